"""Human review of a scoring run: score histograms, threshold counts, flagged samples and verdicts.

Everything here runs as database aggregations on views (one ``$group`` per histogram or threshold count), so
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
from dataclasses import dataclass
from typing import Any

import numpy as np

import fiftyone as fo
from fiftyone import ViewField as F

from .fields import FieldNames, JudgeFieldNames
from .runs import AnomalyScoreRunConfig, expert_run_key, update_run_config
from .labels import ANOMALOUS, NORMAL

#: the review field written by default
REVIEW_FIELD = "review"
#: the verdicts :func:`review` accepts
VERDICTS = ("accept", "reject", "relabel")
#: tag added to every reviewed sample (plus ``review:<verdict>``)
REVIEWED_TAG = "reviewed"
#: run methods whose runs have ``<key>_score`` / ``<key>`` fields (expert scoring runs)
REVIEWABLE_METHODS = {"anomaly_score"}
#: run methods of VLM judge runs (score ``<key>_p_anomalous``, label ``<key>``; ``<key>_fused`` when fused)
JUDGE_METHODS = {"vlm_judge"}
#: suffix naming a judge run's fused score as a review target (``"<judge key>_fused"``, its field name)
FUSED_SUFFIX = "_fused"


@dataclass(frozen=True)
class ReviewTarget:
    """What can be reviewed: an expert scoring run, a VLM judge run, or a judge run's fused score.

    Attributes:
        name: the name users pick (the run key; for a fused score its field, ``"<judge key>_fused"``).
        run_key: the run that wrote the score.
        kind: ``"expert"``, ``"vlm"`` or ``"fused"``.
        score: the float field ranked, histogrammed and thresholded.
        label: the run's ``fo.Classification`` (anomalous / normal) field, None for a fused score.
        show: fields worth showing on each sample in the App (label, heatmap, mask, VLM verdict, defect,
            location, explanation, regions), where the dataset has them.
        threshold: the run's current threshold on ``score``.
    """

    name: str
    run_key: str
    kind: str
    score: str
    label: str | None
    show: tuple[str, ...]
    threshold: float


def _run_config(dataset, key: str):
    try:
        return dataset.get_run_info(key).config
    except Exception:  # a run whose config class cannot be imported: not ours
        return None


def _method(config) -> str | None:
    if isinstance(config, AnomalyScoreRunConfig):
        return "anomaly_score"
    return getattr(config, "method", None)


def _judges_of(dataset, expert_key: str) -> list[str]:
    judges = []
    for k in dataset.list_runs():
        config = _run_config(dataset, k)
        if _method(config) in JUDGE_METHODS and getattr(config, "expert", None) == expert_key:
            judges.append(k)
    return judges


def run_owned_fields(dataset) -> set[str]:
    """Every field a recorded run wrote (each run's key and the ``fields`` its config lists): never ground truth."""
    dataset = dataset._root_dataset
    owned = set(dataset.list_runs())
    for key in owned.copy():
        owned.update(getattr(_run_config(dataset, key), "fields", None) or [])
    return owned


def review_target(samples, name: str) -> ReviewTarget:
    """Resolve what ``name`` (an entry of :func:`scoring_runs`) reviews: its score, label and fields to show.

    Args:
        samples: a dataset or view (its dataset's runs are used).
        name: an expert scoring run key, a VLM judge run key, or ``"<judge key>_fused"``.

    Returns:
        The :class:`ReviewTarget`.

    Raises:
        ValueError: ``name`` is none of these.
    """
    dataset = samples._root_dataset
    schema = dataset.get_field_schema()
    runs = dataset.list_runs()
    if name in runs and _method(_run_config(dataset, name)) in REVIEWABLE_METHODS:
        config = _run_config(dataset, name)
        fields = FieldNames(name)
        show = [fields.label, fields.map, fields.mask]
        for judge_key in _judges_of(dataset, name):  # the VLM's verdict on the same samples
            jf = JudgeFieldNames(judge_key)
            show += [jf.label, jf.defect, jf.location, jf.explanation]
        value = getattr(config, "normalized_image_threshold", None)
        return ReviewTarget(name, name, "expert", fields.score, fields.label,
                            tuple(f for f in show if f in schema), float(value) if value is not None else 0.5)
    kind, key = "vlm", name
    if name not in runs and name.endswith(FUSED_SUFFIX):
        kind, key = "fused", name[: -len(FUSED_SUFFIX)]
    config = _run_config(dataset, key) if key in runs else None
    if _method(config) not in JUDGE_METHODS:
        raise ValueError(f"{name!r} is not a scoring run, VLM judge run or fused score of this dataset; "
                         f"choose one of {scoring_runs(dataset)}")
    jf = JudgeFieldNames(key)
    show = [jf.label, jf.defect, jf.location, jf.explanation, jf.regions]
    expert = getattr(config, "expert", None)
    if expert:
        show += [FieldNames(expert).map, FieldNames(expert).label]
    # the judge labels a sample anomalous when P(anomalous) >= 0.5, unless reviews moved the threshold
    threshold = float((getattr(config, "review_thresholds", None) or {}).get(name, 0.5))
    if kind == "fused":
        return ReviewTarget(name, key, "fused", jf.fused, None, tuple(f for f in show if f in schema), threshold)
    return ReviewTarget(name, key, "vlm", jf.p_anomalous, jf.label, tuple(f for f in show if f in schema), threshold)


def _verdict_tag(verdict: str) -> str:
    return f"review:{verdict}"


def scoring_runs(dataset) -> list[str]:
    """What can be reviewed: expert scoring runs, VLM judge runs and their fused scores (see :func:`review_target`).

    Args:
        dataset: a dataset or view (its dataset's runs are listed).

    Returns:
        Run keys in the dataset's order, each judge run followed by ``"<key>_fused"`` when it wrote fused scores.
    """
    dataset = dataset._root_dataset
    schema = dataset.get_field_schema()
    names = []
    for key in dataset.list_runs():
        method = _method(_run_config(dataset, key))
        if method in REVIEWABLE_METHODS:
            names.append(key)
        elif method in JUDGE_METHODS:
            names.append(key)
            fused = JudgeFieldNames(key).fused
            if fused in schema and dataset.exists(fused).count():
                names.append(fused)
    return names


def default_threshold(samples, key: str) -> float:
    """The current threshold of review target ``key``: an expert run's recorded threshold on its calibrated
    score (0.5 when it records none); 0.5 for P(anomalous) and fused scores."""
    return review_target(samples, key).threshold


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
    field = review_target(samples, key).score
    scored = samples.exists(field)
    # one $group: (above threshold) x (ground-truth code) -> count
    code = _gt_code_expr(gt_field, positive) if gt_field else 2
    expr = {"$add": [{"$cond": [{"$gt": [f"${field}", float(threshold)]}, 3, 0]}, code]}
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
        threshold: flag samples whose score is above it; default: those an expert run labelled anomalous,
            or, for VLM and fused scores, those above the target's threshold (0.5 unless recalibrated).

    Returns:
        A view sorted by the target's score, descending.
    """
    target = review_target(samples, key)
    if threshold is None and target.kind == "expert":
        view = samples.match(F(f"{target.label}.label") == ANOMALOUS)
    else:
        view = samples.match(F(target.score) > float(target.threshold if threshold is None else threshold))
    return view.sort_by(target.score, reverse=True)


def run_fields(samples, key: str) -> list[str]:
    """The fields worth showing on each sample in the App for review target ``key``: the label, heatmap and
    mask of the expert, and the VLM judge's verdict, defect type, location, explanation and regions, where
    they exist."""
    return list(review_target(samples, key).show)


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
        key: the review target judged (:func:`scoring_runs`: an expert run, a VLM judge run or
            ``"<judge key>_fused"``; default: the dataset's only one).
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
    target = review_target(samples, key)
    if field == target.run_key or field.startswith(f"{target.run_key}_"):  # every field a run writes is named so
        raise ValueError(f"field {field!r} belongs to run {target.run_key!r}; reviews go to their own field")
    dataset = samples._root_dataset
    user = user or _login()
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    schema = samples.get_field_schema()
    if target.label is not None and target.label in schema:
        ids, model_labels = samples.values(["id", f"{target.label}.label"])
    elif target.score in schema:  # a fused score has no label: the target's threshold decides
        ids, scores = samples.values(["id", target.score])
        model_labels = [None if v is None else (ANOMALOUS if v > target.threshold else NORMAL) for v in scores]
    else:
        ids = samples.values("id")
        model_labels = [None] * len(ids)
    values = {}
    for sid, model_label in zip(ids, model_labels):
        if verdict == "relabel":
            human = label
        elif model_label not in (ANOMALOUS, NORMAL):  # not scored, or a VLM answer that could not be parsed
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
    (any of them can be overridden through ``fit_kwargs``) and is recorded as a new expert ``key``. A
    grouped expert (``fit_expert(group_by=...)``) is refitted per group; an ensemble is refused (refit its
    members, then ensemble them again).

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

    from .composite import COMPOSITE_METHOD

    dataset = samples._root_dataset
    config = dataset.get_run_info(expert_run_key(expert)).config
    fitted, group_by = [config], None
    if getattr(config, "method", None) == COMPOSITE_METHOD:
        group_by = getattr(config, "group_field", None)
        if not group_by:
            raise ValueError(f"expert {expert!r} is an ensemble: refit its members with refit_with_reviewed and "
                             "combine the new experts with ensemble_experts")
        fitted = [dataset.get_run_info(expert_run_key(m)).config for m in config.owned_members]
    base_ids = list(dict.fromkeys(i for c in fitted for i in list(getattr(c, "train_ids", None) or [])
                                  + list(getattr(c, "holdout_ids", None) or [])))
    added = [i for i in reviewed_normals(samples, field).values("id") if i not in set(base_ids)]
    normals = dataset.select(base_ids + added, ordered=True)
    config = fitted[0]  # a grouped expert's groups share their settings
    kwargs = dict(model=config.model, pretrained=config.pretrained, backbone=getattr(config, "backbone", None),
                  image_size=tuple(config.image_size), model_kwargs=getattr(config, "model_kwargs", None) or None,
                  holdout=getattr(config, "holdout", 0.2), seed=getattr(config, "seed", 51),
                  device=getattr(config, "device", "auto"), group_by=group_by)
    kwargs.update(fit_kwargs)
    return fit_expert(normals, key=key or f"{expert}_reviewed", overwrite=overwrite, **kwargs)


def recalibrate_from_review(samples, key: str, field: str = REVIEW_FIELD, rule: str = "f1",
                            param: float | None = None):
    """Re-threshold review target ``key`` on the human verdicts (e.g. F1-optimal, or a target recall).

    The verdicts (anomalous whatever the defect type, or normal) are the ground truth. For an expert
    scoring run this is :func:`fiftyone_anomaly_vlm.set_threshold`: the run's labels and masks are rewritten
    and a ``threshold_history`` entry with ``source="review"`` and ``gt_field=<field>`` is recorded on the
    run. For a VLM judge run or its fused score the model's fields stay as they are: the new threshold on
    P(anomalous) / the fused score is recorded on the judge run (``review_thresholds[key]`` and a
    ``threshold_history`` entry) and used by :func:`flagged_view`, :func:`default_threshold` and the panel.

    Args:
        samples: the dataset (or a view) holding run ``key`` and the reviews.
        key: a review target (:func:`scoring_runs`).
        field: the review field.
        rule: ``"f1"`` or ``"recall"``.
        param: the rule's parameter (target recall for ``"recall"``).

    Returns:
        For an expert run its new :class:`~fiftyone_anomaly_vlm.calibration.Calibration`; for a VLM or fused
        score the new threshold (float).

    Raises:
        ValueError: no reviewed anomaly, or the run cannot be re-thresholded.
    """
    from .thresholds import set_threshold

    dataset = samples._root_dataset
    target = review_target(dataset, key)
    reviewed = reviewed_anomalies(dataset, field), reviewed_normals(dataset, field)
    n_pos, n_neg = reviewed[0].count(), reviewed[1].count()
    if not n_pos:
        raise ValueError(f"no sample reviewed as anomalous in {field!r}: review some flagged samples first")
    if target.kind != "expert":
        return _rethreshold_judge(dataset, target, field, rule, param, n_pos, n_neg)
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
    history = json.loads(json.dumps(list(dataset.get_run_info(key).config.threshold_history)))
    history[-1].update(source="review", gt_field=field, num_reviewed_anomalous=n_pos, num_reviewed_normal=n_neg)
    update_run_config(dataset, key, threshold_history=history)
    return calibration


def _rethreshold_judge(dataset, target: ReviewTarget, field: str, rule: str, param: float | None,
                       n_pos: int, n_neg: int) -> float:
    """Record a review-based threshold on a judge run's P(anomalous) or fused score."""
    from .calibration import threshold_from_labels

    scores, anomalous = dataset.exists(field).exists(target.score).values([target.score, f"{field}.anomalous"])
    keep = [a is not None for a in anomalous]
    scores = np.asarray([s for s, k in zip(scores, keep) if k], dtype=float)
    labels = np.asarray([a for a, k in zip(anomalous, keep) if k], dtype=bool)
    threshold = threshold_from_labels(scores, labels, rule, param)  # flags are "score > threshold"
    config = dataset.get_run_info(target.run_key).config
    thresholds = {**config.review_thresholds, target.name: threshold}
    history = json.loads(json.dumps(list(config.threshold_history)))
    history.append(dict(target=target.name, score_field=target.score, rule=rule, param=param, threshold=threshold,
                        source="review", gt_field=field, num_reviewed_anomalous=n_pos, num_reviewed_normal=n_neg,
                        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))
    update_run_config(dataset, target.run_key, review_thresholds=thresholds, threshold_history=history)
    return threshold
