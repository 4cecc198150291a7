"""A lease on a run key: one writer at a time, in any number of processes sharing the database.

While a run writes, a document in the FiftyOne database (collection ``fav_run_leases``, one per dataset and
key) names its owner (host, process id, a random token) and a heartbeat that a background thread renews.
A second writer of the same key is refused with a message naming the holder; different keys never wait. A run
split into shards (:mod:`~fiftyone_anomaly_vlm.shards`) holds one lease per (key, shard): shards of one key run at
once, a second runner of the same shard is refused, and so is an unsplit run of the key while a shard runs (and
the other way round).
The lease is released when the run ends (normally, by an error or a cancel). A holder that died without
releasing it (kill -9, a lost worker) is taken over once its heartbeat is older than the time-out, or at
once when it ran on this host and its process is gone.

Example:
    >>> with RunLease(dataset, "padim", "score"):
    ...     ...  # write the run's fields
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import threading
import uuid

import fiftyone.core.odm as foo
import pymongo.errors

COLLECTION = "fav_run_leases"
#: seconds without a heartbeat after which a lease counts as abandoned ($FAV_LEASE_TIMEOUT)
DEFAULT_TIMEOUT = 60.0


class RunBusyError(RuntimeError):
    """Another live process is writing the same run key."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_id(dataset, key: str, shard: tuple[int, int] | None = None) -> str:
    """The lease document's id of the run ``key`` (of one of its shards)."""
    return f"{dataset._doc.id}/{key}" + (f"#{shard[0]}/{shard[1]}" if shard else "")


def _timeout(timeout: float | None = None) -> float:
    return float(timeout if timeout is not None else os.environ.get("FAV_LEASE_TIMEOUT", DEFAULT_TIMEOUT))


def _abandoned(held: dict, timeout: float) -> bool:
    """Whether the lease ``held`` was left by a process that is gone (on this host) or silent too long."""
    owner = held.get("owner") or {}
    if owner.get("host") == socket.gethostname() and owner.get("pid") and not _pid_alive(int(owner["pid"])):
        return True
    return (_now() - held["heartbeat"]).total_seconds() > timeout


def lease_state(dataset, key: str, shard: tuple[int, int] | None = None, timeout: float | None = None) -> str | None:
    """``"live"``, ``"abandoned"`` (its process died or stopped beating) or None (nobody holds it) for the run
    ``key`` (or one of its shards)."""
    held = foo.get_db_conn()[COLLECTION].find_one({"_id": lease_id(dataset, key, shard)})
    if held is None:
        return None
    return "abandoned" if _abandoned(held, _timeout(timeout)) else "live"


class RunLease:
    """Hold the run ``key`` of ``dataset`` for the duration of a ``with`` block.

    Args:
        dataset: the dataset of the run.
        key: the run key.
        verb: what is running (shown to a refused writer).
        timeout: seconds without a heartbeat before the lease counts as abandoned (default
            ``$FAV_LEASE_TIMEOUT`` or 60).
        shard: ``(index, count)`` for one shard of a split run.

    Raises:
        RunBusyError: on entering, when a live process holds the key.
    """

    def __init__(self, dataset, key: str, verb: str = "run", timeout: float | None = None,
                 shard: tuple[int, int] | None = None) -> None:
        self.lease_id = lease_id(dataset, key, shard)
        self._key_id = lease_id(dataset, key)
        self.key, self.verb, self.dataset_name, self.shard = key, verb, dataset.name, shard
        self.timeout = _timeout(timeout)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def _coll(self):
        return foo.get_db_conn()[COLLECTION]

    def _doc(self) -> dict:
        return {"owner": self.owner, "verb": self.verb, "key": self.key, "dataset": self.dataset_name,
                "heartbeat": _now(), "shard": f"{self.shard[0]}/{self.shard[1]}" if self.shard else None}

    def _abandoned(self, held: dict) -> bool:
        return _abandoned(held, self.timeout)

    def _refuse(self, held: dict, what: str) -> None:
        owner = held.get("owner") or {}
        age = (_now() - held["heartbeat"]).total_seconds()
        raise RunBusyError(
            f"{what} on dataset '{self.dataset_name}' is being written by another process "
            f"({held.get('verb')}, host {owner.get('host')}, pid {owner.get('pid')}, last seen {age:.0f} s ago); "
            f"wait for it to finish or use another key (a lease left by a dead process expires after "
            f"{self.timeout:.0f} s)")

    def _check_other_kind(self) -> None:
        """A shard's lease while the whole key is held, or the whole key's while a shard is held: refused."""
        coll = self._coll
        if self.shard is not None:
            others = [coll.find_one({"_id": self._key_id})]
        else:
            others = list(coll.find({"_id": {"$regex": f"^{re.escape(self._key_id)}#"}}))
        for held in others:
            if held is not None and not self._abandoned(held):
                coll.delete_one({"_id": self.lease_id, "owner": self.owner})
                what = f"run {self.key!r}" + (f" (shard {held.get('shard')})" if held.get("shard") else "")
                self._refuse(held, what)

    def acquire(self) -> None:
        """Take the lease, or raise :class:`RunBusyError`."""
        self._acquire()
        self._check_other_kind()

    def _acquire(self) -> None:
        coll = self._coll
        try:
            coll.insert_one({"_id": self.lease_id, **self._doc()})
            return
        except pymongo.errors.DuplicateKeyError:
            pass
        held = coll.find_one({"_id": self.lease_id})
        if held is None:  # released in between
            return self._acquire()
        if not self._abandoned(held):
            self._refuse(held, f"run {self.key!r}" + (f" (shard {held.get('shard')})" if self.shard else ""))
        taken = coll.find_one_and_replace({"_id": self.lease_id, "owner": held.get("owner")}, self._doc())
        if taken is None:  # someone else took it over first
            return self._acquire()

    def _beat(self) -> None:
        while not self._stop.wait(max(0.5, self.timeout / 4)):
            try:
                self._coll.update_one({"_id": self.lease_id, "owner": self.owner}, {"$set": {"heartbeat": _now()}})
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried; the run goes on
                pass

    def release(self) -> None:
        """Give the lease back (only if this process still holds it)."""
        self._coll.delete_one({"_id": self.lease_id, "owner": self.owner})

    def __enter__(self) -> RunLease:
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="fav-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.release()
