"""Combining an expert's calibrated score and the VLM's P(anomalous) into one score (``<key>_fused``).

Example:
    >>> fuse_scores(np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.9, 0.6]), "rank")
    array([0.  , 0.75, 0.75])
"""

from __future__ import annotations

import numpy as np

#: the ways :func:`fuse_scores` combines
FUSE_METHODS = ("rank", "logistic")


def fuse_scores(expert: np.ndarray, vlm: np.ndarray, method: str = "rank") -> np.ndarray:
    """Combine expert scores and VLM probabilities into one score in [0, 1].

    Args:
        expert: the expert's calibrated scores in (0, 1).
        vlm: P(anomalous) from the VLM.
        method: ``"rank"``: the mean of each score's rank percentile (ties averaged) over the samples given;
            ``"logistic"``: ``sigmoid((logit(expert) + logit(vlm)) / 2)`` (equal weights; no labels needed).

    Returns:
        The fused scores, same order.
    """
    expert = np.asarray(expert, dtype=np.float64)
    vlm = np.asarray(vlm, dtype=np.float64)
    if method == "rank":
        from scipy.stats import rankdata

        n = len(expert)
        if n == 0:
            return np.zeros(0)
        if n == 1:
            return np.array([0.5 * (expert[0] + vlm[0])])
        return 0.5 * ((rankdata(expert) - 1) / (n - 1) + (rankdata(vlm) - 1) / (n - 1))
    if method == "logistic":
        eps = 1e-6
        e = np.clip(expert, eps, 1 - eps)
        v = np.clip(vlm, eps, 1 - eps)
        logits = (np.log(e) - np.log1p(-e)) + (np.log(v) - np.log1p(-v))
        return 1.0 / (1.0 + np.exp(-0.5 * logits))
    raise ValueError(f"fuse must be 'rank' or 'logistic', got {method!r}")
