"""Operator: evaluate a scoring run against ground truth (records an evaluation run)."""

from __future__ import annotations

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm import evaluate
from fiftyone_anomaly_vlm.eval_samples import evaluation_counts, evaluation_view
from fiftyone_anomaly_vlm.gt_fields import default_gt_field, gt_field_candidates
from fiftyone_anomaly_vlm.reviewing import scoring_runs
from fiftyone_anomaly_vlm.runs import AnomalyEvaluationRunConfig

from ._forms import check_key, dropdown, nothing_to_choose, notices, target_input
from ._progress import long_running_config, reports_errors, run_with_progress


def check_both_classes(view, run: str, gt_field: str, positive: str, exclude_fit_samples: bool = True) -> None:
    """Before any mask is read: a classification or string ground truth must hold both classes among the
    samples evaluated (the same check as :func:`~fiftyone_anomaly_vlm.evaluate`, which makes it after its
    pixel pass, on the same samples: scored, with ground truth, less the expert's fitted samples when
    ``exclude_fit_samples``). One aggregation; other kinds of ground truth are left to the core."""
    field = view.get_field_schema().get(gt_field)
    if isinstance(field, fo.EmbeddedDocumentField) and issubclass(field.document_type, fo.Classification):
        path = f"{gt_field}.label"
    elif isinstance(field, fo.StringField):
        path = gt_field
    else:
        return
    labels = evaluation_view(view, run, gt_field, exclude_fit_samples).count_values(path)
    total, n_pos = sum(labels.values()), labels.get(positive, 0)
    if total and n_pos in (0, total):
        kind = "anomalous" if n_pos else "normal"
        raise ValueError(f"all {total} evaluated samples are {kind} according to {gt_field!r}: AUROC, AP and F1 "
                         "need both normal and anomalous samples; evaluate a view that holds both")


def free_eval_key(taken: list[str], run: str) -> str:
    """The evaluation key proposed for ``run``: ``<run>_eval``, else ``<run>_eval_2``, ``_3``... (never one in use)."""
    key, i = f"{run}_eval", 2
    while key in taken:
        key, i = f"{run}_eval_{i}", i + 1
    return key


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
        # the current view by default: a selection left over in the grid is offered, never picked silently
        target, where = target_input(ctx, inputs, "Evaluate", prefer=("CURRENT_VIEW", "DATASET"))
        runs = scoring_runs(ctx.dataset) if ctx.dataset else []
        if not runs:
            return nothing_to_choose(inputs, "no_run", "No scoring run",
                                     "No scoring run on this dataset: run 'Anomaly: score samples' first",
                                     "Evaluate a scoring run")
        run = ctx.params.get("run") or runs[0]
        dropdown(inputs, "run", runs, runs[0], "Scoring run", "An expert run, a VLM judge run or a fused score",
                 required=True)
        gt, masks = gt_field_candidates(ctx.dataset)
        default_gt = default_gt_field(gt)
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
        inputs.bool("exclude_fit_samples", default=True, label="Leave out the expert's own samples",
                    description="Its training and held-out calibration samples: its scores on them say nothing "
                                "about new samples")
        self._count_notice(ctx, inputs, target, where, run, gt_field if gt_field in schema else None)
        self._key_input(ctx, inputs, run)
        return types.Property(inputs, view=view)

    @staticmethod
    def _count_notice(ctx, inputs, target, where: str, run: str, gt_field: str | None) -> None:
        """Say how many samples the evaluation will use, and what it does with those the expert has seen."""
        exclude = bool(ctx.params.get("exclude_fit_samples", True))
        n, seen, fit = evaluation_counts(target, run, gt_field, exclude)
        summary = f"Evaluates {n} samples of {where} (scored, with ground truth)"
        warnings = [w for w in [fit.warning()] if w and exclude]
        if seen and exclude:
            summary += f"; leaves out {seen} that expert '{fit.experts[0]}' was fitted on"
        elif seen:
            warnings.append(f"{seen} of them are samples expert '{fit.experts[0]}' was fitted on: its metrics will "
                            "look better than they are")
        notices(inputs, "eval_target", summary, warnings)

    @staticmethod
    def _key_input(ctx, inputs, run: str) -> None:
        """The evaluation key: a free key is proposed; an evaluation in use is replaced only when ticked."""
        runs = ctx.dataset.list_runs()
        evaluations = [k for k in runs if isinstance(ctx.dataset.get_run_info(k).config, AnomalyEvaluationRunConfig)]
        default = free_eval_key(runs, run)
        key_prop = inputs.str("eval_key", default=default, required=True, label="Evaluation key",
                              description="The run the evaluation is recorded as")
        eval_key = ctx.params.get("eval_key") or default
        if eval_key in evaluations:
            inputs.bool("overwrite", default=False, label=f"Replace the evaluation '{eval_key}'")
        taken = [k for k in runs if k not in evaluations or not ctx.params.get("overwrite")]
        check_key(key_prop, eval_key, taken, "Run")

    @reports_errors
    def execute(self, ctx):
        p = ctx.params
        exclude = bool(p.get("exclude_fit_samples", True))
        check_both_classes(ctx.target_view(), p["run"], p.get("gt_field") or "ground_truth",
                           p.get("positive") or "anomalous", exclude)
        results = yield from run_with_progress(
            ctx, "evaluating", evaluate, ctx.target_view(), p["run"], p.get("gt_field") or "ground_truth",
            positive=p.get("positive") or "anomalous", gt_threshold=float(p.get("gt_threshold") or 0.0),
            gt_mask_field=p.get("gt_mask_field") or None, eval_key=p.get("eval_key") or None,
            exclude_fit_samples=exclude,
        )
        if not ctx.delegated:
            yield ctx.trigger("reload_dataset")
        m = results.metrics
        msg = f"'{results.key}': image AUROC {m['auroc']:.3f}, AP {m['ap']:.3f}, F1-max {m['f1_max']:.3f}"
        if "aupro" in m:
            msg += f"; pixel AUROC {m['pixel_auroc']:.3f}, AUPRO {m['aupro']:.3f}"
        msg += f" on {m['num_samples']} samples"
        if results.config.num_fit_samples_excluded:
            msg += f" ({results.config.num_fit_samples_excluded} the expert was fitted on left out)"
        yield ctx.trigger("notify", dict(message=msg, variant="success"))
