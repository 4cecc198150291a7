"""Ground truth, heatmaps and masks read as arrays for :func:`~.evaluation.evaluate`, and label accuracy.

Ground truth may be a ``fo.Classification`` (``label == positive``), a string (``== positive``), a boolean
(True = anomalous), a number such as a defect probability (``> gt_threshold``), or a ``fo.Segmentation``
mask (any foreground pixel = anomalous; a sample without a mask is normal). :func:`pixel_pass` reads a
run's heatmaps and the masks once, brought to one size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import fiftyone as fo
import fiftyone.core.utils as fou

#: default heatmap range of a scoring run (16-bit PNGs)
_DEFAULT_RANGE = (0, 65535)


def field_kind(dataset, field: str, what: str) -> str:
    """What ``field`` holds: ``"classification"``, ``"mask"``, ``"boolean"``, ``"probability"`` or ``"string"``.

    Raises:
        ValueError: no such field, or one of another type (``what`` names its role in the message).
    """
    schema = dataset.get_field_schema()
    if field not in schema:
        candidates = sorted(schema)
        raise ValueError(f"unknown {what} field {field!r}; the dataset's fields are {candidates}")
    f = schema[field]
    if isinstance(f, fo.EmbeddedDocumentField):
        if issubclass(f.document_type, fo.Classification):
            return "classification"
        if issubclass(f.document_type, fo.Segmentation):
            return "mask"
        raise ValueError(f"{what} field {field!r} holds {f.document_type.__name__}; expected a Classification, "
                         "a Segmentation mask, a number, a string or a boolean")
    if isinstance(f, fo.BooleanField):
        return "boolean"
    if isinstance(f, (fo.FloatField, fo.IntField)):
        return "probability"
    if isinstance(f, fo.StringField):
        return "string"
    raise ValueError(f"{what} field {field!r} is a {type(f).__name__}; expected a Classification, a Segmentation "
                     "mask, a number, a string or a boolean")


def read_mask(seg) -> np.ndarray | None:
    """A ``fo.Segmentation``'s mask as a boolean array (any nonzero pixel/channel), or None."""
    if seg is None:
        return None
    mask = seg.get_mask()
    if mask is None:
        return None
    mask = np.asarray(mask)
    return mask.any(axis=-1) if mask.ndim == 3 else mask != 0


def gt_labels(kind: str, values: list, positive: str, gt_threshold: float) -> np.ndarray:
    """Per sample, whether its ground truth (of :func:`field_kind` ``kind``) says anomalous."""
    if kind == "classification":
        return np.array([v == positive for v in values], dtype=bool)
    if kind == "string":
        return np.array([v == positive for v in values], dtype=bool)
    if kind == "boolean":
        return np.array([bool(v) for v in values], dtype=bool)
    if kind == "probability":
        return np.array([float(v) > gt_threshold for v in values], dtype=bool)
    raise AssertionError(kind)


def read_map(heatmap, default_range) -> np.ndarray:
    """A ``fo.Heatmap``'s map as float32 in its range scaled to ``[0, 1]`` (``default_range`` when unset)."""
    arr = np.asarray(heatmap.get_map(), dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., 0]
    lo, hi = heatmap.range or default_range
    return (arr - lo) / float(hi - lo) if hi > lo else arr


def resize_array(arr: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """``arr`` (2-D) at ``size`` with torch's ``"bilinear"`` or ``"nearest"`` interpolation."""
    if arr.shape == size:
        return arr
    t = torch.as_tensor(np.ascontiguousarray(arr), dtype=torch.float32)[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return torch.nn.functional.interpolate(t, size=size, mode=mode, **kwargs)[0, 0].numpy()


def pixel_pass(view, ids, map_field: str | None, mask_field: str | None, gt_mask_kind_field: str | None, progress):
    """Read maps and masks once: (image-level truth from masks or None, (maps, masks) or None)."""
    read_fields = [f for f in {mask_field, gt_mask_kind_field} if f]
    want_pixels = mask_field is not None
    if want_pixels and (map_field is None or map_field not in view._root_dataset.get_field_schema()):
        raise ValueError(f"the run has no heatmap field ({map_field!r}): pixel metrics need one")
    cols = view.values(["id", *read_fields] + ([map_field] if want_pixels else []))
    by_id = {row[0]: row[1:] for row in zip(*cols)}
    image_truth, maps, masks, size = [], [], [], None
    default_range = _DEFAULT_RANGE
    with fou.ProgressBar(total=len(ids), progress=progress) as pb:
        for sid in ids:
            row = dict(zip(read_fields + ([map_field] if want_pixels else []), by_id[sid]))
            if gt_mask_kind_field:
                m = read_mask(row[gt_mask_kind_field])
                image_truth.append(bool(m is not None and m.any()))
            if want_pixels:
                heatmap = row[map_field]
                if heatmap is None:
                    raise ValueError(f"sample {sid} has a score but no heatmap in {map_field!r}")
                amap = read_map(heatmap, default_range)
                size = size or amap.shape
                amap = resize_array(amap, size, "bilinear")  # only when a run's maps differ in size
                gt = read_mask(row[mask_field])
                gt = np.zeros(size, bool) if gt is None else resize_array(gt.astype(np.float32), size, "nearest") > 0.5
                maps.append(amap)
                masks.append(gt.astype(np.uint8))
            pb.update()
    truth = np.array(image_truth, dtype=bool) if gt_mask_kind_field else None
    return truth, ((np.stack(maps), np.stack(masks)) if want_pixels else None)


def label_path(dataset, field: str) -> str:
    """The path of ``field``'s label values (``<field>.label`` for a classification)."""
    kind = field_kind(dataset, field, "label")
    if kind == "classification":
        return f"{field}.label"
    if kind in ("string", "boolean"):
        return field
    raise ValueError(f"label field {field!r} must be a Classification, string or boolean field, not {kind}")


def label_accuracy(samples, pred_field: str, gt_field: str) -> dict[str, Any]:
    """Accuracy of predicted labels against ground-truth labels: VLM verdicts, or defect types.

    This is the extension point for judge runs: pass the verdict field (normal/anomalous) and the
    ground-truth classification for verdict accuracy, or a predicted and a true defect-type field
    (on a view of the defective samples) for defect-type accuracy. Samples missing either label are left out.

    Args:
        samples: a dataset or view.
        pred_field: predicted labels (``fo.Classification``, string or boolean field).
        gt_field: true labels (``fo.Classification``, string or boolean field).

    Returns:
        ``accuracy``, ``num_samples``, ``num_correct``, ``num_missing`` (samples left out) and ``per_label``:
        ``{true label: {"support", "correct", "accuracy"}}`` (the recall of each true label).

    Raises:
        ValueError: unknown or unsuitable field, or no sample with both labels.
    """
    dataset = samples._root_dataset
    pred_path, gt_path = label_path(dataset, pred_field), label_path(dataset, gt_field)
    preds, gts = samples.values([pred_path, gt_path])
    pairs = [(p, g) for p, g in zip(preds, gts) if p is not None and g is not None]
    if not pairs:
        raise ValueError(f"no sample has both {pred_field!r} and {gt_field!r}")
    per_label: dict[str, dict[str, Any]] = {}
    for p, g in pairs:
        row = per_label.setdefault(str(g), {"support": 0, "correct": 0})
        row["support"] += 1
        row["correct"] += int(p == g)
    for row in per_label.values():
        row["accuracy"] = row["correct"] / row["support"]
    correct = sum(r["correct"] for r in per_label.values())
    return {"accuracy": correct / len(pairs), "num_samples": len(pairs), "num_correct": correct,
            "num_missing": len(preds) - len(pairs), "per_label": dict(sorted(per_label.items()))}
