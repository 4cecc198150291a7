"""Human review of a scoring run: score histograms, threshold counts, flagged samples and verdicts.

Everything here runs as database aggregations on views (``histogram_values``, ``bounds``, ``count``), so
it stays responsive on large datasets: no sample is loaded into Python except the ids and labels of the
samples being reviewed. The review panel (``panels/review.py``) and the ``review_anomalies`` operator are
thin wrappers over these functions.

A verdict is written to a review field (default ``review``) as a ``fo.Classification`` whose label is the
human's answer and whose attributes keep who/when/which run; the model's own fields are never touched.
Reviewed samples are tagged ``reviewed`` and ``review:<verdict>``.

Example:
    >>> import fiftyone_anomaly_vlm as fav
    >>> hist = fav.score_histogram(ds, "padim", gt_field="ground_truth")
    >>> fav.threshold_counts(ds, "padim", 0.9, gt_field="ground_truth")["precision"]
    0.8
    >>> flagged = fav.flagged_view(ds, "padim")                    # labelled anomalous, highest first
    >>> fav.review(flagged.limit(3), "accept", key="padim", user="qa")   # the model was right
    >>> fav.review(flagged.skip(3).limit(1), "relabel", key="padim", label="scratch")
    >>> fav.recalibrate_from_review(ds, "padim", rule="f1")        # threshold from the human verdicts
    >>> fav.reviewed_normals(ds).count()                           # can join an expert's normal set

See Also:
    :func:`fiftyone_anomaly_vlm.set_threshold`, which :func:`recalibrate_from_review` calls.
"""

from __future__ import annotations

import datetime
import getpass
import json
import uuid
from typing import Any

import fiftyone as fo
from fiftyone import ViewField as F

from .fields import FieldNames
from .runs import AnomalyScoreRunConfig, expert_run_key
from .scoring import ANOMALOUS, NORMAL

#: the review field written by default
REVIEW_FIELD = "review"
#: the verdicts :func:`review` accepts
VERDICTS = ("accept", "reject", "relabel")
#: tag added to every reviewed sample (plus ``review:<verdict>``)
REVIEWED_TAG = "reviewed"
#: run methods whose runs have ``<key>_score`` / ``<key>`` fields and can be reviewed; other scoring runs
#: (VLM judges, fused scores) join by adding their method here
REVIEWABLE_METHODS = {"anomaly_score"}


def _verdict_tag(verdict: str) -> str:
    return f"review:{verdict}"


def scoring_runs(dataset) -> list[str]:
    """Keys of the runs that can be reviewed (scoring runs with ``<key>_score`` fields).

    Args:
        dataset: a dataset or view (its dataset's runs are listed).

    Returns:
        The run keys, in the dataset's order.
    """
    dataset = dataset._root_dataset
    keys = []
    for key in dataset.list_runs():
        try:
            config = dataset.get_run_info(key).config
        except Exception:  # a run whose config class cannot be imported: not ours
            continue
        if isinstance(config, AnomalyScoreRunConfig) or getattr(config, "method", None) in REVIEWABLE_METHODS:
            keys.append(key)
    return keys


def default_threshold(samples, key: str) -> float:
    """The run's current threshold on the calibrated score (``<key>_score``), 0.5 when it records none."""
    config = samples._root_dataset.get_run_info(key).config
    value = getattr(config, "normalized_image_threshold", None)
    return float(value) if value is not None else 0.5


def _gt_views(samples, gt_field: str, positive: str):
    label = F(f"{gt_field}.label")
    labelled = samples.exists(gt_field)
    return labelled.match(label == positive), labelled.match(label != positive)


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
    field = FieldNames(key).score
    scored = samples.exists(field)
    count, (lo, hi) = scored.aggregate([fo.Count(), fo.Bounds(field)])
    range_lo = min(0.0, lo) if lo is not None else 0.0
    range_hi = max(1.0, hi) if hi is not None else 1.0
    edges, counts = _histogram(scored, field, bins, (range_lo, range_hi))
    out = {"field": field, "edges": edges, "counts": counts, "count": int(count),
           "bounds": (lo, hi), "gt_field": gt_field, "positive": positive}
    if gt_field:
        pos_view, neg_view = _gt_views(scored, gt_field, positive)
        _, pos = _histogram(pos_view, field, bins, (range_lo, range_hi))
        _, neg = _histogram(neg_view, field, bins, (range_lo, range_hi))
        unlabelled = [c - p - n for c, p, n in zip(counts, pos, neg)]
        other = NORMAL if positive != NORMAL else "other"
        out["series"] = {positive: pos, other: neg, "unlabelled": unlabelled}
    return out


def _histogram(view, field: str, bins: int, value_range: tuple[float, float]) -> tuple[list[float], list[int]]:
    counts, edges, other = view.histogram_values(field, bins=bins, range=list(value_range))
    counts = [int(c) for c in counts]
    if other and counts:  # FiftyOne's last edge is exclusive: a score exactly at the top goes to the last bin
        counts[-1] += int(other)
    return [float(e) for e in edges], counts


def threshold_counts(samples, key: str, threshold: float, gt_field: str | None = None,
                     positive: str = ANOMALOUS) -> dict[str, Any]:
    """How many scored samples fall above/below ``threshold``, and precision/recall against ground truth.

    A sample is flagged when its calibrated score is strictly above the threshold (as the run's labels).

    Args:
        samples: a dataset or view holding run ``key``.
        key: the scoring run.
        threshold: a threshold on ``<key>_score``.
        gt_field: optional ``fo.Classification`` ground-truth field.
        positive: the ground-truth label meaning anomalous.

    Returns:
        ``{"threshold", "total", "above", "below"}`` plus, with ``gt_field``: ``labelled``, ``tp``, ``fp``,
        ``fn``, ``tn``, ``precision``, ``recall``, ``f1`` (None where undefined).
    """
    field = FieldNames(key).score
    scored = samples.exists(field)
    flagged = F(field) > float(threshold)
    total = scored.count()
    above = scored.match(flagged).count()
    out: dict[str, Any] = {"threshold": float(threshold), "total": total, "above": above, "below": total - above}
    if gt_field:
        pos_view, neg_view = _gt_views(scored, gt_field, positive)
        n_pos, n_neg = pos_view.count(), neg_view.count()
        tp, fp = pos_view.match(flagged).count(), neg_view.match(flagged).count()
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
        key: the scoring run.
        threshold: flag samples whose ``<key>_score`` is above it; default: those the run labelled anomalous.

    Returns:
        A view sorted by ``<key>_score`` descending.
    """
    fields = FieldNames(key)
    if threshold is None:
        view = samples.match(F(f"{fields.label}.label") == ANOMALOUS)
    else:
        view = samples.match(F(fields.score) > float(threshold))
    return view.sort_by(fields.score, reverse=True)


def run_fields(samples, key: str) -> list[str]:
    """The run's fields worth showing on each sample in the App (label, heatmap, mask), where they exist."""
    schema = samples.get_field_schema()
    fields = FieldNames(key)
    return [f for f in (fields.label, fields.map, fields.mask) if f in schema]


def _single_run(samples) -> str:
    runs = scoring_runs(samples)
    if len(runs) != 1:
        raise ValueError(f"pass key=: the dataset has {len(runs)} scoring runs {runs}")
    return runs[0]


def review(samples, verdict: str, *, key: str | None = None, user: str | None = None, label: str | None = None,
           field: str = REVIEW_FIELD) -> int:
    """Record a human verdict on ``samples`` in a review field and tags; the model's fields stay as they are.

    Args:
        samples: the reviewed samples (a view, e.g. ``ds.select(ids)``).
        verdict: ``"accept"`` (the run's label is right), ``"reject"`` (the opposite label is right) or
            ``"relabel"`` (``label`` is right: ``"normal"``, ``"anomalous"`` or a defect type such as
            ``"scratch"``, which counts as anomalous).
        key: the scoring run judged (default: the dataset's only scoring run).
        user: the reviewer's name (default: the login name).
        label: the label for ``"relabel"``.
        field: the review field.

    Returns:
        The number of samples reviewed. For accept/reject, samples the run did not label are skipped.

    Raises:
        ValueError: unknown verdict, relabel without a label, no run to judge, or ``field`` is one of the
            run's own fields.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    if verdict == "relabel" and not label:
        raise ValueError("relabel needs label=, e.g. 'normal' or a defect type such as 'scratch'")
    key = key or _single_run(samples)
    if field in FieldNames(key).all() or field.startswith(f"{key}_"):
        raise ValueError(f"field {field!r} belongs to run {key!r}; reviews go to their own field")
    dataset = samples._root_dataset
    user = user or _login()
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    label_path = f"{FieldNames(key).label}.label"
    if FieldNames(key).label in samples.get_field_schema():
        ids, model_labels = samples.values(["id", label_path])
    else:
        ids = samples.values("id")
        model_labels = [None] * len(ids)
    values = {}
    for sid, model_label in zip(ids, model_labels):
        if verdict == "relabel":
            human = label
        elif model_label is None:
            continue
        elif verdict == "accept":
            human = model_label
        else:
            human = NORMAL if model_label == ANOMALOUS else ANOMALOUS
        values[sid] = fo.Classification(label=human, anomalous=human != NORMAL, verdict=verdict,
                                        model_label=model_label, run_key=key, reviewer=user, timestamp=now)
    if not values:
        return 0
    if field not in dataset.get_field_schema():
        dataset.add_sample_field(field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    dataset.set_values(field, values, key_field="id")
    done = dataset.select(list(values))
    done.untag_samples([_verdict_tag(v) for v in VERDICTS if v != verdict])
    done.tag_samples([REVIEWED_TAG, _verdict_tag(verdict)])
    return len(values)


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def reviewed_normals(samples, field: str = REVIEW_FIELD):
    """The samples a human judged normal (accepted normals, rejected anomalies, relabelled ``normal``).

    They can join an expert's normal set (:func:`refit_with_reviewed`), or a VLM's reference pool.
    """
    if field not in samples.get_field_schema():
        return samples.limit(0)
    return samples.match(F(f"{field}.anomalous") == False)  # noqa: E712 - a MongoDB expression


def reviewed_anomalies(samples, field: str = REVIEW_FIELD):
    """The samples a human judged anomalous (whatever the defect type)."""
    if field not in samples.get_field_schema():
        return samples.limit(0)
    return samples.match(F(f"{field}.anomalous") == True)  # noqa: E712


def refit_with_reviewed(samples, expert: str, *, key: str | None = None, field: str = REVIEW_FIELD,
                        overwrite: bool = False, **fit_kwargs: Any):
    """Fit the expert again on its normal set plus the samples reviewed as normal.

    The new expert uses the same model, backbone, input size, weights and split settings as ``expert``
    (any of them can be overridden through ``fit_kwargs``) and is recorded as a new expert ``key``.

    Args:
        samples: the dataset (or a view) holding the expert and the reviews.
        expert: the fitted expert's key (``fit_expert(key=...)``).
        key: the new expert's key (default: ``<expert>_reviewed``).
        field: the review field.
        overwrite: replace an existing expert ``key``.
        **fit_kwargs: other :func:`fiftyone_anomaly_vlm.fit_expert` arguments.

    Returns:
        The new :class:`~fiftyone_anomaly_vlm.experts.Expert`.
    """
    from .experts import fit_expert

    dataset = samples._root_dataset
    config = dataset.get_run_info(expert_run_key(expert)).config
    base_ids = list(getattr(config, "train_ids", None) or []) + list(getattr(config, "holdout_ids", None) or [])
    added = [i for i in reviewed_normals(samples, field).values("id") if i not in set(base_ids)]
    normals = dataset.select(base_ids + added, ordered=True)
    kwargs = dict(model=config.model, pretrained=config.pretrained, backbone=getattr(config, "backbone", None),
                  image_size=tuple(config.image_size), model_kwargs=getattr(config, "model_kwargs", None) or None,
                  holdout=getattr(config, "holdout", 0.2), seed=getattr(config, "seed", 51),
                  device=getattr(config, "device", "auto"))
    kwargs.update(fit_kwargs)
    return fit_expert(normals, key=key or f"{expert}_reviewed", overwrite=overwrite, **kwargs)


def recalibrate_from_review(samples, key: str, field: str = REVIEW_FIELD, rule: str = "f1",
                            param: float | None = None):
    """Re-threshold run ``key`` on the human verdicts (e.g. F1-optimal, or a target recall).

    The verdicts (anomalous whatever the defect type, or normal) are the ground truth of
    :func:`fiftyone_anomaly_vlm.set_threshold`; the run's labels and masks are rewritten and a
    ``threshold_history`` entry with ``source="review"`` and ``gt_field=<field>`` is recorded on the run.

    Args:
        samples: the dataset (or a view) holding run ``key`` and the reviews.
        key: the scoring run.
        field: the review field.
        rule: ``"f1"`` or ``"recall"``.
        param: the rule's parameter (target recall for ``"recall"``).

    Returns:
        The run's new :class:`~fiftyone_anomaly_vlm.calibration.Calibration`.

    Raises:
        ValueError: no reviewed anomaly, or the run cannot be re-thresholded.
    """
    from .thresholds import set_threshold

    dataset = samples._root_dataset
    reviewed = reviewed_anomalies(dataset, field), reviewed_normals(dataset, field)
    n_pos, n_neg = reviewed[0].count(), reviewed[1].count()
    if not n_pos:
        raise ValueError(f"no sample reviewed as anomalous in {field!r}: review some flagged samples first")
    # set_threshold reads a label field; the reviews' binary meaning goes to a scratch field for the call
    tmp = f"fav_review_gt_{uuid.uuid4().hex[:8]}"
    ids, anomalous = dataset.exists(field).values(["id", f"{field}.anomalous"])
    dataset.add_sample_field(tmp, fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    try:
        dataset.set_values(tmp, {i: fo.Classification(label=ANOMALOUS if a else NORMAL)
                                 for i, a in zip(ids, anomalous) if a is not None}, key_field="id")
        calibration = set_threshold(dataset, key, rule=rule, param=param, gt_field=tmp, positive=ANOMALOUS)
    finally:
        dataset.delete_sample_field(tmp)
    config = dataset.get_run_info(key).config
    history = json.loads(json.dumps(list(config.threshold_history)))
    history[-1].update(source="review", gt_field=field, num_reviewed_anomalous=n_pos, num_reviewed_normal=n_neg)
    config.threshold_history = history
    dataset.update_run_config(key, config)
    return calibration
