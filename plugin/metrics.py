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


def binary_image_metrics(scores, labels) -> dict[str, float]:
    """AUROC, AP (anomalib ``AUPR``) and F1-max (anomalib ``F1Max``) of image scores.

    Args:
        scores: image anomaly scores (higher = more anomalous).
        labels: ground truth, 1/True = anomalous.

    Raises:
        ValueError: lengths differ, or only one class is present (the metrics are undefined then).
    """
    from anomalib.metrics import AUPR, AUROC, F1Max

    s = torch.as_tensor(np.asarray(scores, dtype=np.float32))
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
