"""Operator: record a human verdict (accept / reject / relabel) on the selected samples of a scoring run."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm.reviewing import REVIEW_FIELD, VERDICTS, review, scoring_runs

from ._forms import dropdown, nothing_to_choose

_VERDICT_LABELS = {"accept": "Accept: the run's label is right", "reject": "Reject: the opposite label is right",
                   "relabel": "Relabel: give the right label (normal or a defect type)"}


class ReviewSamples(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="review_anomalies",
            label="Anomaly: review samples",
            description="Accept, reject or relabel a scoring run's verdict; writes a review field and tags",
            icon="fact_check",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=False,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        runs = scoring_runs(ctx.dataset) if ctx.dataset else []
        if not runs:
            return nothing_to_choose(inputs, "no_run", "No scoring run",
                                     "No scoring run on this dataset: run 'Anomaly: score samples' first",
                                     "Review samples")
        dropdown(inputs, "key", runs, runs[0], "Run", required=True)
        verdicts = types.RadioGroup()
        for v in VERDICTS:
            verdicts.add_choice(v, label=_VERDICT_LABELS[v])
        inputs.enum("verdict", verdicts.values(), default="accept", required=True, label="Verdict", view=verdicts)
        if ctx.params.get("verdict") == "relabel":
            inputs.str("label", required=True, label="Label", description="'normal' or a defect type, e.g. 'scratch'")
        inputs.str("field", default=REVIEW_FIELD, label="Review field")
        return types.Property(inputs, view=types.View(label="Review samples"))

    def execute(self, ctx):
        p = ctx.params
        user = getattr(ctx.user, "name", None) if ctx.user else None
        # the App's selection unless the form named another target: a review is about the samples looked at
        use_selection = ctx.selected and not ctx.request_params.get("view_target")
        samples = ctx.view.select(ctx.selected) if use_selection else ctx.target_view()
        n = review(samples, p.get("verdict", "accept"), key=p.get("key"), user=user,
                   label=p.get("label"), field=p.get("field") or REVIEW_FIELD)
        if not ctx.delegated and ctx.executor is not None:
            ctx.trigger("reload_samples")
        return {"reviewed": n}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.int("reviewed", label="Samples reviewed")
        return types.Property(outputs)
