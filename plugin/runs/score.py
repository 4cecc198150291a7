"""The record of a scoring run (:func:`fiftyone_anomaly_vlm.score`)."""

from __future__ import annotations

import os
from typing import Any

from ..fields import FieldNames
from .base import SCORE_METHOD, AnomalyRunConfig, FieldsRun, remove_owned_dir


class AnomalyScoreRunConfig(AnomalyRunConfig):
    """Config of a scoring run: which expert (and which fit of it) scored, where its maps are, the threshold.

    Args:
        expert: the expert's name.
        expert_run: the expert's run key (``<expert>_expert``).
        expert_fit_id: the expert fit that wrote the scores (None for runs of earlier releases: the
            checkpoint path stands for it).
        model: the anomalib model name (or the expert's kind).
        model_class: the model's class path.
        checkpoint: the expert's checkpoint file.
        image_size: model input ``[height, width]``.
        output_dir: folder of the heatmap/mask PNGs; ``maps_dir``/``masks_dir`` below it.
        maps_dir: heatmap PNGs.
        masks_dir: mask PNGs.
        owns_output_dir: the plugin chose ``output_dir`` (it is removed with the run when empty).
        heatmap_range: the ``fo.Heatmap`` range of every map.
        fields: the fields written.
        device: where the model ran.
        batch_size: images per forward pass.
        calibration: the calibration in use (:class:`~fiftyone_anomaly_vlm.calibration.Calibration` dict).
        normalized_image_threshold: the image threshold on the calibrated score scale.
        normalized_pixel_threshold: the pixel threshold on the heatmap scale.
        threshold_history: every threshold change (rule, parameter, thresholds, time, source).
        **legacy: parameters of earlier releases.
    """

    METHOD = SCORE_METHOD

    def __init__(self, expert: str | None = None, expert_run: str | None = None, expert_fit_id: str | None = None,
                 model: str | None = None, model_class: str | None = None, checkpoint: str | None = None,
                 image_size: list[int] | None = None, output_dir: str | None = None, maps_dir: str | None = None,
                 masks_dir: str | None = None, owns_output_dir: bool = False, heatmap_range: list[int] | None = None,
                 fields: list[str] | None = None, device: str | None = None, batch_size: int | None = None,
                 calibration: dict[str, Any] | None = None, normalized_image_threshold: float = 0.5,
                 normalized_pixel_threshold: float = 0.5, threshold_history: list[dict] | None = None,
                 **legacy: Any) -> None:
        self.expert, self.expert_run, self.expert_fit_id = expert, expert_run, expert_fit_id
        self.model, self.model_class, self.checkpoint = model, model_class, checkpoint
        self.image_size = image_size
        self.output_dir, self.maps_dir, self.masks_dir = output_dir, maps_dir, masks_dir
        self.owns_output_dir, self.heatmap_range, self.fields = owns_output_dir, heatmap_range, fields
        self.device, self.batch_size, self.calibration = device, batch_size, calibration
        self.normalized_image_threshold = normalized_image_threshold
        self.normalized_pixel_threshold = normalized_pixel_threshold
        self.threshold_history = list(threshold_history or [])
        super().__init__(**legacy)


class AnomalyScoreRun(FieldsRun):
    """A scoring run; its fields are :class:`~fiftyone_anomaly_vlm.fields.FieldNames` of the run key.
    Deleting it deletes the fields, the mask targets and the heatmap/mask PNG folders."""

    FIELD_NAMES = FieldNames

    def rename(self, samples, key, new_key):  # noqa: D102 - FiftyOne's docstring applies
        super().rename(samples, key, new_key)
        dataset = samples._root_dataset
        old, new = FieldNames(key), FieldNames(new_key)
        if old.mask in dataset.mask_targets:
            dataset.mask_targets[new.mask] = dataset.mask_targets.pop(old.mask)
            dataset.save()

    def cleanup(self, samples, key):  # noqa: D102
        super().cleanup(samples, key)
        dataset = samples._root_dataset
        mask_field = FieldNames(key).mask
        if mask_field in dataset.mask_targets:
            dataset.mask_targets.pop(mask_field)
            dataset.save()
        # the PNG folders are the run's own; the parent only when the plugin chose it and it is now empty
        remove_owned_dir(self.config.maps_dir)
        remove_owned_dir(self.config.masks_dir)
        out_dir = self.config.output_dir
        if self.config.owns_output_dir and out_dir and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
