"""The review panel's "Runs" section: this dataset's delegated (scheduled) operations and anomaly runs.

The rows come from :func:`fiftyone_anomaly_vlm.reviewing.overview.run_overview`; :func:`runs_state` turns them
into one markdown table kept in the panel's state (``runs_md``, read by :func:`render_runs`), refreshed with
the panel's Refresh button.
"""

from __future__ import annotations

from fiftyone_anomaly_vlm.reviewing.overview import RunRow, run_overview
from fiftyone_anomaly_vlm.runs import JUDGE_EVAL_METHOD, runs_of

RUNS_STATE = "runs_md"
_HEAD = ["| run | kind | when (UTC) | state | details |", "|---|---|---|---|---|"]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _state(row: RunRow) -> str:
    if row.source == "run" or row.state in ("completed", "failed") or row.progress is None:
        return row.state
    return f"{row.state} {100 * row.progress:.0f} %"


def _details(row: RunRow) -> str:
    if row.error:
        return f"**error:** {row.error}"
    if row.source == "delegated" and row.state not in ("completed", "failed"):
        return f"{row.detail} (id `{row.op_id}`)".strip()
    return row.detail


def runs_markdown(rows: list[RunRow]) -> str:
    """The runs view as markdown: one table row per delegated operation and anomaly run."""
    if not rows:
        return ("**Runs**: none yet. Long operators can be scheduled (\"Schedule\") where the App runs with "
                "`FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true` and a worker (`fiftyone delegated launch`) runs.")
    lines = ["**Runs** (scheduled operations, then recorded runs; Refresh to update)", "", *_HEAD]
    for row in rows:
        when = row.when.strftime("%Y-%m-%d %H:%M:%S") if row.when else ""
        kind = "scheduled" if row.source == "delegated" else row.kind
        lines.append(f"| {_cell(row.name)} | {_cell(kind)} | {when} | {_cell(_state(row))} | "
                     f"{_cell(_details(row))} |")
    return "\n".join(lines)


def judge_eval_markdown(dataset) -> str:
    """The reports of the dataset's judge evaluations (``fav.evaluate_judge``), newest key order; "" if none."""
    parts = []
    for key in runs_of(dataset, JUDGE_EVAL_METHOD):
        try:
            parts.append(dataset.load_run_results(key, cache=False).markdown())
        except Exception as exc:  # noqa: BLE001 - a run recorded without results (interrupted): say so
            parts.append(f"**Judge evaluation `{key}`**: no report ({type(exc).__name__}); run it again to finish")
    return "\n\n".join(parts)


def runs_state(dataset) -> dict[str, str]:
    """The panel state patch of the runs view for ``dataset``: the runs table, then judge evaluation reports."""
    if dataset is None:
        return {RUNS_STATE: ""}
    text = runs_markdown(run_overview(dataset))
    reports = judge_eval_markdown(dataset)
    return {RUNS_STATE: f"{text}\n\n{reports}" if reports else text}


def render_runs(panel, state) -> None:
    """Add the runs view (read from the panel's state) to ``panel``."""
    if state.get(RUNS_STATE):
        panel.md(state.get(RUNS_STATE), name="runs_view")
