"""Writing a run's fields: declaring them once, then one ordered ``set_values`` per field and batch.

Every verb writes through :class:`OrderedWriter`, in the same order: frame fields first, then the error
field, the other sample fields in the job's order, and the job's "done" field last. A sample whose done
field is set has all its other values written, so a run killed at any point resumes from exactly the
samples without it.

Example:
    >>> declare_fields(dataset, FieldNames("padim").specs())
    >>> with OrderedWriter(dataset, specs, "padim_error", "padim_score") as writer:
    ...     writer.submit(batch_output)
"""

from __future__ import annotations

import datetime
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fiftyone as fo
import fiftyone.core.odm as foo

from .fields import FieldSpec

logger = logging.getLogger(__name__)

_DECLARE_TRIES = 5


@dataclass
class BatchOutput:
    """What one computed batch writes.

    Attributes:
        values: sample field -> {sample id: value}.
        frame_values: frame field (without ``frames.``) -> {frame id: value}.
        errors: sample id -> why it failed; the engine writes the message to the job's error field and
            None to its other sample fields (a sample that fails now keeps nothing of an earlier run).
        size: samples this batch stands for (progress), done or failed.
        counts: extra counters of the verb (e.g. ``unparsed``), summed into :attr:`RunStats.counts`.
    """

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    frame_values: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    size: int = 0
    counts: Counter = field(default_factory=Counter)



def _stored_field_names(dataset) -> tuple[set[str], set[str]]:
    """The sample and frame field names in the dataset's document as stored now (other processes included)."""
    doc = foo.get_db_conn().datasets.find_one({"_id": dataset._doc.id}, {"sample_fields.name": 1,
                                                                        "frame_fields.name": 1}) or {}
    return ({f["name"] for f in doc.get("sample_fields") or []},
            {f["name"] for f in doc.get("frame_fields") or []})


def _field_document(doc_cls, spec: FieldSpec, created_at: datetime.datetime) -> dict:
    """The stored form of ``spec``'s field, as FiftyOne's ``add_sample_field`` would store it."""
    ffield = doc_cls._create_field(spec.name, spec.ftype, **spec.kwargs)
    ffield.name, ffield.db_field = spec.name, spec.name
    ffield._set_created_at(created_at)
    return foo.SampleFieldDocument.from_field(ffield).to_dict()


def _sync_field_schema(dataset) -> None:
    """Make this process's schema of ``dataset`` the stored one, without saving anything: the field lists are
    re-read and every stored field this process does not know yet (declared here or by another process) is
    declared on its sample/frame document classes, as a reload would, keeping the classes views were built on."""
    classes = [dataset._sample_doc_cls] + ([dataset._frame_doc_cls] if dataset._has_frame_fields() else [])
    for doc_cls in classes:
        attr = doc_cls._fields_attr()
        dataset._doc.reload(attr)
        for field_doc in dataset._doc[attr]:
            if field_doc.name not in doc_cls._fields:
                doc_cls._declare_field(dataset, field_doc.name, field_doc)


def declare_fields(dataset, specs: list[FieldSpec]) -> None:
    """Create the fields of ``specs`` that the dataset lacks, with their label types (so an all-error batch
    can be written too); safe while other processes change the same dataset's schema.

    FiftyOne's ``add_sample_field`` re-reads the dataset's field list, appends to it and saves the *whole list*,
    so two processes declaring fields at the same moment silently drop each other's fields (issue #21). Here
    each missing field is appended by one atomic ``$push`` guarded by its name (never a whole-list save, never
    a duplicate), then this process's schema is synced from the stored one and the stored schema is checked;
    a field lost to a third party's whole-list save meanwhile is pushed again.

    Raises:
        RuntimeError: the fields could not be declared after several tries.
    """
    missing: list[FieldSpec] = []
    coll = foo.get_db_conn().datasets
    for _ in range(_DECLARE_TRIES):
        stored = _stored_field_names(dataset)
        missing = [s for s in specs if s.name not in stored[1 if s.frame else 0]]
        if not missing:
            _sync_field_schema(dataset)
            declare_colorscales(dataset, specs)
            return
        now = datetime.datetime.utcnow()
        for spec in missing:
            doc_cls = dataset._frame_doc_cls if spec.frame else dataset._sample_doc_cls
            attr = doc_cls._fields_attr()
            coll.update_one({"_id": dataset._doc.id, f"{attr}.name": {"$ne": spec.name}},
                            {"$push": {attr: _field_document(doc_cls, spec, now)},
                             "$set": {"last_modified_at": now}})
    raise RuntimeError(f"could not declare fields {[s.path for s in missing]} on dataset '{dataset.name}' "
                       "(other processes kept changing its schema)")


def declare_colorscales(dataset, specs: list[FieldSpec]) -> None:
    """Give each field of ``specs`` that has a ``colorscale`` that colorscale in the dataset's App config.

    The entry is added to ``dataset.app_config.color_scheme.colorscales`` (a ``fo.ColorScheme`` is created
    when the dataset has none); every other setting of the user's colour scheme is kept, and so is a
    colorscale the user already chose for that field. Like :func:`declare_fields`, each change is one atomic
    update guarded by what it adds (never a save of the whole App config, which would drop another process's
    entry added at the same moment).
    """
    wanted = {s.path: s.colorscale for s in specs if s.colorscale}
    if not wanted:
        return
    coll, scheme = foo.get_db_conn().datasets, "app_config.color_scheme"
    coll.update_one({"_id": dataset._doc.id, scheme: None}, {"$set": {scheme: fo.ColorScheme().to_dict()}})
    coll.update_one({"_id": dataset._doc.id, f"{scheme}.colorscales": None}, {"$set": {f"{scheme}.colorscales": []}})
    for path, name in wanted.items():
        coll.update_one({"_id": dataset._doc.id, f"{scheme}.colorscales.path": {"$ne": path}},
                        {"$push": {f"{scheme}.colorscales": {"path": path, "name": name}}})
    dataset._doc.reload("app_config")  # as stored now (with another process's or the App's changes)


def remove_colorscales(dataset, paths: list[str]) -> None:
    """Remove the per-field colorscales of ``paths`` from the dataset's App config (fields deleted with a
    run); the rest of the colour scheme stays."""
    scheme = dataset.app_config.color_scheme
    if scheme is None or not scheme.colorscales:
        return
    kept = [entry for entry in scheme.colorscales if entry.get("path") not in set(paths)]
    if len(kept) != len(scheme.colorscales):
        scheme.colorscales = kept or None
        dataset.app_config.color_scheme = scheme
        dataset.save()


class OrderedWriter:
    """Writes :class:`~fiftyone_anomaly_vlm.engine.BatchOutput` objects in a background thread, one in flight.

    ``submit`` waits for the previous batch's writes before queueing the next one, so at most one batch is
    held in memory besides the one being computed, and a write error is raised by the next ``submit`` (or
    on leaving the ``with`` block). Leaving the block waits for the batch in flight: a cancelled run keeps
    every batch it submitted.

    Args:
        dataset: the dataset written to.
        specs: the run's fields in write order.
        error_field: the sample field for a failed sample's message.
        done_field: the sample field written last.
    """

    def __init__(self, dataset, specs: list[FieldSpec], error_field: str, done_field: str) -> None:
        self.dataset = dataset
        self.frame_fields = [s.name for s in specs if s.frame]
        middle = [s.name for s in specs if not s.frame and s.name not in (error_field, done_field)]
        self.sample_fields = [error_field, *middle, done_field]
        self.error_field = error_field
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def __enter__(self) -> OrderedWriter:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fav-writer")
        return self

    def submit(self, out: BatchOutput) -> None:
        """Queue one batch's writes (after the previous batch's writes are done)."""
        self._wait()
        self._pending = self._pool.submit(self.write, out)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def __exit__(self, exc_type, *exc_info) -> None:
        try:
            self._wait()
        except Exception:
            if exc_type is None:
                raise
            logger.exception("writing the last batch failed while the run was stopping")
        finally:
            self._pool.shutdown(wait=True)
            self._pool = None

    def write(self, out: BatchOutput) -> None:
        """Write one batch now, in order: frame fields, then error, sample fields, done field."""
        for name in self.frame_fields:
            values = out.frame_values.get(name)
            if values:
                self.dataset.set_values(f"frames.{name}", values, key_field="frames.id")
        values = {name: dict(out.values.get(name) or {}) for name in self.sample_fields}
        for sid, message in out.errors.items():
            for name in self.sample_fields:
                values[name][sid] = None
            values[self.error_field][sid] = message
        for name in self.sample_fields:
            if values[name]:
                self.dataset.set_values(name, values[name], key_field="id")
