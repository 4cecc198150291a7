"""One progress adapter for every long operator.

Delegated runs report through ``ctx.set_progress`` (stored with the delegated operation, shown in the
Runs list); immediate runs execute the work in a worker thread and the operator, a generator, yields
``set_progress`` triggers to the App while it waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import Any

import fiftyone as fo


def run_with_progress(ctx, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Generator:
    """Call ``fn(*args, progress=..., **kwargs)`` reporting progress to the App; ``yield from`` it.

    Returns (as the generator's return value) what ``fn`` returned; re-raises what it raised.
    """

    def message(pb) -> str:
        return f"{label}: {pb.iteration}/{pb.total}" if pb.total else label

    if ctx.delegated:
        progress = fo.report_progress(lambda pb: ctx.set_progress(progress=pb.progress, label=message(pb)), dt=2.0)
        return fn(*args, progress=progress, **kwargs)
        yield  # pragma: no cover - makes this a generator in both branches

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
    return box.get("result")


def long_running_config(name: str, label: str, description: str, icon: str, delegate_by_default: bool = True):
    """The ``OperatorConfig`` shared by the plugin's long operators: dynamic forms, progress as a
    generator, immediate or delegated execution (delegated chosen by default for model work)."""
    import fiftyone.operators as foo

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
