"""The candidates :func:`~fiftyone_anomaly_vlm.select_experts` fits: the default ("auto") set and the forms a
user may give them in (model names, dicts, :class:`Candidate` objects).

Example:
    >>> [c.name for c in auto_candidates(128, None, num_train=40)]
    ['padim_128', 'padim_64', 'patchcore_128', 'dfm_128', 'dfkde_128', 'texture_128', 'texture_deep_128']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._common import check_key
from ..models import backbones as fbb
from ..models.anomalib_build import available_models, name_key


@dataclass
class Candidate:
    """One candidate expert: an anomalib model (or the plugin's texture model) at a size, with its options.

    Attributes:
        name: its name in the table; fitted as the expert ``<key>__<name>``.
        model: the model name (``"padim"``, ``"dfm"``, ``"texturestats"``...).
        image_size: the side it reads.
        model_kwargs: other arguments of the model class (``{"layers": [...]}``...).
    """

    name: str
    model: str
    image_size: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The candidate's identity as a table row starts."""
        return {"candidate": self.name, "model": self.model, "image_size": self.image_size,
                "model_kwargs": dict(self.model_kwargs)}


def auto_candidates(image_size: int, backbone: str | None, num_train: int) -> list[Candidate]:
    """The default candidate set: patch models (PaDiM at two sizes, PatchCore) and global ones (DFM, DFKDE,
    the texture-statistics expert on two layer pairs); DFKDE's PCA is sized to the training images."""
    bb = backbone or fbb.default_offline_backbone() or "resnet18"
    lite = bb.startswith("tf_efficientnet_lite")
    shallow, deep = (["blocks.2", "blocks.4"], ["blocks.4", "blocks.6"]) if lite else (
        ["layer2", "layer3"], ["layer3", "layer4"])
    half = max(32, image_size // 2)
    pca = max(2, min(16, num_train - 1))
    pool = max(1, min(4, image_size // 32))  # DFM pools its stride-16 layer: at most half the map's side
    return [
        Candidate(f"padim_{image_size}", "padim", image_size),
        Candidate(f"padim_{half}", "padim", half),
        Candidate(f"patchcore_{image_size}", "patchcore", image_size, {"coreset_sampling_ratio": 0.1}),
        Candidate(f"dfm_{image_size}", "dfm", image_size, {"pooling_kernel_size": pool}),
        Candidate(f"dfkde_{image_size}", "dfkde", image_size, {"n_pca_components": pca}),
        Candidate(f"texture_{image_size}", "texturestats", image_size, {"layers": shallow}),
        Candidate(f"texture_deep_{image_size}", "texturestats", image_size, {"layers": deep}),
    ]


def resolve_candidates(candidates, image_size: int, backbone: str | None, num_train: int) -> list[Candidate]:
    """``candidates`` as :class:`Candidate` objects (``"auto"``: :func:`auto_candidates`).

    Raises:
        ValueError: an empty or malformed list, an unknown model, a bad or repeated name.
    """
    if candidates == "auto":
        return auto_candidates(image_size, backbone, num_train)
    if isinstance(candidates, (str, dict, Candidate)) or not isinstance(candidates, Sequence) or not candidates:
        raise ValueError('candidates must be "auto" or a non-empty list of model names, dicts or Candidates')
    known = set(available_models())
    out: list[Candidate] = []
    for c in candidates:
        if isinstance(c, str):
            c = Candidate(f"{name_key(c)}_{image_size}", c, image_size)
        elif isinstance(c, dict):
            c = Candidate(name=c.get("name") or f"{name_key(c['model'])}_{c.get('image_size', image_size)}",
                          model=c["model"], image_size=int(c.get("image_size", image_size)),
                          model_kwargs=dict(c.get("model_kwargs") or {}))
        if not isinstance(c, Candidate):
            raise ValueError(f"a candidate must be a model name, a dict or a Candidate, got {c!r}")
        if name_key(c.model) not in known:
            raise ValueError(f"candidate {c.name!r}: unknown model {c.model!r}; available: {', '.join(sorted(known))}")
        check_key(c.name)
        out.append(c)
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must differ, got {names}")
    return out
