"""Image-level metrics of a scoring run against ground truth, computed with anomalib's metrics.

Example:
    >>> fav.image_metrics(ds, "padim", gt_field="ground_truth")
    {'auroc': 0.97, 'ap': 0.95, 'f1_max': 0.91, 'num_samples': 120, 'num_anomalous': 40}
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from .fields import FieldNames


def _unit(values) -> tuple[torch.Tensor, float, float]:
    """Scores min-max scaled into [0, 1] (float32), with ``(lo, span)`` to map thresholds back.

    torchmetrics treats float predictions outside [0, 1] as logits and applies a sigmoid, which saturates
    large raw scores (e.g. PaDiM distances of 20 and 30 both become 1.0) into false ties. Scaling is
    monotone, so every rank metric is unchanged.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size and not np.all(np.isfinite(v)):
        raise ValueError("scores contain NaN or infinite values")
    lo = float(v.min()) if v.size else 0.0
    span = float(v.max()) - lo if v.size else 0.0
    if v.size and (lo < 0.0 or lo + span > 1.0):
        v = (v - lo) / span if span > 0 else np.zeros_like(v)
    else:
        lo, span = 0.0, 1.0
    return torch.as_tensor(v.astype(np.float32)), lo, span


def binary_image_metrics(scores, labels) -> dict[str, float]:
    """AUROC, AP (anomalib ``AUPR``) and F1-max (anomalib ``F1Max``) of image scores.

    Args:
        scores: image anomaly scores (higher = more anomalous).
        labels: ground truth, 1/True = anomalous.

    Raises:
        ValueError: lengths differ, or only one class is present (the metrics are undefined then).
    """
    from anomalib.metrics import AUPR, AUROC, F1Max

    s, _, _ = _unit(scores)
    y = torch.as_tensor(np.asarray(labels, dtype=bool)).long()
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores but {len(y)} labels")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(f"metrics need both classes; got {n_pos} anomalous of {len(y)} samples")
    batch = SimpleNamespace(pred_score=s, gt_label=y)
    out = {}
    for name, metric in (("auroc", AUROC), ("ap", AUPR), ("f1_max", F1Max)):
        m = metric(fields=["pred_score", "gt_label"])
        m.update(batch)
        out[name] = float(m.compute())
    out["num_samples"] = len(y)
    out["num_anomalous"] = n_pos
    return out


def auroc(scores, labels) -> float | None:
    """Image AUROC with anomalib's metric; None when ``labels`` hold one class. Non-finite scores are left out."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    ok = np.isfinite(s)
    if len(np.unique(y[ok])) < 2:
        return None
    from anomalib.metrics import AUROC  # heavy: loaded when a metric is computed

    metric = AUROC(fields=["pred_score", "gt_label"])
    metric.update(SimpleNamespace(pred_score=_unit(s[ok])[0], gt_label=torch.as_tensor(y[ok]).long()))
    return float(metric.compute())


def image_metrics(samples, key: str, gt_field: str = "ground_truth", positive: str = "anomalous") -> dict[str, float]:
    """Metrics of run ``key``'s image scores on the samples that have a score and a ground-truth label.

    Args:
        samples: dataset or view.
        key: scoring run key (reads ``<key>_score``).
        gt_field: a ``fo.Classification`` field with the ground truth.
        positive: the ground-truth label that means anomalous.
    """
    score_field = FieldNames(key).score
    view = samples.exists(score_field).exists(gt_field)
    scores, gts = view.values([score_field, f"{gt_field}.label"])
    return binary_image_metrics(scores, [g == positive for g in gts])


def _check_two_classes(y: torch.Tensor, what: str) -> int:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.numel():
        kind = "anomalous" if n_pos else "normal"
        msg = (f"{what} metrics need both normal and anomalous ground truth, but all {y.numel()} "
               f"{'pixels' if what == 'pixel' else 'samples'} are {kind}")
        raise ValueError(msg)
    return n_pos


def image_curves(scores, labels) -> dict[str, dict[str, list[float]]]:
    """ROC and precision-recall curve points of image scores (the curves behind AUROC and AP).

    Computed by anomalib's ``AUROC`` / ``AUPR`` metrics (torchmetrics ``BinaryROC`` /
    ``BinaryPrecisionRecallCurve`` underneath, exact: one point per distinct score, ties grouped).

    Args:
        scores: image anomaly scores (higher = more anomalous).
        labels: ground truth, 1/True = anomalous.

    Returns:
        ``{"roc": {"fpr", "tpr", "thresholds"}, "pr": {"precision", "recall", "thresholds"}}`` as lists.

    Raises:
        ValueError: only one class is present.
    """
    from anomalib.metrics import AUPR, AUROC
    from torchmetrics.classification import BinaryPrecisionRecallCurve, BinaryROC

    s, lo, span = _unit(scores)
    y = torch.as_tensor(np.asarray(labels, dtype=bool)).long()
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores but {len(y)} labels")
    _check_two_classes(y, "image")
    batch = SimpleNamespace(pred_score=s, gt_label=y)
    roc, pr = AUROC(fields=["pred_score", "gt_label"]), AUPR(fields=["pred_score", "gt_label"])
    roc.update(batch)
    pr.update(batch)
    fpr, tpr, roc_thr = BinaryROC.compute(roc)
    prec, rec, pr_thr = BinaryPrecisionRecallCurve.compute(pr)
    # thresholds back on the caller's score scale (torchmetrics puts 1.0 before the highest score on the ROC)
    roc_thr, pr_thr = roc_thr.double() * span + lo, pr_thr.double() * span + lo
    return {
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": roc_thr.tolist()},
        "pr": {"precision": prec.tolist(), "recall": rec.tolist(), "thresholds": pr_thr.tolist()},
    }


def f1_max_threshold(scores, labels) -> float:
    """The score threshold at which anomalib's ``F1Max`` reaches its maximum (predict anomalous at >= it)."""
    from anomalib.metrics import F1Max

    s, lo, span = _unit(scores)
    m = F1Max(fields=["pred_score", "gt_label"])
    m.update(SimpleNamespace(pred_score=s, gt_label=torch.as_tensor(np.asarray(labels, dtype=bool)).long()))
    m.compute()
    return float(m.threshold) * span + lo


def threshold_metrics(predicted, labels) -> dict[str, float]:
    """Precision, recall, F1 and confusion counts of hard predictions (e.g. a run's own threshold).

    Args:
        predicted: predicted anomalous (1/True) or normal per sample.
        labels: ground truth, 1/True = anomalous.

    Returns:
        ``precision``, ``recall``, ``f1``, ``accuracy`` (0 where undefined, as sklearn's ``zero_division=0``)
        and ``tp``, ``fp``, ``fn``, ``tn``.
    """
    p = np.asarray(predicted, dtype=bool)
    y = np.asarray(labels, dtype=bool)
    if p.shape != y.shape:
        raise ValueError(f"{len(p)} predictions but {len(y)} labels")
    tp, fp = int(np.sum(p & y)), int(np.sum(p & ~y))
    fn, tn = int(np.sum(~p & y)), int(np.sum(~p & ~y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": (tp + tn) / max(len(y), 1),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _thin(xs: torch.Tensor, ys: torch.Tensor, max_points: int) -> tuple[list[float], list[float]]:
    """At most ``max_points`` points of a curve, always keeping both ends (for storing and plotting)."""
    if xs.numel() > max_points:
        idx = torch.linspace(0, xs.numel() - 1, max_points).round().long().unique()
        xs, ys = xs[idx], ys[idx]
    return xs.tolist(), ys.tolist()


def pixel_metrics(anomaly_maps, gt_masks, *, fpr_limit: float = 0.3, max_curve_points: int = 1000) -> dict:
    """Pixel AUROC and AUPRO (anomalib ``AUROC`` / ``AUPRO`` on ``anomaly_map`` / ``gt_mask``).

    Args:
        anomaly_maps: ``(N, H, W)`` pixel anomaly scores (higher = more anomalous).
        gt_masks: ``(N, H, W)`` ground-truth masks, nonzero = defect; the same size as the maps.
        fpr_limit: AUPRO integrates the per-region overlap up to this false-positive rate (anomalib's
            default, 0.3) and divides by it, so a perfect map scores 1.0.
        max_curve_points: the returned curves are thinned to this many points.

    Returns:
        ``pixel_auroc``, ``aupro``, ``num_pixels``, ``num_anomalous_pixels`` and the curves
        ``pixel_roc`` (``fpr``, ``tpr``) and ``pro`` (``fpr``, ``pro``).

    Raises:
        ValueError: shapes differ, or the masks hold no defect pixel (or only defect pixels).
    """
    from anomalib.metrics import AUPRO, AUROC
    from torchmetrics.classification import BinaryROC

    maps, _, _ = _unit(anomaly_maps)
    masks = (torch.as_tensor(np.asarray(gt_masks)) != 0).long()
    if maps.shape != masks.shape or maps.dim() != 3:
        raise ValueError(f"anomaly maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be (N, H, W)")
    n_pos = _check_two_classes(masks, "pixel")
    batch = SimpleNamespace(anomaly_map=maps, gt_mask=masks)
    auroc = AUROC(fields=["anomaly_map", "gt_mask"])
    aupro = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=fpr_limit)
    auroc.update(batch)
    aupro.update(batch)
    out = {"pixel_auroc": float(auroc.compute()), "aupro": float(aupro.compute()),
           "num_pixels": int(masks.numel()), "num_anomalous_pixels": n_pos}
    fpr, tpr, _ = BinaryROC.compute(auroc)
    pro_fpr, pro = aupro._compute()  # noqa: SLF001 - anomalib's own PRO curve, the one AUPRO integrates
    out["pixel_roc"] = dict(zip(("fpr", "tpr"), _thin(fpr, tpr, max_curve_points)))
    out["pro"] = dict(zip(("fpr", "pro"), _thin(pro_fpr, pro, max_curve_points)))
    return out
