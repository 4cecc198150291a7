"""Frame scores over time: smoothing that skips failed frames, and anomalous stretches as segments.

Smoothing decides *whether* a stretch is anomalous, the unsmoothed frame scores *where* it starts and ends.

Example:
    >>> smoothed = smooth_scores(raw, window=5)
    >>> find_segments(smoothed, 0.5, raw=raw)
    [(6, 11)]
    >>> segment_support([1, 3, 5, 7, 9], 1, 2)
    [3, 6]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SMOOTHING = ("uniform", "gaussian", "none")


def smooth_scores(scores, window: int = 5, method: str = "uniform") -> np.ndarray:
    """Smooth frame scores over time, skipping missing (NaN) frames.

    A normalised convolution: ``filter(score * ok) / filter(ok)``, so a failed frame neither drags its
    neighbours down nor gets a score itself (it stays NaN). Edges repeat the nearest value.

    Args:
        scores: frame scores in time order (NaN = no score).
        window: window length in sampled frames (1 or less: no smoothing).
        method: ``"uniform"`` (moving average), ``"gaussian"`` (sigma = window / 4, cut at +-window / 2)
            or ``"none"``.

    Returns:
        The smoothed scores, same length.

    Raises:
        ValueError: unknown method.
    """
    from scipy.ndimage import gaussian_filter1d, uniform_filter1d

    if method not in SMOOTHING:
        raise ValueError(f"smoothing must be one of {SMOOTHING}, got {method!r}")
    x = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(x)
    if method == "none" or int(window) <= 1 or x.size == 0:
        return x.copy()
    if method == "uniform":
        def filt(a):
            return uniform_filter1d(a, size=int(window), mode="nearest")
    else:
        def filt(a):
            return gaussian_filter1d(a, sigma=window / 4.0, truncate=2.0, mode="nearest")
    num = filt(np.where(ok, x, 0.0))
    den = filt(ok.astype(np.float64))
    out = np.full_like(x, np.nan)
    good = ok & (den > 1e-12)
    out[good] = num[good] / den[good]
    return out


def find_segments(smoothed, threshold: float, raw=None, min_length: int = 1) -> list[tuple[int, int]]:
    """Index ranges ``(first, last)`` (inclusive) of the stretches at or above ``threshold``.

    Seeds are the runs of ``smoothed >= threshold``; each is grown over neighbouring frames whose ``raw``
    score is also at or above the threshold (smoothing shortens a stretch by half a window at each end);
    overlapping runs merge; runs shorter than ``min_length`` frames are dropped. NaN never counts.

    Args:
        smoothed: smoothed scores in time order.
        threshold: the threshold.
        raw: unsmoothed scores (None: no growing).
        min_length: shortest kept run, in sampled frames.

    Returns:
        ``[(first_index, last_index), ...]`` in time order.
    """
    s = np.asarray(smoothed, dtype=np.float64)
    above = np.isfinite(s) & (s >= threshold)
    r = None if raw is None else np.asarray(raw, dtype=np.float64)
    r_above = None if r is None else (np.isfinite(r) & (r >= threshold))
    runs: list[list[int]] = []
    i, n = 0, len(s)
    while i < n:
        if not above[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and above[j + 1]:
            j += 1
        a, b = i, j
        if r_above is not None:
            while a - 1 >= 0 and r_above[a - 1]:
                a -= 1
            while b + 1 < n and r_above[b + 1]:
                b += 1
        if runs and a <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], b)
        else:
            runs.append([a, b])
        i = max(j, b) + 1
    return [(a, b) for a, b in runs if b - a + 1 >= max(1, int(min_length))]


def segment_support(frame_numbers: Sequence[int], first: int, last: int, last_frame: int | None = None) -> list[int]:
    """Frame-number ``[start, end]`` of a segment of sampled frames: a sampled frame stands for the frames up
    to the next sampled one; the last sampled frame for one sampling step (within ``last_frame``)."""
    fns = list(frame_numbers)
    if last + 1 < len(fns):
        end = fns[last + 1] - 1
    else:
        step = int(np.median(np.diff(fns))) if len(fns) > 1 else 1
        end = fns[last] + max(0, step - 1)
        if last_frame:
            end = min(end, int(last_frame))
    return [int(fns[first]), int(max(fns[first], end))]
