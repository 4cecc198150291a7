"""Combining an expert's calibrated score and the VLM's P(anomalous) into one score (``<key>_fused``).

Both ways give each sample a value from its own two scores only, never from the other samples judged with
it, so a run split into parts (shards, resumed halves, several workers) fuses exactly as the whole view
would.

Example:
    >>> fuse_scores(np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.9, 0.6]), "rank")
    array([0.15, 0.7 , 0.75])
"""

from __future__ import annotations

import numpy as np

#: the ways :func:`fuse_scores` combines
FUSE_METHODS = ("rank", "logistic")


def fuse_scores(expert: np.ndarray, vlm: np.ndarray, method: str = "rank") -> np.ndarray:
    """Combine expert scores and VLM probabilities into one score in [0, 1].

    Args:
        expert: the expert's calibrated scores in (0, 1): each is already its rank among the expert's
            calibration normals (the share of held-out good samples scoring below it,
            :meth:`~fiftyone_anomaly_vlm.calibration.Calibration.normalize_scores`).
        vlm: P(anomalous) from the VLM.
        method: ``"rank"``: the mean of the two ranks against fixed references: the expert score's rank among
            its calibration normals (the score itself) and P(anomalous) on its own probability scale;
            ``"logistic"``: ``sigmoid((logit(expert) + logit(vlm)) / 2)`` (equal weights; no labels needed).
            (Earlier releases ranked ``"rank"`` over the samples given, so a score depended on the split.)

    Returns:
        The fused scores, same order.
    """
    expert = np.asarray(expert, dtype=np.float64)
    vlm = np.asarray(vlm, dtype=np.float64)
    if method == "rank":
        return 0.5 * (np.clip(expert, 0.0, 1.0) + np.clip(vlm, 0.0, 1.0))
    if method == "logistic":
        eps = 1e-6
        e = np.clip(expert, eps, 1 - eps)
        v = np.clip(vlm, eps, 1 - eps)
        logits = (np.log(e) - np.log1p(-e)) + (np.log(v) - np.log1p(-v))
        return 1.0 / (1.0 + np.exp(-0.5 * logits))
    raise ValueError(f"fuse must be 'rank' or 'logistic', got {method!r}")
