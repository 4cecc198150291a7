"""Operator: evaluate a VLM judge MMAD-style on the labelled target samples, prompt variants side by side."""

from __future__ import annotations

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm import evaluate_judge
from fiftyone_anomaly_vlm.gt_fields import default_gt_field, gt_field_candidates
from fiftyone_anomaly_vlm.runs import JUDGE_EVAL_METHOD, SCORE_METHOD, runs_of

from ._forms import check_key, dropdown, target_input, vlm_backend_inputs
from ._progress import long_running_config, reports_errors, run_with_progress
from .judge import API_KEY_SECRET, backend_from_params

_NONE = "(none)"
#: the variants the form offers: checkbox name -> (variant name, label, judge prompt parts; "kb" = the knowledge)
FORM_VARIANTS = {
    "v_plain": ("plain", "plain: the sample only", {}),
    "v_crops": ("crops", "crops: 3 expert crops (needs an expert)", {"crops": 3}),
    "v_ref": ("ref", "ref: a reference normal image", {"reference": "auto"}),
    "v_all": ("all", "all: crops, reference, knowledge, expert verdict (needs an expert)",
              {"crops": 3, "reference": "auto", "knowledge": "kb", "use_expert_verdict": True}),
}


def variants_from_params(params: dict, expert: str | None) -> dict[str, dict]:
    """The variants the form's checkboxes pick (those needing an expert left out without one)."""
    knowledge = params.get("knowledge") or None
    out = {}
    for box, (name, _, parts) in FORM_VARIANTS.items():
        if not params.get(box, box == "v_plain"):
            continue
        parts = {k: (knowledge if v == "kb" else v) for k, v in parts.items()}
        if expert is None and (parts.get("crops") or parts.get("use_expert_verdict")):
            continue
        out[name] = parts
    return out


def _fields_of(dataset, types_: tuple) -> list[str]:
    return [n for n, f in dataset.get_field_schema().items()
            if isinstance(f, fo.EmbeddedDocumentField) and issubclass(f.document_type, types_)]


class EvaluateJudge(foo.Operator):
    """Form over :func:`fiftyone_anomaly_vlm.evaluate_judge`: backend, labels, prompt variants, key."""

    @property
    def config(self):
        return long_running_config("evaluate_judge", "Anomaly: evaluate the VLM judge (MMAD-style)",
                                   "Multiple-choice questions from the labels, asked with each prompt variant: "
                                   "accuracy per subtask and variant, recorded as a run", "quiz")

    def resolve_input(self, ctx):
        inputs = types.Object()
        target_input(ctx, inputs, "Evaluate the judge on", prefer=("CURRENT_VIEW", "DATASET"))
        p = ctx.params
        ds = ctx.dataset
        runs = ds.list_runs() if ds else []
        key = p.get("key", "judge_eval")
        key_prop = inputs.str("key", default="judge_eval", required=True, label="Run key",
                              description="The answers field (fo.Classifications) and the run's name")
        inputs.bool("overwrite", default=False, label="Ask again samples already answered under this key")
        check_key(key_prop, key, [k for k in runs if k not in runs_of(ds, JUDGE_EVAL_METHOD)], "Run")
        vlm_backend_inputs(inputs, p, API_KEY_SECRET)
        gt, masks = gt_field_candidates(ds) if ds else ([], [])
        dropdown(inputs, "gt_field", gt, default_gt_field(gt), "Ground truth", "Anomalous / normal per sample")
        inputs.str("positive", default="anomalous", label="Label meaning anomalous")
        labels = [n for n in gt if n not in masks]
        dropdown(inputs, "defect_field", [_NONE, *labels], "defect_type" if "defect_type" in labels else _NONE,
                 "Defect type field", "Defect classification questions")
        boxes = _fields_of(ds, (fo.Detections,)) if ds else []
        dropdown(inputs, "mask_field", [_NONE, *masks, *boxes], masks[0] if masks else _NONE,
                 "Defect masks or boxes", "Localization questions (3x3 grid)")
        dropdown(inputs, "class_field", [_NONE, *labels], _NONE, "Product class field",
                 "Object classification questions")
        experts = runs_of(ds, SCORE_METHOD) if ds else []
        dropdown(inputs, "expert", [_NONE, *experts], experts[0] if experts else _NONE, "Expert run",
                 "Its heatmaps give the crops, its scores the verdict in words")
        for box, (_, label, _) in FORM_VARIANTS.items():
            inputs.bool(box, default=box == "v_plain", label=f"Variant {label}")
        inputs.str("knowledge", label="Product knowledge (variant 'all')")
        inputs.int("seed", default=0, label="Seed of the distractors")
        inputs.int("batch_size", default=4, min=1, label="Samples per batch")
        return types.Property(inputs, view=types.View(label="Evaluate the VLM judge"))

    @reports_errors
    def execute(self, ctx):
        p = ctx.params
        pick = lambda name: None if p.get(name) in (None, _NONE) else p.get(name)  # noqa: E731
        expert = pick("expert")
        variants = variants_from_params(p, expert)
        if not variants:
            raise ValueError("choose at least one variant (crops and 'all' need an expert run)")
        report = yield from run_with_progress(
            ctx, "asking", evaluate_judge, ctx.target_view(), backend=backend_from_params(p, ctx.secrets),
            key=p.get("key") or "judge_eval", gt_field=p.get("gt_field") or "ground_truth",
            positive=p.get("positive") or "anomalous", defect_field=pick("defect_field"),
            mask_field=pick("mask_field"), class_field=pick("class_field"), expert=expert, variants=variants,
            seed=int(p.get("seed", 0)), batch_size=int(p.get("batch_size", 4)),
            overwrite=bool(p.get("overwrite", False)))
        if not ctx.delegated:
            yield ctx.trigger("reload_dataset")
        first = report.summary().splitlines()
        msg = (f"Judge evaluation '{report.key}': {sum(r['n'] for r in report.rows)} answers; "
               + ("; ".join(first) if first else "no question could be asked"))
        yield ctx.trigger("notify", dict(message=msg, variant="success"))
