"""Operator: record a zero-shot / few-shot CLIP expert (WinCLIP) that 'Anomaly: score samples' can use."""

from __future__ import annotations

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm import create_clip_expert, list_experts

from ._forms import check_key, dropdown
from ._progress import long_running_config, reports_errors, run_with_progress

_WEIGHTS = {"tag": "open_clip pretrained tag (from the Hugging Face cache, or downloaded once)",
            "file": "Local checkpoint file (offline)", "none": "None: random weights (smoke tests)"}


class CreateClipExpert(foo.Operator):
    @property
    def config(self):
        return long_running_config("create_clip_expert", "Anomaly: CLIP zero/few-shot expert",
                                   "WinCLIP expert from text prompts (zero-shot) and optional normal reference images",
                                   "auto_awesome")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        inputs.str("model", default="ViT-B-16-plus-240", required=True, label="open_clip model",
                   description="A ViT name, a model .json config, or 'local-dir:/path' (config + weights)")
        weights = types.RadioGroup()
        for value, label in _WEIGHTS.items():
            weights.add_choice(value, label=label)
        inputs.enum("weights", weights.values(), default="tag", label="Weights", view=weights)
        choice = ctx.params.get("weights", "tag")
        if choice == "tag":
            inputs.str("pretrained", default="laion400m_e31", required=True, label="Pretrained tag")
        elif choice == "file":
            inputs.str("pretrained", required=True, label="Checkpoint file (.pt / .bin / .safetensors)")
        inputs.str("object_name", default="object", required=True, label="Object name",
                   description="Used in the prompts: 'a photo of a flawless <object>'")
        fields = []
        if ctx.dataset is not None:
            schema = ctx.dataset.get_field_schema(flat=True)
            fields = [n for n, f in schema.items() if isinstance(f, fo.StringField) and n not in ("filepath", "id")]
            fields += [n for n, f in schema.items() if n.endswith(".label") and isinstance(f, fo.StringField)]
        if fields:
            dropdown(inputs, "object_field", fields, None, "Object name field",
                     "Per-sample object names (overrides the name above)")
        inputs.str("description", required=False, label="Description of a normal object",
                   description="e.g. 'This is a photo of a {} for anomaly detection, which should be round and "
                               "without any damage, flaw, defect, scratch, hole or broken part.'")
        tags = sorted(ctx.dataset.distinct("tags")) if ctx.dataset is not None else []
        if tags:
            dropdown(inputs, "reference_tag", tags, None, "Normal references (tag)",
                     "Few-shot: tag of known-good samples; empty = zero-shot")
        inputs.int("k_shot", default=4, min=1, label="References used (k)")
        inputs.bool("overwrite", default=False, label="Overwrite an expert of the same key")
        key_prop = inputs.str("key", default="winclip", required=True, label="Expert key",
                              description="Its record is the run '<key>_expert'; score with this key")
        taken = [] if ctx.params.get("overwrite") else list_experts(ctx.dataset) if ctx.dataset else []
        check_key(key_prop, ctx.params.get("key", "winclip"), taken, "Expert")
        inputs.str("device", default="auto", label="Device",
                   description="'auto' uses CUDA when present, else CPU; or 'cpu', 'cuda:0', ...")
        return types.Property(inputs, view=types.View(label="CLIP zero/few-shot expert"))

    @reports_errors
    def execute(self, ctx):
        p = ctx.params
        weights = p.get("weights", "tag")
        pretrained = None if weights == "none" else p.get("pretrained") or None
        few_shot = bool(p.get("reference_tag"))
        label = "encoding reference images" if few_shot else "loading CLIP, encoding the prompts (zero-shot)"
        expert = yield from run_with_progress(
            ctx, label, create_clip_expert, ctx.target_view(),
            key=p.get("key") or "winclip", model=p.get("model") or "ViT-B-16-plus-240", pretrained=pretrained,
            object_name=p.get("object_name") or "object", object_field=p.get("object_field") or None,
            description=p.get("description") or None, references=p.get("reference_tag") or None,
            k_shot=int(p.get("k_shot", 4)), device=p.get("device", "auto"),
            overwrite=bool(p.get("overwrite", False)),
        )
        kind = f"few-shot, {expert.options.get('num_references', 0)} references" if expert.checkpoint else "zero-shot"
        yield ctx.trigger("set_progress", dict(progress=1.0, label=f"CLIP expert '{expert.key}' ready"))
        yield ctx.trigger("notify", dict(message=f"CLIP expert '{expert.key}' ({kind}) recorded: score with "
                                                 "'Anomaly: score samples'", variant="success"))
