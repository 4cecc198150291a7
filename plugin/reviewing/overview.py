"""What has run and what is running on a dataset: its anomaly runs and its delegated (scheduled) operations.

The review panel's "Runs" section shows :func:`run_overview`. Anomaly runs are the plugin's run records
(``dataset.list_runs()``, kind = method); delegated operations are FiftyOne's
(``DelegatedOperationService().list_operations(dataset_name=...)``) with their state, the progress and label
that ``ctx.set_progress`` stored, the operator's result (the plugin's long operators return
:func:`result_summary` of their run: counts and first errors) and, for a failed one, its error message.

Example:
    >>> for row in run_overview(dataset):
    ...     print(row.name, row.state, row.detail, row.error)
    padim_expert recorded trained on 20, 5 held out None
    score_anomalies completed 42 scored, 0 errors, 7 flagged None
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from fiftyone.operators.delegated import DelegatedOperationService

from ..runs import (CLIP_METHOD, COMPOSITE_METHOD, EVALUATION_METHOD, EXPERT_METHOD, JUDGE_EVAL_METHOD, JUDGE_METHOD,
                    QUESTIONS_METHOD, SCORE_METHOD, VIDEO_METHOD, recorded_config)
from ..shards import sharded_run

#: the kind shown for each run method of the plugin (runs of other methods are not listed)
RUN_KINDS = {
    EXPERT_METHOD: "expert", COMPOSITE_METHOD: "expert (group/ensemble)", CLIP_METHOD: "CLIP expert",
    SCORE_METHOD: "scoring", JUDGE_METHOD: "VLM judge", VIDEO_METHOD: "video scoring",
    QUESTIONS_METHOD: "guiding questions", EVALUATION_METHOD: "evaluation", JUDGE_EVAL_METHOD: "judge evaluation",
}
#: how many first per-sample errors :func:`result_summary` keeps
FIRST_ERRORS = 3
#: the count attributes of a result, in the order :func:`describe_result` names them
_COUNT_WORDS = [("num_scored", "scored"), ("num_judged", "judged"), ("num_frames", "frames"),
                ("num_skipped", "skipped"), ("num_errors", "errors"), ("num_frame_errors", "frame errors"),
                ("num_flagged", "flagged"), ("num_anomalous", "anomalous"), ("num_segments", "stretches")]


@dataclass(frozen=True)
class RunRow:
    """One line of the runs view.

    Attributes:
        source: ``"run"`` (a run record of the dataset) or ``"delegated"`` (a scheduled operation).
        name: the run key, or the operator's name for an operation (with the run key it was given).
        kind: the run's kind (:data:`RUN_KINDS`) or the operator's URI.
        when: when the run was recorded, or when the operation last changed state (UTC).
        state: ``"recorded"`` for a run; the operation's run state (queued, scheduled, running, completed,
            failed).
        progress: the operation's stored progress (0-1), None when it reported none.
        detail: counts of a run, the progress label of an unfinished operation or the summary of a finished one.
        error: a failed operation's error message (the exception's last line), else None.
        op_id: the operation's id (for ``fiftyone delegated info/fail <id>``), None for runs.
    """

    source: str
    name: str
    kind: str
    when: datetime.datetime | None
    state: str
    progress: float | None = None
    detail: str = ""
    error: str | None = None
    op_id: str | None = None


def result_summary(result: Any) -> dict[str, Any]:
    """What a run did, as a small JSON-able dict: its key, counts (``num_*``), metrics, checkpoint and first
    errors. The plugin's delegated operators return this (stored as the operation's result)."""
    values = vars(result) if hasattr(result, "__dict__") else {}
    key = getattr(result, "key", None)
    out: dict[str, Any] = {"key": key} if isinstance(key, str) else {}
    out.update({k: int(v) for k, v in values.items() if k.startswith("num_") and isinstance(v, int)})
    metrics = getattr(result, "metrics", None)
    if isinstance(metrics, dict):
        out["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    checkpoint = getattr(result, "checkpoint", None)
    if isinstance(checkpoint, str):
        out["checkpoint"] = checkpoint
    errors = getattr(result, "errors", None)
    if isinstance(errors, dict) and errors:
        out["first_errors"] = [str(e) for e in list(errors.values())[:FIRST_ERRORS]]
    return out


def describe_result(summary: dict[str, Any] | None) -> str:
    """One line from :func:`result_summary` output: ``"12 scored, 0 errors, 3 flagged in 'padim'"``."""
    if not summary:
        return ""
    parts = [f"{summary[k]} {word}" for k, word in _COUNT_WORDS if k in summary]
    metrics = summary.get("metrics") or {}
    parts += [f"{name} {metrics[k]:.3f}" for k, name in (("auroc", "AUROC"), ("ap", "AP")) if k in metrics]
    text = ", ".join(parts)
    if summary.get("key"):
        text = f"{text} in '{summary['key']}'" if text else f"'{summary['key']}'"
    if summary.get("first_errors"):
        text += f"; first error: {summary['first_errors'][0]}"
    return text


def error_message(error: str | None) -> str | None:
    """The message of a stored traceback: its last non-empty line (``"ValueError: ..."``)."""
    if not error:
        return None
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def _run_detail(dataset, key: str, config) -> str:
    method = config.method
    if method in (SCORE_METHOD, JUDGE_METHOD, VIDEO_METHOD):
        schema = dataset.get_field_schema()
        done = dataset.count(key) if key in schema else 0
        errors = dataset.count(f"{key}_error") if f"{key}_error" in schema else 0
        word = {SCORE_METHOD: "scored", JUDGE_METHOD: "judged", VIDEO_METHOD: "videos scored"}[method]
        split = sharded_run(dataset, key)  # a run split into shards: how far its shards are
        return f"{done} {word}, {errors} errors" + (f" ({split.describe()})" if split is not None else "")
    if method in (EXPERT_METHOD, COMPOSITE_METHOD, CLIP_METHOD):
        train, holdout = getattr(config, "num_train", None), getattr(config, "num_holdout", None)
        return ", ".join(([f"trained on {train}"] if train is not None else [])
                         + ([f"{holdout} held out"] if holdout is not None else []))
    if method == EVALUATION_METHOD:
        return f"of '{getattr(config, 'run_key', '?')}'"
    if method == JUDGE_EVAL_METHOD:
        return (f"model {config.backend.get('model')!r}, variants {', '.join(config.variants)}; "
                f"table below")
    return ""


def anomaly_runs(dataset) -> list[RunRow]:
    """The plugin's run records on ``dataset`` (runs of other plugins are left out)."""
    rows = []
    for key in dataset.list_runs():
        config = recorded_config(dataset, key)
        if config is None or getattr(config, "method", None) not in RUN_KINDS:
            continue
        info = dataset.get_run_info(key)
        rows.append(RunRow("run", key, RUN_KINDS[config.method], info.timestamp, "recorded",
                           detail=_run_detail(dataset, key, config)))
    return rows


def _operation_row(doc) -> RunRow:
    params = (doc.context.request_params or {}).get("params", {}) if doc.context else {}
    operator = doc.operator.rsplit("/", 1)[-1]
    key = params.get("key") or params.get("eval_key") or params.get("expert") or params.get("run")
    name = f"{operator} ({key})" if key else operator
    state = str(getattr(doc.run_state, "value", doc.run_state))
    status = doc.status
    progress = getattr(status, "progress", None)
    when = doc.failed_at or doc.completed_at or doc.started_at or doc.queued_at or doc.scheduled_at
    result = doc.result
    error = error_message(getattr(result, "error", None)) if state == "failed" else None
    if state in ("completed", "failed"):
        detail = describe_result(getattr(result, "result", None) if isinstance(getattr(result, "result", None), dict)
                                 else None)
    else:
        detail = getattr(status, "label", None) or ""
    return RunRow("delegated", name, doc.operator, when, state, progress=progress, detail=detail, error=error,
                  op_id=str(doc.id))


def delegated_operations(dataset, limit: int = 20) -> list[RunRow]:
    """The delegated operations of ``dataset`` (any operator), newest first, at most ``limit``."""
    docs = DelegatedOperationService().list_operations(dataset_name=dataset.name)
    rows = [_operation_row(doc) for doc in docs]
    rows.sort(key=lambda r: r.when or datetime.datetime.min, reverse=True)
    return rows[:limit]


def run_overview(dataset, limit: int = 20) -> list[RunRow]:
    """The delegated operations of ``dataset`` (newest first), then its anomaly runs (newest first)."""
    runs = sorted(anomaly_runs(dataset), key=lambda r: r.when or datetime.datetime.min, reverse=True)
    return delegated_operations(dataset, limit=limit) + runs
