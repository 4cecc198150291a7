"""The review panel's "Runs" section: this dataset's delegated (scheduled) operations and anomaly runs.

The rows come from :func:`fiftyone_anomaly_vlm.reviewing.overview.run_overview`; :func:`runs_state` turns them
into one markdown table kept in the panel's state (``runs_md``, read by :func:`render_runs`), refreshed with
the panel's Refresh button.
"""

from __future__ import annotations

from fiftyone_anomaly_vlm.reviewing.overview import RunRow, run_overview

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


def runs_state(dataset) -> dict[str, str]:
    """The panel state patch of the runs view for ``dataset``."""
    return {RUNS_STATE: runs_markdown(run_overview(dataset)) if dataset is not None else ""}


def render_runs(panel, state) -> None:
    """Add the runs view (read from the panel's state) to ``panel``."""
    if state.get(RUNS_STATE):
        panel.md(state.get(RUNS_STATE), name="runs_view")
