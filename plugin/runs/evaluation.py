"""The record of an evaluation against ground truth (:func:`fiftyone_anomaly_vlm.evaluate`)."""

from __future__ import annotations

from typing import Any

import fiftyone.core.runs as fors

from .base import EVALUATION_METHOD, AnomalyRunConfig


class AnomalyEvaluationRunConfig(AnomalyRunConfig):
    """Config of an evaluation of a scoring run; holds the metrics (curves are in its results).

    Args:
        run_key: the evaluated run.
        score_field: the score field evaluated.
        label_field: the verdict field compared (None: scores only).
        map_field: the heatmap field (pixel metrics).
        gt_field: the ground-truth field.
        gt_kind: how the ground truth reads (label, probability, mask...).
        positive: the label meaning anomalous.
        gt_threshold: for a probability ground truth, above it is anomalous.
        gt_mask_field: ground-truth masks.
        pixel_resize: how masks were resized.
        run_threshold: the run's threshold when evaluated.
        metrics: the numbers.
        exclude_fit_samples: the samples the run's expert was fitted on were left out (None: recorded before
            this option existed, when nothing was left out).
        num_fit_samples_excluded: how many scored samples with ground truth were left out for that.
        fit_experts: the experts whose fitted samples were looked up.
        fit_samples_unknown: those whose fitted samples were not recorded (nothing of theirs left out).
        **legacy: parameters of earlier releases (and any other recorded detail).
    """

    METHOD = EVALUATION_METHOD

    def __init__(self, run_key: str | None = None, score_field: str | None = None, label_field: str | None = None,
                 map_field: str | None = None, gt_field: str | None = None, gt_kind: str | None = None,
                 positive: str | None = None, gt_threshold: float | None = None, gt_mask_field: str | None = None,
                 pixel_resize: str | None = None, run_threshold: float | None = None,
                 metrics: dict[str, Any] | None = None, exclude_fit_samples: bool | None = None,
                 num_fit_samples_excluded: int = 0, fit_experts: list[str] | None = None,
                 fit_samples_unknown: list[str] | None = None, **legacy: Any) -> None:
        self.run_key, self.score_field, self.label_field, self.map_field = run_key, score_field, label_field, map_field
        self.gt_field, self.gt_kind, self.positive, self.gt_threshold = gt_field, gt_kind, positive, gt_threshold
        self.gt_mask_field, self.pixel_resize, self.run_threshold = gt_mask_field, pixel_resize, run_threshold
        self.metrics = dict(metrics or {})
        self.exclude_fit_samples, self.num_fit_samples_excluded = exclude_fit_samples, num_fit_samples_excluded
        self.fit_experts, self.fit_samples_unknown = list(fit_experts or []), list(fit_samples_unknown or [])
        super().__init__(**legacy)


class AnomalyEvaluationRun(fors.Run):
    """An evaluation run; it writes one field, ``<eval_key>`` (TP/FP/FN/TN at the run's threshold)."""

    def get_fields(self, samples, key):  # noqa: D102 - FiftyOne's docstring applies
        return [key]

    def rename(self, samples, key, new_key):  # noqa: D102
        dataset = samples._root_dataset
        if key in dataset.get_field_schema():
            dataset.rename_sample_field(key, new_key)

    def cleanup(self, samples, key):  # noqa: D102
        dataset = samples._root_dataset
        if key in dataset.get_field_schema():
            dataset.delete_sample_field(key)
