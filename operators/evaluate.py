"""Operator: evaluate a scoring run against ground truth (records an evaluation run)."""

from __future__ import annotations

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm import evaluate
from fiftyone_anomaly_vlm.reviewing import review_target, run_owned_fields, scoring_runs
from fiftyone_anomaly_vlm.runs import AnomalyEvaluationRunConfig

from ._forms import check_key, dropdown, nothing_to_choose
from ._progress import long_running_config, reports_errors, run_with_progress

_GT_TYPES = (fo.Classification, fo.Segmentation)


def _gt_fields(dataset, run: str) -> tuple[list[str], list[str]]:
    """(ground-truth candidates, mask candidates), leaving out the fields that runs wrote."""
    own = run_owned_fields(dataset)  # evaluation runs' outcome fields, judge verdicts, expert labels
    gt, masks = [], []
    for name, f in dataset.get_field_schema().items():
        if name in own or name.startswith("_") or name in ("id", "filepath", "tags", "metadata"):
            continue
        if isinstance(f, fo.EmbeddedDocumentField) and issubclass(f.document_type, _GT_TYPES):
            gt.append(name)
            if issubclass(f.document_type, fo.Segmentation):
                masks.append(name)
        elif isinstance(f, (fo.FloatField, fo.IntField, fo.BooleanField, fo.StringField)):
            gt.append(name)
    return gt, masks


def check_both_classes(view, run: str, gt_field: str, positive: str) -> None:
    """Before any mask is read: a classification or string ground truth must hold both classes among the
    scored samples (the same check as :func:`~fiftyone_anomaly_vlm.evaluate`, which makes it after its
    pixel pass). One aggregation; other kinds of ground truth are left to the core."""
    field = view.get_field_schema().get(gt_field)
    if isinstance(field, fo.EmbeddedDocumentField) and issubclass(field.document_type, fo.Classification):
        path = f"{gt_field}.label"
    elif isinstance(field, fo.StringField):
        path = gt_field
    else:
        return
    labels = view.exists(review_target(view, run).score).exists(gt_field).count_values(path)
    total, n_pos = sum(labels.values()), labels.get(positive, 0)
    if total and n_pos in (0, total):
        kind = "anomalous" if n_pos else "normal"
        raise ValueError(f"all {total} evaluated samples are {kind} according to {gt_field!r}: AUROC, AP and F1 "
                         "need both normal and anomalous samples; evaluate a view that holds both")


class EvaluateAnomalies(foo.Operator):
    """Form over :func:`fiftyone_anomaly_vlm.evaluate`: scoring run, ground truth, optional masks, key."""

    @property
    def config(self):
        return long_running_config("evaluate_anomalies", "Anomaly: evaluate against ground truth",
                                   "Image AUROC/AP/F1 and pixel AUROC/AUPRO of a scoring run, recorded as a run",
                                   "rule", delegate_by_default=False)

    def resolve_input(self, ctx):
        inputs = types.Object()
        view = types.View(label="Evaluate a scoring run")
        inputs.view_target(ctx)
        runs = scoring_runs(ctx.dataset) if ctx.dataset else []
        if not runs:
            return nothing_to_choose(inputs, "no_run", "No scoring run",
                                     "No scoring run on this dataset: run 'Anomaly: score samples' first",
                                     "Evaluate a scoring run")
        run = ctx.params.get("run") or runs[0]
        dropdown(inputs, "run", runs, runs[0], "Scoring run", "An expert run, a VLM judge run or a fused score",
                 required=True)
        gt, masks = _gt_fields(ctx.dataset, run)
        default_gt = "ground_truth" if "ground_truth" in gt else (gt[0] if gt else None)
        dropdown(inputs, "gt_field", gt, default_gt, "Ground truth",
                 "Classification/string (== positive label), number (> threshold), boolean, or a mask",
                 required=True)
        inputs.str("positive", default="anomalous", label="Label that means anomalous")
        gt_field = ctx.params.get("gt_field") or default_gt
        schema = ctx.dataset.get_field_schema()
        if gt_field in schema and isinstance(schema[gt_field], (fo.FloatField, fo.IntField)):
            inputs.float("gt_threshold", default=0.0, label="Anomalous when the value is above")
        if masks:
            dropdown(inputs, "gt_mask_field", masks, None, "Ground-truth masks (optional)",
                     "For pixel AUROC and AUPRO")
        eval_key = ctx.params.get("eval_key") or f"{run}_eval"
        key_prop = inputs.str("eval_key", default=f"{run}_eval", required=True, label="Evaluation key",
                              description="Re-using an evaluation key replaces that evaluation")
        taken = [k for k in ctx.dataset.list_runs()
                 if not isinstance(ctx.dataset.get_run_info(k).config, AnomalyEvaluationRunConfig)]
        check_key(key_prop, eval_key, taken, "Run")
        return types.Property(inputs, view=view)

    @reports_errors
    def execute(self, ctx):
        p = ctx.params
        check_both_classes(ctx.target_view(), p["run"], p.get("gt_field") or "ground_truth",
                           p.get("positive") or "anomalous")
        results = yield from run_with_progress(
            ctx, "evaluating", evaluate, ctx.target_view(), p["run"], p.get("gt_field") or "ground_truth",
            positive=p.get("positive") or "anomalous", gt_threshold=float(p.get("gt_threshold") or 0.0),
            gt_mask_field=p.get("gt_mask_field") or None, eval_key=p.get("eval_key") or None,
        )
        if not ctx.delegated:
            yield ctx.trigger("reload_dataset")
        m = results.metrics
        msg = f"'{results.key}': image AUROC {m['auroc']:.3f}, AP {m['ap']:.3f}, F1-max {m['f1_max']:.3f}"
        if "aupro" in m:
            msg += f"; pixel AUROC {m['pixel_auroc']:.3f}, AUPRO {m['aupro']:.3f}"
        yield ctx.trigger("notify", dict(message=msg, variant="success"))
