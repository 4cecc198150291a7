"""Which fields hold ground truth, and how many samples are known to be anomalous.

Used by the forms to keep work off the wrong samples: the fit form counts target samples that are labelled or
tagged anomalous (an expert must learn normals only), ``group_by`` never offers a ground-truth field (one
expert per defect class would learn the anomalies), and the evaluation form proposes ground-truth fields.

Rules, in one place:

- **Labelled anomalous** in a known labels field (:func:`count_labelled_anomalous`), as
  :func:`~fiftyone_anomaly_vlm.evaluate` reads ground truth (:func:`~.ground_truth.field_kind`): a
  ``fo.Classification`` or string equal to ``positive``; a boolean True; a number above ``gt_threshold``; a
  ``fo.Segmentation`` that is set (its mask is not read: a form must stay quick).
- **Tagged anomalous** (:func:`anomaly_tags`): a tag whose lower-cased text, or the part before a ``:``, is
  one of :data:`ANOMALY_TAG_WORDS` (``anomalous``, ``defect``, ``Defect``, ``defect:scratch``...).
- **Looks like ground truth** (:func:`ground_truth_like`): a field named ``ground_truth``/``groundtruth``
  (or starting with it), a field whose name has a ``gt``, ``defect`` or ``anomal...`` word
  (``gt_label``, ``defect_type``, ``is_anomalous``), or a field a recorded evaluation used as ground truth.

Example:
    >>> count_labelled_anomalous(ds.match_tags("train"), "ground_truth")
    0
    >>> anomaly_tags(ds)
    {'defect': 12}
"""

from __future__ import annotations

import re

import fiftyone as fo
from fiftyone import ViewField as F

from .ground_truth import field_kind
from .labels import ANOMALOUS
from .runs import EVALUATION_METHOD, recorded_config, run_owned_fields, runs_of

#: tags (lower-cased, or their part before ``:``) that mark a sample as anomalous
ANOMALY_TAG_WORDS = frozenset({"anomalous", "anomaly", "anomalies", "abnormal", "defect", "defective", "defects",
                               "bad", "ng", "faulty"})
#: words of a field name (split on ``_``) that make it look like ground truth
_GT_WORDS = frozenset({"gt", "defect", "defects", "anomaly", "anomalous", "anomalies", "abnormal"})
_GT_PREFIX = re.compile(r"^ground_?truth", re.IGNORECASE)
_GT_TYPES = (fo.Classification, fo.Segmentation)
_SCALARS = (fo.FloatField, fo.IntField, fo.BooleanField, fo.StringField)


def gt_field_candidates(samples) -> tuple[list[str], list[str]]:
    """(ground-truth candidates, mask candidates) of ``samples``' dataset: classification, segmentation and
    scalar fields, leaving out the fields that runs wrote and FiftyOne's own."""
    dataset = samples._root_dataset
    own = run_owned_fields(dataset)  # evaluation runs' outcome fields, judge verdicts, expert labels
    gt, masks = [], []
    for name, f in dataset.get_field_schema().items():
        if name in own or name.startswith("_") or name in ("id", "filepath", "tags", "metadata", "media_type"):
            continue
        if isinstance(f, fo.EmbeddedDocumentField) and issubclass(f.document_type, _GT_TYPES):
            gt.append(name)
            if issubclass(f.document_type, fo.Segmentation):
                masks.append(name)
        elif isinstance(f, _SCALARS) and not isinstance(f, fo.ObjectIdField):
            gt.append(name)
    return gt, masks


def default_gt_field(candidates: list[str]) -> str | None:
    """The ground-truth field a form proposes: ``ground_truth`` when it is a candidate, else the first one."""
    return "ground_truth" if "ground_truth" in candidates else (candidates[0] if candidates else None)


def evaluated_gt_fields(samples) -> set[str]:
    """The fields recorded evaluations of ``samples``' dataset used as ground truth (labels and masks)."""
    dataset = samples._root_dataset
    out = set()
    for key in runs_of(dataset, EVALUATION_METHOD):
        config = recorded_config(dataset, key)
        out.update(f for f in (config.gt_field, config.gt_mask_field) if f)
    return out


def ground_truth_like(samples, path: str, extra: tuple[str, ...] | list[str] = (),
                      evaluated: set[str] | None = None) -> bool:
    """Whether field ``path`` (``"cell_type.label"`` or ``"camera"``) looks like ground truth (module rules),
    or is one of ``extra`` (e.g. the labels field a form names). ``evaluated``: :func:`evaluated_gt_fields`
    when already at hand (looked up otherwise)."""
    root = path.split(".")[0]
    if root in {e.split(".")[0] for e in extra if e}:
        return True
    if _GT_PREFIX.match(root) or _GT_WORDS.intersection(root.lower().split("_")):
        return True
    return root in (evaluated if evaluated is not None else evaluated_gt_fields(samples))


def count_labelled_anomalous(samples, field: str, positive: str = ANOMALOUS, gt_threshold: float = 0.0) -> int:
    """How many of ``samples`` are anomalous according to the known labels in ``field`` (module rules).

    Raises:
        ValueError: no such field, or one that cannot hold ground truth.
    """
    kind = field_kind(samples._root_dataset, field, "known labels")
    if kind == "classification":
        return samples.match(F(f"{field}.label") == positive).count()
    if kind == "string":
        return samples.match(F(field) == positive).count()
    if kind == "boolean":
        return samples.match(F(field) == True).count()  # noqa: E712 - a MongoDB expression, not a Python test
    if kind == "probability":
        return samples.match(F(field) > gt_threshold).count()
    return samples.exists(field).count()  # a mask: set at all


def anomaly_tags(samples) -> dict[str, int]:
    """The tags of ``samples`` that mark samples anomalous (module rules), with how many samples carry each."""
    counts = samples.count_sample_tags()
    return {tag: n for tag, n in sorted(counts.items())
            if tag.lower() in ANOMALY_TAG_WORDS or tag.split(":")[0].lower() in ANOMALY_TAG_WORDS}
