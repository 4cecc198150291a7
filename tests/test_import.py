"""Importing the package and registering the plugin load no heavy model library.

The App imports the plugin at start-up, so anomalib, Lightning, transformers and open_clip must load only
when a model is built. Each check runs in a fresh interpreter (this one already imported them for other
tests); it looks at ``sys.modules``, not at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap

import pytest

HEAVY = ("anomalib", "lightning", "transformers", "open_clip")

# what the App does at start-up (conftest points FIFTYONE_PLUGINS_DIR at a folder linking to this checkout)
_REGISTER = """
import fiftyone.plugins as fop
import fiftyone.plugins.context as fopc

context = fopc.PluginContext(fop.get_plugin("@anomaly-vlm/anomaly-vlm"))
context.register_all()
assert not context.errors and len(context.instances) >= 2, (context.errors, context.instances)
"""


def _heavy_after(code: str) -> list[str]:
    script = (f"import json, sys\n{textwrap.dedent(code)}\n"
              f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
    # run outside the checkout, so its folders (models/, plugin/...) cannot shadow anything
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import fiftyone_anomaly_vlm",
        "import fiftyone_anomaly_vlm as fav\nfrom fiftyone_anomaly_vlm.models import AnomalibExpert, ClipExpert\n"
        "from fiftyone_anomaly_vlm.models.judge import make_backend\nfav.available_models",
        _REGISTER,
    ],
    ids=["package", "models", "plugin-registration"],
)
def test_import_loads_no_heavy_library(code):
    assert _heavy_after(code) == []


def test_building_a_model_still_loads_anomalib():
    """The lazy path is the real one: listing models imports anomalib, and the EfficientAD subclass resolves."""
    code = """
    from fiftyone_anomaly_vlm.models import anomalib_expert as ae
    assert "efficientad" in ae.available_models()
    from fiftyone_anomaly_vlm.models.anomalib_expert import OfflineEfficientAd
    from anomalib.models import EfficientAd
    assert issubclass(OfflineEfficientAd, EfficientAd) and ae.OfflineEfficientAd is OfflineEfficientAd
    assert f"{OfflineEfficientAd.__module__}.{OfflineEfficientAd.__qualname__}" == \\
        "fiftyone_anomaly_vlm.models.anomalib_expert.OfflineEfficientAd"
    """
    assert "anomalib" in _heavy_after(code)
