"""The record of a fitted expert and how its model is loaded.

An :class:`Expert` is what ``fit_expert`` / ``ensemble_experts`` / ``create_clip_expert`` recorded (run
``<name>_expert``); :meth:`Expert.load` builds its model through the loader of its kind, listed in one explicit
table, :data:`EXPERT_LOADERS` (run method -> loader). A composite expert's loader loads its members by name
through the same table.

Example:
    >>> spec = fav.load_expert(ds, "padim")
    >>> model = spec.load("cpu")          # a VisionExpert: model.predict(images) -> ExpertOutput
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import fiftyone as fo

from ..calibration import Calibration
from ..models import AnomalibExpert, TiledExpert
from ..models.clip_expert import ClipExpert
from ..runs import (CLIP_METHOD, COMPOSITE_METHOD, EXPERT_METHOD, EXPERT_METHODS, expert_run_key, expert_state,
                    runs_of)
from ..native import MAP_MAX_SIDE
from .combined import CompositeExpert, combine_rule


@dataclass(frozen=True)
class Expert:
    """A fitted expert recorded on a dataset.

    Attributes:
        key: the expert's name (``fit_expert(key=...)``); scoring runs default to it.
        run_key: the FiftyOne run holding the record (``<key>_expert``).
        model: anomalib model name.
        model_class: fully qualified anomalib class of the checkpoint.
        checkpoint: path of the saved model ("" for experts that need none, e.g. zero-shot CLIP).
        image_size: ``(height, width)`` the model reads.
        method: the run method, which picks the loader (:data:`EXPERT_LOADERS`).
        options: the rest of the run config, for loaders that need it.
    """

    key: str
    run_key: str
    model: str
    model_class: str
    checkpoint: str
    image_size: tuple[int, int]
    method: str = "anomalib_expert"
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def load(self, device: str | torch.device | None = "auto"):
        """Load the model (a :class:`~fiftyone_anomaly_vlm.models.VisionExpert`) on ``device``."""
        try:
            loader = EXPERT_LOADERS[self.method]
        except KeyError:
            raise ValueError(f"expert {self.key!r} has unknown method {self.method!r}") from None
        return loader(self, device)


def load_anomalib(expert: Expert, device) -> AnomalibExpert | TiledExpert:
    """Load a fitted anomalib model from its checkpoint; a tiled expert (run recorded with ``tile_size``) comes
    back as a :class:`~fiftyone_anomaly_vlm.models.TiledExpert` with its recorded tile settings."""
    model = AnomalibExpert.load(expert.checkpoint, model_class=expert.model_class, image_size=expert.image_size,
                                device=device)
    opts = expert.options
    if opts.get("tile_size") is None:  # runs recorded before tiling have no tile settings: not tiled
        return model
    return TiledExpert(model, opts["tile_size"], opts["tile_stride"], image_score=opts["tile_image_score"],
                       max_map_side=MAP_MAX_SIDE)


def load_clip(expert: Expert, device) -> ClipExpert:
    """Rebuild a :class:`ClipExpert` from its run record (and load its few-shot memory)."""
    opts = expert.options
    model = ClipExpert.from_pretrained(
        expert.model, opts.get("pretrained"), image_size=tuple(expert.image_size),
        object_name=opts.get("object_name", "object"), object_field=opts.get("object_field"),
        description=opts.get("description"), scales=tuple(opts.get("scales", (2, 3))),
        threshold=opts.get("threshold", 0.5), sigma=opts.get("sigma", 4.0), device=device,
    )
    if expert.checkpoint:
        model.load_memory(expert.checkpoint)
    return model


def member_calibration(spec: Expert) -> Calibration | None:
    """The calibration an expert recorded (None for one that calibrates itself)."""
    cal = spec.options.get("calibration")
    return Calibration.from_dict(cal) if cal and "image_scores" in cal else None


def load_composite(expert: Expert, device) -> CompositeExpert:
    """Rebuild a :class:`CompositeExpert` from its run record (its members are loaded by key)."""
    dataset = fo.load_dataset(expert.options["_dataset_name"])
    members: dict[str, list] = {}
    for group, keys in expert.options["members"].items():
        members[group] = []
        for key in keys:
            try:
                spec = load_expert(dataset, key)
            except ValueError:
                raise ValueError(f"expert {expert.key!r} combines expert {key!r}, which no longer exists; "
                                 "fit it again or make a new composite") from None
            members[group].append((spec.load(device=device), member_calibration(spec), tuple(spec.image_size)))
    return CompositeExpert(members, image_size=tuple(expert.image_size), group_field=expert.options.get("group_field"),
                           head=expert.options.get("head"), combine=combine_rule(expert.options.get("combine")),
                           weights=expert.options.get("weights"))


#: run method -> function(Expert, device) returning a VisionExpert
EXPERT_LOADERS: dict[str, Callable[[Expert, Any], Any]] = {
    EXPERT_METHOD: load_anomalib,
    COMPOSITE_METHOD: load_composite,
    CLIP_METHOD: load_clip,
}


def load_expert(samples, key: str) -> Expert:
    """Return the :class:`Expert` recorded under ``key`` (or its run key ``<key>_expert``).

    Raises:
        ValueError: no such expert on the dataset.
        FileNotFoundError: the recorded checkpoint is gone.
    """
    dataset = samples._root_dataset
    run_key = expert_run_key(key)
    if run_key not in dataset.list_runs():
        experts = list_experts(dataset)
        msg = f"no expert named {key!r} on dataset '{dataset.name}'; fitted experts: {', '.join(experts) or 'none'}"
        raise ValueError(msg)
    cfg = dataset.get_run_info(run_key).config
    if cfg.method not in EXPERT_METHODS:
        raise ValueError(f"no expert named {key!r} on dataset '{dataset.name}' (its run key {run_key!r} holds "
                         f"a run of another kind); fitted experts: {', '.join(list_experts(dataset)) or 'none'}")
    checkpoint = cfg.checkpoint or ""
    if checkpoint and not os.path.isfile(checkpoint):
        msg = f"the checkpoint of expert {cfg.expert!r} is missing: {checkpoint} (refit it with fit_expert)"
        raise FileNotFoundError(msg)
    options = {k: v for k, v in cfg.serialize().items() if k not in ("cls", "type", "method")}
    options.update(expert_state(dataset, run_key))
    options["_dataset_name"] = dataset.name  # composite experts load their members from it
    return Expert(key=cfg.expert, run_key=run_key, model=cfg.model, model_class=cfg.model_class or "",
                  checkpoint=checkpoint, image_size=tuple(cfg.image_size), method=cfg.method, options=options)


def list_experts(samples) -> list[str]:
    """Names of the experts fitted on the dataset of ``samples``."""
    dataset = samples._root_dataset
    return [dataset.get_run_info(k).config.expert for k in runs_of(dataset, *EXPERT_METHODS)]


def jsonable(value: Any) -> Any:
    """``value`` with dicts, lists and tuples made JSON-serialisable (other objects as strings)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
