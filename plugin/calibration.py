"""Normal-only calibration: thresholds, normalised scores and heatmap ranges from held-out good samples.

anomalib learns its threshold with ``F1AdaptiveThreshold``, which needs anomalous validation images. Our
users fit on normal samples only, where that threshold degenerates (anomalib issues #2433, #3357, #1997:
it once fell to the minimum score and flagged everything; since 2.x it takes the highest normal score, a
rule no user chose). Here the held-out normal samples of a fit give a score distribution, and the user
picks the rule:

* ``"far"`` (default, parameter 0.01): the image threshold lets that share of known-good samples through
  as false alarms; ``"percentile"`` (parameter 99): that percentile of normal scores; ``"mean_std"``
  (parameter k): mean + k standard deviations;
* with labelled anomalies (:func:`fiftyone_anomaly_vlm.set_threshold` with ``gt_field``): ``"f1"`` (the
  F1-optimal threshold) or ``"recall"`` (parameter r: the highest threshold that reaches recall r);
* ``"value"``: a raw threshold given by the user.

The pixel threshold applies the same rule to the per-image maxima of the normal maps, so "far 0.01" also
means a mask appears on about 1 % of good samples.

Uncertainty: a false-alarm rate set from n held-out normals is only as sure as n allows (5 normals cannot
show a 1 % rate). Every threshold records, in ``stats["far"]``, how many of the n normals lie above it and
the exact (Clopper-Pearson) 95 % interval of the true false-alarm rate at that threshold; a
:class:`ThresholdUncertaintyWarning` (also logged) says so when the interval's upper bound is more than
:data:`MAX_FAR_RATIO` times the requested rate, or when n < 1 / rate.

Scores: ``<key>_score`` is the share of calibration normals that score below the sample (linear between
calibration scores, hyperbolic tails beyond them, so it keeps the ranking): 0.99 reads "higher than
99 % of known-good samples". Heatmaps are normalised with two dataset-level anchors (never per image):
the median normal pixel score maps to 0 and :attr:`Calibration.map_high` to 1.

Example:
    >>> cal = Calibration.from_normals(image_scores, map_maxima, pixel_sample, rule="far", param=0.01)
    >>> cal.image_threshold, cal.normalize_scores(np.array([cal.image_threshold]))
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from .floatgrid import largest_at_most
from .models.line_inference import calibrated_scores, normalized_map, score_scale, standardized_scores

logger = logging.getLogger(__name__)

RULES = ("far", "percentile", "mean_std", "f1", "recall", "value")
DEFAULT_PARAMS = {"far": 0.01, "percentile": 99.0, "mean_std": 3.0, "recall": 0.95}
#: confidence of the recorded false-alarm interval
FAR_CONFIDENCE = 0.95
#: warn when the interval's upper bound exceeds the requested false-alarm rate this many times
MAX_FAR_RATIO = 3.0


class ThresholdUncertaintyWarning(UserWarning):
    """A threshold was set from too few samples to keep the false-alarm (or recall) rate it promises."""


def rate_interval(k: int, n: int, confidence: float = FAR_CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a rate observed as ``k`` events in ``n`` trials."""
    if n < 1:
        return 0.0, 1.0
    a = (1.0 - confidence) / 2.0
    lo = 0.0 if k <= 0 else float(scipy_stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k >= n else float(scipy_stats.beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def requested_far(rule: str, param: float | None) -> float | None:
    """The false-alarm rate a normal-only rule promises (``mean_std``: the Gaussian tail beyond k sigma)."""
    param = DEFAULT_PARAMS.get(rule) if param is None else float(param)
    if rule == "far":
        return param
    if rule == "percentile":
        return 1.0 - param / 100.0
    if rule == "mean_std":
        return float(scipy_stats.norm.sf(param))
    return None


def far_uncertainty(normal_scores, threshold: float, rule: str, param: float | None,
                    confidence: float = FAR_CONFIDENCE) -> dict[str, Any]:
    """What ``n`` held-out normals say about the false-alarm rate at ``threshold`` (flagged: score > threshold).

    Returns:
        ``rate`` (requested, None for labelled or value rules), ``num_normals``, ``num_above``, ``interval``
        ``[lo, hi]`` of the true rate, ``confidence`` and ``too_wide`` (the warning condition).
    """
    scores = np.asarray(normal_scores, dtype=np.float64)
    n, k = int(scores.size), int(np.sum(scores > threshold))
    lo, hi = rate_interval(k, n, confidence)
    rate = requested_far(rule, param)
    too_wide = bool(rate is not None and rate > 0 and (hi > MAX_FAR_RATIO * rate or n < 1.0 / rate))
    return {"rate": rate, "num_normals": n, "num_above": k, "interval": [lo, hi], "confidence": confidence,
            "too_wide": too_wide}


def describe_far(info: dict[str, Any]) -> str:
    """One line for a threshold's false-alarm uncertainty, e.g. ``far 0.01: 0 of 5 normals above, ...``."""
    lo, hi = info["interval"]
    text = (f"{info['num_above']} of {info['num_normals']} held-out normals above it; true false-alarm rate "
            f"{lo:.1%}-{hi:.1%} ({info['confidence']:.0%} interval)")
    if info.get("rate") is not None:
        text += f", requested {info['rate']:.2%}"
    return text


def warn_if_uncertain(info: dict[str, Any], what: str = "threshold") -> None:
    """Log and ``warnings.warn`` (:class:`ThresholdUncertaintyWarning`) when ``info["too_wide"]``."""
    if not info.get("too_wide"):
        return
    need = math.ceil(MAX_FAR_RATIO / info["rate"]) if info["rate"] else None
    message = (f"{what}: {describe_far(info)}. Too few held-out normals to promise that rate"
               + (f"; hold out more good samples (hundreds for a 1 % rate, e.g. {need}+)" if need else ""))
    logger.warning(message)
    warnings.warn(message, ThresholdUncertaintyWarning, stacklevel=3)


def check_param(rule: str, param: float | None) -> float | None:
    """``param`` as a float (None stays None); NaN and infinities fail, whatever the rule.

    Raises:
        ValueError: a parameter that is not a finite number.
    """
    if param is None:
        return None
    try:
        value = float(param)
    except (TypeError, ValueError):
        raise ValueError(f"the parameter of threshold rule {rule!r} must be a number, got {param!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"the parameter of threshold rule {rule!r} must be a finite number, got {param!r}")
    return value


def check_threshold(value: float, what: str = "threshold") -> float:
    """``value`` as a float; a NaN or infinite threshold (from non-finite scores, say) fails.

    Raises:
        ValueError: ``value`` is not finite.
    """
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"the {what} came out as {value}, not a finite number; the scores it was chosen "
                         "from hold NaN or infinite values")
    return value


def threshold_from_normals(scores: np.ndarray, rule: str, param: float | None) -> float:
    """Threshold on raw scores from normal scores only (rules ``far``, ``percentile``, ``mean_std``, ``value``).

    Raises:
        ValueError: unknown rule, a rule that needs anomalies, a parameter out of range or not finite, or a
            threshold that is not finite.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose from {RULES}")
    param = check_param(rule, param)
    if param is None:
        param = DEFAULT_PARAMS.get(rule)
    if rule == "value":
        if param is None:
            raise ValueError("rule 'value' needs the threshold as its parameter")
        return param
    if rule in ("f1", "recall"):
        raise ValueError(f"rule {rule!r} needs labelled anomalies: call set_threshold(..., gt_field=...)")
    if rule == "far":
        if not 0.0 <= param < 1.0:
            raise ValueError(f"false-alarm rate must be in [0, 1), got {param}")
        value = np.quantile(scores, 1.0 - param, method="higher") if param > 0 else scores.max()
    elif rule == "percentile":
        if not 0.0 < param <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {param}")
        value = np.percentile(scores, param)
    else:
        value = scores.mean() + param * scores.std()
    return check_threshold(value)


def threshold_from_labels(scores: np.ndarray, labels: np.ndarray, rule: str, param: float | None) -> float:
    """Threshold on raw scores from labelled samples: ``"f1"`` (F1-optimal) or ``"recall"`` (reach recall r).

    A sample is flagged when its score is strictly above the threshold.

    Raises:
        ValueError: no anomalous sample, or an unknown rule.
    """
    from sklearn.metrics import precision_recall_curve

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    param = check_param(rule, param)
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} of the labelled samples' scores are NaN or "
                         "infinite; a threshold cannot be chosen from them")
    if not labels.any():
        raise ValueError("the labelled samples hold no anomaly; use a normal-only rule (far, percentile, mean_std)")
    if rule == "f1":
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = thresholds[int(np.argmax(f1[:-1]))]
        below = scores[scores < best]
        return float(below.max()) if below.size else float(np.nextafter(best, -np.inf))
    if rule == "recall":
        r = DEFAULT_PARAMS["recall"] if param is None else float(param)
        if not 0.0 < r <= 1.0:
            raise ValueError(f"target recall must be in (0, 1], got {r}")
        pos = np.sort(scores[labels])[::-1]
        k = int(np.ceil(r * len(pos)))  # flag at least the k highest anomalies
        kth = pos[k - 1]
        below = scores[scores < kth]
        return float(below.max()) if below.size else float(np.nextafter(kth, -np.inf))
    raise ValueError(f"rule {rule!r} is not a labelled rule; use 'f1' or 'recall'")


@dataclass
class Calibration:
    """What the held-out normal samples say, and the thresholds chosen from it.

    Attributes:
        image_scores: sorted raw image scores of the calibration normals.
        map_maxima: sorted per-image maxima of their raw anomaly maps.
        map_low: median raw pixel score of the normals (maps to 0 in stored heatmaps).
        map_high: raw pixel score that maps to 1 in stored heatmaps (fixed at fit time).
        rule: threshold rule; param: its parameter.
        image_threshold: raw image threshold (anomalous when score > threshold).
        pixel_threshold: raw pixel threshold (mask where the map > threshold).
        stats: summary statistics, for display.
    """

    image_scores: list[float]
    map_maxima: list[float]
    map_low: float
    map_high: float
    rule: str
    param: float | None
    image_threshold: float
    pixel_threshold: float
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_normals(cls, image_scores, map_maxima, pixel_sample, rule: str = "far",
                     param: float | None = None) -> "Calibration":
        """Build from the raw outputs of held-out normal samples.

        Args:
            image_scores: raw image scores of the normals.
            map_maxima: per-image maxima of their raw maps.
            pixel_sample: a sample of their raw pixel scores (for the heatmap anchors).
            rule: a normal-only rule (``far``, ``percentile``, ``mean_std``, ``value``).
            param: the rule's parameter (default: :data:`DEFAULT_PARAMS`).
        """
        image_scores = np.sort(np.asarray(image_scores, dtype=np.float64))
        map_maxima = np.sort(np.asarray(map_maxima, dtype=np.float64))
        pixel_sample = np.asarray(pixel_sample, dtype=np.float64)
        if image_scores.size < 1:
            raise ValueError("calibration needs at least one held-out normal sample")
        param = DEFAULT_PARAMS.get(rule) if param is None else float(param)
        image_t = threshold_from_normals(image_scores, rule, param)
        pixel_t = threshold_from_normals(map_maxima, rule, param) if rule != "value" else float(map_maxima.max())
        low = float(np.median(pixel_sample))
        # 1.0 in the stored maps sits as far above the normal maxima as they sit above the median pixel
        high = float(map_maxima.max() + (map_maxima.max() - low))
        if not high > low:
            high = low + 1.0
        stats = {
            "num_normals": int(image_scores.size),
            "image": _summary(image_scores),
            "map_max": _summary(map_maxima),
            "pixel": {"median": low, "p99": float(np.quantile(pixel_sample, 0.99)),
                      "max": float(pixel_sample.max())},
            "far": far_uncertainty(image_scores, image_t, rule, param),
        }
        warn_if_uncertain(stats["far"], f"image threshold ({rule} {param})")
        return cls([float(v) for v in image_scores], [float(v) for v in map_maxima], low, high, rule, param,
                    image_t, pixel_t, stats)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        """Inverse of :meth:`to_dict` (also accepts the database's list/dict wrappers)."""
        return cls(**json.loads(json.dumps(dict(d))))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, stored on the runs."""
        return asdict(self)

    def with_threshold(self, rule: str, param: float | None = None, *, scores=None, labels=None,
                       pixel_threshold: float | None = None) -> "Calibration":
        """A copy with thresholds chosen by another rule (labelled rules need ``scores`` and ``labels``)."""
        if rule in ("f1", "recall"):
            if scores is None or labels is None:
                raise ValueError(f"rule {rule!r} needs scores and labels of labelled samples")
            image_t = threshold_from_labels(scores, labels, rule, param)
            # pixel masks follow the image decision: the same share of normals gets a mask
            share = float(np.mean(np.asarray(self.image_scores) > image_t))
            pixel_t = threshold_from_normals(np.asarray(self.map_maxima), "far", min(share, 0.999))
        else:
            image_t = threshold_from_normals(np.asarray(self.image_scores), rule, param)
            pixel_t = threshold_from_normals(np.asarray(self.map_maxima), rule, param) if rule != "value" \
                else self.pixel_threshold
        if pixel_threshold is not None:
            pixel_t = check_threshold(pixel_threshold, "pixel threshold")
        image_t, pixel_t = check_threshold(image_t, "image threshold"), check_threshold(pixel_t, "pixel threshold")
        param = DEFAULT_PARAMS.get(rule) if param is None else float(param)
        far = far_uncertainty(self.image_scores, image_t, rule, param)
        warn_if_uncertain(far, f"image threshold ({rule} {param})")
        return Calibration(self.image_scores, self.map_maxima, self.map_low, self.map_high, rule, param,
                           float(image_t), float(pixel_t), {**self.stats, "far": far})

    @property
    def far(self) -> dict[str, Any]:
        """The false-alarm uncertainty of the image threshold (:func:`far_uncertainty`), also for old records."""
        return self.stats.get("far") or far_uncertainty(self.image_scores, self.image_threshold, self.rule, self.param)

    # ----------------------------------------------------------------- transforms
    def _score_scale(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Calibration scores, their ranks ``i / (n + 1)`` and the tails' scale."""
        return score_scale(self.image_scores)

    def normalize_scores(self, raw) -> np.ndarray:
        """Share of calibration normals below each raw score, strictly increasing (see module docs).

        The formula lives in :mod:`~fiftyone_anomaly_vlm.models.line_inference`, which exported experts carry
        to the line: the calibrated score there is this one by construction."""
        return calibrated_scores(raw, self.image_scores)

    def standardize_scores(self, raw) -> np.ndarray:
        """``(raw - median) / std`` of the calibration normals (how far beyond normal; weighted ensembles)."""
        return standardized_scores(raw, self.image_scores)

    def raw_from_normalized(self, values) -> np.ndarray:
        """Inverse of :meth:`normalize_scores`: for each calibrated threshold ``v``, the raw threshold ``t``
        with ``(raw > t) == (normalize_scores(raw) > v)`` for every raw score (``t``: the largest float whose
        calibrated score is at most ``v``; the analytic inverse, made exact on the float grid by
        :func:`~fiftyone_anomaly_vlm.floatgrid.largest_at_most`). ``raw_from_normalized(normalize_scores(x))
        >= x``, equal unless neighbouring floats share its calibrated score (far in the tails). Calibrated
        scores lie in (0, 1): ``v <= 0`` gives ``-inf`` (all above), ``v >= 1`` ``+inf`` (none); NaN stays NaN.
        """
        v = np.asarray(values, dtype=np.float64)
        c, ranks, scale = self._score_scale()
        out, inside = np.where(v <= 0, -np.inf, np.where(v >= 1, np.inf, np.nan)), (v > 0) & (v < 1)
        w = v[inside]
        with np.errstate(divide="ignore", over="ignore"):
            guess = np.interp(w, ranks, c)
            guess = np.where(w < ranks[0], c[0] - scale * (ranks[0] / w - 1.0), guess)
            guess = np.where(w > ranks[-1], c[-1] + scale * ((1.0 - ranks[-1]) / (1.0 - w) - 1.0), guess)
        out[inside] = largest_at_most(self.normalize_scores, w, guess)
        return out

    def normalize_map(self, raw_map) -> np.ndarray:
        """Raw pixel scores -> [0, 1] with the run's two anchors (the same for every image)."""
        return normalized_map(raw_map, self.map_low, self.map_high)

    @property
    def normalized_pixel_threshold(self) -> float:
        """The pixel threshold on the stored (normalised) heatmap scale."""
        return float(self.normalize_map(np.array([self.pixel_threshold]))[0])

    @property
    def normalized_image_threshold(self) -> float:
        """The image threshold on the ``<key>_score`` scale."""
        return float(self.normalize_scores(np.array([self.image_threshold]))[0])


def _summary(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "p50": float(np.median(x)), "p99": float(np.quantile(x, 0.99)), "max": float(x.max())}


def calibrated_arrays(out, calibration: Calibration | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scores, labels, maps, masks) of an expert's batch output on the plugin's calibrated scales.

    With a calibration: scores are the share of calibration normals below (:meth:`Calibration.normalize_scores`),
    maps use the run's two anchors, labels and masks follow its thresholds. Without one (an expert that
    calibrates itself) the expert's own normalised outputs are returned. Maps are float in ``[0, 1]``.
    """
    if calibration is None or out.raw_score is None:
        scores = out.score.numpy().astype(np.float64)
        labels = out.label.numpy().astype(bool)
    else:
        raw = out.raw_score.numpy()
        scores = calibration.normalize_scores(raw)
        labels = raw > calibration.image_threshold
    if calibration is None or out.raw_map is None:
        maps = out.anomaly_map.clamp(0, 1).numpy().astype(np.float64)
        masks = out.mask.numpy().astype(bool)
    else:
        raw_map = out.raw_map.numpy()
        maps = calibration.normalize_map(raw_map)
        masks = raw_map > calibration.pixel_threshold
    return scores, labels, maps, masks
