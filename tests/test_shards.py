"""One scoring run split into shards (issue #21): worker-side ``shard=(i, n)`` calls and ``shards=N`` delegated
operations run by real ``fiftyone delegated launch`` workers, one of them SIGKILLed mid-shard and resumed.

Every sample is scored exactly once into the one run key; the run's shard ledger shows each shard's state; a
second runner of a live shard is refused; a shard whose worker died is seen as stale, re-queued by
``resume_shards`` and scores only what is missing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from bson import ObjectId

import fiftyone as fo
from fiftyone import ViewField as F
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState

import fiftyone_anomaly_vlm as fav
from conftest import fitted_clone, subprocess_env
from fiftyone_anomaly_vlm.app_launch import worker_command
from fiftyone_anomaly_vlm.leases import RunBusyError, RunLease
from fiftyone_anomaly_vlm.reviewing.overview import run_overview
from fiftyone_anomaly_vlm.shards import resume_shards, shard_ids, sharded_run

SCORE = dict(expert="padim", device="cpu", batch_size=2, num_workers=0)


@pytest.fixture(scope="module")
def shard_ds(parts_template):
    with fitted_clone(parts_template, "fav-shards") as ds:
        yield ds


def _flagged(ds, key):
    return ds.match(F(f"{key}.label") == "anomalous").count()


def test_worker_side_shards_score_each_sample_once(shard_ds, tmp_path):
    ds, ids = shard_ds, shard_ds.values("id")
    parts = [shard_ids(ids, i, 2) for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(ids) and parts[0] and parts[1]
    with pytest.raises(ValueError, match="index must be in"):
        fav.score(ds, key="half", shard=(2, 2), **SCORE)

    first = fav.score(ds, key="half", shard=(0, 2), **SCORE)
    assert first.num_scored == len(parts[0]) and first.num_skipped == 0
    ds.reload()
    assert sorted(ds.exists("half_score").values("id")) == sorted(parts[0])
    run = sharded_run(ds, "half")
    assert [s.state for s in run.shards] == ["complete", "queued"] and run.totals is None
    assert "1/2 shards complete, 1 queued" in next(r.detail for r in run_overview(ds) if r.name == "half")

    with RunLease(ds, "half", "score", shard=(1, 2)):  # a live runner of shard 1 (this process)
        assert sharded_run(ds, "half").shards[1].state == "queued"
        with pytest.raises(RunBusyError, match=r"shard 1/2"):
            fav.score(ds, key="half", shard=(1, 2), **SCORE)
        with pytest.raises(RunBusyError):  # the whole key while a shard is written
            fav.score(ds, key="half", **SCORE)

    again = fav.score(ds, key="half", shard=(0, 2), **SCORE)  # a finished shard again: nothing to do
    assert again.num_scored == 0 and again.num_skipped == len(parts[0])
    own = tmp_path / "shard-1"  # a shard writing its heatmaps elsewhere (another machine's mount)
    last = fav.score(ds, key="half", shard=(1, 2), output_dir=str(own), **SCORE)
    assert last.num_scored == len(parts[1]) and len(os.listdir(own / "maps")) == len(parts[1])
    ds.reload()
    run = sharded_run(ds, "half")
    assert run.complete and ds.count("half_score") == len(ds)
    assert [(s.done, s.total) for s in run.shards] == [(len(p), len(p)) for p in parts]
    assert run.totals["num_done"] == len(ds) and run.totals["num_errors"] == 0
    assert run.totals["flagged"] == last.num_flagged == _flagged(ds, "half") > 0
    ds.delete_run("half")
    assert sharded_run(ds, "half") is None
    assert not (own / "maps").exists() and not os.path.exists(first.output_dir)  # every shard's files


def _wait(what, predicate, timeout):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_delegated_shards_survive_a_killed_worker(shard_ds, tmp_path):
    ds, key = shard_ds, "sharded"
    queued = fav.score(ds, key=key, shards=2, **{k: v for k, v in SCORE.items() if k != "num_workers"})
    assert queued.count == 2 and len(queued.op_ids) == 2
    assert [s.state for s in sharded_run(ds, key).shards] == ["queued", "queued"]
    env = dict(subprocess_env(), FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS="true", OMP_NUM_THREADS="1",
               FAV_SHARD_PROGRESS_S="0")  # the ledger's progress after every batch: the kill lands mid-shard
    workers = [subprocess.Popen(worker_command(), env=env, stdout=open(tmp_path / f"w{i}.log", "w"),  # noqa: SIM115
                                stderr=subprocess.STDOUT, start_new_session=True) for i in range(2)]
    print("worker logs:", tmp_path)
    try:
        # the first shard to start: SIGKILL the process that runs it, mid-shard
        service = DelegatedOperationService()

        def started():
            failed = [d.result.error for d in map(service.get, map(ObjectId, queued.op_ids))
                      if d.run_state == ExecutionRunState.FAILED]
            assert not failed, failed
            return next((s for s in sharded_run(ds, key).shards if s.state == "running" and s.done), None)

        running = _wait("a shard to write its first batch", started, 480)
        pid = int(running.host.rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        for proc in workers:
            if proc.pid == pid:
                proc.wait()  # reaped, as a worker's parent (a shell, systemd) does; a zombie still looks alive
        victim = running.index
        _wait(f"the killed shard to be seen stale ({sharded_run(ds, key).shards})",
              lambda: sharded_run(ds, key).shards[victim].state == "stale", 30)
        other = 1 - victim
        _wait("the other shard to complete", lambda: sharded_run(ds, key).shards[other].state == "complete", 240)
        ds.reload()
        victim_ids = shard_ids(ds.values("id"), victim, 2)
        done_before = ds.select(victim_ids).exists(f"{key}_score").count()
        assert 0 < done_before < len(victim_ids)
        print(f"shard {victim}: {done_before} of {len(victim_ids)} samples scored when its worker was killed")
        assert service.get(ObjectId(queued.op_ids[victim])).run_state == ExecutionRunState.RUNNING  # FiftyOne never learns

        (new_id,) = resume_shards(ds, key)
        assert service.get(ObjectId(queued.op_ids[victim])).run_state == ExecutionRunState.FAILED
        op = _wait("the resumed shard to end", lambda: (lambda d: d if d.run_state in (
            ExecutionRunState.COMPLETED, ExecutionRunState.FAILED) else None)(service.get(ObjectId(new_id))), 240)
        assert op.run_state == ExecutionRunState.COMPLETED, op.result and op.result.error
        result = op.result.result  # the operation's result carries the shard's counts
        assert result["num_skipped"] == done_before and result["num_scored"] == len(victim_ids) - done_before
        ds.reload()
        run = sharded_run(ds, key)
        assert run.complete and run.totals["num_done"] == len(ds) == ds.count(f"{key}_score")
        assert run.totals["flagged"] == _flagged(ds, key)
    finally:
        for proc in workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
