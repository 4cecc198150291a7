"""Fit folders: each fit of an expert writes its files into a folder of its own, ``<output dir>/<fit_id>``.

A re-fit must never touch the expert it replaces until it has fully succeeded: its checkpoint, anomalib's work
folder and any other file go to the new fit's folder, the run record is switched to it in one write
(:meth:`FitFolder.commit`), and only then is the replaced fit's folder removed. A fit killed part way leaves
the old expert exactly as it was; the folder it leaves behind is removed by the next fit into the same output
folder (:func:`remove_orphan_fits`). Runs recorded before fit folders existed (checkpoint straight in the
output folder, no ``fit_id``) still load and delete as before.

Example:
    >>> with FitFolder(samples, out_dir, "padim") as fit:
    ...     checkpoint = expert.save(fit.file("model.ckpt"))
    ...     fit.commit(ExpertRunConfig(expert="padim", checkpoint=checkpoint, fit_id=fit.fit_id, ...), "padim_expert")
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid

from ..runs import EXPERT_METHODS, register_expert_run, runs_of

try:  # a running fit holds a lock on its folder, so that a fit beside it never takes it for a leftover
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks
    fcntl = None

logger = logging.getLogger(__name__)

#: a fit's folder name (its ``fit_id``): ``fit-<UTC time>-<random hex>``; group slugs never contain "-"
_FIT_ID = re.compile(r"^fit-\d{8}T\d{6}-[0-9a-f]{8}$")
#: a fit folder being set up (renamed to its fit_id once its marker is written and locked)
_STAGING_PREFIX = ".staging-"
#: file in each fit folder saying which dataset and expert it belongs to (locked while the fit runs)
FIT_MARKER = "fit.json"


def new_fit_id() -> str:
    """A new fit id, also the name of the fit's folder: ``fit-20250101T120000-1a2b3c4d``."""
    return f"fit-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def _try_lock(f) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _expert_configs(dataset) -> list:
    """Configs of the experts recorded on ``dataset``."""
    return [dataset.get_run_info(key).config for key in runs_of(dataset, *EXPERT_METHODS)]


def _referenced_fit_dirs(dataset) -> set[str]:
    """Folders holding the checkpoint of an expert recorded on ``dataset`` (real paths)."""
    out = set()
    for config in _expert_configs(dataset):
        checkpoint = config.checkpoint
        if checkpoint:
            out.add(os.path.realpath(os.path.dirname(checkpoint)))
        fit_id, out_dir = config.fit_id, config.output_dir
        if fit_id and out_dir:
            out.add(os.path.realpath(os.path.join(out_dir, fit_id)))
    return out


def remove_orphan_fits(dataset, out_dir: str) -> list[str]:
    """Remove the fit folders under ``out_dir`` that no expert recorded on ``dataset`` uses; return them.

    They are what a killed fit leaves (its checkpoint, anomalib's work folder). Only folders this module
    made are considered (named by a fit id, holding a :data:`FIT_MARKER` of this dataset); a fit still
    running holds a lock on its marker and is left alone, as are other datasets' fits sharing the folder.
    """
    if not os.path.isdir(out_dir):
        return []
    held = []  # (path, open marker holding our lock while we decide)
    try:
        for name in sorted(os.listdir(out_dir)):
            path = os.path.join(out_dir, name)
            staged = name.startswith(_STAGING_PREFIX)
            if not (staged or _FIT_ID.match(name)) or not os.path.isdir(path):
                continue
            marker = os.path.join(path, FIT_MARKER)
            try:
                f = open(marker)
            except OSError:
                if not staged:  # no marker: no fit set up this folder to completion; nobody can be using it
                    held.append((path, None))
                continue  # a staging folder without a marker may be being set up right now
            if not _try_lock(f):
                f.close()  # a running fit
                continue
            try:
                owner = json.load(f).get("dataset_id")
            except (ValueError, AttributeError):
                owner = None  # killed while writing the marker
            if owner not in (None, str(dataset._doc.id)):
                f.close()  # another dataset's fit sharing a user-chosen output folder
                continue
            held.append((path, f))
        if not held:
            return []
        dataset._reload()  # runs recorded by other processes since this dataset was loaded count too
        referenced = _referenced_fit_dirs(dataset)
        removed = []
        for path, _ in held:
            if os.path.realpath(path) not in referenced:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        if removed:
            logger.info("removed %d folders of fits that were interrupted: %s", len(removed), removed)
        return removed
    finally:
        for _, f in held:
            if f is not None:
                f.close()


class FitFolder:
    """The folder of one fit, ``<out_dir>/<fit_id>``: everything the fit writes goes there.

    Entering removes the leftovers of killed fits in ``out_dir`` (:func:`remove_orphan_fits`) and creates the
    folder with its :data:`FIT_MARKER`, locked until exit. Record the run, then call :meth:`commit`; a fit
    that fails before that has its folder removed on exit (a killed one, by the next fit).

    Args:
        samples: the collection the expert is fitted on (the record goes on its dataset).
        out_dir: the expert's output folder.
        expert: the expert's name (written in the marker, for humans).
    """

    def __init__(self, samples, out_dir: str, expert: str) -> None:
        self.dataset = samples._root_dataset
        self.out_dir = out_dir
        self.expert = expert
        self.fit_id = new_fit_id()
        self.path = os.path.join(out_dir, self.fit_id)
        self.committed = False
        self._marker = None

    def __enter__(self) -> "FitFolder":
        remove_orphan_fits(self.dataset, self.out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        # set up under a staging name and renamed: a folder named by a fit id always holds its locked marker
        staging = tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{self.fit_id}-", dir=self.out_dir)
        self._marker = open(os.path.join(staging, FIT_MARKER), "w")
        _try_lock(self._marker)
        json.dump({"fit_id": self.fit_id, "expert": self.expert, "dataset": self.dataset.name,
                   "dataset_id": str(self.dataset._doc.id), "pid": os.getpid()}, self._marker)
        self._marker.flush()
        if fcntl is None:  # pragma: no cover - Windows cannot rename a folder holding an open file
            self._marker.close()
            self._marker = None
        os.rename(staging, self.path)
        return self

    def file(self, name: str) -> str:
        """Path of the file ``name`` in the fit's folder."""
        return os.path.join(self.path, name)

    def commit(self, config, run_key: str) -> None:
        """Record ``config`` (which names this fit's ``fit_id``) as the run ``run_key``, replacing the run there,
        then remove the files of the replaced fit that no recorded expert uses any more."""
        dataset = self.dataset
        if config.fit_id != self.fit_id:
            raise ValueError(f"the run config must record fit_id={self.fit_id!r}")
        old = dataset.get_run_info(run_key).config if run_key in dataset.list_runs() else None
        register_expert_run(dataset, run_key, config)
        self.committed = True
        if old is not None:
            _remove_replaced_fit(dataset, old)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._marker is not None:
            self._marker.close()  # releases the lock
            self._marker = None
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


def _remove_replaced_fit(dataset, old) -> None:
    """After a re-fit: remove the replaced fit's folder unless a recorded expert still uses it. Runs recorded
    before fit folders wrote their checkpoint straight into the output folder: that file is removed."""
    fit_id, out_dir, checkpoint = old.fit_id, old.output_dir, old.checkpoint
    if fit_id and out_dir:
        folder = os.path.join(out_dir, fit_id)
        if os.path.realpath(folder) not in _referenced_fit_dirs(dataset):
            shutil.rmtree(folder, ignore_errors=True)
    elif checkpoint and os.path.isfile(checkpoint):
        in_use = {os.path.realpath(getattr(c, "checkpoint", "") or "") for c in _expert_configs(dataset)}
        if os.path.realpath(checkpoint) not in in_use:
            os.remove(checkpoint)
