"""Human verdicts on flagged samples, and what they feed back: thresholds and a refitted expert.

A verdict is written to a review field (default ``review``) as a ``fo.Classification`` whose label is the
human's answer and whose attributes keep who/when/which run; the model's own fields are never touched.
Reviewed samples are tagged ``reviewed`` and ``review:<verdict>``.

Example:
    >>> fav.review(flagged.limit(3), "accept", key="padim", user="qa")   # the model was right
    >>> fav.review(flagged.skip(3).limit(1), "relabel", key="padim", label="scratch")
    >>> fav.recalibrate_from_review(ds, "padim", rule="f1")        # threshold from the human verdicts
    >>> recalibration_caution(ds, "padim")                         # "... false-alarm rate 0%-71% ..." or None
    >>> set_calibrated_threshold(ds, "padim", 0.95)                # the panel's "Apply threshold"
    >>> fav.reviewed_normals(ds).count()                           # can join an expert's normal set

See Also:
    :func:`fiftyone_anomaly_vlm.set_threshold`, which :func:`recalibrate_from_review` calls.
"""

from __future__ import annotations

import datetime
import getpass
import json
import logging
import uuid
import warnings
from typing import Any

import numpy as np

import fiftyone as fo
from fiftyone import ViewField as F

from ..calibration import ThresholdUncertaintyWarning, describe_far, rate_interval, threshold_from_labels
from ..experts import fit_expert, list_experts
from ..fields import FieldNames, label_spec
from ..labels import ANOMALOUS, NORMAL
from ..runs import COMPOSITE_METHOD, expert_run_key, expert_state, recorded_config, update_run_config
from ..thresholds import set_threshold
from ..writers import declare_fields
from .queries import raw_threshold
from .targets import ReviewTarget, calibration_of, review_target, scoring_runs

#: the review field written by default
REVIEW_FIELD = "review"
#: the verdicts :func:`review` accepts
VERDICTS = ("accept", "reject", "relabel")
#: tag added to every reviewed sample (plus ``review:<verdict>``)
REVIEWED_TAG = "reviewed"
#: a review-based threshold warns when its false-alarm or recall interval (95 %) is wider than this
MAX_REVIEW_INTERVAL = 0.3

logger = logging.getLogger(__name__)


def _verdict_tag(verdict: str) -> str:
    return f"review:{verdict}"


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
    declare_fields(dataset, [label_spec(field)])  # race-safe: several reviewers may write verdicts at once
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
    dataset = samples._root_dataset
    experts = list_experts(dataset)
    if expert not in experts:  # named as the user knows it, not by its run key
        raise ValueError(f"no expert named {expert!r} on dataset '{dataset.name}'; fitted experts: "
                         f"{', '.join(experts) or 'none'}")
    config = dataset.get_run_info(expert_run_key(expert)).config
    keys, group_by = [expert_run_key(expert)], None
    if config.method == COMPOSITE_METHOD:
        group_by = config.group_field
        if not group_by:
            raise ValueError(f"expert {expert!r} is an ensemble: refit its members with refit_with_reviewed and "
                             "combine the new experts with ensemble_experts")
        keys = [expert_run_key(m) for m in config.owned_members]
    states = [expert_state(dataset, k) for k in keys]
    base_ids = list(dict.fromkeys(i for s in states for i in (s["train_ids"] or []) + (s["holdout_ids"] or [])))
    added = [i for i in reviewed_normals(samples, field).values("id") if i not in set(base_ids)]
    normals = dataset.select(base_ids + added, ordered=True)
    config = dataset.get_run_info(keys[0]).config  # a grouped expert's groups share their settings
    kwargs = dict(model=config.model, pretrained=config.pretrained, backbone=config.backbone,
                  image_size=tuple(config.image_size), model_kwargs=config.model_kwargs or None,
                  holdout=config.holdout, seed=config.seed, device=config.device or "auto", group_by=group_by)
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
    ids, anomalous, raw = dataset.exists(field).values(["id", f"{field}.anomalous", FieldNames(key).raw_score])
    dataset.add_sample_field(tmp, fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    try:
        dataset.set_values(tmp, {i: fo.Classification(label=ANOMALOUS if a else NORMAL)
                                 for i, a in zip(ids, anomalous) if a is not None}, key_field="id")
        calibration = set_threshold(dataset, key, rule=rule, param=param, gt_field=tmp, positive=ANOMALOUS)
    finally:
        dataset.delete_sample_field(tmp)
    history = json.loads(json.dumps(list(dataset.get_run_info(key).config.threshold_history)))
    keep = [(s, a) for s, a in zip(raw, anomalous) if a is not None and s is not None]
    uncertainty = _warn_if_few_reviews(key, np.array([s for s, _ in keep], dtype=float),
                                       np.array([a for _, a in keep], dtype=bool), calibration.image_threshold)
    history[-1].update(source="review", gt_field=field, num_reviewed_anomalous=n_pos, num_reviewed_normal=n_neg,
                       **uncertainty)
    update_run_config(dataset, key, threshold_history=history)
    return calibration


def _warn_if_few_reviews(key: str, scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """The 95 % intervals of the false-alarm rate and recall the reviews show at ``threshold``; warn when wide.

    Returns the intervals and ``caution``: the warning's text, or None when both intervals are narrow enough.
    """
    flagged = scores > threshold
    n_neg, n_pos = int((~labels).sum()), int(labels.sum())
    far = rate_interval(int(flagged[~labels].sum()), n_neg)
    recall = rate_interval(int(flagged[labels].sum()), n_pos)
    message = None
    if max(far[1] - far[0], recall[1] - recall[0]) > MAX_REVIEW_INTERVAL:
        message = (f"threshold of {key!r} from {n_pos} anomalous and {n_neg} normal reviews: false-alarm rate "
                   f"{far[0]:.0%}-{far[1]:.0%}, recall {recall[0]:.0%}-{recall[1]:.0%} (95 % intervals); "
                   "review more samples before trusting it")
        logger.warning(message)
        warnings.warn(message, ThresholdUncertaintyWarning, stacklevel=3)
    return {"far_interval": list(far), "recall_interval": list(recall), "caution": message}


def recalibration_caution(samples, key: str) -> str | None:
    """The caution of the last :func:`recalibrate_from_review` of review target ``key``, for display.

    A threshold set from few reviews is uncertain: the caution names the reviews it rests on and the 95 %
    intervals of the false-alarm rate and recall they show (the :class:`ThresholdUncertaintyWarning` text).

    Returns:
        The caution, or None when the last threshold of ``key`` did not come from reviews or rests on enough.
    """
    target = review_target(samples, key)
    history = getattr(recorded_config(samples._root_dataset, target.run_key), "threshold_history", None) or []
    mine = [h for h in history if h.get("target", target.name) == target.name]
    return mine[-1].get("caution") if mine and mine[-1].get("source") == "review" else None


def threshold_caution(samples, key: str) -> tuple[str, str] | None:
    """Why the current threshold of review target ``key`` may not keep its promise, for display (the panel).

    Two cases: the last threshold came from few reviews (:func:`recalibration_caution`), or an expert run's
    threshold was set from too few held-out normals for the false-alarm rate it was asked for (the interval of
    the true rate those normals allow is much wider than the rate: :attr:`Calibration.far
    <fiftyone_anomaly_vlm.calibration.Calibration.far>`, the same condition as the fit's
    :class:`~fiftyone_anomaly_vlm.calibration.ThresholdUncertaintyWarning`).

    Returns:
        ``(title, text)``, or None when the threshold rests on enough evidence (or on a rule that promises no
        rate, e.g. a value set by hand).
    """
    review_caution = recalibration_caution(samples, key)
    if review_caution:
        return "Threshold from few reviews", review_caution
    calibration = calibration_of(samples, key)
    far = calibration.far if calibration is not None else None
    if not far or not far.get("too_wide"):
        return None
    return ("Threshold from few held-out normals",
            f"{describe_far(far)}: too few to promise that rate. Fit again holding out more good samples "
            "(hundreds for a 1 % rate), or set the threshold from reviews.")


def set_calibrated_threshold(samples, key: str, threshold: float):
    """Set expert run ``key``'s threshold at ``threshold`` on its calibrated ``<key>_score`` scale (the review
    panel's slider): :func:`fiftyone_anomaly_vlm.set_threshold` with ``rule="value"`` at the raw threshold that
    flags exactly the samples whose calibrated score is above ``threshold`` (:func:`raw_threshold`), so the
    labels written match :func:`threshold_counts` at that value, sample for sample.

    At the ends of the scale the raw threshold is infinite (0: every sample is above, 1: none is); the run then
    records a finite one that flags the same samples: just below its lowest raw score, or its highest.

    Returns:
        The run's new :class:`~fiftyone_anomaly_vlm.calibration.Calibration`.

    Raises:
        ValueError: ``key`` is not an expert scoring run with a calibration, or it has no scores.
    """
    raw = raw_threshold(samples, key, threshold)
    if raw is None:
        raise ValueError(f"{key!r} is not an expert scoring run with a calibration: its labels cannot be "
                         "re-thresholded (use recalibrate_from_review)")
    if not np.isfinite(raw):
        lo, hi = samples._root_dataset.bounds(FieldNames(review_target(samples, key).run_key).raw_score)
        if lo is None:
            raise ValueError(f"run {key!r} has no scores to threshold")
        raw = float(np.nextafter(lo, -np.inf)) if raw < 0 else float(hi)
    return set_threshold(samples, key, rule="value", param=raw)


def _rethreshold_judge(dataset, target: ReviewTarget, field: str, rule: str, param: float | None,
                       n_pos: int, n_neg: int) -> float:
    """Record a review-based threshold on a judge run's P(anomalous) or fused score."""
    scores, anomalous = dataset.exists(field).exists(target.score).values([target.score, f"{field}.anomalous"])
    keep = [a is not None for a in anomalous]
    scores = np.asarray([s for s, k in zip(scores, keep) if k], dtype=float)
    labels = np.asarray([a for a, k in zip(anomalous, keep) if k], dtype=bool)
    threshold = threshold_from_labels(scores, labels, rule, param)  # flags are "score > threshold"
    uncertainty = _warn_if_few_reviews(target.name, scores, labels, threshold)
    config = dataset.get_run_info(target.run_key).config
    thresholds = {**config.review_thresholds, target.name: threshold}
    history = json.loads(json.dumps(list(config.threshold_history)))
    history.append(dict(target=target.name, score_field=target.score, rule=rule, param=param, threshold=threshold,
                        source="review", gt_field=field, num_reviewed_anomalous=n_pos, num_reviewed_normal=n_neg,
                        **uncertainty,
                        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))
    update_run_config(dataset, target.run_key, review_thresholds=thresholds, threshold_history=history)
    return threshold
