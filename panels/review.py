"""Panel 'Anomaly review': score histogram, threshold, flagged samples and human verdicts.

A thin layer over :mod:`fiftyone_anomaly_vlm.review`: every handler calls one of its functions and keeps
only small values (run, field names, threshold, counts) in ``ctx.panel.state``; the histogram traces go to
``ctx.panel.data`` (write-only, not sent back with every event). ``render`` reads state only, no database.
"""

from __future__ import annotations

from typing import Any

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone import ViewField as F

from fiftyone_anomaly_vlm.reviewing import (
    REVIEW_FIELD,
    default_threshold,
    flagged_view,
    recalibrate_from_review,
    review,
    review_target,
    run_fields,
    run_owned_fields,
    score_histogram,
    scoring_runs,
    threshold_counts,
)

NO_GT = "(none)"
BINS = 40
_COLORS = {"anomalous": "#e4572e", "normal": "#4c9f70", "unlabelled": "#9e9e9e", "all": "#ff6d04"}


def gt_candidates(dataset) -> list[str]:
    """Classification fields that can serve as ground truth (the runs' own fields and the review field excluded)."""
    schema = dataset.get_field_schema(embedded_doc_type=fo.Classification)
    own = run_owned_fields(dataset)
    return [name for name in schema if name not in own and name != REVIEW_FIELD]


def histogram_traces(hist: dict[str, Any]) -> list[dict[str, Any]]:
    """Plotly bar traces of :func:`score_histogram` output (one per ground-truth class, stacked)."""
    edges = hist["edges"]
    lefts = edges[:-1]
    width = [b - a for a, b in zip(edges[:-1], edges[1:])]
    series = hist.get("series") or {"all": hist["counts"]}
    return [{"type": "bar", "name": name, "x": lefts, "y": counts, "width": width, "offset": 0,
             "marker": {"color": _COLORS.get(name, "#6d8fd1")}}
            for name, counts in series.items()]


def counts_markdown(counts: dict[str, Any] | None) -> str:
    """The counts line shown under the histogram."""
    if not counts:
        return ""
    text = (f"**{counts['above']}** above / **{counts['below']}** below threshold "
            f"{counts['threshold']:.3f} ({counts['total']} scored)")
    if counts.get("gt_field"):
        def pct(v):
            return "n/a" if v is None else f"{100 * v:.1f} %"
        text += (f"  \nvs `{counts['gt_field']}` ({counts['labelled']} labelled): precision {pct(counts['precision'])}, "
                 f"recall {pct(counts['recall'])} (TP {counts['tp']}, FP {counts['fp']}, FN {counts['fn']})")
    return text


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
                           f"`{REVIEW_FIELD}` field and tags; the model's fields are never changed."),
        )

    # ---- events -------------------------------------------------------------------------------------------
    def on_load(self, ctx):
        """Pick the first scoring run (and a ``ground_truth`` field when present) and compute its data."""
        runs = scoring_runs(ctx.dataset) if ctx.dataset is not None else []
        gts = gt_candidates(ctx.dataset) if ctx.dataset is not None else []
        state = ctx.panel.state
        run = state.run if state.run in runs else (runs[0] if runs else None)
        gt = state.gt_field if state.gt_field in gts else ("ground_truth" if "ground_truth" in gts else NO_GT)
        state.set({"runs": runs, "gt_fields": gts, "run": run, "gt_field": gt})
        if run:
            state.threshold = default_threshold(ctx.dataset, run)
            self._refresh(ctx)

    def on_change_dataset(self, ctx):
        """A new dataset: start over."""
        ctx.panel.state.run = None
        self.on_load(ctx)

    def on_change_run(self, ctx):
        """Another run: its own threshold, histogram and counts."""
        run = ctx.params.get("value") or ctx.panel.state.run
        ctx.panel.state.run = run
        ctx.panel.state.threshold = default_threshold(ctx.dataset, run)
        self._refresh(ctx)

    def on_change_gt(self, ctx):
        """Another ground-truth field (or none)."""
        ctx.panel.state.gt_field = ctx.params.get("value") or NO_GT
        self._refresh(ctx)

    def on_change_threshold(self, ctx):
        """New threshold: recount (the histogram stays; only its threshold line moves)."""
        value = ctx.params.get("value", ctx.panel.state.threshold)
        ctx.panel.state.threshold = float(value)
        self._update_counts(ctx)

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
        label = (ctx.panel.state.relabel_label or "").strip()
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
        ctx.panel.state.threshold = default_threshold(ctx.dataset, run)
        self._update_counts(ctx)
        ctx.ops.notify(f"Threshold of '{run}' recalibrated from reviews: {ctx.panel.state.threshold:.3f}",
                       variant="success")
        ctx.ops.reload_samples()

    # ---- helpers ------------------------------------------------------------------------------------------
    def _gt(self, ctx) -> str | None:
        gt = ctx.panel.state.gt_field
        return None if not gt or gt == NO_GT else gt

    def _refresh(self, ctx) -> None:
        run = ctx.panel.state.run
        hist = score_histogram(ctx.dataset, run, bins=BINS, gt_field=self._gt(ctx))
        ctx.panel.data.histogram = histogram_traces(hist)
        ctx.panel.state.num_scored = hist["count"]
        ctx.panel.state.score_field = hist["field"]
        self._update_counts(ctx)

    def _update_counts(self, ctx) -> None:
        counts = threshold_counts(ctx.dataset, ctx.panel.state.run, ctx.panel.state.threshold,
                                  gt_field=self._gt(ctx))
        ctx.panel.state.counts = counts

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
            return types.Property(panel, view=types.GridView(orientation="vertical", padding=2))

        controls = panel.h_stack("controls", align_x="left", gap=2)
        run_choices = types.DropdownView()
        for r in runs:
            run_choices.add_choice(r, label=r)
        controls.enum("run", run_choices.values(), label="Run", default=state.run, view=run_choices,
                      on_change=self.on_change_run)
        gt_choices = types.DropdownView()
        for g in [NO_GT] + list(state.gt_fields or []):
            gt_choices.add_choice(g, label=g)
        controls.enum("gt_field", gt_choices.values(), label="Ground truth", default=state.gt_field or NO_GT,
                      view=gt_choices, on_change=self.on_change_gt)

        threshold = float(state.threshold if state.threshold is not None else 0.5)
        panel.plot(
            "histogram",
            layout={
                "title": {"text": f"{state.score_field or state.run} ({state.num_scored or 0} samples)"},
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
                    view=types.SliderView(componentsProps={"slider": {"min": 0, "max": 1, "step": 0.001}}),
                    on_change=self.on_change_threshold)
        panel.md(counts_markdown(state.counts), name="counts_text")  # not "counts": md shows that state value

        actions = panel.h_stack("actions", align_x="left", gap=1)
        actions.btn("show_flagged", label="Show flagged", icon="filter_alt", variant="contained",
                    on_click=self.show_flagged)
        actions.btn("accept", label="Accept", icon="check", on_click=self.accept)
        actions.btn("reject", label="Reject", icon="close", on_click=self.reject)
        actions.str("relabel_label", label="Relabel as", view=types.TextFieldView(placeholder="normal, scratch, ..."))
        actions.btn("relabel", label="Relabel", icon="edit", on_click=self.relabel)
        actions.btn("recalibrate", label="Recalibrate from reviews", icon="tune", on_click=self.recalibrate)
        return types.Property(panel, view=types.GridView(orientation="vertical", gap=2, padding=2))
