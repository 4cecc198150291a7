"""Evaluate a scoring run against ground truth and record the evaluation as a FiftyOne run.

Image level: AUROC, AP and F1-max of the run's scores (anomalib ``AUROC``, ``AUPR``, ``F1Max``), and
precision/recall/F1 with the confusion counts at the run's own threshold (the normal/anomalous labels in
``<key>``). Pixel level, where ground-truth masks exist: pixel AUROC and AUPRO (anomalib ``AUROC`` and
``AUPRO`` on ``anomaly_map``/``gt_mask``) of the run's heatmaps.

Ground truth may be a ``fo.Classification`` (``label == positive``), a string (``== positive``), a boolean
(True = anomalous), a number such as a defect probability (``> gt_threshold``), or a ``fo.Segmentation``
mask (any foreground pixel = anomalous; a sample without a mask is normal).

The evaluation is stored under ``eval_key`` (default ``<key>_eval``): the metrics in its config
(``dataset.get_run_info(eval_key).config.metrics``), the ROC/PR/PRO curve points in its results
(``dataset.load_run_results(eval_key)``, in any process), and one sample field ``<eval_key>`` holding
``TP``/``FP``/``FN``/``TN`` at the run's threshold (filter on it in the App). ``delete_run`` removes all of it.

Example:
    >>> results = fav.evaluate(ds, "padim", gt_field="ground_truth", gt_mask_field="ground_truth_mask")
    >>> results.metrics["auroc"], results.metrics["aupro"]
    (0.97, 0.81)
    >>> results.print_report()
    >>> results.plot_roc_curve().show()
    >>> ds.match(F("padim_eval") == "FN")       # missed defects

See Also:
    :func:`label_accuracy` for verdict or defect-type accuracy of label fields (VLM judges).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

import fiftyone as fo
import fiftyone.core.runs as fors
import fiftyone.core.utils as fou

from ._common import check_image_collection, check_key
from .fields import FieldNames, JudgeFieldNames
from .metrics import binary_image_metrics, f1_max_threshold, image_curves, pixel_metrics, threshold_metrics
from .runs import AnomalyEvaluationRunConfig

logger = logging.getLogger(__name__)

#: how maps and masks are brought to one size before the pixel metrics
PIXEL_RESIZE = ("ground-truth masks are resized to the run's heatmap size with nearest-neighbour interpolation "
                "(torch.nn.functional.interpolate), as anomalib resizes masks to the model's input size")
#: default heatmap range of a scoring run (16-bit PNGs)
_DEFAULT_RANGE = (0, 65535)
_OUTCOMES = {(True, True): "TP", (True, False): "FP", (False, True): "FN", (False, False): "TN"}


class AnomalyEvaluationResults(fors.RunResults):
    """Metrics and curve points of one evaluation (what ``dataset.load_run_results(eval_key)`` returns).

    Attributes:
        metrics: the numbers (also in the run's config): ``auroc``, ``ap``, ``f1_max``, ``f1_max_threshold``,
            ``f1``/``precision``/``recall``/``accuracy`` and ``tp``/``fp``/``fn``/``tn`` at the run's
            threshold, ``num_samples``, ``num_anomalous``; with masks also ``pixel_auroc``, ``aupro``,
            ``num_pixels``, ``num_anomalous_pixels``.
        roc: image ROC curve, ``{"fpr", "tpr", "thresholds"}``.
        pr: image precision-recall curve, ``{"precision", "recall", "thresholds"}``.
        pixel_roc: pixel ROC curve ``{"fpr", "tpr"}`` (thinned), or None.
        pro: PRO curve ``{"fpr", "pro"}`` up to the AUPRO FPR limit, or None.
    """

    def __init__(self, samples, config, key, backend=None, metrics=None, roc=None, pr=None, pixel_roc=None,
                 pro=None, **kwargs):
        super().__init__(samples, config, key, backend=backend, metrics=dict(metrics or {}), roc=roc, pr=pr,
                         pixel_roc=pixel_roc, pro=pro, **kwargs)

    def get_meta(self) -> dict[str, Any]:
        """The scalar metrics, stored beside the results."""
        return {k: v for k, v in self.metrics.items() if isinstance(v, (int, float))}

    def report(self) -> dict[str, Any]:
        """The metrics as a dict (a copy)."""
        return dict(self.metrics)

    def print_report(self) -> None:
        """Print a small table of the metrics."""
        print(self._report_text())

    def _report_text(self) -> str:
        m, cfg = self.metrics, self.config
        head = (f"Evaluation '{self.key}' of run '{getattr(cfg, 'run_key', '?')}' against "
                f"'{getattr(cfg, 'gt_field', '?')}': {m.get('num_samples', 0)} samples, "
                f"{m.get('num_anomalous', 0)} anomalous")
        rows = [("image AUROC", m.get("auroc")), ("image AP", m.get("ap")), ("image F1-max", m.get("f1_max"))]
        if "f1" in m:
            rows += [("F1 at run threshold", m["f1"]), ("precision", m["precision"]), ("recall", m["recall"])]
        if "pixel_auroc" in m:
            rows += [("pixel AUROC", m["pixel_auroc"]), (f"AUPRO (FPR <= {m.get('aupro_fpr_limit', 0.3)})",
                                                         m["aupro"])]
        width = max(len(r[0]) for r in rows) + 2
        lines = [head, f"{'metric':<{width}}value", "-" * (width + 6)]
        lines += [f"{name:<{width}}{value:.4f}" for name, value in rows if value is not None]
        if "tp" in m:
            lines.append(f"{'confusion':<{width}}TP {m['tp']}  FP {m['fp']}  FN {m['fn']}  TN {m['tn']}")
        return "\n".join(lines)

    def plot_roc_curve(self, pixel: bool = False):
        """ROC curve as a plotly figure.

        Args:
            pixel: plot the pixel-level ROC instead of the image-level one.

        Returns:
            a ``plotly.graph_objects.Figure``.
        """
        curve = self.pixel_roc if pixel else self.roc
        if curve is None:
            raise ValueError("this evaluation has no pixel ROC curve (it was run without a mask field)")
        auc = self.metrics["pixel_auroc" if pixel else "auroc"]
        what = "Pixel" if pixel else "Image"
        return _figure(curve["fpr"], curve["tpr"], f"{what} ROC ({self.key}): AUROC {auc:.3f}",
                       "False positive rate", "True positive rate", baseline=([0, 1], [0, 1]),
                       text=None if pixel else curve.get("thresholds"))

    def plot_pr_curve(self):
        """Image precision-recall curve as a plotly figure, with the prevalence as the chance baseline.

        Returns:
            a ``plotly.graph_objects.Figure``.
        """
        m = self.metrics
        rate = m["num_anomalous"] / m["num_samples"]
        thresholds = list(self.pr.get("thresholds") or []) + [None]
        return _figure(self.pr["recall"], self.pr["precision"], f"Precision-recall ({self.key}): AP {m['ap']:.3f}",
                       "Recall", "Precision", baseline=([0, 1], [rate, rate]), text=thresholds, step=True)

    def plot_pro_curve(self):
        """Per-region overlap curve (the one AUPRO integrates) as a plotly figure.

        Returns:
            a ``plotly.graph_objects.Figure``.
        """
        if self.pro is None:
            raise ValueError("this evaluation has no PRO curve (it was run without a mask field)")
        return _figure(self.pro["fpr"], self.pro["pro"], f"PRO ({self.key}): AUPRO {self.metrics['aupro']:.3f}",
                       "False positive rate", "Per-region overlap")


def _figure(x, y, title, xlabel, ylabel, baseline=None, text=None, step=False):
    import plotly.graph_objects as go

    fig = go.Figure()
    hover = None
    if text is not None:
        hover = [f"score >= {t:.4g}" if t is not None else "" for t in text]
    fig.add_trace(go.Scatter(x=list(x), y=list(y), mode="lines", name=ylabel, text=hover,
                             line_shape="hv" if step else "linear"))
    if baseline is not None:
        fig.add_trace(go.Scatter(x=baseline[0], y=baseline[1], mode="lines", name="chance",
                                 line={"dash": "dash", "color": "gray"}))
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title=ylabel, xaxis_range=[0, 1],
                      yaxis_range=[0, 1.02], template="plotly_white")
    return fig


# --------------------------------------------------------------------------------------------- ground truth

def _field_kind(dataset, field: str, what: str) -> str:
    schema = dataset.get_field_schema()
    if field not in schema:
        candidates = sorted(schema)
        raise ValueError(f"unknown {what} field {field!r}; the dataset's fields are {candidates}")
    f = schema[field]
    if isinstance(f, fo.EmbeddedDocumentField):
        if issubclass(f.document_type, fo.Classification):
            return "classification"
        if issubclass(f.document_type, fo.Segmentation):
            return "mask"
        raise ValueError(f"{what} field {field!r} holds {f.document_type.__name__}; expected a Classification, "
                         "a Segmentation mask, a number, a string or a boolean")
    if isinstance(f, fo.BooleanField):
        return "boolean"
    if isinstance(f, (fo.FloatField, fo.IntField)):
        return "probability"
    if isinstance(f, fo.StringField):
        return "string"
    raise ValueError(f"{what} field {field!r} is a {type(f).__name__}; expected a Classification, a Segmentation "
                     "mask, a number, a string or a boolean")


def _read_mask(seg) -> np.ndarray | None:
    if seg is None:
        return None
    mask = seg.get_mask()
    if mask is None:
        return None
    mask = np.asarray(mask)
    return mask.any(axis=-1) if mask.ndim == 3 else mask != 0


def _gt_labels(kind: str, values: list, positive: str, gt_threshold: float) -> np.ndarray:
    if kind == "classification":
        return np.array([v == positive for v in values], dtype=bool)
    if kind == "string":
        return np.array([v == positive for v in values], dtype=bool)
    if kind == "boolean":
        return np.array([bool(v) for v in values], dtype=bool)
    if kind == "probability":
        return np.array([float(v) > gt_threshold for v in values], dtype=bool)
    raise AssertionError(kind)


def _read_map(heatmap, default_range) -> np.ndarray:
    arr = np.asarray(heatmap.get_map(), dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., 0]
    lo, hi = heatmap.range or default_range
    return (arr - lo) / float(hi - lo) if hi > lo else arr


def _resize(arr: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    if arr.shape == size:
        return arr
    t = torch.as_tensor(np.ascontiguousarray(arr), dtype=torch.float32)[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return torch.nn.functional.interpolate(t, size=size, mode=mode, **kwargs)[0, 0].numpy()


# --------------------------------------------------------------------------------------------- evaluate

def evaluate(
    samples,
    key: str,
    gt_field: str = "ground_truth",
    *,
    positive: str = "anomalous",
    gt_threshold: float = 0.0,
    gt_mask_field: str | None = None,
    eval_key: str | None = None,
    score: str = "raw",
    progress: bool | Any = None,
) -> AnomalyEvaluationResults:
    """Evaluate scoring run ``key`` on ``samples`` against ground truth and record it under ``eval_key``.

    Samples without a score (errors, unscored) are left out; so are samples whose classification, string,
    boolean or numeric ground truth is missing. With a mask field, a sample without a mask counts as normal
    (an all-normal mask).

    Args:
        samples: a dataset or view (the evaluation's view is recorded with the run).
        key: the scoring run key (reads ``<key>_raw_score`` or ``<key>_score``, ``<key>`` and ``<key>_map``),
            a VLM judge run key (reads ``<key>_p_anomalous`` and the verdict ``<key>``; answers that could not
            be parsed are left out of the threshold metrics) or ``"<judge key>_fused"`` (the fused score).
        gt_field: ground truth: a ``fo.Classification`` or string field (``== positive`` is anomalous), a
            boolean field (True = anomalous), a numeric field such as a defect probability (``> gt_threshold``
            is anomalous) or a ``fo.Segmentation`` field (any foreground pixel is anomalous; it is then also
            the mask field unless ``gt_mask_field`` says otherwise).
        positive: the label that means anomalous.
        gt_threshold: for a numeric ``gt_field``, values above it are anomalous (ELPV ``defect_probability``:
            0 keeps every defect probability > 0).
        gt_mask_field: a ``fo.Segmentation`` field of defect masks (nonzero = defect) for pixel AUROC and AUPRO.
        eval_key: the key to record the evaluation under (default ``<key>_eval``); re-using it replaces the
            earlier evaluation.
        score: ``"raw"`` (the model's score, default: no ties introduced by calibration) or ``"calibrated"``
            (``<key>_score``). Rank metrics agree unless calibration merges scores.
        progress: FiftyOne progress convention: None/True/False, or a callable taking a ``ProgressBar``.

    Returns:
        :class:`AnomalyEvaluationResults`.

    Raises:
        ValueError: unknown or unsuitable ground-truth or mask field, no score field for ``key``, no sample
            with both a score and ground truth, only one class in the ground truth (all normal or all
            anomalous; likewise for pixels), or ``eval_key`` taken by another kind of run or by a field.
    """
    check_image_collection(samples, "evaluate")
    dataset = samples._root_dataset
    if score not in ("raw", "calibrated"):
        raise ValueError(f"score must be 'raw' or 'calibrated', got {score!r}")
    score_field, label_field, map_field, reserved = _run_fields(dataset, key, score)
    schema = dataset.get_field_schema()
    if score_field not in schema:
        runs = [k for k in dataset.list_runs() if f"{k}_score" in schema]
        raise ValueError(f"no score field {score_field!r}: {key!r} is not a scoring run on this dataset "
                         f"(scoring runs: {runs})")
    eval_key = check_key(eval_key or f"{key}_eval")
    _check_eval_key(dataset, eval_key, reserved=reserved)

    gt_kind = _field_kind(dataset, gt_field, "ground-truth")
    if gt_kind == "mask" and gt_mask_field is None:
        gt_mask_field = gt_field
    if gt_mask_field is not None and _field_kind(dataset, gt_mask_field, "mask") != "mask":
        raise ValueError(f"mask field {gt_mask_field!r} is not a fo.Segmentation field")

    view = samples.exists(score_field)
    if gt_kind != "mask":
        view = view.exists(gt_field)
    gt_path = f"{gt_field}.label" if gt_kind == "classification" else gt_field
    has_label = label_field is not None and label_field in schema
    paths = ["id", score_field] + ([f"{label_field}.label"] if has_label else [])
    paths += [] if gt_kind == "mask" else [gt_path]
    values = view.values(paths)
    ids, scores = values[0], np.asarray(values[1], dtype=np.float64)
    if not ids:
        raise ValueError(f"no sample of the view has both a score ({score_field!r}) and ground truth "
                         f"({gt_field!r})")

    pixel = None
    if gt_mask_field is not None or gt_kind == "mask":
        gt, pixel = _pixel_pass(view, ids, map_field, gt_mask_field, gt_field if gt_kind == "mask" else None,
                                progress)
    if gt_kind != "mask":
        gt = _gt_labels(gt_kind, values[-1], positive, gt_threshold)

    n_pos = int(gt.sum())
    if n_pos in (0, len(gt)):
        kind = "anomalous" if n_pos else "normal"
        raise ValueError(f"all {len(gt)} evaluated samples are {kind} according to {gt_field!r}: AUROC, AP and "
                         "F1 need both normal and anomalous samples; evaluate a view that holds both")
    metrics: dict[str, Any] = binary_image_metrics(scores, gt)
    metrics["f1_max_threshold"] = f1_max_threshold(scores, gt)
    curves = image_curves(scores, gt)
    outcomes = None
    if has_label:
        labels = values[2]
        known = [i for i, lab in enumerate(labels) if lab in ("anomalous", "normal")]  # not unparsed answers
        predicted = np.array([labels[i] == "anomalous" for i in known], dtype=bool)
        metrics.update(threshold_metrics(predicted, gt[known]))
        outcomes = {ids[i]: _OUTCOMES[(bool(p), bool(gt[i]))] for i, p in zip(known, predicted)}
        metrics["num_unlabelled"] = len(labels) - len(known)
    pix = {}
    if pixel is not None:
        pix = pixel_metrics(*pixel)
        metrics.update({k: pix[k] for k in ("pixel_auroc", "aupro", "num_pixels", "num_anomalous_pixels")})
        metrics["aupro_fpr_limit"] = 0.3
    metrics["num_left_out"] = samples.count() - len(ids)

    run_cfg = dataset.get_run_info(key).config if key in dataset.list_runs() else None
    config = AnomalyEvaluationRunConfig(
        run_key=key, score_field=score_field, label_field=label_field if has_label else None,
        map_field=map_field if pixel is not None else None, gt_field=gt_field, gt_kind=gt_kind,
        positive=positive, gt_threshold=gt_threshold if gt_kind == "probability" else None,
        gt_mask_field=gt_mask_field, pixel_resize=PIXEL_RESIZE if pixel is not None else None,
        run_threshold=getattr(run_cfg, "normalized_image_threshold", None), metrics=metrics,
    )
    results = AnomalyEvaluationResults(samples, config, eval_key, metrics=metrics, roc=curves["roc"],
                                       pr=curves["pr"], pixel_roc=pix.get("pixel_roc"), pro=pix.get("pro"))
    samples.register_run(eval_key, config, results=results, overwrite=True)
    if outcomes:
        dataset.set_values(eval_key, outcomes, key_field="id")
    return results


def _check_eval_key(dataset, eval_key: str, reserved: list[str]) -> None:
    if eval_key in reserved:
        raise ValueError(f"eval_key {eval_key!r} is a field of the scoring run; choose another key")
    if eval_key in dataset.list_runs():
        if not isinstance(dataset.get_run_info(eval_key).config, AnomalyEvaluationRunConfig):
            raise ValueError(f"key {eval_key!r} is already used by a run of another kind; choose another eval_key")
    elif eval_key in dataset.get_field_schema():
        raise ValueError(f"field {eval_key!r} exists and belongs to no evaluation; choose another eval_key")


def _run_fields(dataset, key: str, score: str) -> tuple[str, str | None, str | None, list[str]]:
    """(score field, label field, heatmap field, the run's own fields) of an expert scoring run, a VLM judge
    run (P(anomalous), its verdict, no heatmap) or a judge run's fused score (``"<judge key>_fused"``)."""
    from .review import review_target

    try:
        target = review_target(dataset, key)
    except ValueError:  # not a recorded run: an expert's field names (the missing score field is reported)
        target = None
    if target is not None and target.kind != "expert":
        return target.score, target.label, None, JudgeFieldNames(target.run_key).all()
    fields = FieldNames(key)
    return (fields.raw_score if score == "raw" else fields.score), fields.label, fields.map, fields.all()


def _pixel_pass(view, ids, map_field: str | None, mask_field: str | None, gt_mask_kind_field: str | None, progress):
    """Read maps and masks once: (image-level truth from masks or None, (maps, masks) or None)."""
    read_fields = [f for f in {mask_field, gt_mask_kind_field} if f]
    want_pixels = mask_field is not None
    if want_pixels and (map_field is None or map_field not in view._root_dataset.get_field_schema()):
        raise ValueError(f"the run has no heatmap field ({map_field!r}): pixel metrics need one")
    cols = view.values(["id", *read_fields] + ([map_field] if want_pixels else []))
    by_id = {row[0]: row[1:] for row in zip(*cols)}
    image_truth, maps, masks, size = [], [], [], None
    default_range = _DEFAULT_RANGE
    with fou.ProgressBar(total=len(ids), progress=progress) as pb:
        for sid in ids:
            row = dict(zip(read_fields + ([map_field] if want_pixels else []), by_id[sid]))
            if gt_mask_kind_field:
                m = _read_mask(row[gt_mask_kind_field])
                image_truth.append(bool(m is not None and m.any()))
            if want_pixels:
                heatmap = row[map_field]
                if heatmap is None:
                    raise ValueError(f"sample {sid} has a score but no heatmap in {map_field!r}")
                amap = _read_map(heatmap, default_range)
                size = size or amap.shape
                amap = _resize(amap, size, "bilinear")  # only when a run's maps differ in size
                gt = _read_mask(row[mask_field])
                gt = np.zeros(size, bool) if gt is None else _resize(gt.astype(np.float32), size, "nearest") > 0.5
                maps.append(amap)
                masks.append(gt.astype(np.uint8))
            pb.update()
    truth = np.array(image_truth, dtype=bool) if gt_mask_kind_field else None
    return truth, ((np.stack(maps), np.stack(masks)) if want_pixels else None)


# --------------------------------------------------------------------------------------------- label accuracy

def _label_path(dataset, field: str) -> str:
    kind = _field_kind(dataset, field, "label")
    if kind == "classification":
        return f"{field}.label"
    if kind in ("string", "boolean"):
        return field
    raise ValueError(f"label field {field!r} must be a Classification, string or boolean field, not {kind}")


def label_accuracy(samples, pred_field: str, gt_field: str) -> dict[str, Any]:
    """Accuracy of predicted labels against ground-truth labels: VLM verdicts, or defect types.

    This is the extension point for judge runs: pass the verdict field (normal/anomalous) and the
    ground-truth classification for verdict accuracy, or a predicted and a true defect-type field
    (on a view of the defective samples) for defect-type accuracy. Samples missing either label are left out.

    Args:
        samples: a dataset or view.
        pred_field: predicted labels (``fo.Classification``, string or boolean field).
        gt_field: true labels (``fo.Classification``, string or boolean field).

    Returns:
        ``accuracy``, ``num_samples``, ``num_correct``, ``num_missing`` (samples left out) and ``per_label``:
        ``{true label: {"support", "correct", "accuracy"}}`` (the recall of each true label).

    Raises:
        ValueError: unknown or unsuitable field, or no sample with both labels.
    """
    dataset = samples._root_dataset
    pred_path, gt_path = _label_path(dataset, pred_field), _label_path(dataset, gt_field)
    preds, gts = samples.values([pred_path, gt_path])
    pairs = [(p, g) for p, g in zip(preds, gts) if p is not None and g is not None]
    if not pairs:
        raise ValueError(f"no sample has both {pred_field!r} and {gt_field!r}")
    per_label: dict[str, dict[str, Any]] = {}
    for p, g in pairs:
        row = per_label.setdefault(str(g), {"support": 0, "correct": 0})
        row["support"] += 1
        row["correct"] += int(p == g)
    for row in per_label.values():
        row["accuracy"] = row["correct"] / row["support"]
    correct = sum(r["correct"] for r in per_label.values())
    return {"accuracy": correct / len(pairs), "num_samples": len(pairs), "num_correct": correct,
            "num_missing": len(preds) - len(pairs), "per_label": dict(sorted(per_label.items()))}
