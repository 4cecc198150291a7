"""Where the plugin keeps its files (expert checkpoints, heatmap and mask PNGs, exports, video frames), on one
machine or on several that mount the same shared storage at different places.

**One root.** Every default folder is under the storage root: ``$FAV_STORAGE_ROOT`` where set, else
``<fo.config.default_dataset_dir>/anomaly_vlm`` (:func:`storage_root`), then ``<dataset name>/<what>/<key>``.
A relative ``output_dir`` given to a verb or typed in an operator's form is taken under the root too.

**Records are relative to it.** Run configs (experts, scoring runs, video runs) store their files and folders
relative to the root of the process that writes the record (and that root, ``storage_root``, for
information); every process resolves them against its own root when it loads the record
(:class:`RootRelativePaths`). A worker whose shared storage is mounted at ``/mnt/nfs/fav`` (with
``FAV_STORAGE_ROOT=/mnt/nfs/fav``) finds the checkpoint an App machine fitted under ``/data/fav``. Paths outside
the root (an ``output_dir`` chosen elsewhere) are recorded as they are and must be the same on every machine;
so are the paths of runs recorded by earlier releases (absolute), which load, score and delete as before.

**Labels point where the App looks.** ``fo.Heatmap.map_path`` / ``fo.Segmentation.mask_path`` must be
absolute paths on the App's machine: FiftyOne's App server opens them as given
(``fiftyone/server/routes/media.py``). A scoring run writes them under its ``app_root``: recorded when the
run is first recorded, from ``$FAV_APP_STORAGE_ROOT`` (where the machine that runs the App mounts the root;
default: this process's root). A worker writes each PNG under its own root and stores its path under the
run's ``app_root`` (:func:`label_path`); every process that reads or removes one maps it back to its own mount
(:func:`local_path`).

Example:
    >>> os.environ["FAV_STORAGE_ROOT"] = "/mnt/nfs/fav"           # this worker's mount of the shared storage
    >>> os.environ["FAV_APP_STORAGE_ROOT"] = "/data/fav"          # where the App's machine mounts it
    >>> stored_path("/mnt/nfs/fav/line3/experts/padim/fit-1/model.ckpt")
    'line3/experts/padim/fit-1/model.ckpt'
    >>> resolve_path("line3/experts/padim/fit-1/model.ckpt")
    '/mnt/nfs/fav/line3/experts/padim/fit-1/model.ckpt'
"""

from __future__ import annotations

import os
import shutil
from typing import Any, ClassVar

import fiftyone as fo

#: environment variable: this machine's path of the plugin's storage root
ROOT_ENV = "FAV_STORAGE_ROOT"
#: environment variable: the storage root as the machine running the App sees it (label paths point there)
APP_ROOT_ENV = "FAV_APP_STORAGE_ROOT"


def storage_root() -> str:
    """This process's storage root: ``$FAV_STORAGE_ROOT``, else ``<fo.config.default_dataset_dir>/anomaly_vlm``
    (absolute, normalised)."""
    root = os.environ.get(ROOT_ENV) or os.path.join(fo.config.default_dataset_dir, "anomaly_vlm")
    return os.path.normpath(os.path.abspath(os.path.expanduser(root)))


def app_root() -> str:
    """Where the App's machine sees the storage root: ``$FAV_APP_STORAGE_ROOT``, else :func:`storage_root`."""
    root = os.environ.get(APP_ROOT_ENV)
    return os.path.normpath(os.path.abspath(os.path.expanduser(root))) if root else storage_root()


def _under(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` when it lies under it (``"."`` for the root itself), else None."""
    path, root = os.path.normpath(path), os.path.normpath(root)
    if path == root:
        return "."
    prefix = root if root.endswith(os.sep) else root + os.sep
    return path[len(prefix):] if path.startswith(prefix) else None


def stored_path(path: str | None, root: str | None = None) -> str | None:
    """How a run record stores ``path``: relative to ``root`` (default: :func:`storage_root`) when under it,
    else the absolute path. None and ``""`` stay as they are."""
    if not path:
        return path
    absolute = os.path.abspath(path)
    rel = _under(absolute, root or storage_root())
    return absolute if rel is None else rel


def resolve_path(path: str | None, root: str | None = None) -> str | None:
    """A recorded path on this machine: a relative one under ``root`` (default: :func:`storage_root`), an
    absolute one (outside the root, or recorded by an earlier release) as it is. None and ``""`` stay."""
    if not path or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(root or storage_root(), path))


def label_path(local: str, label_root: str | None) -> str:
    """The path a label stores for the file ``local`` written under this process's root: the same file under
    ``label_root`` (a run's ``app_root``); a file outside this process's root, or no ``label_root``, as it is."""
    rel = _under(local, storage_root()) if label_root else None
    return local if rel is None else os.path.normpath(os.path.join(label_root, rel))


def local_path(path: str | None, label_root: str | None) -> str | None:
    """Where this process finds the file a label points to (``path`` under the run's ``app_root``
    ``label_root``): the same file under :func:`storage_root`; other paths as they are."""
    if not path or not label_root:
        return path
    rel = _under(path, label_root)
    return path if rel is None else os.path.normpath(os.path.join(storage_root(), rel))


def output_folder(output_dir: str | None, default: str) -> tuple[str, bool]:
    """``(folder, owned)`` for a verb's ``output_dir`` argument: ``default`` (the plugin's own, removed with the
    run) when None or ``""``; a relative path under :func:`storage_root`; an absolute one as it is. Checked
    before any work (:func:`output_dir_problem`); the writer creates it.

    Raises:
        ValueError: the folder is a file, cannot be created, or is not writable (the message says which).
    """
    owned = not output_dir
    folder = os.path.abspath(default if owned else resolve_path(os.path.expanduser(str(output_dir))))
    problem = output_dir_problem(folder)
    if problem:
        raise ValueError(problem)
    return folder, owned


def output_dir_problem(output_dir: str | None) -> str | None:
    """Why ``output_dir`` (as a verb takes it: relative under the root) could not be used, or None; creates
    nothing (for forms, checked as the user types): it must not be a file, and its nearest existing folder must be
    writable."""
    if not output_dir:
        return None
    folder = os.path.abspath(resolve_path(os.path.expanduser(str(output_dir))))
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"output folder {folder} is a file, not a folder"
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"output folder {folder} cannot be created: {probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"output folder {folder} is not writable: no write permission on {probe}"
    return None


class RootRelativePaths:
    """Mixin for run configs whose files live under the storage root.

    The attributes named in :attr:`PATH_ATTRS` (a path) and :attr:`PATH_LIST_ATTRS` (a list of paths) hold
    absolute paths on this machine once the config is built (:meth:`resolve_root_paths`, called by the
    subclass's constructor) and are serialised relative to this process's root, with ``storage_root`` (the
    root in force when written). Configs recorded by earlier releases hold absolute paths: they load as they are.
    """

    PATH_ATTRS: ClassVar[tuple[str, ...]] = ()
    PATH_LIST_ATTRS: ClassVar[tuple[str, ...]] = ()

    def resolve_root_paths(self) -> None:
        """Make this config's recorded paths absolute on this machine."""
        for name in self.PATH_ATTRS:
            setattr(self, name, resolve_path(getattr(self, name)))
        for name in self.PATH_LIST_ATTRS:
            setattr(self, name, [resolve_path(p) for p in getattr(self, name) or []])

    def serialize(self, reflective: bool = False) -> dict[str, Any]:  # noqa: D102 - eta's docstring applies
        d = super().serialize(reflective=reflective)
        root = storage_root()
        for name in self.PATH_ATTRS:
            if name in d:
                d[name] = stored_path(d[name], root)
        for name in self.PATH_LIST_ATTRS:
            if d.get(name) is not None:
                d[name] = [stored_path(p, root) for p in d[name]]
        d["storage_root"] = root
        return d


def delete_dataset(name: str) -> str | None:
    """Delete dataset ``name`` with every file the plugin made for it; say what was removed (None: no such
    dataset and no folder).

    ``fo.delete_dataset`` deletes run records without running their clean-up (FiftyOne has no hook for it), so
    the heatmap/mask PNGs, checkpoints and frames would stay on disk: this deletes each run first (each removes
    its files, every shard's included, wherever they are recorded), then the dataset, then the dataset's folder
    under :func:`storage_root`. Call it on a name whose dataset is already gone to remove that folder.
    """
    folder = os.path.join(storage_root(), name)
    what = []
    if fo.dataset_exists(name):
        ds = fo.load_dataset(name)
        runs = ds.list_runs()
        what.append(f"dataset '{name}' ({len(ds)} samples, runs {', '.join(runs) or 'none'})")
        ds.delete_runs()  # each run removes its own files (PNG folders, fits); fo.delete_dataset would not
        ds.delete()
    if os.path.isdir(folder):
        num = sum(len(files) for _, _, files in os.walk(folder))
        shutil.rmtree(folder, ignore_errors=True)
        what.append(f"{num} more files under {folder}")
    return "; ".join(what) or None
