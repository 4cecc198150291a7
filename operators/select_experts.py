"""Operator: fit candidate experts (patch and global), rank them on validation anomalies, keep the best."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm import list_experts, select_experts, selection_markdown

from ._forms import check_key, device_and_batch, dropdown, group_by_input, target_input
from ._progress import long_running_config, reports_errors, run_with_progress


class SelectExperts(foo.Operator):
    @property
    def config(self):
        return long_running_config("select_experts", "Anomaly: choose experts by evidence",
                                   "Fit patch and global experts, rank them on labelled or synthetic anomalies and "
                                   "keep the best one or ensemble", "auto_awesome")

    def resolve_input(self, ctx):
        inputs = types.Object()
        _target, where = target_input(ctx, inputs, "Fit the candidates on (known-good samples)")
        tags = sorted(ctx.dataset.distinct("tags")) if ctx.dataset else []
        dropdown(inputs, "val_tag", tags, None, "Validation samples: tag (optional)",
                 description="Samples with labelled anomalies rank the candidates by AUROC; good samples only, or "
                             f"none: synthetic anomalies are made from good images (of {where} when empty)")
        inputs.str("gt_field", default="ground_truth", label="Labels field of the validation samples")
        inputs.str("kind_field", required=False, label="Defect kind field of the validation samples (optional)",
                   description="Names each labelled anomaly's kind (e.g. defect_type): the choice must then be as "
                               "good as the best single candidate on every kind, not only on all anomalies together")
        group_by_input(ctx, inputs, ctx.params.get("gt_field") or "ground_truth",
                       "Candidates one per group of (optional)", "every candidate is fitted one expert per group, which")
        inputs.bool("synthetic", default=True, label="Allow synthetic anomalies",
                    description="Local (Perlin, cut-paste, small spot, thin scratch) and global (colour, blur, grain) "
                                "kinds")
        if ctx.params.get("synthetic", True):
            dropdown(inputs, "synthetic_kinds", ["all", "local", "global"], "all", "Synthetic defects to rank on",
                     description="local: your defects are small (cracks, specks, scratches), so no option has to "
                                 "protect a whole-image change the line never sees; global: only whole-image changes "
                                 "(colour, grain, focus)")
        inputs.str("candidates", required=False, label="Candidate models (comma-separated; empty: auto)",
                   description="auto: PaDiM at two sizes, PatchCore, DFM, DFKDE and two texture-statistics experts; "
                               "or anomalib model names (padim, patchcore, dfm, dfkde, ...) and texturestats")
        inputs.int("image_size", default=128, min=32, label="Image size")
        inputs.float("budget_s", default=600.0, min=1.0, label="Time budget (seconds)",
                     description="Candidates whose estimated cost no longer fits are skipped and listed")
        inputs.bool("pretrained", default=True, label="ImageNet backbone weights (off: random, smoke tests)")
        inputs.bool("overwrite", default=False, label="Overwrite an expert of the same key")
        key = ctx.params.get("key", "auto_ens")
        key_prop = inputs.str("key", default="auto_ens", required=True, label="Expert key")
        taken = [] if ctx.params.get("overwrite") else list_experts(ctx.dataset) if ctx.dataset else []
        check_key(key_prop, key, taken, "Expert")
        table = selection_markdown(ctx.dataset, key) if ctx.dataset and key else None
        if table:
            inputs.md(table, name="selection_table")
        device_and_batch(inputs, batch_size=8)
        return types.Property(inputs, view=types.View(label="Choose experts by evidence"))

    @reports_errors
    def execute(self, ctx):
        p = ctx.params
        tag = p.get("val_tag")
        expert = yield from run_with_progress(
            ctx, "fitting the candidates", select_experts, ctx.target_view(),
            ctx.dataset.match_tags(tag) if tag else None, candidates=_names(p.get("candidates")) or "auto",
            key=p.get("key") or "auto_ens", gt_field=p.get("gt_field") or "ground_truth",
            kind_field=(p.get("kind_field") or "").strip() or None, group_by=p.get("group_by") or None,
            synthetic=bool(p.get("synthetic", True)), synthetic_kinds=p.get("synthetic_kinds") or "all",
            image_size=int(p.get("image_size", 128)),
            budget_s=float(p.get("budget_s", 600.0)), pretrained=bool(p.get("pretrained", True)),
            device=p.get("device", "auto"), batch_size=int(p.get("batch_size", 8)),
            overwrite=bool(p.get("overwrite", False)),
        )
        members = ", ".join(expert.options["members"]["*"])
        yield ctx.trigger("notify", dict(message=f"Expert '{expert.key}' chosen: {members}; open this form again "
                                                 "for its table of candidates", variant="success"))


def _names(text: str | None) -> list[str]:
    """Model names typed in the form, comma- or space-separated."""
    return [n for n in (text or "").replace(",", " ").split() if n]
