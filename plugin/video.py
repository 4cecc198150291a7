"""Video anomaly scoring: frame scores from an image expert and/or VLM questions, smoothed over time,
anomalous stretches as temporal detections on the App's timeline.

Frames are sampled at a chosen rate with FiftyOne's own video tooling (``to_frames(sample_frames=True)``,
which runs ``ffmpeg``; frame images are kept under the plugin's folder and recorded in ``frames.filepath``).
Each sampled frame is scored by

- a fitted image expert (:func:`~fiftyone_anomaly_vlm.fit_expert`, e.g. fitted on the frames of normal
  videos: ``fit_expert(video_frames(ds.match_tags("train"), fps=4), ...)``): its calibrated score, and/or
- a VLM through the judge backends, asked VERA-style guiding questions (:mod:`.questions`): P(yes) per
  question, frame score = max or mean over the questions (or one joint question). Video-capable models see
  ``frames_per_prompt`` consecutive frames per request; image-only models one frame.

With both, the frame score is the mean of the two. Frame scores are smoothed over time (a uniform or
Gaussian window of ``window`` sampled frames; frames that failed are skipped, not counted as zeros, as in
VERA's temporal smoothing); runs of smoothed scores at or above the threshold become segments, whose ends
are refined by the unsmoothed scores (smoothing decides *whether*, the frame scores *where*).

Fields written under the run key ``K`` (see :class:`VideoFieldNames`):

- frames: ``frames.K`` (``fo.Classification`` normal/anomalous at the threshold), ``frames.K_score``
  (smoothed), ``frames.K_raw_score`` (before smoothing), ``frames.K_expert_score``, ``frames.K_vlm_score``,
  ``frames.K_question_scores`` (P(yes) per question, in the run's question order), ``frames.K_error``
  (why a sampled frame could not be scored, e.g. it could not be decoded);
- videos: ``K`` (``fo.Classification``), ``K_score`` (max smoothed frame score), ``K_segments``
  (``fo.TemporalDetections``, label ``"anomalous"``, ``support`` in frame numbers, ``confidence`` = peak
  score, attributes ``explanation``, ``peak_frame``, ``top_question``), ``K_error`` (a video with no
  decodable frame).

The run is recorded (questions, rate, window, threshold, expert, backend); ``delete_run`` removes every field.
A run that was killed resumes: videos that already have ``K_score`` are skipped.

Example:
    >>> fav.fit_expert(fav.video_frames(ds.match_tags("train"), fps=4), key="frames_padim")
    >>> res = fav.score_video(ds, key="vid", expert="frames_padim", fps=4, window=5)
    >>> ds.first().vid_segments.detections[0].support
    [13, 24]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

import fiftyone as fo
import fiftyone.core.utils as fou

from ._common import check_key, default_output_dir
from .calibration import Calibration
from .fields import VideoFieldNames
from .runs import VideoAnomalyRun, VideoAnomalyRunConfig  # noqa: F401 - the run classes' path before 0.2
from .experts import Expert
from .images import ImageLoadError, load_image
from .models.judge.base import JudgeBackend, JudgeRequest
from .scoring import _resolve_expert, calibrated_arrays

logger = logging.getLogger(__name__)

ANOMALOUS, NORMAL = "anomalous", "normal"
SMOOTHING = ("uniform", "gaussian", "none")
#: the frame error of a frame the video announces but ffmpeg could not decode (e.g. a truncated file)
NOT_EXTRACTED = "frame could not be decoded from the video (no image was extracted)"
EXPLAIN_PROMPT = ("This part of the video was flagged as anomalous. {questions}In one sentence, say what is "
                  "unusual in what you see.")


@dataclass
class VideoResults:
    """What a :func:`score_video` call did.

    Attributes:
        key: the run key.
        fields: the :class:`VideoFieldNames` written.
        questions: the questions asked (empty without a VLM).
        threshold: the threshold on the smoothed frame score.
        num_videos: videos in the view.
        num_scored: videos scored by this call.
        num_skipped: videos already scored under this key (resume).
        num_frames: sampled frames scored by this call.
        num_frame_errors: sampled frames that got ``frames.K_error``.
        num_errors: videos that got ``K_error``.
        num_flagged: videos of the view labelled anomalous (after this call).
        num_segments: segments written by this call.
        errors: video id -> message.
    """

    key: str
    fields: VideoFieldNames
    questions: list[str]
    threshold: float
    num_videos: int
    num_scored: int = 0
    num_skipped: int = 0
    num_frames: int = 0
    num_frame_errors: int = 0
    num_errors: int = 0
    num_flagged: int = 0
    num_segments: int = 0
    errors: dict[str, str] = field(default_factory=dict)


# --- frames ------------------------------------------------------------------------------------------------
def check_video_collection(samples, what: str) -> int:
    """Fail early when ``samples`` is not a non-empty collection of videos; return the video count.

    Raises:
        TypeError: not a FiftyOne dataset or view.
        ValueError: empty, not videos, or ffmpeg is missing.
    """
    from .synthetic_video import ffmpeg_available

    if not isinstance(samples, fo.core.collections.SampleCollection):
        raise TypeError(f"{what}: expected a FiftyOne dataset or view, got {type(samples).__name__}")
    if samples.media_type != "video":
        raise ValueError(f"{what}: '{samples._root_dataset.name}' holds {samples.media_type} samples, not videos")
    n = samples.count()
    if n == 0:
        raise ValueError(f"{what}: the view is empty; nothing to do")
    if not ffmpeg_available():
        raise ValueError(f"{what}: ffmpeg/ffprobe not found; FiftyOne samples video frames with them "
                         "(apt-get install ffmpeg)")
    return n


def _frames_dir(samples, output_dir: str | None) -> tuple[str, str | None]:
    out = output_dir or default_output_dir(samples, "frames")
    dirs = sorted({os.path.dirname(os.path.abspath(p)) for p in samples._root_dataset.distinct("filepath")})
    rel = os.path.commonpath(dirs) if dirs else None
    return out, rel


def video_frames(samples, fps: float | None = None, output_dir: str | None = None):
    """The sampled frames of the videos as an image view (FiftyOne's ``to_frames(sample_frames=True)``).

    Frame images are written once (ffmpeg) under ``output_dir`` (default: the plugin's folder for the
    dataset, mirroring the videos' folders) and reused by later calls; their paths go to
    ``frames.filepath``. Use the view to fit an image expert on frames of normal videos.

    Args:
        samples: a video dataset or view.
        fps: sampling rate in frames per second (None: every frame).
        output_dir: where frame images go.

    Returns:
        A ``FramesView`` (one image sample per sampled frame; ``sample_id`` and ``frame_number`` fields).
    """
    check_video_collection(samples, "video_frames")
    out, rel = _frames_dir(samples, output_dir)
    return samples.to_frames(sample_frames=True, fps=fps, output_dir=out, rel_dir=rel, skip_failures=True)


@dataclass
class SampledVideo:
    """The sampled frames of one video, in time order."""

    sample_id: str
    frame_ids: list[str]
    frame_numbers: list[int]
    paths: list[str]


def extract_frames(samples, fps: float | None = None, output_dir: str | None = None) -> list[SampledVideo]:
    """Sample the frames of every video (see :func:`video_frames`); videos with no frame are omitted.

    Frames the video announces but ffmpeg could not decode (e.g. a truncated file) are listed with a path
    that does not exist: loading them gives the frame's error.
    """
    frames = video_frames(samples, fps=fps, output_dir=output_dir)
    by_video: dict[str, SampledVideo] = {}
    for fid, sid, fn, path in zip(*frames.values(["id", "sample_id", "frame_number", "filepath"])):
        v = by_video.setdefault(sid, SampledVideo(sid, [], [], []))
        v.frame_ids.append(fid)
        v.frame_numbers.append(int(fn))
        v.paths.append(path)
    out = []
    for sid in samples.values("id"):
        v = by_video.get(sid)
        if v is None:
            continue
        order = np.argsort(v.frame_numbers, kind="stable")
        out.append(SampledVideo(sid, [v.frame_ids[i] for i in order], [v.frame_numbers[i] for i in order],
                                [v.paths[i] for i in order]))
    return out


def load_frame_images(paths: Sequence[str]) -> tuple[list[Image.Image | None], list[str | None]]:
    """Decode frame images to RGB; a missing or corrupt image gives None and its error message."""
    images: list[Image.Image | None] = []
    errors: list[str | None] = []
    for path in paths:
        if not os.path.isfile(path):
            images.append(None)
            errors.append(NOT_EXTRACTED)
            continue
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.convert("RGB"))
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this frame's error
            images.append(None)
            errors.append(f"cannot decode frame image: {type(exc).__name__}: {exc}")
    return images, errors


# --- time ----------------------------------------------------------------------------------------------------
def smooth_scores(scores, window: int = 5, method: str = "uniform") -> np.ndarray:
    """Smooth frame scores over time, skipping missing (NaN) frames.

    A normalised convolution: ``filter(score * ok) / filter(ok)``, so a failed frame neither drags its
    neighbours down nor gets a score itself (it stays NaN). Edges repeat the nearest value.

    Args:
        scores: frame scores in time order (NaN = no score).
        window: window length in sampled frames (1 or less: no smoothing).
        method: ``"uniform"`` (moving average), ``"gaussian"`` (sigma = window / 4, cut at +-window / 2)
            or ``"none"``.

    Returns:
        The smoothed scores, same length.

    Raises:
        ValueError: unknown method.
    """
    from scipy.ndimage import gaussian_filter1d, uniform_filter1d

    if method not in SMOOTHING:
        raise ValueError(f"smoothing must be one of {SMOOTHING}, got {method!r}")
    x = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(x)
    if method == "none" or int(window) <= 1 or x.size == 0:
        return x.copy()
    if method == "uniform":
        def filt(a):
            return uniform_filter1d(a, size=int(window), mode="nearest")
    else:
        def filt(a):
            return gaussian_filter1d(a, sigma=window / 4.0, truncate=2.0, mode="nearest")
    num = filt(np.where(ok, x, 0.0))
    den = filt(ok.astype(np.float64))
    out = np.full_like(x, np.nan)
    good = ok & (den > 1e-12)
    out[good] = num[good] / den[good]
    return out


def find_segments(smoothed, threshold: float, raw=None, min_length: int = 1) -> list[tuple[int, int]]:
    """Index ranges ``(first, last)`` (inclusive) of the stretches at or above ``threshold``.

    Seeds are the runs of ``smoothed >= threshold``; each is grown over neighbouring frames whose ``raw``
    score is also at or above the threshold (smoothing shortens a stretch by half a window at each end);
    overlapping runs merge; runs shorter than ``min_length`` frames are dropped. NaN never counts.

    Args:
        smoothed: smoothed scores in time order.
        threshold: the threshold.
        raw: unsmoothed scores (None: no growing).
        min_length: shortest kept run, in sampled frames.

    Returns:
        ``[(first_index, last_index), ...]`` in time order.
    """
    s = np.asarray(smoothed, dtype=np.float64)
    above = np.isfinite(s) & (s >= threshold)
    r = None if raw is None else np.asarray(raw, dtype=np.float64)
    r_above = None if r is None else (np.isfinite(r) & (r >= threshold))
    runs: list[list[int]] = []
    i, n = 0, len(s)
    while i < n:
        if not above[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and above[j + 1]:
            j += 1
        a, b = i, j
        if r_above is not None:
            while a - 1 >= 0 and r_above[a - 1]:
                a -= 1
            while b + 1 < n and r_above[b + 1]:
                b += 1
        if runs and a <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], b)
        else:
            runs.append([a, b])
        i = max(j, b) + 1
    return [(a, b) for a, b in runs if b - a + 1 >= max(1, int(min_length))]


def segment_support(frame_numbers: Sequence[int], first: int, last: int, last_frame: int | None = None) -> list[int]:
    """Frame-number ``[start, end]`` of a segment of sampled frames: a sampled frame stands for the frames up
    to the next sampled one; the last sampled frame for one sampling step (within ``last_frame``)."""
    fns = list(frame_numbers)
    if last + 1 < len(fns):
        end = fns[last + 1] - 1
    else:
        step = int(np.median(np.diff(fns))) if len(fns) > 1 else 1
        end = fns[last] + max(0, step - 1)
        if last_frame:
            end = min(end, int(last_frame))
    return [int(fns[first]), int(max(fns[first], end))]


# --- the run -----------------------------------------------------------------------------------------------
def _expert_frame_scores(model, calibration: Calibration | None, image_size, paths: list[str],
                         batch_size: int, extra: dict[str, Any] | None) -> tuple[np.ndarray, list[str | None]]:
    """Calibrated expert scores of frame images (NaN + message where a frame cannot be decoded)."""
    n = len(paths)
    scores = np.full(n, np.nan)
    errors: list[str | None] = [None] * n
    tensors, idx = [], []
    for i, path in enumerate(paths):
        if not os.path.isfile(path):
            errors[i] = NOT_EXTRACTED
            continue
        try:
            tensors.append(load_image(path, image_size))
            idx.append(i)
        except ImageLoadError as exc:
            errors[i] = str(exc)
    for start in range(0, len(idx), batch_size):
        batch = torch.stack(tensors[start:start + batch_size])
        if extra:
            out = model.predict(batch, fields={k: [v] * len(batch) for k, v in extra.items()})
        else:
            out = model.predict(batch)
        s = calibrated_arrays(out, calibration)[0]
        for k, i in enumerate(idx[start:start + batch_size]):
            scores[i] = float(s[k])
    return scores, errors


def _resolve_questions(samples, questions) -> list[str]:
    from .questions import DEFAULT_QUESTIONS, load_questions

    if questions is None:
        return list(DEFAULT_QUESTIONS)
    if isinstance(questions, str):
        return load_questions(samples, questions)
    qs = [str(q).strip() for q in questions if q and str(q).strip()]
    if not qs:
        raise ValueError("questions is empty")
    return qs


def score_video(
    samples,
    key: str = "video",
    *,
    expert: str | Expert | None = None,
    backend: JudgeBackend | None = None,
    questions: str | Sequence[str] | None = None,
    combine: str = "max",
    frames_per_prompt: int = 1,
    context: str | None = None,
    fps: float | None = None,
    window: int = 5,
    smoothing: str = "uniform",
    threshold: float | None = None,
    min_length: int = 1,
    explain: bool = True,
    device: str | None = "auto",
    batch_size: int = 16,
    frames_dir: str | None = None,
    overwrite: bool = False,
    progress: bool | Any = None,
) -> VideoResults:
    """Score the frames of every video, smooth them over time, write frame/video fields and segments.

    Args:
        samples: a video dataset or view.
        key: run key and field prefix (see :class:`VideoFieldNames`).
        expert: a fitted image expert (name or :class:`Expert`), e.g. fitted on frames of normal videos.
        backend: a VLM judge backend asked the guiding ``questions`` (see :mod:`.questions`).
        questions: a list of yes/no questions, the key of a :func:`learn_questions` run, or None (one
            generic question). Only used with ``backend``.
        combine: ``"max"`` / ``"mean"`` over the questions' P(yes), or ``"joint"`` (one prompt listing them).
        frames_per_prompt: frames per VLM request, centred on the scored frame (video-capable models).
        context: scene description put before each question ("A camera watches a car park.").
        fps: sampling rate in frames per second (None: every frame).
        window: temporal smoothing window in sampled frames (1: none).
        smoothing: ``"uniform"``, ``"gaussian"`` or ``"none"``.
        threshold: threshold on the smoothed frame score. Default: the expert's calibrated threshold, 0.5
            for the VLM, their mean with both.
        min_length: shortest segment kept, in sampled frames.
        explain: with a VLM, ask it for a one-sentence explanation of each segment (at its peak frame);
            otherwise (and as ``summary``) the explanation is written from the scores.
        device: the expert's device (``"auto"``, ``"cpu"``, ``"cuda:0"``...).
        batch_size: frames per expert forward pass.
        frames_dir: where sampled frame images go (default: the plugin's folder for the dataset).
        overwrite: score every video again; by default videos already scored under ``key`` are skipped.
        progress: FiftyOne progress convention, over videos.

    Returns:
        :class:`VideoResults`.

    Raises:
        ValueError: not a video view, empty, no ffmpeg, neither expert nor backend, bad key or a key in use
            by another kind of run, unknown question run, bad ``combine``/``smoothing``.
    """
    from .questions import COMBINE, combine_questions, question_scores

    n_total = check_video_collection(samples, "score_video")
    key = check_key(key)
    if expert is None and backend is None:
        raise ValueError("score_video needs an expert, a VLM backend, or both")
    if backend is not None and not isinstance(backend, JudgeBackend):
        raise TypeError(f"backend must be a JudgeBackend (see make_backend), got {type(backend).__name__}")
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    smooth_scores(np.zeros(1), window, smoothing)
    dataset = samples._root_dataset
    fields = VideoFieldNames(key)
    qs = _resolve_questions(samples, questions) if backend is not None else []

    spec = model = calibration = None
    expert_threshold = None
    if expert is not None:
        spec = _resolve_expert(samples, expert)
        model = spec.load(device=device)
        cal = spec.options.get("calibration")
        calibration = Calibration.from_dict(cal) if cal and "image_scores" in cal else None
        expert_threshold = calibration.normalized_image_threshold if calibration is not None else 0.5
    if threshold is None:
        parts = [t for t in (expert_threshold, 0.5 if backend is not None else None) if t is not None]
        threshold = float(np.mean(parts))
    threshold = float(threshold)

    runs = dataset.list_runs()
    if key in runs:
        if not isinstance(dataset.get_run_info(key).config, VideoAnomalyRunConfig):
            raise ValueError(f"key {key!r} is already used by a run of another kind; choose another key")
    else:
        schema, fschema = dataset.get_field_schema(), dataset.get_frame_field_schema() or {}
        clash = [f for f in fields.sample_fields() if f in schema] + \
                [f"frames.{f}" for f in fields.frame_fields() if f in fschema]
        if clash:
            raise ValueError(f"fields {clash} exist but belong to no video run {key!r}; choose another key")

    frames_out, _ = _frames_dir(samples, frames_dir)
    config = VideoAnomalyRunConfig(
        expert=spec.key if spec else None,
        expert_checkpoint=spec.checkpoint if spec else None,
        backend=_describe(backend) if backend is not None else None,
        questions=qs,
        combine=combine if backend is not None else None,
        frames_per_prompt=int(frames_per_prompt),
        context=context,
        fps=fps,
        window=int(window),
        smoothing=smoothing,
        threshold=threshold,
        expert_threshold=expert_threshold,
        min_length=int(min_length),
        explain=bool(explain and backend is not None),
        frames_dir=frames_out,
        fields=fields.all(),
    )
    dataset.register_run(key, config, overwrite=True, cleanup=False)
    _declare_fields(dataset, fields)

    todo = samples
    if not overwrite:
        todo = samples.exists(fields.score, False)
    results = VideoResults(key=key, fields=fields, questions=qs, threshold=threshold, num_videos=n_total,
                           num_skipped=n_total - todo.count())
    if overwrite:
        _clear_frames(dataset, todo, fields)
    todo_ids = todo.values("id")
    if not todo_ids:
        return _finish(samples, fields, results)

    videos = {v.sample_id: v for v in extract_frames(todo, fps=fps, output_dir=frames_dir)}
    meta = dict(zip(todo_ids, todo.values("metadata")))  # after sampling, which computes missing metadata
    needs = list(getattr(model, "needs_fields", ()) or ()) if model is not None else []
    extras = dict(zip(todo_ids, zip(*todo.values(needs)))) if needs else {}
    writer = _Writer(dataset, fields)
    with fou.ProgressBar(total=len(todo_ids), progress=progress) as pb:
        for sid in todo_ids:
            v = videos.get(sid)
            if v is None or not v.frame_ids:
                msg = ("could not read the video (ffprobe found no video stream)" if meta.get(sid) is None
                       else "no frame could be sampled from the video")
                writer.video_error(sid, msg)
                results.num_errors += 1
                results.errors[sid] = msg
                pb.update()
                continue
            n = len(v.frame_ids)
            errors: list[str | None] = [None] * n
            expert_s = vlm_s = None
            per_q = None
            if model is not None:
                extra = dict(zip(needs, extras[sid])) if needs else None
                expert_s, e_err = _expert_frame_scores(model, calibration, spec.image_size, v.paths, batch_size, extra)
                errors = [a or b for a, b in zip(errors, e_err)]
            images: list[Image.Image | None] = []
            if backend is not None:
                images, i_err = load_frame_images(v.paths)
                ok = [i for i, im in enumerate(images) if im is not None]
                per_q = np.full((n, 1 if combine == "joint" else len(qs)), np.nan)
                if ok:
                    p, q_err = question_scores(backend, [images[i] for i in ok], qs, combine=combine,
                                               frames_per_prompt=frames_per_prompt, context=context)
                    per_q[ok] = p
                    for k, i in enumerate(ok):
                        i_err[i] = i_err[i] or q_err[k]
                vlm_s = combine_questions(per_q, "mean" if combine == "mean" else "max")
                errors = [a or b for a, b in zip(errors, i_err)]
            stack = np.stack([s for s in (expert_s, vlm_s) if s is not None])
            # a frame is scored only when every scorer answered (a half score would not be comparable)
            raw = np.where(np.isfinite(stack).all(axis=0), stack.mean(axis=0), np.nan)
            for i in range(n):
                if errors[i] is None and not np.isfinite(raw[i]):
                    errors[i] = "no score"
            smoothed = smooth_scores(raw, window, smoothing)
            last_frame = getattr(meta.get(sid), "total_frame_count", None)
            segs = find_segments(smoothed, threshold, raw=raw, min_length=min_length)
            dets = []
            for a, b in segs:
                dets.append(_segment(v, a, b, smoothed, per_q, qs, expert_s, vlm_s, images, backend,
                                     bool(explain), frames_per_prompt, context, last_frame, threshold))
            writer.video(v, raw, smoothed, expert_s, vlm_s, per_q if combine != "joint" else None, errors,
                         threshold, dets)
            n_err = sum(e is not None for e in errors)
            results.num_frames += n - n_err
            results.num_frame_errors += n_err
            results.num_segments += len(dets)
            if not np.isfinite(smoothed).any():
                msg = f"none of the {n} sampled frames could be scored ({next(e for e in errors if e)})"
                writer.video_error(sid, msg)
                results.num_errors += 1
                results.errors[sid] = msg
            else:
                results.num_scored += 1
            pb.update()
    writer.flush()
    return _finish(samples, fields, results)


def _finish(samples, fields: VideoFieldNames, results: VideoResults) -> VideoResults:
    if fields.label in samples._root_dataset.get_field_schema():
        results.num_flagged = samples.match(fo.ViewField(f"{fields.label}.label") == ANOMALOUS).count()
    return results


def _segment(v: SampledVideo, a: int, b: int, smoothed, per_q, qs, expert_s, vlm_s, images, backend,
             explain: bool, frames_per_prompt: int, context: str | None, last_frame, threshold: float):
    """One ``fo.TemporalDetection`` with its explanation."""
    from .questions import VIDEO_SYSTEM, frame_windows

    seg = smoothed[a:b + 1]
    peak = a + int(np.nanargmax(seg)) if np.isfinite(seg).any() else a
    support = segment_support(v.frame_numbers, a, b, last_frame)
    parts = [f"frames {support[0]}-{support[1]} score above {threshold:.2f} (peak {smoothed[peak]:.2f} "
             f"at frame {v.frame_numbers[peak]})"]
    top_q = None
    if per_q is not None and qs and per_q.shape[1] == len(qs) and np.isfinite(per_q[peak]).any():
        j = int(np.nanargmax(per_q[peak]))
        top_q = qs[j]
        parts.append(f"strongest question: '{top_q}' (P(yes) {per_q[peak, j]:.2f})")
    elif vlm_s is not None and np.isfinite(vlm_s[peak]):
        parts.append(f"VLM P(yes) {vlm_s[peak]:.2f}")
    if expert_s is not None and np.isfinite(expert_s[peak]):
        parts.append(f"expert score {expert_s[peak]:.2f}")
    summary = "; ".join(parts)
    explanation = summary
    if explain and backend is not None and images and images[peak] is not None:
        ok = [i for i, im in enumerate(images) if im is not None]
        pos = ok.index(peak)
        lo, hi = frame_windows(len(ok), frames_per_prompt)[pos]
        listed = ("Guiding questions: " + " ".join(qs) + " ") if qs else ""
        user = ((context.strip() + "\n") if context else "") + EXPLAIN_PROMPT.format(questions=listed)
        ans = backend.judge([JudgeRequest(images=[images[i] for i in ok[lo:hi]], user=user, system=VIDEO_SYSTEM,
                                          max_new_tokens=48)])[0]
        if ans.error is None and ans.text.strip():
            explanation = ans.text.strip()
    return fo.TemporalDetection(label=ANOMALOUS, support=support, confidence=float(smoothed[peak]),
                                explanation=explanation, summary=summary, peak_frame=int(v.frame_numbers[peak]),
                                top_question=top_q)


def _num(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


class _Writer:
    """Collects frame and video values and writes them with ``set_values`` (the video score last)."""

    FLUSH_FRAMES = 2000

    def __init__(self, dataset, fields: VideoFieldNames) -> None:
        self.dataset, self.f = dataset, fields
        self.frames: dict[str, dict[str, Any]] = {name: {} for name in fields.frame_fields()}
        self.samples: dict[str, dict[str, Any]] = {name: {} for name in fields.sample_fields()}
        self.pending = 0

    def video(self, v: SampledVideo, raw, smoothed, expert_s, vlm_s, per_q, errors, threshold, dets) -> None:
        f = self.f
        for i, fid in enumerate(v.frame_ids):
            s = _num(smoothed[i]) if errors[i] is None else None
            self.frames[f.frame_score][fid] = s
            self.frames[f.frame_raw_score][fid] = _num(raw[i]) if errors[i] is None else None
            self.frames[f.frame_expert_score][fid] = _num(expert_s[i]) if expert_s is not None else None
            self.frames[f.frame_vlm_score][fid] = _num(vlm_s[i]) if vlm_s is not None else None
            self.frames[f.frame_question_scores][fid] = ([_num(x) for x in per_q[i]] if per_q is not None
                                                         and errors[i] is None else None)
            self.frames[f.frame_error][fid] = errors[i]
            self.frames[f.frame_label][fid] = (None if s is None else fo.Classification(
                label=ANOMALOUS if s >= threshold else NORMAL, confidence=s if s >= threshold else 1.0 - s))
        video_score = float(np.nanmax(smoothed)) if np.isfinite(smoothed).any() else None
        sid = v.sample_id
        self.samples[f.segments][sid] = fo.TemporalDetections(detections=dets)
        self.samples[f.error][sid] = None
        self.samples[f.label][sid] = (None if video_score is None else fo.Classification(
            label=ANOMALOUS if dets else NORMAL, confidence=video_score if dets else 1.0 - video_score,
            anomaly_score=video_score))
        self.samples[f.score][sid] = video_score
        self.pending += len(v.frame_ids)
        if self.pending >= self.FLUSH_FRAMES:
            self.flush()

    def video_error(self, sid: str, message: str) -> None:
        for name in self.f.sample_fields():
            self.samples[name][sid] = None
        self.samples[self.f.error][sid] = message

    def flush(self) -> None:
        for name, values in self.frames.items():
            if values:
                self.dataset.set_values(f"frames.{name}", values, key_field="frames.id")
                values.clear()
        order = [self.f.error, self.f.segments, self.f.label, self.f.score]
        for name in order:
            if self.samples[name]:
                self.dataset.set_values(name, self.samples[name], key_field="id")
                self.samples[name].clear()
        self.pending = 0


def _declare_fields(dataset, fields: VideoFieldNames) -> None:
    emb = fo.EmbeddedDocumentField
    schema = dataset.get_field_schema()
    for name, ftype, kw in ((fields.label, emb, {"embedded_doc_type": fo.Classification}),
                            (fields.score, fo.FloatField, {}),
                            (fields.segments, emb, {"embedded_doc_type": fo.TemporalDetections}),
                            (fields.error, fo.StringField, {})):
        if name not in schema:
            dataset.add_sample_field(name, ftype, **kw)
    fschema = dataset.get_frame_field_schema() or {}
    for name, ftype, kw in ((fields.frame_label, emb, {"embedded_doc_type": fo.Classification}),
                            (fields.frame_score, fo.FloatField, {}),
                            (fields.frame_raw_score, fo.FloatField, {}),
                            (fields.frame_expert_score, fo.FloatField, {}),
                            (fields.frame_vlm_score, fo.FloatField, {}),
                            (fields.frame_question_scores, fo.ListField, {"subfield": fo.FloatField}),
                            (fields.frame_error, fo.StringField, {})):
        if name not in fschema:
            dataset.add_frame_field(name, ftype, **kw)


def _clear_frames(dataset, todo, fields: VideoFieldNames) -> None:
    """Before an overwrite: frames scored by an earlier run (maybe at another rate) lose its values."""
    fids = [fid for ids in todo.values("frames.id") for fid in ids]
    if not fids:
        return
    for name in fields.frame_fields():
        dataset.set_values(f"frames.{name}", {fid: None for fid in fids}, key_field="frames.id")


def _describe(backend: JudgeBackend) -> dict[str, Any]:
    from .judge import _safe_describe

    return _safe_describe(backend)


__all__ = ["VideoFieldNames", "VideoResults", "find_segments", "score_video", "segment_support", "smooth_scores",
           "video_frames"]
