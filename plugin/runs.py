"""FiftyOne run records for fitted experts and scoring runs.

Both are ordinary FiftyOne runs (``dataset.list_runs()``, ``get_run_info``, ``rename_run``,
``delete_run``). Their config classes live under this package's stable import name, so a run recorded in
one process is understood in any other; ``delete_run`` on a scoring run removes every field it wrote and
its heatmap/mask files.

Example:
    >>> dataset.list_runs()
    ['padim_expert', 'padim']
    >>> dataset.get_run_info("padim").config.expert
    'padim'
    >>> dataset.delete_run("padim")   # removes padim, padim_score, padim_map, padim_mask, padim_error...
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import fiftyone.core.runs as fors

from .fields import FieldNames, JudgeFieldNames, VideoFieldNames

logger = logging.getLogger(__name__)

#: suffix of the run key under which a fitted expert is recorded (``fit_expert(key="padim")`` -> ``padim_expert``)
EXPERT_RUN_SUFFIX = "_expert"


def expert_run_key(key: str) -> str:
    """Run key of the expert fitted under ``key``."""
    return key if key.endswith(EXPERT_RUN_SUFFIX) else f"{key}{EXPERT_RUN_SUFFIX}"


def register_expert_run(dataset, run_key: str, config: fors.RunConfig) -> None:
    """Record an expert run under ``run_key``, replacing one that is there.

    The per-group experts the replaced run owned and the new one does not own (a re-fit with other groups,
    or an ungrouped expert under the same key) are deleted, after the new record is in place: a crash
    before that leaves the old expert whole.
    """
    old = _owned_members(dataset.get_run_info(run_key).config) if run_key in dataset.list_runs() else []
    dataset.register_run(run_key, config, overwrite=True, cleanup=False)
    keep = set(_owned_members(config))
    _delete_expert_runs(dataset, [m for m in old if m not in keep])


def _owned_members(config) -> list[str]:
    """The per-group experts a composite expert's run ``config`` fitted for itself (none for others)."""
    return list(getattr(config, "owned_members", None) or [])


def _delete_expert_runs(dataset, keys: list[str]) -> None:
    """Delete the expert runs of ``keys`` that still exist (their cleanup removes their checkpoints)."""
    runs = set(dataset.list_runs())
    for key in keys:
        if expert_run_key(key) in runs:
            dataset.delete_run(expert_run_key(key))


def _remove_owned_dir(path: str | None) -> None:
    if path and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


class ExpertRunConfig(fors.RunConfig):
    """Config of a fitted vision expert (model, checkpoint, weights, calibration); writes no fields.

    Args:
        **kwargs: JSON-serialisable attributes (see :func:`fiftyone_anomaly_vlm.fit_expert`).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("method", "anomalib_expert")
        super().__init__(**kwargs)


class ExpertRun(fors.Run):
    """A fitted expert. Deleting the run deletes the checkpoint folder the plugin created for it, and the
    per-group experts a composite expert fitted for itself (``owned_members``)."""

    def cleanup(self, samples, key):  # noqa: D102 - FiftyOne's docstring applies
        if getattr(self.config, "owns_output_dir", False):
            _remove_owned_dir(getattr(self.config, "output_dir", None))
        _delete_expert_runs(samples._root_dataset, _owned_members(self.config))


class AnomalyScoreRunConfig(fors.RunConfig):
    """Config of a scoring run: which expert scored, where its maps are, the threshold used.

    Args:
        **kwargs: JSON-serialisable attributes (see :func:`fiftyone_anomaly_vlm.score`).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("method", "anomaly_score")
        super().__init__(**kwargs)


class AnomalyScoreRun(fors.Run):
    """A scoring run; its fields are :class:`~fiftyone_anomaly_vlm.fields.FieldNames` of the run key."""

    def get_fields(self, samples, key):  # noqa: D102
        return FieldNames(key).all()

    def rename(self, samples, key, new_key):  # noqa: D102
        dataset = samples._root_dataset
        old, new = FieldNames(key), FieldNames(new_key)
        schema = dataset.get_field_schema()
        pairs = {o: n for o, n in zip(old.all(), new.all()) if o in schema}
        if pairs:
            dataset.rename_sample_fields(pairs)
        if old.mask in dataset.mask_targets:
            dataset.mask_targets[new.mask] = dataset.mask_targets.pop(old.mask)
            dataset.save()

    def cleanup(self, samples, key):  # noqa: D102
        dataset = samples._root_dataset
        schema = dataset.get_field_schema()
        fields = [f for f in FieldNames(key).all() if f in schema]
        if fields:
            dataset.delete_sample_fields(fields)
        mask_field = FieldNames(key).mask
        if mask_field in dataset.mask_targets:
            dataset.mask_targets.pop(mask_field)
            dataset.save()
        # the PNG folders are the run's own; the parent only when the plugin chose it and it is now empty
        for name in ("maps_dir", "masks_dir"):
            _remove_owned_dir(getattr(self.config, name, None))
        out_dir = getattr(self.config, "output_dir", None)
        if getattr(self.config, "owns_output_dir", False) and out_dir and os.path.isdir(out_dir):
            if not os.listdir(out_dir):
                os.rmdir(out_dir)


class AnomalyEvaluationRunConfig(fors.RunConfig):
    """Config of an evaluation of a scoring run against ground truth; holds the metrics.

    Args:
        **kwargs: JSON-serialisable attributes (see :func:`fiftyone_anomaly_vlm.evaluate`): ``run_key``,
            ``gt_field``, ``gt_kind``, ``gt_mask_field``, ``metrics``...
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("method", "anomaly_evaluation")
        super().__init__(**kwargs)


class AnomalyEvaluationRun(fors.Run):
    """An evaluation run; it writes one field, ``<eval_key>`` (TP/FP/FN/TN at the run's threshold)."""

    def get_fields(self, samples, key):  # noqa: D102
        return [key]

    def rename(self, samples, key, new_key):  # noqa: D102
        dataset = samples._root_dataset
        if key in dataset.get_field_schema():
            dataset.rename_sample_field(key, new_key)

    def cleanup(self, samples, key):  # noqa: D102
        dataset = samples._root_dataset
        if key in dataset.get_field_schema():
            dataset.delete_sample_field(key)


def _judge_fields(key: str) -> list[str]:
    return JudgeFieldNames(key).all()


class JudgeRunConfig(fors.RunConfig):
    """Config of a VLM judge run: the backend's description (model, revision; never secrets), the expert
    run used, and every prompt part as used.

    Args:
        **kwargs: JSON-serialisable attributes (see :func:`fiftyone_anomaly_vlm.judge`).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("method", "vlm_judge")
        super().__init__(**kwargs)


class JudgeRun(fors.Run):
    """A VLM judge run; its fields are :class:`~fiftyone_anomaly_vlm.judge.JudgeFieldNames` of the run key."""

    def get_fields(self, samples, key):  # noqa: D102
        return _judge_fields(key)

    def rename(self, samples, key, new_key):  # noqa: D102
        dataset = samples._root_dataset
        schema = dataset.get_field_schema()
        pairs = {o: n for o, n in zip(_judge_fields(key), _judge_fields(new_key)) if o in schema}
        if pairs:
            dataset.rename_sample_fields(pairs)

    def cleanup(self, samples, key):  # noqa: D102
        dataset = samples._root_dataset
        schema = dataset.get_field_schema()
        fields = [f for f in _judge_fields(key) if f in schema]
        if fields:
            dataset.delete_sample_fields(fields)


class VideoAnomalyRunConfig(fors.RunConfig):
    """Config of a video run: expert and/or VLM backend, questions, sampling rate, window, threshold.

    Args:
        **kwargs: JSON-serialisable attributes (see :func:`score_video`).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("method", "video_anomaly")
        super().__init__(**kwargs)


class VideoAnomalyRun(fors.Run):
    """A video run; its fields are :class:`VideoFieldNames` of the run key (frame fields included)."""

    def get_fields(self, samples, key):  # noqa: D102
        return VideoFieldNames(key).all()

    def rename(self, samples, key, new_key):  # noqa: D102
        dataset = samples._root_dataset
        old, new = VideoFieldNames(key), VideoFieldNames(new_key)
        schema, fschema = dataset.get_field_schema(), dataset.get_frame_field_schema() or {}
        pairs = {o: n for o, n in zip(old.sample_fields(), new.sample_fields()) if o in schema}
        if pairs:
            dataset.rename_sample_fields(pairs)
        fpairs = {o: n for o, n in zip(old.frame_fields(), new.frame_fields()) if o in fschema}
        if fpairs:
            dataset.rename_frame_fields(fpairs)

    def cleanup(self, samples, key):  # noqa: D102
        dataset = samples._root_dataset
        f = VideoFieldNames(key)
        schema, fschema = dataset.get_field_schema(), dataset.get_frame_field_schema() or {}
        sample = [n for n in f.sample_fields() if n in schema]
        if sample:
            dataset.delete_sample_fields(sample)
        frames = [n for n in f.frame_fields() if n in fschema]
        if frames:
            dataset.delete_frame_fields(frames)


class QuestionRunConfig(fors.RunConfig):
    """Config of a learned question set: the best questions, their AUROC, every set tried, the settings.

    Args:
        **kwargs: JSON-serialisable attributes (see :func:`learn_questions`).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("method", "vera_questions")
        super().__init__(**kwargs)


class QuestionRun(fors.Run):
    """A learned question set; it writes no fields."""

    def get_fields(self, samples, key):  # noqa: D102
        return []
