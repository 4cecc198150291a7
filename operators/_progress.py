"""One progress adapter and one error path for every long operator.

Delegated runs report through ``ctx.set_progress`` (stored with the delegated operation, shown in the
Runs list); immediate runs execute the work in a worker thread and the operator, a generator, yields
``set_progress`` triggers to the App while it waits.

Delegated runs return what they did: :func:`reports_errors` drives the generator itself when delegated and
returns :func:`~fiftyone_anomaly_vlm.reviewing.overview.result_summary` of the run's result (counts, first
errors), which FiftyOne stores as the operation's result (FiftyOne exhausts a generator and keeps nothing
of it); the review panel's Runs section shows it ("42 scored, 0 errors"). The last progress of a delegated run is
stored at 100 % with a "done" label, so a finished operation never shows a stale label.

Scheduling: the open-source App offers "Schedule" only with ``FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true`` in the
App server's environment (``fo.config.allow_legacy_orchestrators``), and a worker (``fiftyone delegated
launch``) runs what was scheduled; :mod:`fiftyone_anomaly_vlm.app_launch` starts both.

Errors: FiftyOne 1.22 streams a generator operator's messages to the App and has no error path for them
(``fiftyone/operators/server.py``, ``create_response_generator``): an exception ends the stream without a
word and the App's progress dialog waits forever. :func:`reports_errors` wraps ``execute`` so that, for a
run the App started, the exception becomes an error notification with its message, the progress dialog
ends on that message and the full traceback goes to the browser console. Delegated runs and runs started
from Python (``foo.execute_operator``) raise as before: the delegated operation is marked failed with the
error, the Python caller gets the exception.
"""

from __future__ import annotations

import functools
import threading
import traceback
from collections.abc import Callable, Generator
from typing import Any

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm.reviewing.overview import result_summary


def run_with_progress(ctx, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Generator:
    """Call ``fn(*args, progress=..., **kwargs)`` reporting progress to the App; ``yield from`` it.

    Returns (as the generator's return value) what ``fn`` returned; re-raises what it raised.
    """

    def message(pb) -> str:  # a run in phases names each (models.progress.PhaseBar.phase_label)
        return getattr(pb, "phase_label", None) or (f"{label}: {pb.iteration}/{pb.total}" if pb.total else label)

    if ctx.delegated:
        progress = fo.report_progress(lambda pb: ctx.set_progress(progress=pb.progress, label=message(pb)), dt=2.0)
        result = fn(*args, progress=progress, **kwargs)
        ctx.set_progress(progress=1.0, label=f"{label}: done")  # report_progress may have stopped short of it
        yield RunOutcome(result)
        return result

    state: dict[str, Any] = {"progress": 0.0, "label": label}
    box: dict[str, Any] = {}

    def on_progress(pb) -> None:
        state["progress"], state["label"] = pb.progress, message(pb)

    def work() -> None:
        try:
            box["result"] = fn(*args, progress=on_progress, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the operator's thread below
            box["error"] = exc

    thread = threading.Thread(target=work, name=f"fav-{label}", daemon=True)
    thread.start()
    yield ctx.trigger("set_progress", dict(progress=0.0, label=label))
    last = None
    while thread.is_alive():
        thread.join(timeout=1.0)
        now = (round(state["progress"] or 0.0, 3), state["label"])
        if now != last:
            last = now
            yield ctx.trigger("set_progress", dict(progress=now[0], label=now[1]))
    if "error" in box:
        raise box["error"]
    yield ctx.trigger("set_progress", dict(progress=1.0, label=f"{label}: done"))  # the dialog ends at 100 %
    yield RunOutcome(box.get("result"))
    return box.get("result")


class RunOutcome:
    """What :func:`run_with_progress` yields once its call returned: the call's result, for
    :func:`reports_errors` (which keeps it from the App). Not a message for the App."""

    def __init__(self, result: Any) -> None:
        self.result = result


def report_queued(ctx, queued) -> Generator:
    """What a form's ``shards=N`` run yields once its shards are queued (``yield from`` it): the
    :class:`~fiftyone_anomaly_vlm.shards.QueuedShards` as the run's outcome and a notification."""
    yield RunOutcome(queued)
    yield ctx.trigger("notify", dict(message=f"Queued {queued.count} shards of '{queued.key}' for the delegated "
                                             "workers", variant="success"))


def started_from_app(ctx) -> bool:
    """Whether the App's server streams this immediate run to the browser.

    The server's execute endpoints require ``operator_uri`` in the request body, which becomes
    ``ctx.request_params``; ``foo.execute_operator`` (Python) passes no such key, and a delegated run has
    ``ctx.delegated`` set.
    """
    return not ctx.delegated and ctx.executor is not None and "operator_uri" in (ctx.request_params or {})


def failure_messages(ctx, title: str, exc: BaseException) -> list:
    """The App messages that report a failed run: an error notification with the exception's message, the
    progress dialog replaced by that message (its Done button closes it), the traceback in the console."""
    message = str(exc) or type(exc).__name__
    outputs = types.Object()
    outputs.view("error", types.Error(label=title, description=message))
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return [ctx.ops.notify(message, variant="error"),
            ctx.ops.show_output(types.Property(outputs).to_json(), {}),
            ctx.log(f"{title}: {trace}")]


def reports_errors(execute: Callable) -> Callable:
    """Decorate a generator ``execute`` so that a run started in the App reports its failure there, and a
    delegated run returns :func:`result_summary` of what it did.

    See the module docs; nothing else changes (a failed run writes what the core wrote before raising,
    which is nothing for the core's whole-run checks).
    """

    def messages(self, ctx, outcome: dict) -> Generator:
        try:
            for message in execute(self, ctx):
                if isinstance(message, RunOutcome):
                    outcome["result"] = message.result
                else:
                    yield message
        except Exception as exc:
            if not started_from_app(ctx):
                raise
            for message in failure_messages(ctx, f"{self.config.label} failed", exc):
                yield message

    @functools.wraps(execute)
    def execute_reporting_errors(self, ctx):
        outcome: dict[str, Any] = {}
        if not ctx.delegated:
            return messages(self, ctx, outcome)  # a generator: the App streams it, Python exhausts it
        for _ in messages(self, ctx, outcome):  # FiftyOne would exhaust it and keep nothing: keep the result
            pass
        return result_summary(outcome["result"]) if "result" in outcome else None

    return execute_reporting_errors


def long_running_config(name: str, label: str, description: str, icon: str, delegate_by_default: bool = True):
    """The ``OperatorConfig`` shared by the plugin's long operators: dynamic forms, progress as a
    generator, immediate or delegated execution (delegated chosen by default for model work: the App's
    button reads "Schedule" where scheduling is enabled, see the module docs, and "Execute" elsewhere)."""
    return foo.OperatorConfig(
        name=name,
        label=label,
        description=description,
        icon=icon,
        dynamic=True,
        execute_as_generator=True,
        allow_immediate_execution=True,
        allow_delegated_execution=True,
        default_choice_to_delegated=delegate_by_default,
    )
