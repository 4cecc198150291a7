"""The samples an expert has seen, and a check of the samples an expert is about to be fitted on.

An expert's scores on the samples it was fitted on say nothing about how it does on new ones: its training
samples and its held-out calibration normals (which set its threshold) are left out of an evaluation by
default (:func:`expert_fit_samples`). What counts as seen, per kind of expert:

- an anomalib expert: its ``train_ids`` and ``holdout_ids`` (recorded with its fitted state);
- a composite (per-group expert or ensemble): its own calibration samples (``holdout_ids``) and, recursively,
  everything its members have seen;
- a CLIP expert: its few-shot ``reference_ids`` (none when zero-shot).

Experts recorded before these ids were (or whose run is gone) are reported as ``unknown``: nothing of theirs is
left out, and :meth:`FitSamples.warning` says so.

Before a fit, :func:`check_fit_target` counts the target samples and says what is wrong with them: no filter
(the whole dataset, anomalies included), samples labelled anomalous in a known labels field, or samples tagged
anomalous (rules in :mod:`fiftyone_anomaly_vlm.gt_fields`).

Example:
    >>> check_fit_target(ds.match_tags("train"), labels_field="ground_truth").warnings()
    []
    >>> check_fit_target(ds, labels_field="ground_truth").warnings()[0]
    'No filter: this fits on all 42 samples of the dataset, anomalies included. ...'
    >>> len(expert_fit_samples(ds, "padim").ids)
    24
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..gt_fields import anomaly_tags, count_labelled_anomalous, evaluated_gt_fields, ground_truth_like
from ..labels import ANOMALOUS
from ..runs import CLIP_METHOD, COMPOSITE_METHOD, expert_run_key, expert_state, recorded_config
from .grouped import group_fields


@dataclass
class FitSamples:
    """The samples one expert (with its members) was fitted or calibrated on.

    Attributes:
        ids: the sample ids (training, held-out calibration, references).
        experts: the experts looked at (the expert and, for a composite, its members).
        unknown: experts whose fitted samples are not recorded (older releases) or whose run is gone.
    """

    ids: set[str] = field(default_factory=set)
    experts: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def warning(self) -> str | None:
        """What could not be left out, or None."""
        if not self.unknown:
            return None
        return (f"the samples expert(s) {self.unknown} were fitted on are not recorded (fitted by an earlier "
                "release, or deleted): none of theirs are left out, so scores on their training samples may look "
                "better than they are")


def expert_fit_samples(samples, expert: str) -> FitSamples:
    """The samples expert ``expert`` (a name, as ``fit_expert(key=...)``) has seen; see the module docs."""
    dataset = samples._root_dataset
    out = FitSamples()
    todo, done = [expert], set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        out.experts.append(name)
        run_key = expert_run_key(name)
        config = recorded_config(dataset, run_key) if run_key in dataset.list_runs() else None
        if config is None:
            out.unknown.append(name)
            continue
        method = getattr(config, "method", None)
        if method == CLIP_METHOD:
            out.ids.update(getattr(config, "reference_ids", None) or [])
            continue
        state = expert_state(dataset, run_key)
        if method == COMPOSITE_METHOD:
            members = getattr(config, "members", None) or {}
            todo.extend(m for keys in members.values() for m in keys)
            if state["holdout_ids"] is None:
                out.unknown.append(name)
            out.ids.update(state["holdout_ids"] or [])
            continue
        if state["train_ids"] is None or state["holdout_ids"] is None:
            out.unknown.append(name)
        out.ids.update(state["train_ids"] or [])
        out.ids.update(state["holdout_ids"] or [])
    return out


@dataclass
class FitTargetCheck:
    """What :func:`check_fit_target` found about the samples a fit would use.

    Attributes:
        num_samples: samples in the target.
        num_dataset: samples in the whole dataset.
        whole_dataset: the target holds every sample of the dataset (no filter applied).
        labels_field: the known labels field looked at (None: none).
        num_labelled_anomalous: target samples anomalous according to ``labels_field``.
        tags: anomaly tags on target samples, with their sample counts.
    """

    num_samples: int
    num_dataset: int
    whole_dataset: bool
    labels_field: str | None = None
    num_labelled_anomalous: int = 0
    tags: dict[str, int] = field(default_factory=dict)

    def warnings(self) -> list[str]:
        """One sentence per problem (empty when the target looks like known-good samples only)."""
        out = []
        if self.whole_dataset:
            out.append(f"No filter: this fits on all {self.num_samples} samples of the dataset, anomalies included. "
                       "Filter the view to known-good samples first (e.g. match a 'good' tag).")
        if self.num_labelled_anomalous:
            out.append(f"{self.num_labelled_anomalous} of the {self.num_samples} samples are labelled anomalous in "
                       f"'{self.labels_field}': an expert must learn normal samples only.")
        if self.tags:
            tagged = ", ".join(f"{n} tagged '{tag}'" for tag, n in self.tags.items())
            out.append(f"{tagged} among the {self.num_samples} samples: an expert must learn normal samples only.")
        return out


def check_fit_target(samples, labels_field: str | None = None, positive: str = ANOMALOUS,
                     gt_threshold: float = 0.0) -> FitTargetCheck:
    """Count the samples a fit would use and what speaks against them (a few aggregations).

    Args:
        samples: the fit's target (a dataset or view).
        labels_field: a known labels field (ground truth, reviews...), read as :func:`fiftyone_anomaly_vlm.evaluate`
            reads ground truth; None: only tags are looked at.
        positive: the label that means anomalous.
        gt_threshold: for a numeric labels field, above it is anomalous.

    Returns:
        :class:`FitTargetCheck` (``warnings()`` gives the sentences to show).
    """
    dataset = samples._root_dataset
    n, total = samples.count(), dataset.count()
    labelled = count_labelled_anomalous(samples, labels_field, positive, gt_threshold) if labels_field else 0
    return FitTargetCheck(num_samples=n, num_dataset=total, whole_dataset=n == total and n > 0,
                          labels_field=labels_field, num_labelled_anomalous=labelled, tags=anomaly_tags(samples))


def group_by_choices(samples, labels_field: str | None = None) -> list[str]:
    """Fields offered for ``fit_expert(group_by=...)``: :func:`~.grouped.group_fields` without those that look like
    ground truth (:func:`~fiftyone_anomaly_vlm.gt_fields.ground_truth_like`) or are ``labels_field``."""
    extra = [labels_field] if labels_field else []
    evaluated = evaluated_gt_fields(samples)
    return [f for f in group_fields(samples) if not ground_truth_like(samples, f, extra, evaluated)]
