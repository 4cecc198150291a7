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

import fiftyone.core.runs as fors

from ._common import check_image_collection, check_key, field_key
from .engine import record_run
from .eval_samples import without_fit_samples
from .fields import FieldNames, JudgeFieldNames
from .ground_truth import field_kind, gt_labels, label_accuracy, pixel_pass
from .metrics import binary_image_metrics, f1_max_threshold, image_curves, pixel_metrics, threshold_metrics
from .reviewing.targets import review_target
from .runs import AnomalyEvaluationRunConfig

logger = logging.getLogger(__name__)

#: how maps and masks are brought to one size before the pixel metrics
PIXEL_RESIZE = ("ground-truth masks are resized to the run's heatmap size with nearest-neighbour interpolation "
                "(torch.nn.functional.interpolate), as anomalib resizes masks to the model's input size")
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
        if getattr(cfg, "num_fit_samples_excluded", 0):
            head += f" ({cfg.num_fit_samples_excluded} samples the expert was fitted on left out)"
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
    exclude_fit_samples: bool = True,
    progress: bool | Any = None,
) -> AnomalyEvaluationResults:
    """Evaluate scoring run ``key`` on ``samples`` against ground truth and record it under ``eval_key``.

    Samples without a score (errors, unscored) are left out; so are samples whose classification, string,
    boolean or numeric ground truth is missing. With a mask field, a sample without a mask counts as normal
    (an all-normal mask). By default the samples the run's expert was fitted on (training and held-out
    calibration samples, members' too for a composite; see :func:`~.experts.targets.expert_fit_samples`) are
    left out as well: its scores on them say nothing about new samples. The run records how many
    (``config.num_fit_samples_excluded``).

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
        exclude_fit_samples: leave out the samples the run's expert was fitted or calibrated on (default). For
            experts whose fitted samples were not recorded (earlier releases) nothing is left out and a
            warning says so.
        progress: FiftyOne progress convention: None/True/False, or a callable taking a ``ProgressBar``.

    Returns:
        :class:`AnomalyEvaluationResults`.

    Raises:
        ValueError: unknown or unsuitable ground-truth or mask field, no score field for ``key``, no sample
            with both a score and ground truth, only one class in the ground truth (all normal or all
            anomalous; likewise for pixels), every scored sample is one the expert was fitted on (with
            ``exclude_fit_samples``), or ``eval_key`` taken by another kind of run or by a field.
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
    eval_key = check_key(eval_key or field_key(f"{key}_eval"))  # a run recorded under "a__b": "a_b_eval"
    _check_eval_key(dataset, eval_key, reserved=reserved)

    gt_kind = field_kind(dataset, gt_field, "ground-truth")
    if gt_kind == "mask" and gt_mask_field is None:
        gt_mask_field = gt_field
    if gt_mask_field is not None and field_kind(dataset, gt_mask_field, "mask") != "mask":
        raise ValueError(f"mask field {gt_mask_field!r} is not a fo.Segmentation field")

    view = samples.exists(score_field)
    if gt_kind != "mask":
        view = view.exists(gt_field)
    gt_path = f"{gt_field}.label" if gt_kind == "classification" else gt_field
    has_label = label_field is not None and label_field in schema
    paths = ["id", score_field] + ([f"{label_field}.label"] if has_label else [])
    paths += [] if gt_kind == "mask" else [gt_path]
    values = view.values(paths)
    if not values[0]:
        raise ValueError(f"no sample of the view has both a score ({score_field!r}) and ground truth "
                         f"({gt_field!r})")
    values, fit = without_fit_samples(dataset, key, values, exclude_fit_samples)
    ids, scores = values[0], np.asarray(values[1], dtype=np.float64)

    pixel = None
    if gt_mask_field is not None or gt_kind == "mask":
        gt, pixel = pixel_pass(view, ids, map_field, gt_mask_field, gt_field if gt_kind == "mask" else None,
                                progress)
    if gt_kind != "mask":
        gt = gt_labels(gt_kind, values[-1], positive, gt_threshold)

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
        exclude_fit_samples=exclude_fit_samples, num_fit_samples_excluded=fit.num_excluded,
        fit_experts=fit.experts, fit_samples_unknown=fit.unknown,
    )
    results = AnomalyEvaluationResults(samples, config, eval_key, metrics=metrics, roc=curves["roc"],
                                       pr=curves["pr"], pixel_roc=pix.get("pixel_roc"), pro=pix.get("pro"))
    record_run(samples, eval_key, config, results, cleanup=True)
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
    try:
        target = review_target(dataset, key)
    except ValueError:  # not a recorded run: an expert's field names (the missing score field is reported)
        target = None
    if target is not None and target.kind != "expert":
        return target.score, target.label, None, JudgeFieldNames(target.run_key).all()
    fields = FieldNames(key)
    return (fields.raw_score if score == "raw" else fields.score), fields.label, fields.map, fields.all()
