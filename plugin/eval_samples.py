"""Which samples an evaluation uses: the scored samples with ground truth, less those the run's expert has seen.

An expert scores its own training samples and held-out calibration normals low by construction (its threshold
was set on the latter): evaluating on them inflates AUROC (1.000 on the parts demo's whole dataset). So
:func:`~fiftyone_anomaly_vlm.evaluate` leaves them out by default, for every kind of run that has an expert
behind it: an expert scoring run, a VLM judge run guided by one, and a judge run's fused score (see
:func:`~.experts.targets.expert_fit_samples` for what counts as seen, composites and ensembles included).

Example:
    >>> fit = run_fit_samples(ds, "padim")
    >>> fit.experts, len(fit.ids)
    (['padim'], 24)
    >>> evaluation_view(ds, "padim").count()      # what the evaluation form says it will evaluate
    18
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import fiftyone as fo

from .experts.targets import FitSamples, expert_fit_samples
from .reviewing.targets import review_target
from .runs import recorded_config

logger = logging.getLogger(__name__)


@dataclass
class ExcludedFit:
    """What an evaluation left out because the run's expert was fitted on it.

    Attributes:
        enabled: ``exclude_fit_samples`` as asked.
        num_excluded: scored samples with ground truth left out.
        experts: the experts whose fitted samples were looked up (empty: the run has no expert behind it).
        unknown: those whose fitted samples are not recorded (nothing of theirs left out).
    """

    enabled: bool
    num_excluded: int = 0
    experts: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def run_expert(samples, key: str) -> str | None:
    """The expert behind review target ``key``: a scoring run's expert, or the expert of the scoring run that
    guided a VLM judge run (also for its fused score); None when there is none (or ``key`` is not a run)."""
    dataset = samples._root_dataset
    try:
        target = review_target(dataset, key)
    except ValueError:
        return None
    config = recorded_config(dataset, target.run_key)
    if target.kind != "expert":
        scoring = config.expert
        if not scoring or scoring not in dataset.list_runs():
            return None
        config = recorded_config(dataset, scoring)
    return config.expert


def run_fit_samples(samples, key: str) -> FitSamples:
    """The samples the expert behind run ``key`` has seen (empty when no expert is behind it)."""
    expert = run_expert(samples, key)
    return expert_fit_samples(samples, expert) if expert else FitSamples()


def without_fit_samples(samples, key: str, columns: list[list], exclude: bool) -> tuple[list[list], ExcludedFit]:
    """Drop from ``columns`` (parallel lists of values, sample ids first) the samples run ``key``'s expert has seen.

    Warns (``UserWarning`` and the log) when some expert's fitted samples are not recorded.

    Raises:
        ValueError: every sample is one the expert has seen.
    """
    if not exclude:
        return columns, ExcludedFit(enabled=False)
    fit = run_fit_samples(samples, key)
    note = fit.warning()
    if note:
        warnings.warn(note, UserWarning, stacklevel=3)
        logger.warning(note)
    keep = [i for i, sid in enumerate(columns[0]) if sid not in fit.ids]
    if not keep:
        raise ValueError(f"all {len(columns[0])} scored samples of the view were used to fit expert "
                         f"{fit.experts[0]!r} (its training or held-out calibration samples): its scores on them say "
                         "nothing about new samples. Evaluate other samples, or pass exclude_fit_samples=False")
    out = columns if len(keep) == len(columns[0]) else [[col[i] for i in keep] for col in columns]
    return out, ExcludedFit(enabled=True, num_excluded=len(columns[0]) - len(keep), experts=fit.experts,
                            unknown=fit.unknown)


def evaluation_view(samples, key: str, gt_field: str | None = None, exclude_fit_samples: bool = True):
    """The samples of ``samples`` an evaluation of run ``key`` would use: scored, with ground truth in
    ``gt_field`` (any, for a mask field or None), less those its expert has seen when ``exclude_fit_samples``."""
    target = review_target(samples, key)
    view = samples.exists(target.score)
    schema = samples._root_dataset.get_field_schema()
    is_mask = isinstance(schema.get(gt_field), fo.EmbeddedDocumentField) and issubclass(
        schema[gt_field].document_type, fo.Segmentation)
    if gt_field and gt_field in schema and not is_mask:
        view = view.exists(gt_field)
    if exclude_fit_samples:
        seen = run_fit_samples(samples, key).ids
        if seen:
            view = view.exclude(list(seen))
    return view


def evaluation_counts(samples, key: str, gt_field: str | None = None, exclude_fit_samples: bool = True
                      ) -> tuple[int, int, FitSamples]:
    """(samples an evaluation of ``key`` on ``samples`` would use, how many of the scored samples with ground
    truth are ones its expert has seen, what it has seen): what the evaluation form says before it runs."""
    scored = evaluation_view(samples, key, gt_field, exclude_fit_samples=False)
    fit = run_fit_samples(samples, key)
    seen = len(fit.ids.intersection(scored.values("id"))) if fit.ids else 0
    n = scored.count() - (seen if exclude_fit_samples else 0)
    return n, seen, fit
