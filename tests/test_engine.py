"""The run engine's rules, checked once through scoring: the key lease, stale results of another fit, checks
before any write, overwrite clearing, and runs recorded by the previous release (old class paths/kwargs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.leases import COLLECTION, RunBusyError, RunLease
from fiftyone_anomaly_vlm.runs import EXPERT_STATE, SCORE_METHOD, expert_state, runs_of

from conftest import FIT_KWARGS, subprocess_env


def test_second_writer_of_a_key_is_refused_and_other_keys_go_on(fitted):
    """A key held by a live writer refuses a second one, with a message naming the holder; another key is free."""
    with RunLease(fitted, "held", "score"):
        with pytest.raises(RunBusyError, match="being written by another process"):
            fav.score(fitted, expert="padim", key="held", device="cpu", num_workers=0)
        assert "held" not in fitted.list_runs()
        res = fav.score(fitted.limit(4), expert="padim", key="other", device="cpu", num_workers=0)
        assert res.num_scored == 4
    # released: the key can be written now, and no lease is left behind
    fav.score(fitted.limit(4), expert="padim", key="held", device="cpu", num_workers=0)
    assert fo.core.odm.get_db_conn()[COLLECTION].count_documents({"key": "held"}) == 0


def test_lease_of_a_killed_process_is_taken_over(fitted):
    """A process that holds a key and is killed (-9) does not block the key: the next writer takes it over."""
    code = ("import sys, time, fiftyone as fo\n"
            "from fiftyone_anomaly_vlm.leases import RunLease\n"
            f"ds = fo.load_dataset({fitted.name!r})\n"
            "lease = RunLease(ds, 'k9', 'score').__enter__()\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunBusyError, match=f"pid {child.pid}"):
            fav.score(fitted.limit(3), expert="padim", key="k9", device="cpu", num_workers=0)
    finally:
        child.kill()
        child.wait()
    res = fav.score(fitted.limit(3), expert="padim", key="k9", device="cpu", num_workers=0)
    assert res.num_scored == 3


def test_scores_of_an_earlier_fit_are_not_kept_silently(fitted):
    """Re-fitting an expert under the same name, then scoring again without overwrite, used to skip the samples
    scored by the old fit (stale scores under a record naming the new one); now the call refuses, and
    overwrite=True scores every sample again."""
    part = fitted.limit(10)
    fav.score(part, expert="padim", device="cpu", num_workers=0)
    fav.fit_expert(fitted.match_tags("train").skip(2), key="padim", overwrite=True, **FIT_KWARGS)
    with pytest.raises(ValueError, match="overwrite=True"):
        fav.score(fitted, expert="padim", device="cpu", num_workers=0)
    res = fav.score(fitted, expert="padim", device="cpu", num_workers=0, overwrite=True)
    assert res.num_scored == len(fitted) and res.num_skipped == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=-3), "batch_size"),
    (dict(key="_rand"), "invalid key"),
    (dict(key="media_type"), "built-in"),
])
def test_whole_run_errors_come_before_any_write(fitted, kwargs, match):
    """Bad batch sizes and keys fail before a run is registered or a field declared."""
    runs, schema = set(fitted.list_runs()), set(fitted.get_field_schema())
    with pytest.raises(ValueError, match=match):
        fav.score(fitted, expert="padim", device="cpu", num_workers=0, **kwargs)
    assert set(fitted.list_runs()) == runs
    assert set(fitted.get_field_schema()) == schema


def test_overwrite_clears_old_values_before_rescoring(fitted):
    """overwrite=True clears the run's fields on the target samples first (so a killed overwrite leaves
    samples to do, not old scores marked done)."""
    fav.score(fitted, expert="padim", device="cpu", num_workers=0)
    part = fitted.limit(5)

    class Stop(Exception):
        pass

    def stop(pb):
        raise Stop

    with pytest.raises(Stop):
        fav.score(part, expert="padim", device="cpu", num_workers=0, batch_size=2, overwrite=True, progress=stop)
    scored_again = len(part.exists("padim_score"))
    assert scored_again <= 2  # the first batch at most; the rest were cleared, not left with old scores
    assert len(fitted.exists("padim_score")) == len(fitted) - (5 - scored_again)
    res = fav.score(fitted, expert="padim", device="cpu", num_workers=0)
    assert res.num_scored == 5 - scored_again


def test_runs_are_found_by_method(fitted):
    fav.score(fitted, expert="padim", device="cpu", num_workers=0)
    fav.score(fitted.limit(3), expert="padim", key="second", device="cpu", num_workers=0)
    assert runs_of(fitted, SCORE_METHOD) == ["padim", "second"]


def _make_legacy(dataset, key: str, cls: str, drop: tuple[str, ...], state_in_config: bool = False) -> None:
    """Rewrite run ``key``'s stored record as the previous release wrote it: its class path and its keys (an
    expert's fitted state in its config, no results)."""
    doc = dataset._doc.runs[key]
    config = dict(doc.config)
    config["cls"] = cls
    for name in drop:
        config.pop(name, None)
    if state_in_config:
        results = dataset.load_run_results(key, cache=False, load_view=False)
        config.update({name: getattr(results, name) for name in EXPERT_STATE})
        doc.results.delete()
        doc.results = None
    doc.config = config
    doc.save()
    dataset.reload()


def test_runs_recorded_by_the_previous_release_load_rethreshold_score_and_delete(fitted):
    """Run documents with the old class paths (fiftyone_anomaly_vlm.runs.<Class>) and without the new
    parameters still list, load, re-threshold, resume scoring, and delete with their fields and PNG files."""
    fav.score(fitted.limit(12), expert="padim", device="cpu", num_workers=0)
    state = fitted.load_run_results("padim_expert")
    _make_legacy(fitted, "padim_expert", "fiftyone_anomaly_vlm.runs.ExpertRunConfig", ("fit_id", "owned_members"),
                 state_in_config=True)
    assert fitted.load_run_results("padim_expert", cache=False) is None
    assert expert_state(fitted, "padim_expert")["holdout_ids"] == state.holdout_ids
    _make_legacy(fitted, "padim", "fiftyone_anomaly_vlm.runs.AnomalyScoreRunConfig", ("expert_fit_id",))
    assert fav.list_experts(fitted) == ["padim"]
    info = fitted.get_run_info("padim")
    assert info.config.method == SCORE_METHOD and info.config.expert_fit_id is None
    fav.set_threshold(fitted, "padim", rule="percentile", param=90.0)
    assert fitted.get_run_info("padim").config.threshold_history[-1]["rule"] == "percentile"
    res = fav.score(fitted, expert="padim", device="cpu", num_workers=0)  # resumes: same expert, same checkpoint
    assert res.num_skipped == 12 and res.num_scored == len(fitted) - 12
    maps_dir = fitted.get_run_info("padim").config.maps_dir
    assert os.listdir(maps_dir)
    fitted.delete_run("padim")
    assert not [f for f in fitted.get_field_schema() if f.startswith("padim_") or f == "padim"]
    assert not os.path.exists(maps_dir)
    fitted.delete_run("padim_expert")
    assert fav.list_experts(fitted) == []


def test_lease_heartbeat_keeps_a_long_run_alive(fitted):
    """A holder whose heartbeat is fresh is not taken over, even past the time-out since it started."""
    with RunLease(fitted, "beat", "score", timeout=1.0):
        time.sleep(1.5)  # the heartbeat thread renews every 0.5 s
        other = RunLease(fitted, "beat", "score", timeout=1.0)
        with pytest.raises(RunBusyError):  # a live holder's age is its last heartbeat, not its start
            other.acquire()


@pytest.mark.parametrize("old_cls, method, fields", [
    ("fiftyone_anomaly_vlm.runs.JudgeRunConfig", "vlm_judge", ["old", "old_p_anomalous", "old_error"]),
    ("fiftyone_anomaly_vlm.video.VideoAnomalyRunConfig", "video_anomaly", []),
    ("fiftyone_anomaly_vlm.questions.QuestionRunConfig", "vera_questions", []),
    ("fiftyone_anomaly_vlm.runs.AnomalyEvaluationRunConfig", "anomaly_evaluation", ["old"]),
])
def test_other_run_kinds_recorded_by_the_previous_release_load_list_and_delete(parts, old_cls, method, fields):
    """Judge, video, question and evaluation runs stored with the 0.1 class paths and kwargs (including keys
    the typed classes do not name) load as the typed classes, are found by method, and delete their fields."""
    import fiftyone.core.runs as fors

    parts.register_run("old", fors.RunConfig(method=method))
    for name in fields:
        parts.add_sample_field(name, fo.FloatField)
        parts.set_values(name, [0.5] * len(parts))
    doc = parts._doc.runs["old"]
    doc.config = {"cls": old_cls, "type": "run", "method": method, "fields": fields, "a_key_of_0_1": 3,
                  "backend": {"model": "m"}, "questions": ["Is it red?"]}
    doc.save()
    parts.reload()
    config = parts.get_run_info("old").config
    assert config.method == method and config.a_key_of_0_1 == 3
    assert type(config).__module__.startswith("fiftyone_anomaly_vlm.runs.")
    assert parts.list_runs(method=method) == ["old"]
    parts.delete_run("old")
    assert "old" not in parts.list_runs()
    assert not [f for f in fields if f in parts.get_field_schema()]
