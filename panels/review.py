"""Panel 'Anomaly review': score histogram, threshold, flagged samples, human verdicts and evaluations.

A thin layer over :mod:`fiftyone_anomaly_vlm.reviewing`: every handler calls one core function and keeps
only small values (run, field names, threshold, counts, markdown) in ``ctx.panel.state``; plot traces go to
``ctx.panel.data`` (write-only, not sent back with every event). ``render`` reads state only, no database.
Inputs declared inside a stack live under the stack's name in the state (``actions.relabel_label``).
"""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone import ViewField as F

from fiftyone_anomaly_vlm.reviewing import (REVIEW_FIELD, calibration_of, default_threshold, flagged_view,
                                            recalibrate_from_review, recalibration_caution, review, review_target,
                                            run_errors, run_fields, score_histogram, scoring_runs,
                                            set_calibrated_threshold, threshold_caution, threshold_counts)

from .review_parts import (NO_GT, counts_markdown, curve_traces, errors_markdown, evaluation_markdown, evaluations_of,
                           gt_candidates, histogram_title, histogram_traces)
from .runs_view import render_runs, runs_state

__all__ = ["NO_GT", "ReviewPanel", "counts_markdown", "gt_candidates", "histogram_traces"]

BINS = 40
CURVES_LAYOUT = {
    "height": 340, "showlegend": True, "legend": {"orientation": "h", "x": 0, "y": -0.3},
    "margin": {"t": 40, "l": 50, "b": 60, "r": 10},
    "xaxis": {"domain": [0, 0.42], "range": [0, 1], "title": {"text": "false-positive rate"}},
    "yaxis": {"range": [0, 1.02], "title": {"text": "true-positive rate"}},
    "xaxis2": {"domain": [0.58, 1], "range": [0, 1], "title": {"text": "recall"}},
    "yaxis2": {"anchor": "x2", "range": [0, 1.02], "title": {"text": "precision"}},
    "annotations": [{"text": "ROC", "x": 0.21, "y": 1.08, "xref": "paper", "yref": "paper", "showarrow": False},
                    {"text": "Precision-recall", "x": 0.79, "y": 1.08, "xref": "paper", "yref": "paper",
                     "showarrow": False}],
}
RELABEL_PATH = "actions.relabel_label"


class ReviewPanel(foo.Panel):
    """Review what a scoring run flags: histogram, threshold, flagged samples, accept/reject/relabel."""

    @property
    def config(self):
        return foo.PanelConfig(
            name="anomaly_review",
            label="Anomaly review",
            surfaces="grid",
            icon="fact_check",
            help_markdown=("Pick a scoring run, move the threshold, load the flagged samples into the grid, "
                           "then accept / reject / relabel the selected samples. Verdicts go to the "
                           f"`{REVIEW_FIELD}` field and tags; the model's fields are never changed. "
                           "'Apply threshold' rewrites the run's labels and masks at the slider's threshold."),
        )

    # ---- events -------------------------------------------------------------------------------------------
    def on_load(self, ctx):
        """Pick the first scoring run (and a ``ground_truth`` field when present) and compute its data."""
        runs = scoring_runs(ctx.dataset) if ctx.dataset is not None else []
        gts = gt_candidates(ctx.dataset) if ctx.dataset is not None else []
        state = ctx.panel.state
        run = state.run if state.run in runs else (runs[0] if runs else None)
        gt = state.gt_field if state.gt_field in gts else ("ground_truth" if "ground_truth" in gts else NO_GT)
        state.set({"runs": runs, "gt_fields": gts, "gt_field": gt, "controls.gt_field": gt,
                   **runs_state(ctx.dataset)})
        self._select_run(ctx, run)

    def on_change_dataset(self, ctx):
        """A new dataset: start over."""
        ctx.panel.state.run = None
        self.on_load(ctx)

    def on_change_run(self, ctx):
        """Another run: its own threshold, histogram, counts, errors and evaluations."""
        self._select_run(ctx, ctx.params.get("value") or ctx.panel.state.run)

    def on_change_gt(self, ctx):
        """Another ground-truth field (or none)."""
        gt = ctx.params.get("value") or NO_GT
        ctx.panel.state.set({"gt_field": gt, "controls.gt_field": gt})
        self._refresh(ctx)

    def on_change_threshold(self, ctx):
        """New threshold: recount (the histogram stays; only its threshold line moves)."""
        value, run = ctx.params.get("value", ctx.panel.state.threshold), ctx.panel.state.run
        # the caution again: the App sends this event when Recalibrate moves the slider, with the panel state of
        # before that recalibration (no caution), and render reads that state
        ctx.panel.state.set({"threshold": float(value), "confirm": None,
                             "caution": threshold_caution(ctx.dataset, run) if run else None})
        self._update_counts(ctx)

    def on_change_evaluation(self, ctx):
        """Another evaluation of the run: its metrics and curves."""
        self._show_evaluation(ctx, ctx.params.get("value"))

    def on_histogram_click(self, ctx):
        """Clicking a bar shows the samples of that bin in the grid, highest score first."""
        run = ctx.panel.state.run
        lo, hi = (ctx.params.get("range") or [None, None])[:2]
        if not run or lo is None:
            return
        score = review_target(ctx.dataset, run).score
        view = ctx.dataset.match((F(score) >= lo) & (F(score) < hi)).sort_by(score, reverse=True)
        ctx.ops.set_view(view)

    def show_flagged(self, ctx):
        """Load the samples above the threshold into the grid, sorted by score, with the run's fields shown."""
        run = ctx.panel.state.run
        if not run:
            return
        ctx.ops.set_view(flagged_view(ctx.dataset, run, threshold=ctx.panel.state.threshold))
        fields = run_fields(ctx.dataset, run)
        if REVIEW_FIELD in ctx.dataset.get_field_schema():
            fields.append(REVIEW_FIELD)
        ctx.ops.set_active_fields(fields=fields)

    def accept(self, ctx):
        """The run's label is right for the selected samples."""
        self._review(ctx, "accept")

    def reject(self, ctx):
        """The run's label is wrong for the selected samples."""
        self._review(ctx, "reject")

    def relabel(self, ctx):
        """The selected samples get the label typed in the panel (``normal`` or a defect type)."""
        label = (ctx.panel.state.get(RELABEL_PATH) or "").strip()
        if not label:
            ctx.ops.notify("Type a label first (e.g. 'normal' or 'scratch')", variant="warning")
            return
        self._review(ctx, "relabel", label=label)

    def recalibrate(self, ctx):
        """Move the run's threshold to the F1-optimal one on the reviewed samples."""
        run = ctx.panel.state.run
        try:
            recalibrate_from_review(ctx.dataset, run, field=REVIEW_FIELD, rule="f1")
        except ValueError as e:
            ctx.ops.notify(str(e), variant="warning")
            return
        caution = recalibration_caution(ctx.dataset, run)  # few reviews: the false-alarm and recall intervals
        ctx.panel.state.set({"threshold": default_threshold(ctx.dataset, run), "confirm": None,
                             "caution": threshold_caution(ctx.dataset, run)})
        self._update_counts(ctx)
        message = f"Threshold of '{run}' recalibrated from reviews: {ctx.panel.state.threshold:.3f}"
        ctx.ops.notify(f"{message}. Caution: {caution}" if caution else message,
                       variant="warning" if caution else "success")
        ctx.ops.reload_samples()

    def ask_apply_threshold(self, ctx):
        """First step of 'Apply threshold': say what it will do and ask to confirm."""
        run, counts = ctx.panel.state.run, ctx.panel.state.counts or {}
        if calibration_of(ctx.dataset, run) is None:
            ctx.ops.notify(f"'{run}' is not an expert scoring run with a calibration: its labels cannot be "
                           "re-thresholded (use 'Recalibrate from reviews')", variant="warning")
            return
        ctx.panel.state.confirm = (f"Rewrite the labels and masks of **{run}** at threshold "
                                   f"**{ctx.panel.state.threshold:.3f}**? {counts.get('above', '?')} of "
                                   f"{counts.get('total', '?')} samples will be labelled anomalous.")

    def apply_threshold(self, ctx):
        """Confirmed: the slider's value becomes the run's threshold (labels as the counts shown)."""
        run, value = ctx.panel.state.run, float(ctx.panel.state.threshold)
        ctx.panel.state.set({"confirm": None, "caution": None})
        try:
            set_calibrated_threshold(ctx.dataset, run, value)
        except ValueError as e:
            ctx.ops.notify(str(e), variant="error")
            return
        ctx.panel.state.threshold = default_threshold(ctx.dataset, run)
        self._update_counts(ctx)
        ctx.ops.notify(f"Threshold of '{run}' set to {value:.3f}: {ctx.panel.state.counts['above']} samples "
                       "labelled anomalous", variant="success")
        ctx.ops.reload_samples()

    def cancel_apply(self, ctx):
        """The threshold is not applied."""
        ctx.panel.state.confirm = None

    def refresh(self, ctx):
        """Read the runs and evaluations again (after running an operator)."""
        self.on_load(ctx)

    # ---- helpers ------------------------------------------------------------------------------------------
    def _gt(self, ctx) -> str | None:
        gt = ctx.panel.state.gt_field
        return None if not gt or gt == NO_GT else gt

    def _select_run(self, ctx, run: str | None) -> None:
        ctx.panel.state.set({"run": run, "controls.run": run, "confirm": None, "caution": None})
        if not run:
            return
        ctx.panel.state.threshold = default_threshold(ctx.dataset, run)
        self._refresh(ctx)
        evals = evaluations_of(ctx.dataset, run)
        ctx.panel.state.evaluations = evals
        self._show_evaluation(ctx, evals[-1] if evals else None)

    def _refresh(self, ctx) -> None:
        run = ctx.panel.state.run
        hist = score_histogram(ctx.dataset, run, bins=BINS, gt_field=self._gt(ctx))
        ctx.panel.data.histogram = histogram_traces(hist)
        errors = run_errors(ctx.dataset, run)
        # one patch: the title, the counts, the errors and the caution always describe the same run
        ctx.panel.state.set({"num_scored": hist["count"], "score_field": hist["field"],
                             "title": histogram_title(run, hist),
                             "errors_md": errors_markdown(run, hist["count"], errors),
                             "caution": threshold_caution(ctx.dataset, run), "counts": self._counts(ctx)})

    def _counts(self, ctx) -> dict:
        return threshold_counts(ctx.dataset, ctx.panel.state.run, ctx.panel.state.threshold, gt_field=self._gt(ctx))

    def _update_counts(self, ctx) -> None:
        ctx.panel.state.counts = self._counts(ctx)

    def _show_evaluation(self, ctx, key: str | None) -> None:
        if not key:
            ctx.panel.state.set({"eval_key": None, "eval_md": None})
            return
        results = ctx.dataset.load_run_results(key, cache=False)
        ctx.panel.data.eval_curves = curve_traces(results)
        ctx.panel.state.set({"eval_key": key, "eval_md": evaluation_markdown(results)})

    def _targets(self, ctx) -> list[str]:
        if ctx.selected:
            return list(ctx.selected)
        return [ctx.current_sample] if ctx.current_sample else []

    def _review(self, ctx, verdict: str, label: str | None = None) -> None:
        ids = self._targets(ctx)
        if not ids:
            ctx.ops.notify("Select samples in the grid first", variant="warning")
            return
        user = getattr(getattr(ctx, "user", None), "name", None)
        n = review(ctx.dataset.select(ids), verdict, key=ctx.panel.state.run, user=user, label=label)
        ctx.panel.state.last_review = {"verdict": verdict, "count": n}
        ctx.ops.notify(f"{verdict}: {n} sample(s) reviewed in '{REVIEW_FIELD}'", variant="success")
        ctx.ops.reload_samples()

    # ---- layout -------------------------------------------------------------------------------------------
    def render(self, ctx):
        panel = types.Object()
        state = ctx.panel.state
        runs = state.runs or []
        if not runs:
            panel.md("No scoring run on this dataset yet: fit an expert and run **Anomaly: score samples**.",
                     name="empty")
            panel.btn("refresh", label="Refresh", icon="refresh", on_click=self.refresh)
            render_runs(panel, state)
            return types.Property(panel, view=types.GridView(orientation="vertical", padding=2))

        controls = panel.h_stack("controls", align_x="left", gap=2)
        _dropdown(controls, "run", runs, state.run, "Run", self.on_change_run)
        _dropdown(controls, "gt_field", [NO_GT, *(state.gt_fields or [])], state.gt_field or NO_GT, "Ground truth",
                  self.on_change_gt)
        controls.btn("refresh", label="Refresh", icon="refresh", on_click=self.refresh)

        if state.errors_md:
            panel.view("errors", types.Warning(label="Samples without a score", description=state.errors_md))
        threshold = float(state.threshold if state.threshold is not None else 0.5)
        panel.plot(
            "histogram",
            layout={
                "title": {"text": state.title or str(state.run)},
                "barmode": "stack", "showlegend": True, "height": 320,
                "xaxis": {"title": {"text": "score"}, "range": [0, 1]},
                "yaxis": {"title": {"text": "samples"}},
                "margin": {"t": 40, "l": 50, "b": 40, "r": 10},
                "shapes": [{"type": "line", "x0": threshold, "x1": threshold, "y0": 0, "y1": 1,
                            "yref": "paper", "line": {"color": "#ffffff", "dash": "dash", "width": 2}}],
            },
            config={"displayModeBar": False},
            on_click=self.on_histogram_click,
        )
        panel.float("threshold", label="Threshold", default=threshold, min=0.0, max=1.0,
                    view=types.SliderView(min=0, max=1, view_multiple_of=0.001, label="Threshold"),
                    on_change=self.on_change_threshold)
        panel.md(counts_markdown(state.counts), name="counts_text")  # not "counts": md shows that state value
        self._render_actions(panel, state)
        self._render_evaluation(panel, state)
        render_runs(panel, state)
        return types.Property(panel, view=types.GridView(orientation="vertical", gap=2, padding=2))

    def _render_actions(self, panel, state) -> None:
        actions = panel.h_stack("actions", align_x="left", gap=1)
        actions.btn("show_flagged", label="Show flagged", icon="filter_alt", variant="contained",
                    on_click=self.show_flagged)
        actions.btn("accept", label="Accept", icon="check", on_click=self.accept)
        actions.btn("reject", label="Reject", icon="close", on_click=self.reject)
        actions.str("relabel_label", label="Relabel as",
                    view=types.TextFieldView(placeholder="normal, scratch, ...",
                                             componentsProps={"container": {"sx": {"minWidth": "12rem"}}}))
        actions.btn("relabel", label="Relabel", icon="edit", on_click=self.relabel)
        thresholds = panel.h_stack("threshold_actions", align_x="left", gap=1)
        thresholds.btn("apply_threshold", label="Apply threshold", icon="done_all", on_click=self.ask_apply_threshold)
        thresholds.btn("recalibrate", label="Recalibrate from reviews", icon="tune", on_click=self.recalibrate)
        if state.caution:  # [title, text]: few reviews, or too few held-out normals for the promised rate
            panel.view("caution", types.Warning(label=state.caution[0], description=state.caution[1]))
        if state.confirm:
            confirm = panel.h_stack("confirm_apply", align_x="left", gap=1)
            confirm.md(state.confirm, name="confirm_text")
            confirm.btn("confirm_threshold", label="Confirm", icon="check", variant="contained",
                        on_click=self.apply_threshold)
            confirm.btn("cancel_threshold", label="Cancel", on_click=self.cancel_apply)

    def _render_evaluation(self, panel, state) -> None:
        evals = state.evaluations or []
        if not evals:
            panel.md(f"No evaluation of **{state.run}** yet: run **Anomaly: evaluate against ground truth**.",
                     name="no_evaluation")
            return
        _dropdown(panel, "eval_key", evals, state.eval_key or evals[-1], "Evaluation", self.on_change_evaluation)
        if state.eval_md:
            panel.md(state.eval_md, name="eval_metrics")
            # one figure, two subplots: plots side by side in a stack widen the panel past its space
            panel.plot("eval_curves", layout=CURVES_LAYOUT, config={"displayModeBar": False})


def _dropdown(stack, name: str, values: list[str], default: str | None, label: str, on_change) -> None:
    choices = types.DropdownView()
    for v in values:
        choices.add_choice(v, label=v)
    stack.enum(name, choices.values(), label=label, default=default, view=choices, on_change=on_change)
