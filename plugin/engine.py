"""The one run engine behind every verb that writes per-sample fields (score, judge, score_video).

A verb describes *what* a run is (a :class:`Job`: its fields, its config, how to cut the samples into batches
and what one batch writes); the engine does the rest the same way for all of them:

1. **validate** the collection (media type, not empty) and the key (an identifier FiftyOne does not reserve);
2. **check the key** against the runs already recorded (:func:`check_run_key`): a run of another kind, or of
   another model (a different expert fit, a different VLM) under the same key, is refused without
   ``overwrite``; fields of that name that belong to no run are refused;
3. **hold the key** (:class:`~fiftyone_anomaly_vlm.leases.RunLease`): a second process writing the same key
   is refused while the first is alive;
4. on ``overwrite``, **clear** the run's old values (sample and frame fields) on the target samples, then
   **register** the run (before any work, so a crash still leaves a run that ``delete_run`` cleans up) and
   **declare** its fields with their types;
5. **resume**: samples whose "done" field (the last field written) is set are skipped;
6. the **batch loop**: batches are prepared ahead in a worker thread when the job asks (``prefetch``),
   computed, and handed to one background writer (:class:`~fiftyone_anomaly_vlm.writers.OrderedWriter`)
   that writes frame fields first, then the sample fields in the job's order with the "done" field last;
   one batch is in flight, so memory is bounded and errors surface promptly. A cancelled or failed run
   (an exception, e.g. from a progress callback) stops after the batch in flight is written: nothing finished
   is lost and the next call resumes;
7. **finish**: counts (:class:`RunStats`) and the job's own final step.

A run split into shards (``shard=(i, n)``, :mod:`~fiftyone_anomaly_vlm.shards`) does the same on the samples of
its shard (a hash of the sample id), under a lease of its own (key, shard); its state and progress go to the run's
shard ledger, and the shard that completes the set does step 7 for the whole view and stores the run's totals.

Example:
    >>> stats = run_job(view, ScoreJob(expert, ...), key="padim", overwrite=False)
    >>> stats.num_done, stats.num_skipped, stats.num_errors
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
import logging
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator

import fiftyone as fo
import fiftyone.core.utils as fou

from ._common import check_field_key, check_key, field_key  # noqa: F401 - re-exported: the engine's key rules
from .fields import FieldSpec
from .leases import RunLease
from .shards import (QueuedShards, check_shard, complete_shard, in_shard, queue_shards, set_shard, shard_ids,
                     start_shard, store_totals)
from .writers import BatchOutput, OrderedWriter, declare_fields

logger = logging.getLogger(__name__)
#: seconds between two progress updates of a shard in its ledger ($FAV_SHARD_PROGRESS_S, default 2)
SHARD_PROGRESS_EVERY = float(os.environ.get("FAV_SHARD_PROGRESS_S", 2.0))

def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def check_collection(samples, what: str, media_type: str = "image") -> int:
    """Fail early, with one clear message, when ``samples`` cannot be used; return the sample count.

    Raises:
        TypeError: ``samples`` is not a FiftyOne dataset or view.
        ValueError: the collection is empty or holds another media type.
    """
    if not isinstance(samples, fo.core.collections.SampleCollection):
        raise TypeError(f"{what}: expected a FiftyOne dataset or view, got {type(samples).__name__}")
    if samples.media_type != media_type:
        hint = ("image experts need image samples (for video, score frames with "
                "`dataset.to_frames(sample_frames=True)` or use score_video)" if media_type == "image"
                else f"{what} needs {media_type} samples")
        raise ValueError(f"{what}: '{samples._root_dataset.name}' holds {samples.media_type} samples; {hint}")
    count = samples.count()
    if count == 0:
        raise ValueError(f"{what}: the view is empty; nothing to do")
    return count


@dataclass
class RunStats:
    """Counts of one engine run.

    Attributes:
        num_samples: samples in the target view (in the shard of the view, for a shard).
        num_selected: samples the job selected (e.g. only flagged ones).
        num_skipped: selected samples already done under this key (resume).
        num_done: samples written without error by this call.
        num_errors: samples that got an error by this call.
        errors: sample id -> message.
        counts: the verb's own counters.
    """

    num_samples: int = 0
    num_selected: int = 0
    num_skipped: int = 0
    num_done: int = 0
    num_errors: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    def add(self, out: BatchOutput) -> None:
        """Count one written batch."""
        self.num_errors += len(out.errors)
        self.num_done += out.size - len(out.errors)
        self.errors.update(out.errors)
        self.counts.update(out.counts)


class Job(ABC):
    """What a verb contributes to a run: override the hooks below; the engine calls them in order.

    Attributes:
        verb: the verb's name, used in messages (``"score"``).
        method: the run's method (its kind), as recorded in the run config.
        media_type: media the verb works on.
        fields: the run's fields in write order (see :class:`~fiftyone_anomaly_vlm.fields.FieldSpec`).
        error_field: the sample field that holds a failed sample's message.
        done_field: the sample field written last; a sample with it set is done (resume skips it).
        prefetch: batches prepared ahead in a worker thread (0: in turn).
    """

    verb: ClassVar[str] = "run"
    method: ClassVar[str] = ""
    media_type: ClassVar[str] = "image"
    fields: list[FieldSpec]
    error_field: str
    done_field: str
    prefetch: int = 0

    def identity(self, config) -> Any:
        """What must be equal between a recorded run's ``config`` and this one to add to its results (the
        model that wrote them). Works on configs recorded by earlier releases too."""
        return None

    def describe_identity(self, config) -> str:
        """``identity(config)`` in words, for the refusal message."""
        return repr(self.identity(config))

    @abstractmethod
    def config(self):
        """The run config to register (a typed :class:`~fiftyone_anomaly_vlm.runs.AnomalyRunConfig`)."""

    def select(self, samples):
        """The samples this run works on (default: all of ``samples``)."""
        return samples

    def setup(self, dataset) -> None:
        """After the run is registered and its fields declared (e.g. mask targets, folders)."""

    def columns(self) -> list[str]:
        """Fields read for each sample to do (``id`` first)."""
        return ["id", "filepath"]

    def batches(self, rows: dict[str, list]) -> Iterable[Any]:
        """Cut the samples to do (``rows``: column -> values) into work items (default: none, for a run that
        writes no sample fields, such as a learned question set)."""
        return ()

    def prepare(self, item: Any) -> Any:
        """CPU work of one item, run ahead in a worker thread when ``prefetch`` > 0."""
        return item

    def compute(self, prepared: Any) -> BatchOutput:
        """The model's work on one prepared item: what to write (default: nothing, as :meth:`batches`)."""
        return BatchOutput()

    def finish(self, samples, stats: RunStats) -> None:
        """After the last batch is written (e.g. values that need the whole view)."""

    def totals(self, samples) -> dict[str, int]:
        """The verb's counters over the whole view, read from the database: a run split into shards stores them
        as its totals when its last shard finishes, whichever processes wrote the samples (a shard's own
        counters cover only what its last runner did)."""
        return {}


def check_run_key(dataset, key: str, job: Job, overwrite: bool) -> None:
    """The one place that decides whether ``key`` may be (re)used by ``job``.

    Raises:
        ValueError: a run of another kind holds ``key``; or one of this kind holds results of another
            model and ``overwrite`` is False; or the job's fields exist but belong to no run ``key``.
    """
    if key in dataset.list_runs():
        recorded = dataset.get_run_info(key).config
        if recorded.method != job.method:
            raise ValueError(f"key {key!r} is already used by a run of another kind; choose another key")
        if not overwrite and job.identity(recorded) != job.identity(job.config()):
            raise ValueError(f"run {key!r} holds results of {job.describe_identity(recorded)}, not of "
                             f"{job.describe_identity(job.config())}; pass overwrite=True to replace them, or "
                             "choose another key")
        return  # a run recorded before field keys were checked keeps its key
    check_field_key(key)
    schema = dataset.get_field_schema()
    fschema = (dataset.get_frame_field_schema() or {}) if dataset._has_frame_fields() else {}
    clash = [s.path for s in job.fields if (fschema if s.frame else schema).get(s.name) is not None]
    if clash:
        raise ValueError(f"fields {clash} exist but belong to no {job.verb} run {key!r}; choose another key")


def record_run(samples, key: str, config, results=None, *, cleanup: bool = False) -> None:
    """Record (or replace) the run ``key`` with ``config`` and optional ``results``: the one place the plugin
    registers FiftyOne runs (on a view, the view is recorded with the run). ``cleanup=False`` keeps the fields of
    a run being replaced (a resumed run)."""
    samples.register_run(key, config, results=results, overwrite=True, cleanup=cleanup)


def clear_fields(samples, specs: list[FieldSpec], done_field: str) -> None:
    """Set the run's fields to None on ``samples`` (the done field first, so a crash midway leaves the
    samples to do, never half-old ones marked done)."""
    dataset = samples._root_dataset
    schema = dataset.get_field_schema()
    names = [done_field] + [s.name for s in specs if not s.frame and s.name != done_field]
    present = [n for n in names if n in schema]
    if present:
        samples.clear_sample_fields(present)
    if dataset._has_frame_fields():
        fschema = dataset.get_frame_field_schema() or {}
        frames = [s.name for s in specs if s.frame and s.name in fschema]
        if frames:
            samples.clear_frame_fields(frames)


def run_job(samples, job: Job, key: str, *, overwrite: bool = False, progress: bool | Any = None,
            shard: tuple[int, int] | None = None) -> RunStats:
    """Run ``job`` on ``samples`` under the run ``key`` (see the module docstring for the steps).

    Args:
        samples: the target dataset or view.
        job: what the verb computes and writes.
        key: the run key (already checked with :func:`check_key`).
        overwrite: replace the run's results on these samples (and its record), whatever wrote them.
        progress: FiftyOne progress convention: None/True/False, or a callable taking a ``ProgressBar``.
        shard: ``(index, count)``: work on that shard of ``samples`` only (see the module docs).

    Returns:
        :class:`RunStats` (of the shard, for a shard).

    Raises:
        ValueError: a bad ``shard``, or ``overwrite`` with ``shard`` (clear the run on the whole view first).
    """
    dataset = samples._root_dataset
    if shard is not None:
        shard = check_shard(shard)
        if overwrite:
            raise ValueError("overwrite=True with shard=...: a shard cannot clear the run for the other shards; "
                             "run again with overwrite=True and shards=N (it clears the run once), or "
                             "delete the run first")
        dataset._doc.reload("runs")  # runs registered by the other shards' processes
    check_run_key(dataset, key, job, overwrite)
    stats = RunStats(num_samples=samples.count())
    with RunLease(dataset, key, job.verb, shard=shard):
        selected = job.select(samples)
        if overwrite:
            clear_fields(selected, job.fields, job.done_field)
        if shard is None or key not in dataset.list_runs():  # a shard keeps the record its siblings share
            record_run(dataset, key, job.config())
        declare_fields(dataset, job.fields)
        job.setup(dataset)
        todo = selected if overwrite else selected.exists(job.done_field, False)
        columns = job.columns()
        rows = dict(zip(columns, todo.values(columns)))
        if shard is None:
            stats.num_selected = selected.count()
        else:
            keep = [in_shard(sid, *shard) for sid in rows["id"]]
            rows = {name: [v for v, k in zip(values, keep) if k] for name, values in rows.items()}
            stats.num_selected = len(shard_ids(selected.values("id"), *shard))
            stats.num_samples = (stats.num_selected if selected is samples
                                 else len(shard_ids(samples.values("id"), *shard)))
            # a shard with samples to do opens the run again: the last shard to complete finishes it again
            start_shard(dataset, key, shard[0], shard[1], stats.num_selected, reopen=bool(rows["id"]))
        n = len(rows[columns[0]])
        stats.num_skipped = stats.num_selected - n
        try:
            if n:
                _batch_loop(dataset, job, rows, n, stats, progress, key, shard)
        except BaseException as exc:
            if shard is not None:
                set_shard(dataset, key, shard[0], state="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        if shard is None:
            job.finish(samples, stats)
        elif complete_shard(dataset, key, shard[0], stats.num_errors, stats.num_skipped + stats.num_done
                            + stats.num_errors):  # the last shard finishes the run
            own = dict(stats.counts)  # this shard's counters: not the run's
            job.finish(samples, stats)
            store_totals(dataset, key, {"num_samples": samples.count(), "num_done": samples.count(job.done_field),
                                        "num_errors": samples.count(job.error_field),
                                        **{k: v for k, v in stats.counts.items() if own.get(k) != v},
                                        **job.totals(samples)})
    return stats


def queue_run_shards(samples, method: str, specs: list[FieldSpec], done_field: str, operator_uri: str,
                     params: dict[str, Any], key: str, shards: Any, shard: Any, overwrite: bool) -> QueuedShards:
    """A verb's ``shards=N``: queue one delegated operation of ``operator_uri`` per shard, each running the verb
    with ``params`` on its shard (:func:`~fiftyone_anomaly_vlm.shards.queue_shards`). ``overwrite`` clears the
    run's fields (``specs``, sample and frame fields; ``done_field`` first) on ``samples`` once, here, before any
    shard starts, and forgets its record, so the shards record the new model; values outside ``samples`` stay.

    Raises:
        ValueError: ``shards`` not a whole number >= 1, both ``shard`` and ``shards``, or ``key`` held by a run
            of another kind than ``method``.
    """
    shards = check_positive_int("shards", shards)
    if shard is not None:
        raise ValueError("pass shard=(i, n) (run one shard here) or shards=N (queue N shards), not both")
    dataset = samples._root_dataset
    if key in dataset.list_runs():
        if dataset.get_run_info(key).config.method != method:
            raise ValueError(f"key {key!r} is already used by a run of another kind; choose another key")
        if overwrite:
            clear_fields(samples, specs, done_field)
            fo.core.runs.Run.delete_run(dataset, key, cleanup=False)
    return queue_shards(samples, operator_uri, params, key, shards)


def _batch_loop(dataset, job: Job, rows: dict[str, list], n: int, stats: RunStats, progress, key: str,
                shard: tuple[int, int] | None) -> None:
    """Compute and write the batches of ``rows`` (a shard's progress goes to its ledger every
    :data:`SHARD_PROGRESS_EVERY` seconds)."""
    writer = OrderedWriter(dataset, job.fields, job.error_field, job.done_field)
    last = time.monotonic()
    with writer, fou.ProgressBar(total=n, progress=progress) as pb, \
            Prefetch(job.prepare, job.batches(rows), job.prefetch,
                     name=f"fav-{job.verb}-prepare") as prepared_items:
        for prepared in prepared_items:
            out = job.compute(prepared)
            written = stats.num_skipped + stats.num_done + stats.num_errors
            writer.submit(out)  # returns once the batches before this one are written
            stats.add(out)
            pb.update(out.size)
            if shard is not None and time.monotonic() - last >= SHARD_PROGRESS_EVERY:
                last = time.monotonic()
                set_shard(dataset, key, shard[0], done=written, num_errors=stats.num_errors - len(out.errors))


class Prefetch:
    """Iterate ``fn(item)`` over ``items`` in order, computing up to ``depth`` results ahead in one worker thread.

    While the caller works on result ``n`` (e.g. ``generate()`` on the accelerator), the worker computes
    ``n + 1`` (reading images, cutting crops, running the processor). At most ``depth + 1`` results exist at
    once. An exception raised by ``fn`` is raised by the iteration at that item. Leaving the ``with`` block
    (normally, by an error or a cancelled run) drops what was not yet consumed: queued items are cancelled
    and the one being computed is waited for, so no work goes on after it.

    Args:
        fn: the work for one item.
        items: the items, in order.
        depth: how many items ahead; 0 computes each item in the caller's thread when it is needed.
        name: the worker thread's name prefix (the engine names it after the verb: ``fav-judge-prepare``).

    Example:
        >>> with Prefetch(load_batch, range(0, n, 8), depth=1) as batches:
        ...     for batch in batches:
        ...         run_model(batch)
    """

    def __init__(self, fn, items, depth: int = 1, name: str = "fav-prepare") -> None:
        self.fn = fn
        self.name = name
        self.items = iter(items)
        self.depth = max(0, int(depth))
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def __enter__(self) -> Prefetch:
        if self.depth:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
            for item in itertools.islice(self.items, self.depth):
                self._pending.append(self._pool.submit(self.fn, item))
        return self

    def __iter__(self) -> Iterator[Any]:
        if self._pool is None:
            for item in self.items:
                yield self.fn(item)
            return
        while self._pending:
            future = self._pending.popleft()
            for item in itertools.islice(self.items, 1):  # keep `depth` items queued behind this one
                self._pending.append(self._pool.submit(self.fn, item))
            yield future.result()

    def __exit__(self, *exc_info) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
