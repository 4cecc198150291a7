"""Change a scoring run's threshold without running the model again.

Example:
    >>> fav.set_threshold(ds, "padim", rule="far", param=0.05)          # 5 % false alarms on good parts
    >>> fav.set_threshold(ds, "padim", rule="f1", gt_field="ground_truth")   # F1-optimal on labelled samples
    >>> ds.get_run_info("padim").config.threshold_history[-1]["rule"]
    'f1'
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image

import fiftyone as fo
import fiftyone.core.utils as fou

from .calibration import Calibration
from .fields import FieldNames, int_spec, label_spec, str_spec
from .runs import SCORE_METHOD, update_run_config
from .images import read_heatmap
from .labels import ANOMALOUS, NORMAL
from .regions import RegionRule, declare_region_attributes, image_size_of
from .scoring import threshold_record
from .storage import local_path
from .writers import declare_fields


def set_threshold(
    samples,
    key: str,
    rule: str = "far",
    param: float | None = None,
    *,
    gt_field: str | None = None,
    positive: str = ANOMALOUS,
    pixel_threshold: float | None = None,
    progress: bool | Any = None,
) -> Calibration:
    """Re-threshold run ``key``: rewrite its labels, masks and regions from the stored scores and heatmaps.

    Only ``<key>`` (labels), the mask PNGs and the region fields (``<key>_regions``, ``<key>_num_regions``,
    ``<key>_explanation``, with the run's ``min_region_area``; a run of an earlier release gains them here)
    change; scores, raw scores, heatmaps and every other field stay as they are. The new rule and thresholds are recorded on the run (``calibration`` and a new
    ``threshold_history`` entry).

    Args:
        samples: the dataset (or a view of it) holding the run.
        key: the scoring run.
        rule: ``"far"``, ``"percentile"``, ``"mean_std"``, ``"value"`` (normal-only rules, on the expert's
            held-out normals), or ``"f1"`` / ``"recall"`` (on the run's samples labelled in ``gt_field``).
        param: the rule's parameter (for ``"value"``: the raw image threshold).
        gt_field: a ``fo.Classification`` ground-truth field, for the labelled rules.
        positive: the ground-truth label meaning anomalous.
        pixel_threshold: an explicit raw pixel threshold (default: from the rule).
        progress: FiftyOne progress convention.

    Returns:
        The run's new :class:`Calibration`.

    Raises:
        ValueError: ``key`` is not a calibrated scoring run, or the rule cannot be applied.
    """
    dataset = samples._root_dataset
    if key not in dataset.list_runs():
        raise ValueError(f"no scoring run {key!r} on dataset '{dataset.name}'")
    config = dataset.get_run_info(key).config
    if config.method != SCORE_METHOD or not config.calibration:
        raise ValueError(f"run {key!r} has no normal-only calibration to re-threshold")
    fields = FieldNames(key)
    old = Calibration.from_dict(config.calibration)
    scored = dataset.exists(fields.raw_score)
    labels = scores = None
    if rule in ("f1", "recall"):
        if not gt_field:
            raise ValueError(f"rule {rule!r} needs gt_field, a ground-truth classification field")
        labelled = scored.exists(gt_field)
        scores, gts = labelled.values([fields.raw_score, f"{gt_field}.label"])
        labels = np.array([g == positive for g in gts])
    new = old.with_threshold(rule, param, scores=scores, labels=labels, pixel_threshold=pixel_threshold)

    ids, raw, norm, mask_paths, map_paths, filepaths = scored.values(
        ["id", fields.raw_score, fields.score, f"{fields.mask}.mask_path", f"{fields.map}.map_path", "filepath"])
    new_labels, anomalous = {}, {}
    for sid, r, s in zip(ids, raw, norm):
        anomalous[sid] = bool(r > new.image_threshold)
        new_labels[sid] = fo.Classification(label=ANOMALOUS if anomalous[sid] else NORMAL,
                                            confidence=s if anomalous[sid] else 1.0 - s, anomaly_score=s)
    declare_fields(dataset, [label_spec(fields.regions, fo.Detections), int_spec(fields.num_regions),
                             str_spec(fields.explanation)])
    declare_region_attributes(dataset, fields.regions)
    rule = RegionRule.of(new, config.min_region_area)
    region_values: dict[str, dict[str, Any]] = {fields.regions: {}, fields.num_regions: {}, fields.explanation: {}}
    with fou.ProgressBar(total=len(ids), progress=progress) as pb:
        for sid, s, map_path, mask_path, filepath in pb(zip(ids, norm, map_paths, mask_paths, filepaths)):
            # the labels point under the run's app_root: the same files on this machine
            map_path, mask_path = local_path(map_path, config.app_root), local_path(mask_path, config.app_root)
            if map_path and mask_path and os.path.isfile(map_path):
                heatmap = read_heatmap(map_path)
                mask = heatmap > new.normalized_pixel_threshold
                Image.fromarray(mask.astype(np.uint8)).save(mask_path)
                for name, value in zip(region_values, rule.values(heatmap, mask, image_size_of(filepath),
                                                                  anomalous=anomalous[sid], score=s)):
                    region_values[name][sid] = value
    dataset.set_values(fields.label, new_labels, key_field="id")
    for name, values in region_values.items():
        if values:
            dataset.set_values(name, values, key_field="id")

    history = json.loads(json.dumps(list(config.threshold_history)))
    history.append(threshold_record(new, source="set_threshold", gt_field=gt_field))
    update_run_config(dataset, key, calibration=new.to_dict(), threshold_history=history, fields=fields.all(),
                      normalized_image_threshold=new.normalized_image_threshold,
                      normalized_pixel_threshold=new.normalized_pixel_threshold)
    return new
