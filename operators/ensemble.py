"""Operator: combine fitted experts into one ensemble expert."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm import ensemble_experts, list_experts
from fiftyone_anomaly_vlm.experts.combined import check_combine

from ._choices import EXPERT, check_choice, unknown_choice
from ._forms import check_key, device_and_batch, nothing_to_choose
from ._progress import long_running_config, reports_errors, run_with_progress


RULES = {
    "mean": "Mean of calibrated scores (members that see the same defects)",
    "max": "Max of calibrated scores (members that see different kinds of defect)",
    "weighted": "Weighted sum of standardised scores",
}


def parse_weights(text) -> list[float] | None:
    """``"1, 0.25"`` -> ``[1.0, 0.25]`` (None when a part is not a number)."""
    try:
        return [float(part) for part in str(text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError:
        return None


def combine_inputs(inputs: types.Object, params: dict, num_experts: int) -> None:
    """The combine rule, and for a weighted sum one weight per chosen expert (checked under the field)."""
    rules = types.RadioGroup()
    for rule, label in RULES.items():
        rules.add_choice(rule, label=label)
    inputs.enum("combine", rules.values(), default="mean", label="Combine", view=rules)
    if params.get("combine") != "weighted":
        return
    prop = inputs.str("weights", required=True, label="Weights",
                      description="One positive number per expert, in the order chosen, e.g. 1, 0.25: the weight "
                                  "of each member's score in standard deviations of its known-good scores")
    text = params.get("weights")
    if text:
        try:  # the same check ensemble_experts makes
            check_combine("weighted", parse_weights(text), num_experts)
        except ValueError:
            prop.invalid = True
            prop.error_message = f"Give {num_experts} positive numbers separated by commas, one per expert"


class EnsembleExperts(foo.Operator):
    @property
    def config(self):
        return long_running_config("ensemble_experts", "Anomaly: ensemble experts",
                                   "Combine two or more fitted experts (mean, max or weighted sum of their scores)",
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
                           description="Two or more, combined as chosen below",
                           view=types.AutocompleteView(choices=choices, allow_user_input=False,
                                                       allow_duplicates=False))
        asked = ctx.params.get("experts")
        known = check_choice(prop, asked, experts, what=EXPERT, dataset=ctx.dataset)
        if known and asked is not None and len(set(asked)) < 2:
            prop.invalid = True
            prop.error_message = "Choose two or more experts"
        combine_inputs(inputs, ctx.params, len(set(asked or [])))
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
            key=p.get("key") or "ensemble", combine=p.get("combine") or "mean",
            weights=parse_weights(p.get("weights")) if p.get("combine") == "weighted" else None,
            device=p.get("device", "auto"), batch_size=int(p.get("batch_size", 8)),
            overwrite=bool(p.get("overwrite", False)),
        )
        yield ctx.trigger("notify", dict(message=f"Ensemble '{expert.key}' of {', '.join(p['experts'])} is ready "
                                                 "to score", variant="success"))
