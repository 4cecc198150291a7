"""Operator: combine fitted experts into one ensemble expert."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm import ensemble_experts, list_experts

from ._choices import EXPERT, check_choice, unknown_choice
from ._forms import check_key, device_and_batch, nothing_to_choose
from ._progress import long_running_config, reports_errors, run_with_progress


class EnsembleExperts(foo.Operator):
    @property
    def config(self):
        return long_running_config("ensemble_experts", "Anomaly: ensemble experts",
                                   "Average the calibrated scores and heatmaps of two or more fitted experts",
                                   "merge_type")

    def resolve_input(self, ctx):
        inputs = types.Object()
        experts = list_experts(ctx.dataset) if ctx.dataset else []
        if len(experts) < 2:
            message = ("An ensemble needs two or more fitted experts on this dataset: fit them with "
                       "'Anomaly: fit vision expert' (same training view and seed)")
            unknown = unknown_choice(ctx.params.get("experts"), experts, what=EXPERT,
                                     dataset_name=ctx.dataset.name) if ctx.dataset else None
            return nothing_to_choose(inputs, "too_few_experts", "Fewer than two experts",
                                     f"{unknown}. {message}" if unknown else message, "Ensemble experts")
        choices = [types.Choice(e, label=e) for e in experts]
        prop = inputs.list("experts", types.String(), required=True, label="Experts",
                           description="Two or more; their calibrated scores are averaged",
                           view=types.AutocompleteView(choices=choices, allow_user_input=False,
                                                       allow_duplicates=False))
        asked = ctx.params.get("experts")
        known = check_choice(prop, asked, experts, what=EXPERT, dataset=ctx.dataset)
        if known and asked is not None and len(set(asked)) < 2:
            prop.invalid = True
            prop.error_message = "Choose two or more experts"
        inputs.bool("overwrite", default=False, label="Overwrite an expert of the same key")
        key_prop = inputs.str("key", default="ensemble", required=True, label="Ensemble key",
                              description="Score with it like any expert: 'Anomaly: score samples'")
        taken = [] if ctx.params.get("overwrite") else experts
        check_key(key_prop, ctx.params.get("key", "ensemble"), taken, "Expert")
        device_and_batch(inputs, batch_size=8)
        return types.Property(inputs, view=types.View(label="Ensemble experts"))

    @reports_errors
    def execute(self, ctx):
        p = ctx.params
        expert = yield from run_with_progress(
            ctx, "calibrating the ensemble", ensemble_experts, ctx.dataset, list(p["experts"]),
            key=p.get("key") or "ensemble", device=p.get("device", "auto"), batch_size=int(p.get("batch_size", 8)),
            overwrite=bool(p.get("overwrite", False)),
        )
        yield ctx.trigger("notify", dict(message=f"Ensemble '{expert.key}' of {', '.join(p['experts'])} is ready "
                                                 "to score", variant="success"))
