"""What can be reviewed: expert scoring runs, VLM judge runs and their fused scores, and what each shows.

Example:
    >>> fav.scoring_runs(ds)                 # ['padim', 'vlm', 'vlm_fused'] after a judge run
    >>> fav.review_target(ds, "vlm").score   # 'vlm_p_anomalous' (what is histogrammed)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..calibration import Calibration
from ..fields import FieldNames, JudgeFieldNames
from ..runs import JUDGE_METHOD, SCORE_METHOD, recorded_config

#: run methods whose runs have ``<key>_score`` / ``<key>`` fields (expert scoring runs)
REVIEWABLE_METHODS = {SCORE_METHOD}
#: run methods of VLM judge runs (score ``<key>_p_anomalous``, label ``<key>``; ``<key>_fused`` when fused)
JUDGE_METHODS = {JUDGE_METHOD}
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


def _method(config) -> str | None:
    return getattr(config, "method", None)  # None for a run whose config class is not ours


def _judges_of(dataset, expert_key: str) -> list[str]:
    return dataset.list_runs(method=JUDGE_METHOD, expert=expert_key)


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
    if name in runs and _method(recorded_config(dataset, name)) in REVIEWABLE_METHODS:
        config = recorded_config(dataset, name)
        fields = FieldNames(name)
        show = [fields.label, fields.map, fields.mask, fields.regions, fields.explanation]
        for judge_key in _judges_of(dataset, name):  # the VLM's verdict on the same samples
            jf = JudgeFieldNames(judge_key)
            show += [jf.label, jf.defect, jf.location, jf.explanation]
        value = config.normalized_image_threshold
        return ReviewTarget(name, name, "expert", fields.score, fields.label,
                            tuple(f for f in show if f in schema), float(value) if value is not None else 0.5)
    kind, key = "vlm", name
    if name not in runs and name.endswith(FUSED_SUFFIX):
        kind, key = "fused", name[: -len(FUSED_SUFFIX)]
    config = recorded_config(dataset, key) if key in runs else None
    if _method(config) not in JUDGE_METHODS:
        raise ValueError(f"{name!r} is not a scoring run, VLM judge run or fused score of this dataset; "
                         f"choose one of {scoring_runs(dataset)}")
    jf = JudgeFieldNames(key)
    show = [jf.label, jf.defect, jf.location, jf.explanation, jf.regions]
    expert = config.expert
    if expert:
        show += [FieldNames(expert).map, FieldNames(expert).label]
    # the judge labels a sample anomalous when P(anomalous) >= 0.5, unless reviews moved the threshold
    threshold = float(config.review_thresholds.get(name, 0.5))
    if kind == "fused":
        return ReviewTarget(name, key, "fused", jf.fused, None, tuple(f for f in show if f in schema), threshold)
    return ReviewTarget(name, key, "vlm", jf.p_anomalous, jf.label, tuple(f for f in show if f in schema), threshold)


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
        method = _method(recorded_config(dataset, key))
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


def run_fields(samples, key: str) -> list[str]:
    """The fields worth showing on each sample in the App for review target ``key``: the label, heatmap, mask,
    defect regions and explanation of the expert, and the VLM judge's verdict, defect type, location, explanation and regions, where
    they exist."""
    return list(review_target(samples, key).show)


def calibration_of(samples, key: str) -> Calibration | None:
    """The normal-only calibration of expert scoring run ``key`` (what maps its raw scores to ``<key>_score``
    and holds its raw thresholds); None for VLM and fused scores and for experts that calibrate themselves."""
    target = review_target(samples, key)
    config = recorded_config(samples._root_dataset, target.run_key)
    if target.kind != "expert" or not getattr(config, "calibration", None):
        return None
    return Calibration.from_dict(config.calibration)
