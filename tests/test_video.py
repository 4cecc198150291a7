"""Video: frames sampled by FiftyOne/ffmpeg from generated MP4s, an image expert and a tiny VLM per frame,
smoothing, temporal detections over the inserted stretch, per-frame errors, VERA question learning.

The videos (``make_video_dataset``) show a moving bar and blob; anomalous ones get a red square in frames
13-23 of 32. Sampling at 4 fps of 8 keeps frames 1, 3, ..., 31. The tiny Qwen2-VL has random weights: its
P(yes) is garbage, so VLM tests check the plumbing (values, shapes, records, the learner keeping its best
set), while the expert test checks that the detections cover the inserted stretch.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo
import fiftyone.operators as foo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.models.judge import make_backend
from fiftyone_anomaly_vlm.questions import (DEFAULT_QUESTIONS, QuestionRunConfig, combine_questions, frame_windows,
                                            load_questions, make_proposer, parse_questions, question_scores)
from fiftyone_anomaly_vlm.datasets import damage_video, ffmpeg_available, make_video_dataset
from fiftyone_anomaly_vlm.video import (VideoAnomalyRunConfig, VideoFieldNames, find_segments, segment_support,
                                        smooth_scores, video_frames)

from tiny_vlms import build_qwen2_vl

PLUGIN = "@anomaly-vlm/anomaly-vlm"
needs_ffmpeg = pytest.mark.skipif(not ffmpeg_available(),
                                  reason="ffmpeg/ffprobe not installed (scripts/setup.sh installs the system package)")
GT = (13, 23)
FIT = dict(model="padim", pretrained=False, backbone="resnet18", image_size=64, device="cpu",
           model_kwargs={"layers": ["layer1", "layer2"]})


# --- pure functions ------------------------------------------------------------------------------------------
def test_smoothing_skips_missing_frames_and_keeps_length():
    x = np.array([0.0, 0.0, 1.0, np.nan, 1.0, 0.0, 0.0])
    u = smooth_scores(x, window=3, method="uniform")
    assert u.shape == x.shape and np.isnan(u[3])
    assert u[2] == pytest.approx(0.5)  # (0 + 1) / 2: the missing neighbour is not a zero
    assert u[0] == pytest.approx(0.0) and u[1] == pytest.approx(1 / 3)
    g = smooth_scores(x, window=4, method="gaussian")
    assert np.isnan(g[3]) and 0 < g[2] < 1
    assert np.array_equal(smooth_scores(x, 1), x, equal_nan=True)
    assert np.array_equal(smooth_scores(x, 5, "none"), x, equal_nan=True)
    with pytest.raises(ValueError, match="smoothing"):
        smooth_scores(x, 3, "median")


def test_segments_grow_to_raw_scores_and_merge():
    raw = np.array([0.1, 0.9, 0.95, 0.95, 0.9, 0.1, 0.1, 0.95, 0.1, 0.1])
    smoothed = smooth_scores(raw, 3)
    # smoothing alone shortens the stretch; growing over raw frames above the threshold restores it
    assert find_segments(smoothed, 0.8) == [(2, 3)]
    assert find_segments(smoothed, 0.8, raw=raw) == [(1, 4)]
    # a lone spike is removed by smoothing (no seed), not grown back
    assert find_segments(smoothed, 0.8, raw=raw, min_length=1) == [(1, 4)]
    assert find_segments(raw, 0.8, raw=raw, min_length=2) == [(1, 4)]
    assert find_segments([np.nan, 0.9, np.nan], 0.5) == [(1, 1)]
    fns = [1, 3, 5, 7, 9]
    assert segment_support(fns, 1, 2) == [3, 6]
    assert segment_support(fns, 3, 4, last_frame=10) == [7, 10]
    assert segment_support(fns, 4, 4, last_frame=9) == [9, 9]


def test_parse_questions_is_robust():
    text = ("Sure! Here are better questions:\n1. Do you see a red square?\n2) is something flashing\n"
            "- **Are there two moving objects in the frame?**\n3. Do you see a red square?\n"
            "§§ ?? x?\nQ4: Can you see smoke or fire? Is a person lying on the ground?")
    assert parse_questions(text) == ["Do you see a red square?", "is something flashing?",
                                     "Are there two moving objects in the frame?", "Can you see smoke or fire?",
                                     "Is a person lying on the ground?"]
    assert parse_questions(text, max_questions=2) == ["Do you see a red square?", "is something flashing?"]
    assert parse_questions("Yes No bottom left crack hole ? ? center") == []
    assert parse_questions("") == []
    assert frame_windows(5, 3) == [(0, 3), (0, 3), (1, 4), (2, 5), (2, 5)]
    assert frame_windows(2, 4) == [(0, 2), (0, 2)]
    p = np.array([[0.2, 0.6], [np.nan, 0.3], [np.nan, np.nan]])
    assert np.allclose(combine_questions(p, "max")[:2], [0.6, 0.3])
    assert np.allclose(combine_questions(p, "mean")[:2], [0.4, 0.3]) and np.isnan(combine_questions(p)[2])


# --- on real videos ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def videos():
    """8 generated videos (6 normal, 2 anomalous), a truncated copy of an anomalous one, and a broken file."""
    if not ffmpeg_available():
        pytest.skip("ffmpeg/ffprobe not installed (scripts/setup.sh installs the system package)")
    ds = make_video_dataset("fav-videos", num_normal=6, num_anomalous=2, num_frames=32, size=48, fps=8,
                            anomaly=GT, seed=1)
    src = ds.match(fo.ViewField("ground_truth.label") == "anomalous").first().filepath
    folder = os.path.join(os.path.dirname(src), "damaged")
    os.makedirs(folder, exist_ok=True)
    truncated = damage_video(src, os.path.join(folder, "truncated.mp4"), keep=0.75)
    broken = os.path.join(folder, "broken.mp4")
    with open(broken, "wb") as f:
        f.write(b"this is not a video" * 50)
    ds.add_samples([fo.Sample(filepath=truncated, tags=["damaged"]), fo.Sample(filepath=broken, tags=["damaged"])])
    ds.compute_metadata()
    yield ds
    fo.delete_dataset(ds.name)


@pytest.fixture(scope="module")
def frames_expert(videos) -> str:
    """A PaDiM expert fitted on the sampled frames of the train-tagged normal videos."""
    frames = video_frames(videos.match_tags("train"), fps=4)
    assert frames.media_type == "image" and frames.count() == 3 * 16
    fav.fit_expert(frames, key="frames_padim", **FIT)
    return "frames_padim"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = build_qwen2_vl(str(tmp_path_factory.mktemp("tiny-qwen2-vl-video")))
    return make_backend("transformers", model=path, device="cpu", max_pixels=56 * 56, batch_size=16)


@needs_ffmpeg
def test_expert_frame_scores_and_segments_cover_the_inserted_stretch(videos, frames_expert):
    ds = videos
    # the held-out frames (picked by a hash of their paths, which live in a new temporary folder each run)
    # set the expert's own threshold; a fixed one, far from both the normal frames' tail (<= 0.95) and the
    # red square's frames (>= 0.99), keeps the segment checks independent of that draw
    res = fav.score_video(ds, key="vid", expert=frames_expert, fps=4, window=3, device="cpu", threshold=0.98)
    f = VideoFieldNames("vid")
    assert res.num_videos == 10 and res.num_scored == 9 and res.num_errors == 1
    assert res.threshold == ds.get_run_info("vid").config.threshold

    # the sampled frames (1, 3, ..., 31) carry every frame field; the others none
    clean = ds.match_tags("damaged", bool=False)
    fns, raw, smoothed, expert_s, labels = clean.values(
        ["frames.frame_number", f"frames.{f.frame_raw_score}", f"frames.{f.frame_score}",
         f"frames.{f.frame_expert_score}", f"frames.{f.frame_label}.label"])
    for v_fns, v_raw, v_s, v_e, v_l in zip(fns, raw, smoothed, expert_s, labels):
        scored = [fn for fn, r in zip(v_fns, v_raw) if r is not None]
        assert scored == list(range(1, 33, 2))
        r = np.array([x for x in v_raw if x is not None])
        assert np.allclose(r, [x for x in v_e if x is not None])  # expert only: the raw score is the expert's
        assert np.allclose([x for x in v_s if x is not None], smooth_scores(r, 3))
        assert {x for x in v_l if x is not None} <= {"normal", "anomalous"}

    for sample in clean:
        segs = sample["vid_segments"].detections
        if sample.ground_truth.label == "anomalous":
            assert sample.vid.label == "anomalous"
            assert len(segs) == 1, [d.support for d in segs]
            start, end = segs[0].support
            # covers the inserted stretch, to within one sampling step (2 frames) of its ends
            assert start <= GT[0] and end >= GT[1], (start, end)
            assert start >= GT[0] - 2 and end <= GT[1] + 2, (start, end)
            assert segs[0].label == "anomalous" and segs[0].confidence >= res.threshold
            assert "frames" in segs[0].explanation and "expert score" in segs[0].explanation
            assert GT[0] <= segs[0].peak_frame <= GT[1]
        else:
            assert segs == [] and sample.vid.label == "normal"
    scores = dict(zip(*clean.values(["ground_truth.label", "vid_score"])))
    normal = clean.match(fo.ViewField("ground_truth.label") == "normal").values("vid_score")
    anomalous = clean.match(fo.ViewField("ground_truth.label") == "anomalous").values("vid_score")
    assert min(anomalous) > max(normal), scores

    # truncated video: frames past the cut get frames.vid_error, earlier frames are scored
    trunc = ds.match(fo.ViewField("filepath").ends_with("truncated.mp4")).first()
    sampled = [fr for fr in trunc.frames.values() if fr.frame_number % 2 == 1]
    errs = [fr[f.frame_error] for fr in sampled]
    ok = [fr[f.frame_score] for fr in sampled]
    assert any(e is None for e in errs) and any(e is not None for e in errs), errs
    assert all((e is None) == (s is not None) for e, s in zip(errs, ok))
    first_bad = next(i for i, e in enumerate(errs) if e is not None)
    assert all(e is not None for e in errs[first_bad:]) and "decoded" in errs[first_bad]
    assert trunc["vid_error"] is None and trunc["vid_score"] is not None
    assert res.num_frame_errors == sum(e is not None for e in errs)
    # unreadable file: a video-level error, no score
    broken = ds.match(fo.ViewField("filepath").ends_with("broken.mp4")).first()
    assert broken["vid_score"] is None and "could not read the video" in broken["vid_error"]

    # the run is recorded; a second call resumes (only the errored video is tried again)
    cfg = ds.get_run_info("vid").config
    assert isinstance(cfg, VideoAnomalyRunConfig)
    assert (cfg.fps, cfg.window, cfg.smoothing, cfg.expert, cfg.questions) == (4, 3, "uniform", frames_expert, [])
    again = fav.score_video(ds, key="vid", expert=frames_expert, fps=4, window=3, device="cpu")
    assert again.num_skipped == 9 and again.num_scored == 0 and again.num_errors == 1

    # delete_run removes the sample and frame fields
    ds.delete_run("vid")
    assert not set(f.sample_fields()) & set(ds.get_field_schema())
    assert not set(f.frame_fields()) & set(ds.get_frame_field_schema())
    assert "filepath" in ds.get_frame_field_schema()  # the sampled frame paths stay (FiftyOne's own field)


@needs_ffmpeg
def test_vlm_questions_with_expert_on_frames(videos, frames_expert, qwen):
    ds = videos
    view = ds.match_tags(["damaged", "train"], bool=False)  # 3 normal + 2 anomalous videos
    view = view.select([view.match(fo.ViewField("ground_truth.label") == lab).first().id
                        for lab in ("normal", "anomalous")])
    qs = ["Do you see a red square?", "Is something unusual in the scene?"]
    res = fav.score_video(view, key="vlm_vid", expert=frames_expert, backend=qwen, questions=qs, fps=2,
                          window=3, smoothing="gaussian", frames_per_prompt=2, device="cpu")
    f = VideoFieldNames("vlm_vid")
    assert res.num_scored == 2 and res.num_frame_errors == 0 and res.questions == qs
    cfg = ds.get_run_info("vlm_vid").config
    assert cfg.questions == qs and cfg.frames_per_prompt == 2 and cfg.combine == "max"
    assert cfg.backend["model_class"] == "Qwen2VLForConditionalGeneration"
    assert cfg.threshold == pytest.approx((cfg.expert_threshold + 0.5) / 2)
    for sample in view:
        rows = [fr for fr in sample.frames.values() if fr[f.frame_raw_score] is not None]
        assert [fr.frame_number for fr in rows] == list(range(1, 33, 4))  # 2 fps of 8
        for fr in rows:
            p = fr[f.frame_question_scores]
            assert len(p) == 2 and all(0.0 <= x <= 1.0 for x in p)
            assert fr[f.frame_vlm_score] == pytest.approx(max(p))
            assert fr[f.frame_raw_score] == pytest.approx((fr[f.frame_vlm_score] + fr[f.frame_expert_score]) / 2)
        raw = np.array([fr[f.frame_raw_score] for fr in rows])
        assert np.allclose([fr[f.frame_score] for fr in rows], smooth_scores(raw, 3, "gaussian"))
        for det in sample[f.segments].detections:
            assert isinstance(det.explanation, str) and det.summary.startswith("frames ")
            assert det.top_question in qs

    # the joint prompt (VERA's single question listing the set): one P(yes) per frame
    frames = [Image.fromarray(np.full((48, 48, 3), v, np.uint8)) for v in (10, 120, 240)]
    p, errors = question_scores(qwen, frames, qs, combine="joint", frames_per_prompt=1)
    assert p.shape == (3, 1) and np.isfinite(p).all() and errors == [None] * 3
    p2, _ = question_scores(qwen, frames, qs, combine="max")
    assert p2.shape == (3, 2) and not np.allclose(p2[:, 0], p2[:, 1])  # each question is its own prompt


@needs_ffmpeg
def test_learn_questions_keeps_best_set_and_is_reused(videos, qwen):
    ds = videos
    clean = ds.match_tags(["damaged", "train"], bool=False)
    val = clean.select([clean.match(fo.ViewField("ground_truth.label") == lab).first().id
                        for lab in ("normal", "anomalous")])  # one normal and one anomalous video
    candidates = [["Do you see a red square?"], ["Is the bar moving?", "Do you see a red square?"]]
    # the tiny model as optimizer: its text is garbage, so proposals are mostly unparsed; never worse
    learned = fav.learn_questions(val, key="val_q", backend=qwen, proposer=make_proposer(qwen, max_new_tokens=48),
                                  candidates=candidates, iterations=2, fps=2, window=3, num_questions=3)
    assert learned.level == "frame" and learned.num_videos == 2 and learned.num_frames == 2 * 8
    assert len(learned.history) == 1 + len(candidates) + 2
    assert [h.source for h in learned.history[:3]] == ["initial", "candidate", "candidate"]
    assert all(h.status in ("evaluated", "unparsed", "duplicate", "error") for h in learned.history)
    scored = [h for h in learned.history if h.auroc is not None]
    assert learned.auroc == max(h.auroc for h in scored)
    assert learned.questions == next(h.questions for h in scored if h.auroc == learned.auroc)
    for h in learned.history[:3]:
        assert 0.0 <= h.auroc <= 1.0 and len(h.question_aurocs) == len(h.questions)
    assert load_questions(ds, "val_q") == learned.questions
    cfg = ds.get_run_info("val_q").config
    assert isinstance(cfg, QuestionRunConfig) and cfg.history[0]["questions"] == list(DEFAULT_QUESTIONS)

    # a scripted optimizer: parses a numbered list with chatter, repeats (duplicate) and fails (error)
    replies = iter(["Here you go:\n1. Do you see a bright red block?\n2. Is the scene darker than usual?",
                    "1. Do you see a red square?", RuntimeError("server down")])

    def optimizer(prompt: str) -> str:
        assert "AUROC" in prompt and "Do you see a red square?" in prompt
        r = next(replies)
        if isinstance(r, Exception):
            raise r
        return r

    learned2 = fav.learn_questions(val, key="val_q2", backend=qwen, proposer=optimizer,
                                   candidates=[["Do you see a red square?"]], iterations=3, fps=2, window=3)
    statuses = [(h.source, h.status) for h in learned2.history]
    assert statuses == [("initial", "evaluated"), ("candidate", "evaluated"), ("proposal", "evaluated"),
                        ("proposal", "duplicate"), ("proposal", "error")]
    assert learned2.history[2].questions == ["Do you see a bright red block?", "Is the scene darker than usual?"]
    assert "server down" in learned2.history[4].error
    assert learned2.auroc == max(h.auroc for h in learned2.history if h.auroc is not None)

    # labels only on videos (no frame labels): video-level AUROC
    learned3 = fav.learn_questions(val, key="val_q3", backend=qwen, label_field="ground_truth",
                                   candidates=[["Do you see a red square?"]], fps=2, window=3)
    assert learned3.level == "video" and len(learned3.history) == 2
    with pytest.raises(ValueError, match="both normal and anomalous"):
        fav.learn_questions(val.match_tags("good"), key="val_q4", backend=qwen, fps=2)

    # reuse by name: the video run records the learned questions
    one = val.match(fo.ViewField("ground_truth.label") == "anomalous").limit(1)
    res = fav.score_video(one, key="vera", backend=qwen, questions="val_q", fps=2, window=3, explain=False)
    assert res.questions == learned.questions == ds.get_run_info("vera").config.questions
    with pytest.raises(ValueError, match="no learned question set"):
        fav.score_video(one, key="vera2", backend=qwen, questions="missing", fps=2)


@needs_ffmpeg
def test_score_video_operator_and_bad_input(videos, frames_expert):
    ds = videos
    one = ds.match(fo.ViewField("ground_truth.label") == "anomalous").limit(1)
    result = foo.execute_operator(f"{PLUGIN}/score_video", ctx=dict(view=one, params=dict(
        key="op_vid", expert=frames_expert, fps=4, window=3, device="cpu", threshold=0.98)))
    result.raise_exceptions()
    sample = one.first()
    assert sample["op_vid_score"] is not None and ds.get_run_info("op_vid").config.window == 3
    assert len(sample["op_vid_segments"].detections) == 1

    with pytest.raises(ValueError, match="needs an expert, a VLM backend, or both"):
        fav.score_video(ds, key="x")
    with pytest.raises(ValueError, match="not videos"):
        fav.score_video(fav.video_frames(one, fps=4), key="x", expert=frames_expert)
    with pytest.raises(ValueError, match="another kind"):
        fav.score_video(ds, key=f"{frames_expert}_expert", expert=frames_expert)
    with pytest.raises(ValueError, match="combine"):
        fav.score_video(ds, key="x", expert=frames_expert, combine="median")


def test_server_backend_answers_windows_and_proposes(tmp_path):
    """An OpenAI-compatible server (real HTTP, tiny Qwen2-VL): frame windows as several images of one
    request, in time order; the optimizer as a text-only request through the same backend."""
    from openai_server import OpenAITestServer, build_tiny_qwen2vl

    from fiftyone_anomaly_vlm.models.judge.openai_compat import OpenAICompatBackend

    frames = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (0, 80, 160, 240)]
    with OpenAITestServer(build_tiny_qwen2vl(tmp_path / "m")) as server:
        backend = OpenAICompatBackend(base_url=server.base_url, model="tiny", max_concurrency=4, timeout=30.0)
        p, errors = question_scores(backend, frames, ["Do you see a red square?"], frames_per_prompt=3)
        assert p.shape == (4, 1) and np.isfinite(p).all() and errors == [None] * 4
        shown = sorted([int(np.asarray(im)[0, 0, 0]) for im in ims] for ims in server.images)
        assert shown == [[0, 80, 160], [0, 80, 160], [80, 160, 240], [80, 160, 240]]
        server.images.clear()
        text = make_proposer(backend, max_new_tokens=8)("Propose questions. AUROC 0.5: - Is it odd?")
        assert isinstance(text, str) and server.images == [[]]
