"""Video runs and question runs follow the engine's rules: key kinds, identities, leases, overwrite clearing.

A scripted VLM backend (P(yes) from the frame's red share) keeps these tests fast; the plumbing is the same
as with a real model (see test_video.py).
"""

from __future__ import annotations

import numpy as np
import pytest

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.fields import VideoFieldNames
from fiftyone_anomaly_vlm.leases import RunBusyError, RunLease
from fiftyone_anomaly_vlm.models.judge.base import JudgeAnswer, JudgeBackend
from fiftyone_anomaly_vlm.runs import QuestionRunConfig, VideoAnomalyRunConfig
from fiftyone_anomaly_vlm.datasets import ffmpeg_available, make_video_dataset

pytestmark = pytest.mark.skipif(not ffmpeg_available(), reason="ffmpeg/ffprobe not installed")


class RedBackend(JudgeBackend):
    """Answers every question with P(yes) = the share of red in the request's last image."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls = 0

    def judge(self, requests):
        self.calls += len(requests)
        out = []
        for req in requests:
            a = np.asarray(req.images[-1], dtype=np.float64) / 255.0
            red = float(np.mean((a[..., 0] > 0.6) & (a[..., 1] < 0.4)))
            out.append(JudgeAnswer(text="Yes" if red > 0.01 else "No", p_yes=min(1.0, 0.2 + 20 * red),
                                   meta=req.meta))
        return out

    def describe(self):
        return {"backend": self.name, "model": "red-share"}


@pytest.fixture(scope="module")
def clips():
    ds = make_video_dataset("fav-video-engine", num_normal=1, num_anomalous=1, num_frames=16, size=32, fps=8,
                            anomaly=(5, 10), seed=3)
    yield ds
    fo.delete_dataset(ds.name)


def test_learn_questions_follows_the_key_rules(clips):
    vlm = RedBackend()
    # a run of another kind holds the key: refused with the kind message, overwrite or not
    clips.register_run("taken", VideoAnomalyRunConfig(questions=["Is it red?"]))
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="another kind"):
            fav.learn_questions(clips, key="taken", backend=vlm, overwrite=overwrite, fps=4)
    assert clips.get_run_info("taken").config.method == "video_anomaly"
    # an existing question run: refused without overwrite
    clips.register_run("learned", QuestionRunConfig(questions=["Do you see red?"], auroc=0.9))
    with pytest.raises(ValueError, match="overwrite=True"):
        fav.learn_questions(clips, key="learned", backend=vlm, fps=4)
    assert fav.load_questions(clips, "learned") == ["Do you see red?"]
    # another process holds the key: refused (the lease), nothing asked
    with RunLease(clips, "busy", "score_video"):
        with pytest.raises(RunBusyError):
            fav.learn_questions(clips, key="busy", backend=vlm, fps=4)
    assert vlm.calls == 0
    # with overwrite the question run is replaced
    learned = fav.learn_questions(clips, key="learned", backend=vlm, candidates=[["Do you see a red square?"]],
                                  fps=4, window=1, overwrite=True)
    assert learned.auroc is not None and fav.load_questions(clips, "learned") == learned.questions
    for key in ("taken", "learned"):
        clips.delete_run(key)


def test_score_video_overwrite_clears_frames_of_an_earlier_rate(clips):
    vlm = RedBackend()
    f = VideoFieldNames("ow")
    with pytest.raises(ValueError, match="batch_size"):
        fav.score_video(clips, key="ow", backend=vlm, fps=4, batch_size=0)
    assert "ow" not in clips.list_runs() and f.score not in clips.get_field_schema()

    first = fav.score_video(clips, key="ow", backend=vlm, fps=4, window=1, explain=False)
    assert first.num_scored == 2 and first.num_frames == 2 * 8

    def scored_frames():
        return [[fn for fn, s in zip(fns, scores) if s is not None]
                for fns, scores in zip(*clips.values(["frames.frame_number", f"frames.{f.frame_score}"]))]

    assert scored_frames() == [list(range(1, 17, 2))] * 2
    # same VLM and questions: resumes (nothing to do); other questions: refused without overwrite
    again = fav.score_video(clips, key="ow", backend=vlm, fps=2, window=1, explain=False)
    assert again.num_skipped == 2 and again.num_scored == 0
    with pytest.raises(ValueError, match="holds results of"):
        fav.score_video(clips, key="ow", backend=vlm, questions=["Is it red?"], fps=2)

    second = fav.score_video(clips, key="ow", backend=vlm, fps=2, window=1, explain=False, overwrite=True)
    assert second.num_scored == 2 and second.num_frames == 2 * 4 and second.num_skipped == 0
    # the frames sampled only at 4 fps lost every value of the first run
    assert scored_frames() == [list(range(1, 17, 4))] * 2
    for name in f.frame_fields():
        values = clips.values(f"frames.{name}")
        fns = clips.values("frames.frame_number")
        stale = [v for vf, vn in zip(values, fns) for v, fn in zip(vf, vn) if (fn - 1) % 4 and v is not None]
        assert stale == [], name
    assert clips.get_run_info("ow").config.fps == 2
    flagged = clips.match(fo.ViewField(f"{f.label}.label") == "anomalous").values("ground_truth.label")
    assert second.num_flagged == len(flagged)
    clips.delete_run("ow")
