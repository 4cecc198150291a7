"""The engine's key rules, once for all four verbs it serves (score, judge, score_video, learn_questions):
a key held by a run of another kind, a key being written by another process, and a batch size below 1 are
refused before anything is written. Real components: a fitted PaDiM, a tiny Qwen2-VL built at test time,
generated MP4s decoded by ffmpeg."""

from __future__ import annotations

import fiftyone.core.runs as fors
import pytest

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.datasets import ffmpeg_available, make_video_dataset
from fiftyone_anomaly_vlm.leases import RunBusyError, RunLease
from fiftyone_anomaly_vlm.models.judge import make_backend

from conftest import fitted_clone
from tiny_vlms import BUILDERS

VERBS = ("score", "judge", "score_video", "learn_questions")


@pytest.fixture(scope="module")
def fitted(parts_template):
    """One fitted parts clone for the module (the checks here fail before they could change it)."""
    with fitted_clone(parts_template, "fav-engine-verbs-images") as ds:
        yield ds


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return make_backend("transformers", model=BUILDERS["qwen2_vl"](str(tmp_path_factory.mktemp("verbs-vlm"))),
                        device="cpu", max_pixels=56 * 56)


@pytest.fixture(scope="module")
def clips():
    if not ffmpeg_available():
        pytest.skip("ffmpeg/ffprobe not installed")
    ds = make_video_dataset("fav-engine-verbs", num_normal=1, num_anomalous=1, num_frames=8, size=32, fps=8,
                            anomaly=(3, 5), seed=5)
    yield ds
    fo.delete_dataset(ds.name)


def _call(verb: str, fitted, clips, vlm, key: str, **kwargs):
    if verb == "score":
        return fav.score(fitted, expert="padim", key=key, device="cpu", num_workers=0, **kwargs)
    if verb == "judge":
        return fav.judge(fitted, key=key, backend=vlm, **kwargs)
    if verb == "score_video":
        return fav.score_video(clips, key=key, backend=vlm, fps=4, **kwargs)
    return fav.learn_questions(clips, key=key, backend=vlm, fps=4, **kwargs)


def _dataset(verb: str, fitted, clips):
    return clips if verb in ("score_video", "learn_questions") else fitted


def _state(ds, key: str):
    return (ds.list_runs(), sorted(f for f in ds.get_field_schema() if f.startswith(key)),
            sorted(f for f in (ds.get_frame_field_schema() or {}) if f.startswith(key)))


@pytest.mark.parametrize("verb", VERBS)
def test_key_of_another_kind_is_refused_before_any_write(verb, fitted, clips, vlm):
    ds = _dataset(verb, fitted, clips)
    ds.register_run("taken", fors.RunConfig(method="someone_elses_kind"))
    before = _state(ds, "taken")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="another kind"):
            _call(verb, fitted, clips, vlm, "taken", overwrite=overwrite)
    assert _state(ds, "taken") == before
    assert ds.get_run_info("taken").config.method == "someone_elses_kind"
    ds.delete_run("taken")


@pytest.mark.parametrize("verb", VERBS)
def test_key_being_written_elsewhere_is_refused(verb, fitted, clips, vlm):
    ds = _dataset(verb, fitted, clips)
    with RunLease(ds, "busy", "another process"):
        with pytest.raises(RunBusyError, match="being written by another process"):
            _call(verb, fitted, clips, vlm, "busy")
    assert "busy" not in ds.list_runs()


@pytest.mark.parametrize("verb", ("score", "judge", "score_video"))
def test_batch_size_below_one_is_refused_before_any_write(verb, fitted, clips, vlm):
    ds = _dataset(verb, fitted, clips)
    with pytest.raises(ValueError, match="batch_size"):
        _call(verb, fitted, clips, vlm, "b0", batch_size=0)
    assert _state(ds, "b0") == (ds.list_runs(), [], []) and "b0" not in ds.list_runs()
