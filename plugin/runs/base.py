"""What every run record of the plugin shares: a typed config base, field clean-up, the one way to change a
recorded config, and finding runs by kind.

A run kind is its ``method`` (``"anomaly_score"``, ``"vlm_judge"``...): runs are found with
``dataset.list_runs(method=...)`` (:func:`runs_of`), never by class checks or key suffixes. Configs are
typed (named, documented parameters); parameters recorded by earlier releases that a class no longer names
are kept as attributes, so every stored run still loads.

Example:
    >>> runs_of(dataset, SCORE_METHOD)
    ['padim']
    >>> update_run_config(dataset, "padim", threshold_history=[...])
"""

from __future__ import annotations

import os
import shutil
from typing import Any, ClassVar

import fiftyone.core.runs as fors

from ..fields import RunFieldNames
from ..shards import forget_shards
from ..writers import remove_colorscales

EXPERT_METHOD = "anomalib_expert"
COMPOSITE_METHOD = "composite_expert"
CLIP_METHOD = "winclip"
#: every method an expert run can have
EXPERT_METHODS = (EXPERT_METHOD, COMPOSITE_METHOD, CLIP_METHOD)
SCORE_METHOD = "anomaly_score"
JUDGE_METHOD = "vlm_judge"
VIDEO_METHOD = "video_anomaly"
QUESTIONS_METHOD = "vera_questions"
EVALUATION_METHOD = "anomaly_evaluation"


class AnomalyRunConfig(fors.RunConfig):
    """Base of the plugin's run configs: subclasses name their parameters; the method is the kind.

    Args:
        method: the run kind (default: the class's :attr:`METHOD`).
        **legacy: parameters recorded by an earlier release that the class no longer names (kept as
            attributes, so old runs load and list).
    """

    METHOD: ClassVar[str] = ""

    def __init__(self, method: str | None = None, **legacy: Any) -> None:
        super().__init__(method=method or self.METHOD, **legacy)


def runs_of(samples, *methods: str) -> list[str]:
    """Keys of the runs of ``samples``' dataset whose method is one of ``methods``, sorted."""
    dataset = samples._root_dataset
    return sorted({k for m in methods for k in dataset.list_runs(method=m)})


def run_method(samples, key: str) -> str | None:
    """The method (kind) of run ``key``, or None when there is no such run."""
    dataset = samples._root_dataset
    return dataset.get_run_info(key).config.method if key in dataset.list_runs() else None


def recorded_config(samples, key: str):
    """Run ``key``'s config, or None for a run whose config class cannot be imported (not ours)."""
    try:
        return samples._root_dataset.get_run_info(key).config
    except Exception:  # noqa: BLE001 - another plugin's run whose class is not installed here
        return None


def run_owned_fields(samples) -> set[str]:
    """Every field a recorded run wrote (each run's key and the ``fields`` its config lists): never ground truth."""
    dataset = samples._root_dataset
    owned = set(dataset.list_runs())
    for key in owned.copy():
        owned.update(getattr(recorded_config(dataset, key), "fields", None) or [])
    return owned


def update_run_config(samples, key: str, **changes: Any) -> AnomalyRunConfig:
    """The one way to change a recorded run's config after registration (thresholds, review history):
    loads it, sets ``changes`` and stores it with ``update_run_config``.

    Raises:
        ValueError: a change names a parameter the config does not have.
    """
    dataset = samples._root_dataset
    config = dataset.get_run_info(key).config
    unknown = [name for name in changes if not hasattr(config, name) and name not in _UPDATABLE]
    if unknown:
        raise ValueError(f"run {key!r} has no parameters {unknown}")
    for name, value in changes.items():
        setattr(config, name, value)
    dataset.update_run_config(key, config)
    return config


#: parameters that runs recorded before they existed may gain later
_UPDATABLE = ("threshold_history", "review_thresholds", "calibration", "normalized_image_threshold",
              "normalized_pixel_threshold")


def remove_owned_dir(path: str | None) -> None:
    """Delete the folder ``path`` (the run's own) when it exists."""
    if path and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


class FieldsRun(fors.Run):
    """A run whose fields are a :class:`~fiftyone_anomaly_vlm.fields.RunFieldNames` of its key (sample and
    frame fields): listed, renamed and deleted with the run."""

    FIELD_NAMES: ClassVar[type[RunFieldNames]]

    def get_fields(self, samples, key):  # noqa: D102 - FiftyOne's docstring applies
        return self.FIELD_NAMES(key).all()

    def rename(self, samples, key, new_key):  # noqa: D102
        dataset = samples._root_dataset
        old, new = self.FIELD_NAMES(key).specs(), self.FIELD_NAMES(new_key).specs()
        schema = dataset.get_field_schema()
        pairs = {o.name: n.name for o, n in zip(old, new) if not o.frame and o.name in schema}
        if pairs:
            dataset.rename_sample_fields(pairs)
        if dataset._has_frame_fields():
            fschema = dataset.get_frame_field_schema() or {}
            fpairs = {o.name: n.name for o, n in zip(old, new) if o.frame and o.name in fschema}
            if fpairs:
                dataset.rename_frame_fields(fpairs)

    def cleanup(self, samples, key):  # noqa: D102
        dataset = samples._root_dataset
        forget_shards(dataset, key)  # a run split into shards: its ledger
        specs = self.FIELD_NAMES(key).specs()
        schema = dataset.get_field_schema()
        sample = list(dict.fromkeys(s.name for s in specs if not s.frame and s.name in schema))
        if sample:
            dataset.delete_sample_fields(sample)
        remove_colorscales(dataset, [s.path for s in specs if s.colorscale])
        if dataset._has_frame_fields():
            fschema = dataset.get_frame_field_schema() or {}
            frames = list(dict.fromkeys(s.name for s in specs if s.frame and s.name in fschema))
            if frames:
                dataset.delete_frame_fields(frames)
