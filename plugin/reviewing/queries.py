"""The review panel's queries, as database aggregations: score histograms, threshold counts, flagged samples,
a run's errors.

One ``$group`` per histogram or threshold count: no sample is loaded into Python, so the panel stays
responsive on large datasets.

Thresholds are given on the calibrated scale the panel shows (``<key>_score``). An expert run's labels are
decided on raw scores against its raw threshold, so for expert runs the counts and flagged samples compare
raw scores against the raw threshold of the same calibrated value (:func:`raw_threshold`): the panel's
counts equal the number of samples a threshold labels anomalous, to the last sample.

Example:
    >>> hist = fav.score_histogram(ds, "padim", gt_field="ground_truth")
    >>> fav.threshold_counts(ds, "padim", 0.9, gt_field="ground_truth")["precision"]
    >>> flagged = fav.flagged_view(ds, "padim")   # labelled anomalous, highest first
    >>> fav.reviewing.run_errors(ds, "padim")     # {"count": 2, "first": [["part_7.png", "file not found: ..."], ...]}
"""

from __future__ import annotations

from typing import Any

import numpy as np

import fiftyone as fo
from fiftyone import ViewField as F

from ..fields import FieldNames
from ..labels import ANOMALOUS, NORMAL
from .targets import calibration_of, review_target

#: how many of a run's errors :func:`run_errors` returns by default
FIRST_ERRORS = 3

def score_histogram(samples, key: str, bins: int = 50, gt_field: str | None = None,
                    positive: str = ANOMALOUS) -> dict[str, Any]:
    """Histogram of a run's calibrated scores, computed by the database.

    Bins span ``[0, 1]`` (calibrated scores live in (0, 1)), widened to the data's bounds if a score falls
    outside. As in ``numpy.histogram``, every bin is half-open except the last, which includes its right edge.

    Args:
        samples: a dataset or view holding run ``key``.
        key: the scoring run.
        bins: number of bins.
        gt_field: optional ``fo.Classification`` ground-truth field; the counts are then also split into
            ``positive`` / other labels / unlabelled samples.
        positive: the ground-truth label meaning anomalous.

    Returns:
        A dict with ``field``, ``edges`` (``bins + 1`` floats), ``counts`` (all scored samples),
        ``count`` (scored samples), ``bounds`` (min, max score or None) and, with ``gt_field``, ``series``:
        ``{positive: counts, "normal": counts, "unlabelled": counts}`` (label names as in the field).
    """
    field = review_target(samples, key).score
    scored = samples.exists(field)
    code = _gt_code_expr(gt_field, positive) if gt_field else 2

    def bin_counts(edges: np.ndarray):
        return fo.CountValues({"$add": [{"$multiply": [_bin_index_expr(f"${field}", edges), 3]}, code]})

    # one pass for the usual case (calibrated scores in [0, 1]); a second one if a score falls outside
    edges = np.linspace(0.0, 1.0, int(bins) + 1)  # numpy.histogram's edges
    (lo, hi), counts = scored.aggregate([fo.Bounds(field), bin_counts(edges)])
    if lo is not None and (lo < 0.0 or hi > 1.0):
        edges = np.linspace(min(0.0, lo), max(1.0, hi), int(bins) + 1)
        counts = scored.aggregate(bin_counts(edges))
    table = np.zeros((int(bins), 3), dtype=np.int64)  # columns: positive, other label, unlabelled
    for k, n in counts.items():
        table[int(k) // 3, int(k) % 3] += n
    count = int(table.sum())
    out = {"field": field, "edges": edges.tolist(), "counts": table.sum(1).tolist(), "count": int(count),
           "bounds": (lo, hi), "gt_field": gt_field, "positive": positive}
    if gt_field:
        other = NORMAL if positive != NORMAL else "other"
        out["series"] = {positive: table[:, 0].tolist(), other: table[:, 1].tolist(),
                         "unlabelled": table[:, 2].tolist()}
    return out


def _bin_index_expr(value: str, edges: np.ndarray) -> dict[str, Any]:
    """MongoDB expression: the ``numpy.histogram`` bin of ``value`` (within ``edges``; last bin closed).

    The index comes from arithmetic, then is corrected by comparing with the edges themselves, as numpy
    does, so values on an edge land where numpy puts them. One ``$group`` over this index (``count_values``)
    is ~10-20x faster than MongoDB's ``$bucket`` (what ``histogram_values`` runs) on 20k-100k samples.
    """
    n = len(edges) - 1
    lo, scale = float(edges[0]), n / float(edges[-1] - edges[0])
    e = [float(x) for x in edges]
    guess = {"$max": [0, {"$min": [n - 1, {"$floor": {"$multiply": [{"$subtract": ["$$v", lo]}, scale]}}]}]}
    down = {"$subtract": ["$$i", {"$cond": [{"$lt": ["$$v", {"$arrayElemAt": [e, "$$i"]}]}, 1, 0]}]}
    up = {"$add": ["$$j", {"$cond": [{"$and": [{"$lt": ["$$j", n - 1]},
                                                {"$gte": ["$$v", {"$arrayElemAt": [e, {"$add": ["$$j", 1]}]}]}]},
                                      1, 0]}]}
    return {"$let": {"vars": {"v": value}, "in": {
        "$let": {"vars": {"i": {"$toInt": guess}}, "in": {
            "$let": {"vars": {"j": {"$max": [0, down]}}, "in": up}}}}}}


def _gt_code_expr(gt_field: str, positive: str) -> dict[str, Any]:
    """MongoDB expression: 0 if the ground truth's label is ``positive``, 1 for another label, 2 without one."""
    return {"$cond": [{"$gt": [f"${gt_field}", None]},
                      {"$cond": [{"$eq": [f"${gt_field}.label", positive]}, 0, 1]}, 2]}


def threshold_counts(samples, key: str, threshold: float, gt_field: str | None = None,
                     positive: str = ANOMALOUS) -> dict[str, Any]:
    """How many scored samples fall above/below ``threshold``, and precision/recall against ground truth.

    A sample is flagged when its score is strictly above the threshold, as the run's labels: for an expert
    run with a calibration, its raw score above the matching raw threshold (:func:`raw_threshold`), so at the
    run's own threshold ``above`` is the number of samples labelled anomalous.

    Args:
        samples: a dataset or view holding run ``key``.
        key: the scoring run.
        threshold: a threshold on the target's score (``<key>_score`` for an expert run).
        gt_field: optional ``fo.Classification`` ground-truth field.
        positive: the ground-truth label meaning anomalous.

    Returns:
        ``{"threshold", "total", "above", "below"}`` plus, with ``gt_field``: ``labelled``, ``tp``, ``fp``,
        ``fn``, ``tn``, ``precision``, ``recall``, ``f1`` (None where undefined).
    """
    field = review_target(samples, key).score
    scored = samples.exists(field)
    compared, value, _ = _flag_test(samples, key, threshold)
    # one $group: (above threshold) x (ground-truth code) -> count
    code = _gt_code_expr(gt_field, positive) if gt_field else 2
    expr = {"$add": [{"$cond": [{"$gt": [f"${compared}", value]}, 3, 0]}, code]}
    table = np.zeros((2, 3), dtype=np.int64)  # rows: below, above; columns: positive, other, unlabelled
    for k, n in scored.count_values(expr).items():
        table[int(k) // 3, int(k) % 3] += n
    total, above = int(table.sum()), int(table[1].sum())
    out: dict[str, Any] = {"threshold": float(threshold), "total": total, "above": above, "below": total - above}
    if gt_field:
        tp, fp = int(table[1, 0]), int(table[1, 1])
        n_pos, n_neg = int(table[:, 0].sum()), int(table[:, 1].sum())
        fn, tn = n_pos - tp, n_neg - fp
        precision = tp / (tp + fp) if tp + fp else None
        recall = tp / n_pos if n_pos else None
        f1 = (2 * precision * recall / (precision + recall)
              if precision is not None and recall is not None and precision + recall else None)
        out.update(gt_field=gt_field, labelled=n_pos + n_neg, tp=tp, fp=fp, fn=fn, tn=tn,
                   precision=precision, recall=recall, f1=f1)
    return out


def flagged_view(samples, key: str, threshold: float | None = None):
    """The samples a run flags, highest score first.

    Args:
        samples: a dataset or view holding run ``key``.
        key: a review target (:func:`scoring_runs`): expert run, VLM judge run or ``"<judge>_fused"``.
        threshold: flag samples whose score is above it (an expert run's raw score above the matching raw
            threshold, as :func:`threshold_counts`); default: those an expert run labelled anomalous, or, for
            VLM and fused scores, those above the target's threshold (0.5 unless recalibrated).

    Returns:
        A view sorted by the target's score, descending.
    """
    target = review_target(samples, key)
    if threshold is None and target.kind == "expert":
        view = samples.match(F(f"{target.label}.label") == ANOMALOUS)
    else:
        compared, value, _ = _flag_test(samples, key, target.threshold if threshold is None else threshold)
        view = samples.exists(target.score).exists(compared)
        if value > -np.inf:  # no infinity in the view's stages: the App receives them as JSON
            view = view.match(F(compared) > min(value, float(np.finfo(np.float64).max)))
    return view.sort_by(target.score, reverse=True)


def create_review_indexes(samples, key: str) -> list[str]:
    """Create the database index the review queries of run ``key`` need on large datasets: label + score, so
    the first page of flagged samples (highest score first) is read from the index instead of sorting every
    flagged sample (2.7 s -> 3 ms at 1,000,000 samples, ``benchmarks/review_scale.py``). No index on the score
    alone: the histogram and threshold counts read every scored sample, and with such an index MongoDB reads
    them through it, 2-4 times slower than a collection scan (measured). An existing index is kept.

    Returns:
        The names of the indexes (as ``dataset.list_indexes()`` lists them); empty for a review target
        without a label field (a fused score).
    """
    target = review_target(samples, key)
    dataset = samples._root_dataset
    if f"{target.label}.label" not in dataset.get_field_schema(flat=True):
        return []
    return [dataset.create_index([(f"{target.label}.label", 1), (target.score, -1)])]


def raw_threshold(samples, key: str, threshold: float) -> float | None:
    """The raw image threshold of expert run ``key`` that flags what ``threshold`` on ``<key>_score`` flags.

    At the run's own threshold (:func:`default_threshold`) this is the raw threshold its labels were decided
    with; elsewhere :meth:`Calibration.raw_from_normalized` (``-inf`` at or below 0, ``+inf`` at or above 1).

    Returns:
        The raw threshold, or None for review targets without a calibration (VLM, fused scores, experts that
        calibrate themselves), whose thresholds apply to their scores directly.
    """
    return _flag_test(samples, key, threshold)[2]


def _flag_test(samples, key: str, threshold: float) -> tuple[str, float, float | None]:
    """(field, value, raw threshold or None): a sample of review target ``key`` is flagged when ``field > value``."""
    target = review_target(samples, key)
    calibration = calibration_of(samples, key) if target.kind == "expert" else None
    if calibration is None:
        return target.score, float(threshold), None
    if float(threshold) in (target.threshold, calibration.normalized_image_threshold):
        raw = float(calibration.image_threshold)
    else:
        raw = float(calibration.raw_from_normalized(float(threshold)))
    return FieldNames(target.run_key).raw_score, raw, raw


def run_errors(samples, key: str, first: int = FIRST_ERRORS) -> dict[str, Any]:
    """How many samples of review target ``key`` hold an error, and the first ones.

    Every run kind records a sample's failure in ``<run key>_error`` (a missing file, an image that does
    not decode, a VLM answer that cannot be parsed...): the review panel shows these when a run has few or
    no scores.

    Args:
        samples: a dataset or view holding run ``key``.
        key: a review target (:func:`scoring_runs`).
        first: how many errors to return.

    Returns:
        ``{"count": n, "first": [[file name, message], ...]}`` (at most ``first`` entries).
    """
    field = FieldNames(review_target(samples, key).run_key).error
    if field not in samples.get_field_schema():
        return {"count": 0, "first": []}
    errored = samples.exists(field)
    paths, messages = errored.limit(first).values(["filepath", field])
    return {"count": errored.count(), "first": [[p.rsplit("/", 1)[-1], m] for p, m in zip(paths, messages)]}
