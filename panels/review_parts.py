"""What the review panel shows, computed from the core's answers: plot traces and markdown.

Pure functions (no ``ctx``), so the panel's handlers stay a few lines each and these can be tested alone.
"""

from __future__ import annotations

from typing import Any

import fiftyone as fo

from fiftyone_anomaly_vlm.reviewing import REVIEW_FIELD, run_owned_fields
from fiftyone_anomaly_vlm.runs import EVALUATION_METHOD

NO_GT = "(none)"
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


def histogram_title(run: str | None, hist: dict[str, Any]) -> str:
    """The histogram's title: the run, the field histogrammed and how many samples it holds."""
    return f"{run}: {hist['field']} ({hist['count']} samples)"


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


def errors_markdown(run: str, num_scored: int, errors: dict[str, Any] | None) -> str:
    """Why a run shows few or no scores: how many samples errored and the first errors."""
    errors = errors or {"count": 0, "first": []}
    if not errors["count"]:
        return "" if num_scored else f"Run **{run}** has no scores yet."
    head = (f"Run **{run}** has no scores: all **{errors['count']}** samples it processed errored."
            if not num_scored else f"**{errors['count']}** samples of run **{run}** errored (not in the histogram).")
    lines = [f"- `{name}`: {message}" for name, message in errors["first"]]
    more = errors["count"] - len(errors["first"])
    if more > 0:
        lines.append(f"- ... and {more} more (field `{run}_error`)")
    return "\n".join([head, "", "First errors:", *lines])


def evaluations_of(dataset, run: str) -> list[str]:
    """The evaluation runs recorded for review target ``run`` (``fav.evaluate(..., key=run)``)."""
    return dataset.list_runs(method=EVALUATION_METHOD, run_key=run)


_METRIC_ROWS = [("image AUROC", "auroc"), ("image AP", "ap"), ("image F1-max", "f1_max"),
                ("F1-max threshold (raw)", "f1_max_threshold"), ("F1 at the run's threshold", "f1"),
                ("precision", "precision"), ("recall", "recall"), ("accuracy", "accuracy"),
                ("pixel AUROC", "pixel_auroc"), ("AUPRO", "aupro")]


def evaluation_markdown(results) -> str:
    """The metrics of an evaluation run (``dataset.load_run_results``) as a markdown table."""
    m, cfg = results.metrics, results.config
    head = (f"Evaluation **{results.key}** of `{getattr(cfg, 'run_key', '?')}` against "
            f"`{getattr(cfg, 'gt_field', '?')}`: {m.get('num_samples', '?')} samples, "
            f"{m.get('num_anomalous', '?')} anomalous")
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {name} | {m[k]:.4f} |" for name, k in _METRIC_ROWS if isinstance(m.get(k), (int, float))]
    if "tp" in m:
        rows.append(f"| confusion | TP {m['tp']}, FP {m['fp']}, FN {m['fn']}, TN {m['tn']} |")
    return "\n".join([head, "", *rows])


def curve_traces(results) -> list[dict[str, Any]]:
    """Plotly traces of an evaluation's image ROC curve (axes x, y) and precision-recall curve (axes x2, y2)."""
    roc, pr = results.roc or {}, results.pr or {}
    auroc, ap = results.metrics.get("auroc"), results.metrics.get("ap")
    return [
        {"type": "scatter", "mode": "lines", "x": list(roc.get("fpr", [])), "y": list(roc.get("tpr", [])),
         "name": f"ROC, AUROC {auroc:.3f}" if auroc is not None else "ROC", "line": {"color": "#ff6d04"}},
        {"type": "scatter", "mode": "lines", "x": [0, 1], "y": [0, 1], "name": "chance",
         "line": {"dash": "dot", "color": "#9e9e9e"}},
        {"type": "scatter", "mode": "lines", "x": list(pr.get("recall", [])), "y": list(pr.get("precision", [])),
         "name": f"PR, AP {ap:.3f}" if ap is not None else "PR", "line": {"color": "#6d8fd1"},
         "xaxis": "x2", "yaxis": "y2"},
    ]
