"""What the review panel shows, computed from the core's answers: plot traces, markdown, the threshold scale.

Pure functions (no ``ctx``), so the panel's handlers stay a few lines each and these can be tested alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import fiftyone as fo

from fiftyone_anomaly_vlm.calibration import Calibration
from fiftyone_anomaly_vlm.fields import FieldNames
from fiftyone_anomaly_vlm.reviewing import REVIEW_FIELD, review_target, run_owned_fields
from fiftyone_anomaly_vlm.runs import EVALUATION_METHOD, AnomalyScoreRunConfig

NO_GT = "(none)"
FIRST_ERRORS = 3
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


def run_errors(dataset, run: str, first: int = FIRST_ERRORS) -> dict[str, Any]:
    """How many samples of review target ``run`` hold an error, and the first ones (file name, message)."""
    field = FieldNames(review_target(dataset, run).run_key).error  # every run kind names it <key>_error
    if field not in dataset.get_field_schema():
        return {"count": 0, "first": []}
    errored = dataset.exists(field)
    paths, messages = errored.limit(first).values(["filepath", field])
    return {"count": errored.count(), "first": [[p.rsplit("/", 1)[-1], m] for p, m in zip(paths, messages)]}


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


def raw_threshold(calibration: Calibration, score: float, steps: int = 4000) -> float:
    """The raw image threshold that flags exactly the samples whose calibrated score is above ``score``.

    ``Calibration.normalize_scores`` is strictly increasing, so the answer is the largest raw score whose
    calibrated score is at most ``score``, found by bisection (a raw sample is flagged when above it).
    """
    def norm(x: float) -> float:
        return float(calibration.normalize_scores(np.array([x], dtype=np.float64))[0])

    c = np.asarray(calibration.image_scores, dtype=np.float64)
    span = float(c.std()) or float(abs(c[-1]) * 0.1) or 1.0
    lo, hi = float(c[0]), float(c[-1])
    for _ in range(64):  # bracket: norm(lo) <= score < norm(hi)
        if norm(lo) <= score:
            break
        lo, span = lo - span, span * 2
    for _ in range(64):
        if norm(hi) > score:
            break
        hi, span = hi + span, span * 2
    if norm(lo) > score:  # every calibrated score is above: flag all
        return lo
    if norm(hi) <= score:  # none can be above (score ~ 1)
        return hi
    for _ in range(steps):
        mid = lo + (hi - lo) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if norm(mid) <= score else (lo, mid)
    return lo


def calibration_of(dataset, run: str) -> Calibration | None:
    """The normal-only calibration of expert scoring run ``run`` (None for VLM and fused scores)."""
    if review_target(dataset, run).kind != "expert":
        return None
    config = dataset.get_run_info(run).config
    if not isinstance(config, AnomalyScoreRunConfig) or not getattr(config, "calibration", None):
        return None
    return Calibration.from_dict(config.calibration)


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
