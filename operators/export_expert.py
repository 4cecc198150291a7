"""Operators: export a fitted expert for the line, and import an anomalib model trained elsewhere."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm import export_expert, import_expert, list_experts
from fiftyone_anomaly_vlm.models.anomalib_export import FORMATS

from ._choices import EXPERT, check_choice
from ._forms import check_key, dropdown, nothing_to_choose
from ._progress import long_running_config, reports_errors, run_with_progress


class ExportExpert(foo.Operator):
    @property
    def config(self):
        return long_running_config("export_expert", "Anomaly: export expert",
                                   "Export a fitted expert (ONNX, OpenVINO or torch) with its calibration and "
                                   "thresholds, and a standalone infer.py for the line", "file_download")

    def resolve_input(self, ctx):
        inputs = types.Object()
        experts = list_experts(ctx.dataset) if ctx.dataset else []
        if not experts:
            return nothing_to_choose(inputs, "no_experts", "No fitted expert",
                                     "Fit one with 'Anomaly: fit vision expert' first", "Export expert")
        prop = dropdown(inputs, "expert", experts, experts[0], "Expert", required=True)
        check_choice(prop, ctx.params.get("expert"), experts, what=EXPERT, dataset=ctx.dataset)
        dropdown(inputs, "format", list(FORMATS), "onnx", "Format", required=True,
                 description="onnx: onnxruntime; openvino: OpenVINO IR; torch: anomalib's torch export "
                             "(needs torch and anomalib at the line)")
        inputs.str("output_dir", required=True, label="Output folder",
                   description="A new or empty folder on the machine that runs the export")
        inputs.str("score_key", label="Thresholds of scoring run",
                   description="Default: the scoring run named like the expert, else the fit's thresholds")
        inputs.bool("overwrite", default=False, label="Replace a non-empty output folder")
        return types.Property(inputs, view=types.View(label="Export expert"))

    @reports_errors
    def execute(self, ctx):
        p = ctx.params
        path = yield from run_with_progress(
            ctx, "exporting", export_expert, ctx.dataset, p["expert"], format=p.get("format") or "onnx",
            output_dir=p["output_dir"], score_key=p.get("score_key") or None, overwrite=bool(p.get("overwrite")))
        yield ctx.trigger("notify", dict(message=f"Exported '{p['expert']}' to {path}: on the line run "
                                                 f"python {path}/infer.py <image>", variant="success"))


class ImportExpert(foo.Operator):
    @property
    def config(self):
        return long_running_config("import_expert", "Anomaly: import expert",
                                   "Register an anomalib model trained elsewhere (Lightning .ckpt or to_torch .pt) "
                                   "as an expert, calibrated on the current view's known-good samples",
                                   "file_upload")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.md("The current view calibrates the model: open a view of known-good samples it did not train "
                  "on (e.g. the `good` tag) before running this.", name="calibration_note")
        inputs.str("checkpoint", required=True, label="Checkpoint",
                   description="Path of a Lightning .ckpt (anomalib Engine.fit) or an anomalib to_torch .pt file")
        inputs.str("model", label="anomalib model name",
                   description="Only for checkpoints whose class cannot be told from them (e.g. padim)")
        experts = list_experts(ctx.dataset) if ctx.dataset else []
        inputs.bool("overwrite", default=False, label="Overwrite an expert of the same key")
        key_prop = inputs.str("key", required=True, label="Expert key")
        check_key(key_prop, ctx.params.get("key"), [] if ctx.params.get("overwrite") else experts, "Expert")
        return types.Property(inputs, view=types.View(label="Import expert"))

    @reports_errors
    def execute(self, ctx):
        p = ctx.params
        expert = yield from run_with_progress(
            ctx, "calibrating the imported model", import_expert, ctx.view, checkpoint=p["checkpoint"],
            key=p["key"], model=p.get("model") or None, overwrite=bool(p.get("overwrite")))
        yield ctx.trigger("notify", dict(message=f"Expert '{expert.key}' ({expert.model}) imported and calibrated "
                                                 f"on {len(ctx.view)} samples: score with it", variant="success"))
