"""The record of a scoring run (:func:`fiftyone_anomaly_vlm.score`), and the PNG files it owns.

A run's heatmap and mask PNGs live in ``<output_dir>/maps`` and ``<output_dir>/masks``; every folder the run
has written to is recorded (``output_dirs``), so nothing is lost when a later call scores under another
``output_dir``. A PNG in those folders that no sample's ``<key>_map`` / ``<key>_mask`` references any more
(after ``overwrite``, or re-scoring some samples elsewhere) is removed at the end of the scoring call
(:func:`remove_orphaned_pngs`); ``delete_run`` removes the folders. ``fo.delete_dataset`` runs no run
cleanup: call :func:`fiftyone_anomaly_vlm.delete_dataset` (or ``dataset.delete_runs()`` before deleting it).

Folders are recorded relative to the storage root, and the labels' paths point under the run's ``app_root``
(see :mod:`~fiftyone_anomaly_vlm.storage`): a shard on a machine that mounts the storage elsewhere records the
same folder, and any machine's ``delete_run`` removes it.
"""

from __future__ import annotations

import os
from typing import Any

import fiftyone.core.odm as foo

from ..fields import FieldNames
from ..shards import forget_shards
from ..storage import RootRelativePaths, local_path, stored_path
from .base import SCORE_METHOD, AnomalyRunConfig, FieldsRun, remove_owned_dir


class AnomalyScoreRunConfig(RootRelativePaths, AnomalyRunConfig):
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
        output_dirs: every output folder this run has written to (``output_dir`` last).
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
        min_region_area: the smallest region written to ``<key>_regions``, as a share of the image (0: every
            region; runs of earlier releases load with 0 and have no regions until scored again or
            re-thresholded).
        app_root: the storage root as the App's machine sees it, recorded when the run was first recorded
            (``$FAV_APP_STORAGE_ROOT``, else the recording process's root): the ``map_path`` / ``mask_path`` of the
            labels point under it, whichever worker wrote the PNG (None for runs of earlier releases: their labels
            hold the writing machine's paths).
        **legacy: parameters of earlier releases.

    ``checkpoint``, ``output_dir``, ``maps_dir``, ``masks_dir`` and ``output_dirs`` are recorded relative to the
    storage root and are absolute paths on this machine once loaded (``storage_root``: the root of the process
    that wrote the record).
    """

    METHOD = SCORE_METHOD
    PATH_ATTRS = ("checkpoint", "output_dir", "maps_dir", "masks_dir")
    PATH_LIST_ATTRS = ("output_dirs",)

    def __init__(self, expert: str | None = None, expert_run: str | None = None, expert_fit_id: str | None = None,
                 model: str | None = None, model_class: str | None = None, checkpoint: str | None = None,
                 image_size: list[int] | None = None, output_dir: str | None = None, maps_dir: str | None = None,
                 masks_dir: str | None = None, owns_output_dir: bool = False, heatmap_range: list[int] | None = None,
                 fields: list[str] | None = None, device: str | None = None, batch_size: int | None = None,
                 calibration: dict[str, Any] | None = None, normalized_image_threshold: float = 0.5,
                 normalized_pixel_threshold: float = 0.5, threshold_history: list[dict] | None = None,
                 output_dirs: list[str] | None = None, min_region_area: float = 0.0, app_root: str | None = None,
                 **legacy: Any) -> None:
        self.expert, self.expert_run, self.expert_fit_id = expert, expert_run, expert_fit_id
        self.model, self.model_class, self.checkpoint = model, model_class, checkpoint
        self.image_size = image_size
        self.output_dir, self.maps_dir, self.masks_dir = output_dir, maps_dir, masks_dir
        self.output_dirs = list(output_dirs or [])
        self.owns_output_dir, self.heatmap_range, self.fields = owns_output_dir, heatmap_range, fields
        self.device, self.batch_size, self.calibration = device, batch_size, calibration
        self.normalized_image_threshold = normalized_image_threshold
        self.normalized_pixel_threshold = normalized_pixel_threshold
        self.threshold_history = list(threshold_history or [])
        self.min_region_area, self.app_root = min_region_area, app_root
        super().__init__(**legacy)
        self.resolve_root_paths()
        out = self.output_dir
        self.output_dirs = list(dict.fromkeys(d for d in self.output_dirs if d != out)) + ([out] if out else [])


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
        forget_shards(dataset, key)
        mask_field = FieldNames(key).mask
        if mask_field in dataset.mask_targets:
            dataset.mask_targets.pop(mask_field)
            dataset.save()
        # the PNG folders are the run's own (every one it wrote to); the parent only when the plugin chose it
        # and it is now empty
        for folder in png_dirs(self.config):
            remove_owned_dir(folder)
        out_dir = self.config.output_dir
        if self.config.owns_output_dir and out_dir and os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)


def record_output_dir(dataset, key: str, out_dir: str) -> None:
    """Add ``out_dir`` to the recorded ``output_dirs`` of scoring run ``key`` with one atomic ``$addToSet`` (a
    shard scoring into a folder of its own, while the other shards do the same), so that ``delete_run`` removes
    every shard's PNGs."""
    run_doc = dataset._doc.runs[key]
    foo.get_db_conn().runs.update_one({"_id": run_doc.id}, {"$addToSet": {"config.output_dirs": stored_path(out_dir)}})
    run_doc.reload()


def png_dirs(config: AnomalyScoreRunConfig) -> list[str]:
    """Every folder of heatmap / mask PNGs a scoring run has written to."""
    dirs = [config.maps_dir, config.masks_dir]
    for out_dir in getattr(config, "output_dirs", None) or []:
        dirs += [os.path.join(out_dir, "maps"), os.path.join(out_dir, "masks")]
    return list(dict.fromkeys(d for d in dirs if d))


def remove_orphaned_pngs(dataset, key: str) -> int:
    """Delete the PNGs in run ``key``'s folders that no sample references any more; returns how many.

    ``maps`` / ``masks`` folders of earlier output folders are removed once empty (the folders above them,
    which the user may have chosen, stay).
    """
    config = dataset.get_run_info(key).config
    names = FieldNames(key)
    schema = dataset.get_field_schema()
    used: set[str] = set()
    for field, attr in ((names.map, "map_path"), (names.mask, "mask_path")):
        if field in schema:  # labels point under the run's app_root: where those files are on this machine
            paths = dataset.distinct(f"{field}.{attr}")
            used.update(os.path.realpath(local_path(p, config.app_root)) for p in paths if p)
    removed = 0
    for folder in png_dirs(config):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name.endswith(".png") and os.path.realpath(path) not in used:
                os.remove(path)
                removed += 1
        if folder not in (config.maps_dir, config.masks_dir) and not os.listdir(folder):
            os.rmdir(folder)
    return removed
