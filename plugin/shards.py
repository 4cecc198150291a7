"""One run split into shards: each shard a deterministic part of the view, all writing the one run key.

A sample belongs to shard ``i`` of ``n`` when ``crc32(sample id) % n == i``: the split depends only on the
sample's id (not on the view's order or on which worker asks), so a shard run again, on any machine, covers the
same samples. Each shard is a run of its own for the engine (its own lease, resumable: a re-run scores only its
samples without a score), and a ledger in the database (collection ``fav_run_shards``, one document per dataset
and run key) records each shard's state and progress. The shard that completes the set finishes the run for the
whole view (e.g. the flagged count) and stores the run's totals in the ledger.

States of a shard: ``queued`` (scheduled, not started), ``running`` (its lease is live), ``stale`` (it was running
but its lease expired or its process is gone: the worker died), ``failed`` (raised, or its delegated operation
failed before the shard started), ``complete``.

Example:
    >>> fav.score(view, expert="padim", shard=(3, 8))      # a worker-side call, e.g. from your own scheduler
    >>> fav.score(view, expert="padim", shards=8)          # queue 8 delegated operations (workers run them)
    >>> fav.judge(view, backend=backend, expert="padim", shards=8)   # judge and score_video take the same
    >>> [s.state for s in shard_states(dataset, "padim")]
    ['complete', 'running', ...]
    >>> resume_shards(dataset, "padim")                    # queue again the shards whose worker died
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fiftyone.core.odm as foo
from bson import ObjectId
import fiftyone.operators as foo_ops
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionResult, ExecutionRunState

from .leases import lease_state

COLLECTION = "fav_run_shards"


def check_shard(shard: Any) -> tuple[int, int]:
    """``shard`` as ``(index, count)`` with ``0 <= index < count``, or a ValueError saying what is wrong."""
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)):
        raise ValueError(f"shard must be (index, count), e.g. (0, 4), got {shard!r}")
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {shard!r}: the index must be in 0..count-1 and count >= 1")
    return int(index), int(count)


def in_shard(sample_id: str, index: int, count: int) -> bool:
    """Whether the sample ``sample_id`` belongs to shard ``index`` of ``count`` (by a hash of the id)."""
    return zlib.crc32(str(sample_id).encode()) % count == index


def shard_ids(ids: list[str], index: int, count: int) -> list[str]:
    """The ids of ``ids`` in shard ``index`` of ``count``, in order."""
    return [sid for sid in ids if in_shard(sid, index, count)]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _coll():
    return foo.get_db_conn()[COLLECTION]


def _ledger_id(dataset, key: str) -> str:
    return f"{dataset._doc.id}/{key}"


@dataclass
class ShardState:
    """One shard of a run as the ledger holds it.

    Attributes:
        index: the shard's index.
        count: how many shards the run has.
        state: ``queued``, ``running``, ``stale``, ``failed`` or ``complete`` (see the module docs).
        done: samples of the shard written so far (by the current or last runner, skipped ones included; the
            batch being written is not counted).
        total: samples in the shard (known once it started).
        num_errors: samples of the shard that got an error.
        error: why a failed shard failed.
        host: the host that ran it last.
        op_id: the delegated operation that runs it, when it was scheduled with ``shards=N``.
        updated: when it last changed (UTC).
    """

    index: int
    count: int
    state: str = "queued"
    done: int = 0
    total: int | None = None
    num_errors: int = 0
    error: str | None = None
    host: str | None = None
    op_id: str | None = None
    updated: datetime.datetime | None = None


@dataclass
class ShardedRun:
    """The ledger of a sharded run: each shard's state and, once every shard is complete, the run's totals."""

    key: str
    count: int
    shards: list[ShardState] = field(default_factory=list)
    totals: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        """Whether every shard completed."""
        return all(s.state == "complete" for s in self.shards)

    def describe(self) -> str:
        """One line: ``"3/8 shards complete, 1 running, 1 stale"``."""
        by_state: dict[str, int] = {}
        for s in self.shards:
            by_state[s.state] = by_state.get(s.state, 0) + 1
        rest = [f"{n} {state}" for state, n in sorted(by_state.items()) if state != "complete"]
        return ", ".join([f"{by_state.get('complete', 0)}/{self.count} shards complete", *rest])


def sharded_run(dataset, key: str) -> ShardedRun | None:
    """The ledger of the run ``key`` of ``dataset`` (None when it never ran in shards), with each running shard
    checked against its lease (a running shard without a live lease is ``stale``)."""
    doc = _coll().find_one({"_id": _ledger_id(dataset, key)})
    if doc is None:
        return None
    count = int(doc["count"])
    shards = []
    for i in range(count):
        part = dict(doc.get("parts", {}).get(str(i)) or {})
        state = ShardState(index=i, count=count, **{k: v for k, v in part.items() if k in _PART_KEYS})
        if state.state == "running" and lease_state(dataset, key, (i, count)) != "live":
            state.state = "stale"
        elif state.state == "queued" and state.op_id:  # its operation may have failed before the shard started
            _check_operation(state)
        shards.append(state)
    return ShardedRun(key=key, count=count, shards=shards, totals=doc.get("totals"))


def _check_operation(state: ShardState) -> None:
    """A queued shard whose delegated operation failed before the shard started (e.g. the VLM server could not
    be reached, the expert could not load) is ``failed``, with the operation's error."""
    try:
        doc = DelegatedOperationService().get(ObjectId(state.op_id))
    except ValueError:  # the operation was deleted (``fiftyone delegated delete``)
        return
    if doc.run_state == ExecutionRunState.FAILED:
        state.state = "failed"
        error = doc.result.error if doc.result is not None else None
        state.error = str(error).strip().splitlines()[-1] if error else "its delegated operation failed"


_PART_KEYS = {"state", "done", "total", "num_errors", "error", "host", "op_id", "updated"}


def shard_states(dataset, key: str) -> list[ShardState]:
    """Each shard's :class:`ShardState` of the run ``key`` (empty when the run was never split)."""
    run = sharded_run(dataset, key)
    return run.shards if run is not None else []


def open_ledger(dataset, key: str, count: int, restart: bool = False) -> None:
    """Create the ledger of a run split into ``count`` shards (``restart``: forget an earlier split).

    Raises:
        ValueError: the run is already split into another number of shards that are not all complete.
    """
    coll, lid = _coll(), _ledger_id(dataset, key)
    if restart:
        coll.delete_one({"_id": lid})
    coll.update_one({"_id": lid}, {"$setOnInsert": {"count": count, "key": key, "dataset": dataset.name,
                                                    "parts": {}, "created": _now()}}, upsert=True)
    doc = coll.find_one({"_id": lid})
    if int(doc["count"]) != count:
        run = sharded_run(dataset, key)
        if run is not None and not run.complete:
            raise ValueError(f"run {key!r} on dataset '{dataset.name}' is split into {doc['count']} shards, not "
                             f"{count}, and not all are complete ({run.describe()}); finish it with that number "
                             "of shards, or pass overwrite=True to start again")
        coll.replace_one({"_id": lid}, {"count": count, "key": key, "dataset": dataset.name, "parts": {},
                                        "created": _now()})


def set_shard(dataset, key: str, index: int, **values: Any) -> None:
    """Update shard ``index``'s entry in the ledger (one atomic ``$set`` of its own fields)."""
    values["updated"] = _now()
    _coll().update_one({"_id": _ledger_id(dataset, key)},
                       {"$set": {f"parts.{index}.{k}": v for k, v in values.items()}})


def start_shard(dataset, key: str, index: int, count: int, total: int, reopen: bool = True) -> None:
    """Mark shard ``index`` running (on this host) with ``total`` samples; ``reopen``: it has samples to do, so the
    run is not finished any more (the shard that completes the set finishes it again). A shard run again with
    nothing to do leaves a finished run finished: its finish step runs once."""
    open_ledger(dataset, key, count)
    set_shard(dataset, key, index, state="running", done=0, total=total, num_errors=0, error=None,
              host=f"{socket.gethostname()}:{os.getpid()}")
    if reopen:
        _coll().update_one({"_id": _ledger_id(dataset, key)}, {"$set": {"finished": False}})


def complete_shard(dataset, key: str, index: int, num_errors: int, done: int) -> bool:
    """Mark shard ``index`` complete (``done`` samples, ``num_errors`` of them errors); True for exactly one
    caller: the one whose shard completed the set (it finishes the run), even when the last shards complete at
    the same moment."""
    set_shard(dataset, key, index, state="complete", num_errors=num_errors, done=done)
    run = sharded_run(dataset, key)
    if run is None or not run.complete:
        return False
    claimed = _coll().update_one({"_id": _ledger_id(dataset, key), "finished": {"$ne": True}},
                                 {"$set": {"finished": True}})
    return claimed.modified_count == 1


def store_totals(dataset, key: str, totals: dict[str, Any]) -> None:
    """The run's totals over every shard, stored once the last shard finished."""
    _coll().update_one({"_id": _ledger_id(dataset, key)}, {"$set": {"totals": totals, "completed_at": _now()}})


def forget_shards(dataset, key: str) -> None:
    """Remove the run's ledger (the run was deleted or starts again unsplit)."""
    _coll().delete_one({"_id": _ledger_id(dataset, key)})


@dataclass
class QueuedShards:
    """What ``score``, ``judge`` or ``score_video`` with ``shards=N`` did: it queued one delegated operation per
    shard (workers run them).

    Attributes:
        key: the run key.
        count: the number of shards.
        op_ids: the delegated operations' ids, by shard (``fiftyone delegated info <id>``).
    """

    key: str
    count: int
    op_ids: list[str] = field(default_factory=list)


def queue_shards(samples, operator_uri: str, params: dict[str, Any], key: str, count: int) -> QueuedShards:
    """Queue ``count`` delegated operations of ``operator_uri`` on ``samples``, shard ``i`` with ``params`` plus
    ``shard_index=i, shard_count=count``; the ledger records each shard queued with its operation id."""
    dataset = samples._root_dataset
    open_ledger(dataset, key, count, restart=True)
    queued = QueuedShards(key=key, count=count)
    for i in range(count):
        result = _delegate(operator_uri, dict(view=samples.view(), params={
            **params, "key": key, "shard_index": i, "shard_count": count}))
        queued.op_ids.append(str(result.result["id"]))
        set_shard(dataset, key, i, state="queued", op_id=queued.op_ids[-1])
    return queued


def _delegate(operator_uri: str, ctx: dict[str, Any]) -> ExecutionResult:
    """``execute_operator(..., request_delegation=True)``, also from inside an operator (a form's ``shards=N``,
    run from Python or by a worker), where an event loop runs and FiftyOne would return an unawaited task:
    there it runs in a thread of its own."""
    def queue() -> ExecutionResult:
        return foo_ops.execute_operator(operator_uri, ctx=ctx, request_delegation=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return queue()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fav-queue-shard") as pool:
        return pool.submit(queue).result()


def resume_shards(dataset, key: str) -> list[str]:
    """Queue again every shard of the run ``key`` whose worker died (``stale``) or that failed, from its
    delegated operation: the old operation, left ``running`` by a killed worker, is marked failed, and a copy
    is queued (``fiftyone delegated rerun``); the new run does only its shard's samples not yet done.

    Returns:
        The ids of the queued operations.

    Raises:
        ValueError: the run was never split into shards, or a shard to resume was not scheduled as a delegated
            operation (run that ``shard=(i, n)`` call again yourself).
    """
    run = sharded_run(dataset, key)
    if run is None:
        raise ValueError(f"run {key!r} on dataset '{dataset.name}' was not split into shards")
    service, queued = DelegatedOperationService(), []
    for shard in run.shards:
        if shard.state not in ("stale", "failed"):
            continue
        if not shard.op_id:
            raise ValueError(f"shard {shard.index} of run {key!r} is {shard.state} and was not scheduled as a "
                             f"delegated operation: run its call (score, judge or score_video) again with "
                             f"shard=({shard.index}, {run.count})")
        doc = service.get(ObjectId(shard.op_id))
        if doc.run_state == ExecutionRunState.RUNNING:  # its worker died: FiftyOne never learns it
            service.set_failed(doc.id, result=ExecutionResult(error=f"worker lost (shard {shard.index} stale)"))
        new = service.rerun_operation(doc.id)
        queued.append(str(new.id))
        set_shard(dataset, key, shard.index, state="queued", op_id=queued[-1])
    return queued
