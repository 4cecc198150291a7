"""FiftyOne plugin entry point (``py_entry`` in fiftyone.yml).

FiftyOne imports this file under a synthetic module name, so everything else is imported through the
stable package name ``fiftyone_anomaly_vlm``: installed with ``pip install -e .`` or, when the plugin
folder was only copied into the plugins directory, mapped onto this checkout below.
"""

import importlib.util
import os
import sys


def _ensure_package() -> None:
    if importlib.util.find_spec("fiftyone_anomaly_vlm") is not None:
        return
    root = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "fiftyone_anomaly_vlm", os.path.join(root, "plugin", "__init__.py"),
        submodule_search_locations=[os.path.join(root, "plugin"), root],  # core + models/operators/panels
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fiftyone_anomaly_vlm"] = module
    spec.loader.exec_module(module)


def _unshadow_lightning() -> None:
    """Let ``import lightning`` find the real package inside the App server.

    The App server runs ``fiftyone/server/main.py`` as a script, which puts ``fiftyone/server`` (holding a
    ``lightning.py`` module) first on ``sys.path``; anomalib's ``import lightning.pytorch`` then fails and the
    plugin cannot register. Moving that folder to the end of the path keeps every module importable.
    """
    shadowing = [p for p in sys.path if os.path.isfile(os.path.join(p or os.getcwd(), "lightning.py"))
                 and os.path.basename(os.path.normpath(os.path.abspath(p or os.getcwd()))) == "server"]
    for entry in shadowing:
        sys.path.remove(entry)
        sys.path.append(entry)
    module = sys.modules.get("lightning")
    if shadowing and module is not None and not hasattr(module, "__path__"):
        del sys.modules["lightning"]


def register(p):
    """Register the plugin's operators and panels."""
    _unshadow_lightning()
    _ensure_package()
    from fiftyone_anomaly_vlm.console import quiet_third_party

    quiet_third_party()  # the App and delegated workers: no third-party deprecation/tip noise in their logs
    from fiftyone_anomaly_vlm.operators import register as register_operators

    register_operators(p)
    from fiftyone_anomaly_vlm.panels import register as register_panels

    register_panels(p)
