"""Shards of the judge and video verbs (issue #21): the same engine and ledger as ``score(..., shard=(i, n))``.

Worker-side ``shard=(i, n)`` calls judge (against a real local OpenAI-compatible server, tests/scripted_server.py,
whose answer is a fixed function of the request) and score videos (a scripted in-process backend) each sample
exactly once into the one run key; a second runner of a live shard is refused; the shard that completes the set
finishes the run once (the view's anomalous/flagged counts, the run's totals), and every value equals the one an
unsplit run writes (the fused score included: fusion is per sample). ``judge(..., shards=2)`` queues two
delegated operations that carry the backend's arguments, never its key, and one real ``fiftyone delegated
launch`` worker runs them: while the server is down both fail (the ledger says failed, with the reason), and
``resume_shards`` re-queues them once it is up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest
from bson import ObjectId

import fiftyone as fo
import fiftyone.operators as foo
from fiftyone import ViewField as F
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState

import fiftyone_anomaly_vlm as fav
from conftest import fitted_clone, subprocess_env
from fiftyone_anomaly_vlm.app_launch import worker_command
from fiftyone_anomaly_vlm.datasets import ffmpeg_available, make_video_dataset
from fiftyone_anomaly_vlm.fields import VideoFieldNames
from fiftyone_anomaly_vlm.leases import RunBusyError, RunLease
from fiftyone_anomaly_vlm.models.judge import make_backend
from fiftyone_anomaly_vlm.shards import forget_shards, resume_shards, shard_ids, sharded_run
from scripted_server import ScriptedServer
from test_video_engine import RedBackend

JUDGE = dict(expert="padim", batch_size=4, crops=1)
JUDGE_URI, VIDEO_URI = "@anomaly-vlm/anomaly-vlm/judge_anomalies", "@anomaly-vlm/anomaly-vlm/score_video"


@pytest.fixture(scope="module")
def judged_ds(parts_template):
    """A parts clone scored by a PaDiM expert ('padim'), for the judge's crops, verdict words and fusion."""
    with fitted_clone(parts_template, "fav-shards-judge") as ds:
        fav.score(ds, expert="padim", device="cpu", batch_size=8, num_workers=0)
        yield ds


def _values(ds, key, fields):
    ids = ds.values("id")
    return {name: dict(zip(ids, ds.values(name))) for name in fields}


def test_judge_shards_each_sample_once_and_fuse_as_the_whole(judged_ds):
    ds, ids = judged_ds, judged_ds.values("id")
    parts = [shard_ids(ids, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids) and all(parts)
    with ScriptedServer() as server:
        backend = make_backend("openai", base_url=server.base_url, model="scripted")
        whole = fav.judge(ds, key="vlm_all", backend=backend, **JUDGE)
        assert whole.num_judged == len(ds)
        with pytest.raises(ValueError, match="index must be in"):
            fav.judge(ds, key="vlm_sh", backend=backend, shard=(3, 3), **JUDGE)
        assert "vlm_sh" not in ds.list_runs()

        results = []
        for i in range(3):
            if i == 1:  # a live runner of shard 1 (this process): a second one is refused, nothing asked
                asked = server.n_requests
                with RunLease(ds, "vlm_sh", "judge", shard=(1, 3)):
                    with pytest.raises(RunBusyError, match=r"shard 1/3"):
                        fav.judge(ds, key="vlm_sh", backend=backend, shard=(1, 3), **JUDGE)
                    with pytest.raises(RunBusyError):  # the whole key while a shard is written
                        fav.judge(ds, key="vlm_sh", backend=backend, **JUDGE)
                assert server.n_requests == asked
                ds.reload()
                assert ds.exists("vlm_sh_fused").count() == 0  # fused by the shard that completes the set
            results.append(fav.judge(ds, key="vlm_sh", backend=backend, shard=(i, 3), **JUDGE))
            ds.reload()
            assert sorted(ds.exists("vlm_sh").values("id")) == sorted(sum(parts[:i + 1], []))
        assert [r.num_judged for r in results] == [len(p) for p in parts]
        # the finish step ran once, in the last shard: only its call counted the view's anomalous samples
        n_anomalous = ds.match(F("vlm_sh.label") == "anomalous").count()
        assert [r.num_anomalous for r in results] == [0, 0, n_anomalous] and n_anomalous > 0
        again = fav.judge(ds, key="vlm_sh", backend=backend, shard=(0, 3), **JUDGE)  # a complete shard again
        assert again.num_judged == 0 and again.num_skipped == len(parts[0]) and again.num_anomalous == 0

    run = sharded_run(ds, "vlm_sh")
    assert run.complete and [(s.done, s.total) for s in run.shards] == [(len(p), len(p)) for p in parts]
    assert run.totals["num_done"] == len(ds) and run.totals["num_errors"] == 0
    assert run.totals["anomalous"] == n_anomalous == whole.num_anomalous
    assert run.totals["unparsed"] == whole.num_unparsed
    # every value as the unsplit run wrote it: the answers, P(anomalous) and the fused score
    fields = ("{}.label", "{}_p_anomalous", "{}_fused", "{}_answer")
    split = _values(ds, "vlm_sh", [f.format("vlm_sh") for f in fields])
    unsplit = _values(ds, "vlm_all", [f.format("vlm_all") for f in fields])
    for f in fields:
        assert split[f.format("vlm_sh")] == unsplit[f.format("vlm_all")], f
    assert all(v is not None for v in split["vlm_sh_fused"].values())
    for key in ("vlm_all", "vlm_sh"):
        ds.delete_run(key)
    assert sharded_run(ds, "vlm_sh") is None


def test_judge_shards_queued_carry_the_backend_not_its_key(judged_ds, tmp_path, monkeypatch):
    ds, key, service = judged_ds, "vlm_q", DelegatedOperationService()
    with pytest.raises(ValueError, match="api_key_env"):  # a key passed in would be stored with the operations
        fav.judge(ds, key=key, backend=make_backend("openai", base_url="http://x/v1", model="m", api_key="sk-t0p"),
                  shards=2, **JUDGE)
    with pytest.raises(ValueError, match="cannot be rebuilt by a worker"):  # a backend built in code
        fav.judge(ds, key=key, backend=RedBackend(), shards=2, **JUDGE)
    with pytest.raises(ValueError, match="not both"):
        fav.judge(ds, key=key, backend={"name": "openai", "base_url": "http://x/v1", "model": "m"}, shards=2,
                  shard=(0, 2), **JUDGE)
    assert key not in ds.list_runs() and sharded_run(ds, key) is None

    monkeypatch.setenv("FAV_TEST_JUDGE_KEY", "sk-s3cret")
    port = _free_port()  # the server is not up yet: both shards fail, then resume once it is
    backend = make_backend("openai", base_url=f"http://127.0.0.1:{port}/v1", model="scripted",
                           api_key_env="FAV_TEST_JUDGE_KEY")
    queued = fav.judge(ds, key=key, backend=backend, shards=2, **JUDGE)
    assert queued.count == 2 and [s.state for s in sharded_run(ds, key).shards] == ["queued", "queued"]
    params = [service.get(ObjectId(i)).context.request_params["params"] for i in queued.op_ids]
    assert [(p["shard_index"], p["shard_count"], p["key"]) for p in params] == [(0, 2, key), (1, 2, key)]
    assert params[0]["backend_spec"]["api_key_env"] == "FAV_TEST_JUDGE_KEY"
    assert "sk-s3cret" not in repr(params) and params[0]["args"]["expert"] == "padim"

    env = dict(subprocess_env(), FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS="true", OMP_NUM_THREADS="1")
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen(worker_command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        failed = _ended(service, queued.op_ids, tmp_path)
        assert [d.run_state for d in failed] == [ExecutionRunState.FAILED] * 2
        run = sharded_run(ds, key)  # failed before the shards started: the ledger says so, with the reason
        assert [s.state for s in run.shards] == ["failed", "failed"] and str(port) in run.shards[0].error
        with ScriptedServer(port=port) as server:
            resumed = resume_shards(ds, key)
            assert len(resumed) == 2 and [s.state for s in sharded_run(ds, key).shards] == ["queued", "queued"]
            docs = _ended(service, resumed, tmp_path)
            assert [d.run_state for d in docs] == [ExecutionRunState.COMPLETED] * 2, [d.result.error for d in docs]
            assert server.answered == len(ds)  # the worker's backend, built from the arguments, asked each once
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    ds.reload()
    run = sharded_run(ds, key)
    assert run.complete and run.totals["num_done"] == len(ds) == ds.count(key)
    assert sum(d.result.result["num_judged"] for d in docs) == len(ds)
    assert ds.count(f"{key}_fused") == len(ds)
    ds.delete_run(key)

    # the judge form's Shards field: the operator queues the shards with the backend the form describes
    form = dict(key="vlm_form", backend="openai", base_url="http://gpu-a:8000/v1, http://gpu-b:8000/v1",
                server_model="m", api_key_secret="FAV_TEST_JUDGE_KEY", expert="padim", crops=1, shards=2)
    foo.execute_operator(JUDGE_URI, ctx=dict(view=ds.view(), params=form)).raise_exceptions()
    _check_form_queued(ds, "vlm_form", dict(name="openai", base_url=["http://gpu-a:8000/v1", "http://gpu-b:8000/v1"],
                                            model="m", api_key_env="FAV_TEST_JUDGE_KEY", max_concurrency=8),
                       expert="padim", crops=1)


def _check_form_queued(ds, key, backend_spec, **args):
    """Two shards of ``key`` queued by an operator's form (not run here: deleted again)."""
    service, run = DelegatedOperationService(), sharded_run(ds, key)
    assert run.count == 2 and [s.state for s in run.shards] == ["queued", "queued"]
    try:
        params = [service.get(ObjectId(s.op_id)).context.request_params["params"] for s in run.shards]
        assert [(p["key"], p["shard_index"]) for p in params] == [(key, 0), (key, 1)]
        assert params[0]["backend_spec"] == backend_spec
        assert {k: params[0]["args"][k] for k in args} == args
    finally:  # no worker here: none left for another test's worker
        for s in run.shards:
            service.delete_operation(ObjectId(s.op_id))
    forget_shards(ds, key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ended(service, op_ids, logs, timeout=300):
    """The delegated operations ``op_ids`` once each has completed or failed."""
    end = time.time() + timeout
    while time.time() < end:
        docs = [service.get(ObjectId(i)) for i in op_ids]
        if all(d.run_state in (ExecutionRunState.COMPLETED, ExecutionRunState.FAILED) for d in docs):
            return docs
        time.sleep(0.5)
    raise AssertionError(f"operations still running: {(logs / 'worker.log').read_text()[-3000:]}")


@pytest.fixture(scope="module")
def clips():
    if not ffmpeg_available():
        pytest.skip("ffmpeg/ffprobe not installed")
    ds = make_video_dataset("fav-video-shards", num_normal=2, num_anomalous=2, num_frames=16, size=32, fps=8,
                            anomaly=(5, 10), seed=5)
    yield ds
    fo.delete_dataset(ds.name)


VIDEO = dict(fps=4, window=3, explain=False)


def test_video_shards_each_video_once_and_finish_once(clips):
    ds, ids, f = clips, clips.values("id"), VideoFieldNames("vsh")
    whole = fav.score_video(ds, key="vall", backend=RedBackend(), **VIDEO)
    assert whole.num_scored == len(ds) and whole.num_flagged > 0 and whole.num_segments > 0
    parts = [shard_ids(ids, i, 2) for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(ids)

    results, vlm = [], RedBackend()
    for i in range(2):
        if i == 1:
            with RunLease(ds, "vsh", "score_video", shard=(1, 2)):  # a live runner of shard 1
                asked = vlm.calls
                with pytest.raises(RunBusyError, match=r"shard 1/2"):
                    fav.score_video(ds, key="vsh", backend=vlm, shard=(1, 2), **VIDEO)
                assert vlm.calls == asked
        asked = vlm.calls
        results.append(fav.score_video(ds, key="vsh", backend=vlm, shard=(i, 2), **VIDEO))
        assert vlm.calls - asked == results[-1].num_frames == 8 * len(parts[i])  # only its own videos' frames
        ds.reload()
        assert sorted(ds.exists(f.score).values("id")) == sorted(parts[0] + (parts[1] if i else []))
    assert [r.num_scored for r in results] == [len(p) for p in parts]
    assert [r.num_flagged for r in results] == [0, whole.num_flagged]  # the finish step: once, by the last shard
    run = sharded_run(ds, "vsh")
    assert run.complete and run.totals["num_done"] == len(ds) and run.totals["num_errors"] == 0
    assert (run.totals["flagged"], run.totals["frames"], run.totals["segments"], run.totals["frame_errors"]) == (
        whole.num_flagged, whole.num_frames, whole.num_segments, 0)
    # per video, the same as the unsplit run: its score, label, segments and frame scores
    for a, b in ((f.score, "vall_score"), (f"{f.label}.label", "vall.label"),
                 (f"{f.segments}.detections.support", "vall_segments.detections.support"),
                 (f"frames.{f.frame_score}", "frames.vall_score")):
        assert ds.values(a) == ds.values(b), a

    # shards=N on videos: a backend built in code cannot go to a worker; its arguments can
    with pytest.raises(ValueError, match="cannot be rebuilt by a worker"):
        fav.score_video(ds, key="vq", backend=RedBackend(), shards=2, **VIDEO)
    queued = fav.score_video(ds, key="vq", backend={"name": "openai", "base_url": "http://gpu:8000/v1",
                                                    "model": "m"}, questions=["Is there fire?"], shards=2, **VIDEO)
    service = DelegatedOperationService()
    try:
        params = [service.get(ObjectId(i)).context.request_params["params"] for i in queued.op_ids]
        assert [p["shard_index"] for p in params] == [0, 1] and params[0]["args"]["questions"] == ["Is there fire?"]
        assert params[1]["backend_spec"]["base_url"] == "http://gpu:8000/v1" and params[1]["args"]["fps"] == 4
    finally:  # no worker here: not left for another test's worker
        for op_id in queued.op_ids:
            service.delete_operation(ObjectId(op_id))
    for key in ("vall", "vsh"):
        ds.delete_run(key)

    # the video form's Shards field: the operator queues the shards with the backend the form describes
    form = dict(key="vform", use_vlm=True, backend="openai", base_url="http://gpu:8000/v1", server_model="m",
                question_set="(type them)", questions="Is there fire?\nIs there smoke?", fps=4.0, shards=2)
    foo.execute_operator(VIDEO_URI, ctx=dict(view=ds.view(), params=form)).raise_exceptions()
    _check_form_queued(ds, "vform", dict(name="openai", base_url="http://gpu:8000/v1", model="m",
                                         api_key_env="FAV_VLM_API_KEY", max_concurrency=8),
                       questions=["Is there fire?", "Is there smoke?"], fps=4.0, expert=None)
