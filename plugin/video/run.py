"""``score_video``: a video run on the :mod:`engine <fiftyone_anomaly_vlm.engine>`.

:class:`VideoJob` says what a video run is: its frame and video fields, its record, the videos to do cut
into work items (frames sampled first), each item's frames decoded ahead (:meth:`VideoJob.prepare`) while
the previous one is scored, smoothed and cut into segments (:meth:`VideoJob.compute`). The engine does the
rest as for every verb: key and kind checks, the lease, clearing old sample *and* frame values on
``overwrite``, registration, field declaration, resume (videos with ``K_score`` are done) and ordered writes
(frame fields first, the video score last).

Example:
    >>> res = fav.score_video(ds, key="vid", expert="frames_padim", fps=4, window=5)
    >>> res.num_scored, res.num_frames, res.num_segments
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import fiftyone as fo

from .._common import check_key
from ..calibration import Calibration
from ..engine import BatchOutput, Job, RunStats, check_positive_int, queue_run_shards, run_job
from ..experts import Expert
from ..scoring import resolve_expert
from ..fields import VideoFieldNames
from ..judging import backend_spec, build_backend, describe_backend
from ..labels import ANOMALOUS, anomaly_label
from ..models.judge.base import JudgeBackend
from ..runs import VIDEO_METHOD, VideoAnomalyRunConfig
from ..shards import QueuedShards, check_shard
from .frames import SampledVideo, check_video_collection, extract_frames, frames_location
from .learning import load_questions
from .questions import DEFAULT_QUESTIONS, check_combine
from .scorer import FrameScorer, FrameScores, LoadedFrames
from .timeline import find_segments, smooth_scores

#: the video operator that ``score_video(..., shards=N)`` queues (``fiftyone.yml``'s plugin name / operator name)
VIDEO_OPERATOR = "@anomaly-vlm/anomaly-vlm/score_video"
#: videos are grouped into one work item (and one write) until they hold this many sampled frames
FRAMES_PER_ITEM = 256


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


class VideoJob(Job):
    """What a video run is, for the engine: sample each video's frames, score them, smooth them over time,
    write frame scores, segments and the video's verdict.

    Args:
        samples: the target videos.
        key: the run key.
        scorer: the frame scorers.
        settings: the run's recorded settings (the keyword arguments of
            :class:`~fiftyone_anomaly_vlm.runs.VideoAnomalyRunConfig` but ``fields``).
    """

    verb = "score_video"
    method = VIDEO_METHOD
    media_type = "video"
    prefetch = 1

    def __init__(self, samples, key: str, scorer: FrameScorer, **settings: Any) -> None:
        self.samples, self.scorer, self.settings = samples, scorer, settings
        self.names = VideoFieldNames(key)
        self.fields = self.names.specs()
        self.error_field, self.done_field = self.names.error, self.names.score
        self.needs = list(scorer.model.needs_fields) if scorer.model is not None else []  # None: VLM only
        self.threshold = float(settings["threshold"])

    def identity(self, config) -> tuple:
        """The expert fit, the VLM and the questions: frame scores of another of them are not added to."""
        return config.expert, config.expert_checkpoint, (config.backend or {}).get("model"), tuple(config.questions)

    def describe_identity(self, config) -> str:
        expert, checkpoint, model, questions = self.identity(config)
        return f"expert {expert!r} (checkpoint {checkpoint}), VLM {model!r} with questions {list(questions)}"

    def config(self) -> VideoAnomalyRunConfig:
        return VideoAnomalyRunConfig(**self.settings, fields=self.names.all())

    def columns(self) -> list[str]:
        return ["id", *self.needs]

    def batches(self, rows: dict[str, list]) -> list[list[tuple]]:
        """Sample the frames of the videos to do (ffmpeg), then group them into items of about
        :data:`FRAMES_PER_ITEM` frames: ``[(video id, SampledVideo or None, metadata, expert fields)]``."""
        ids = rows["id"]
        todo = self.samples.select(ids, ordered=True)
        videos = {v.sample_id: v for v in extract_frames(todo, fps=self.settings["fps"],
                                                         output_dir=self.settings["frames_dir"])}
        meta = dict(zip(*todo.values(["id", "metadata"])))  # after sampling, which computes missing metadata
        items, item, size = [], [], 0
        for k, sid in enumerate(ids):
            extra = {n: rows[n][k] for n in self.needs} or None
            v = videos.get(sid)
            item.append((sid, v, meta.get(sid), extra))
            size += len(v.frame_ids) if v is not None else 0
            if size >= FRAMES_PER_ITEM:
                items.append(item)
                item, size = [], 0
        return items + ([item] if item else [])

    def prepare(self, item: list[tuple]) -> list[tuple]:
        """Decode the item's frames (in the engine's worker thread, while the previous item is scored)."""
        return [(sid, None if v is None or not v.frame_ids else self.scorer.load(v, extra), metadata)
                for sid, v, metadata, extra in item]

    def compute(self, prepared: list[tuple]) -> BatchOutput:
        out = BatchOutput(values={name: {} for name in self.names.sample_fields()},
                          frame_values={name: {} for name in self.names.frame_fields()}, size=len(prepared))
        for sid, loaded, metadata in prepared:
            if loaded is None:
                out.errors[sid] = ("could not read the video (ffprobe found no video stream)" if metadata is None
                                   else "no frame could be sampled from the video")
                continue
            self._video(out, loaded, getattr(metadata, "total_frame_count", None))
        return out

    def _video(self, out: BatchOutput, loaded: LoadedFrames, last_frame: int | None) -> None:
        """Score one video's frames and add its frame and video values (or its error) to ``out``."""
        v, s = loaded.video, self.settings
        scores = self.scorer.score(loaded)
        smoothed = smooth_scores(scores.raw, s["window"], s["smoothing"])
        dets = [self.scorer.detection(v, a, b, smoothed, scores, self.threshold, last_frame)
                for a, b in find_segments(smoothed, self.threshold, raw=scores.raw, min_length=s["min_length"])]
        _frame_values(out.frame_values, self.names, v, scores, smoothed, self.threshold,
                      per_question=s["combine"] != "joint")
        n_err = sum(e is not None for e in scores.errors)
        out.counts.update(frames=len(v.frame_ids) - n_err, frame_errors=n_err, segments=len(dets))
        if not np.isfinite(smoothed).any():
            first = next(e for e in scores.errors if e)
            out.errors[v.sample_id] = f"none of the {len(v.frame_ids)} sampled frames could be scored ({first})"
            return
        video_score = float(np.nanmax(smoothed))
        f, sid = self.names, v.sample_id
        out.values[f.segments][sid] = fo.TemporalDetections(detections=dets)
        out.values[f.error][sid] = None
        out.values[f.label][sid] = anomaly_label(bool(dets), video_score, anomaly_score=video_score)
        out.values[f.score][sid] = video_score

    def finish(self, samples, stats: RunStats) -> None:
        if self.names.label in samples._root_dataset.get_field_schema():
            stats.counts["flagged"] = samples.match(fo.ViewField(f"{self.names.label}.label") == ANOMALOUS).count()

    def totals(self, samples) -> dict[str, int]:
        """Frames scored, frame errors and segments over the whole view (a sharded run's totals): a frame
        without an error always has a raw score (:meth:`~.scorer.FrameScorer.score`)."""
        f = self.names
        return {"frames": samples.count(f"frames.{f.frame_raw_score}"),
                "frame_errors": samples.count(f"frames.{f.frame_error}"),
                "segments": samples.count(f"{f.segments}.detections")}


def _num(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _frame_values(values: dict[str, dict], f: VideoFieldNames, v: SampledVideo, scores: FrameScores,
                  smoothed: np.ndarray, threshold: float, per_question: bool) -> None:
    """Every frame field of one video's sampled frames (None where a frame has an error)."""
    for i, fid in enumerate(v.frame_ids):
        ok = scores.errors[i] is None
        s = _num(smoothed[i]) if ok else None
        values[f.frame_score][fid] = s
        values[f.frame_raw_score][fid] = _num(scores.raw[i]) if ok else None
        values[f.frame_expert_score][fid] = _num(scores.expert[i]) if scores.expert is not None else None
        values[f.frame_vlm_score][fid] = _num(scores.vlm[i]) if scores.vlm is not None else None
        values[f.frame_question_scores][fid] = ([_num(x) for x in scores.per_question[i]]
                                                if per_question and scores.per_question is not None and ok else None)
        values[f.frame_error][fid] = scores.errors[i]
        values[f.frame_label][fid] = None if s is None else anomaly_label(s >= threshold, s)


def resolve_questions(samples, questions: str | Sequence[str] | None) -> list[str]:
    """The questions to ask: the given list (stripped), those of a learned question run, or the default one.

    Raises:
        ValueError: an empty list, or no learned question run of that name.
    """
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
    backend: JudgeBackend | Mapping[str, Any] | None = None,
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
    shard: tuple[int, int] | None = None,
    shards: int | None = None,
) -> VideoResults | QueuedShards:
    """Score the frames of every video, smooth them over time, write frame/video fields and segments.

    Args:
        samples: a video dataset or view.
        key: run key and field prefix (see :class:`VideoFieldNames`).
        expert: a fitted image expert (name or :class:`Expert`), e.g. fitted on frames of normal videos.
        backend: a VLM judge backend asked the guiding ``questions`` (see :mod:`.questions`), or
            ``make_backend``'s arguments as a dict (``{"name": "openai", "base_url": ..., "model": ...}``), which
            ``shards`` sends to the workers as is.
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
        overwrite: score every video again (old sample and frame values of these videos are cleared first);
            by default videos already scored under ``key`` by the same expert fit, VLM and questions are
            skipped, so an interrupted run resumes.
        progress: FiftyOne progress convention, over videos.
        shard: ``(index, count)``: score only that shard of the videos (a hash of the video's sample id, see
            :mod:`~fiftyone_anomaly_vlm.shards`): all frames of a video are in one shard, so its smoothing and
            segments are its own; every shard writes the one run ``key``, and the one that completes the set
            counts the flagged videos of the whole view and stores the run's totals.
        shards: queue this many delegated operations, one per shard, and return at once
            (:class:`~fiftyone_anomaly_vlm.shards.QueuedShards`); ``fiftyone delegated launch`` workers run them.

    Returns:
        :class:`VideoResults` (of the shard, for ``shard``), or
        :class:`~fiftyone_anomaly_vlm.shards.QueuedShards` for ``shards``.

    Raises:
        ValueError: not a video view, empty, no ffmpeg, neither expert nor backend, bad key or batch size, a
            key in use by another kind of run or holding scores of another expert fit, VLM or question set
            (without ``overwrite``), unknown question run, bad ``combine``/``smoothing``.
        BackendUnavailable: the backend's pre-check failed (e.g. the server cannot be reached); nothing recorded.
        RunBusyError: another process is writing the run ``key``.
    """
    n_total = check_video_collection(samples, "score_video")
    key = check_key(key)
    batch_size = check_positive_int("batch_size", batch_size)
    if expert is None and backend is None:
        raise ValueError("score_video needs an expert, a VLM backend, or both")
    if shard is not None:
        shard = check_shard(shard)
    # a TypeError / bad dict before any work; with shards, what the workers build the backend from
    spec_of_backend = (backend_spec(backend) if backend is not None and (
        shards is not None or not isinstance(backend, JudgeBackend)) else None)
    check_combine(combine)
    smooth_scores(np.zeros(1), window, smoothing)  # a bad smoothing fails before any work
    qs = resolve_questions(samples, questions) if backend is not None else []
    if shards is not None:
        args = dict(expert=resolve_expert(samples, expert).key if expert is not None else None,
                    questions=qs or None, combine=combine, frames_per_prompt=frames_per_prompt, context=context,
                    fps=fps, window=window, smoothing=smoothing, threshold=threshold, min_length=min_length,
                    explain=explain, device=device, batch_size=batch_size, frames_dir=frames_dir)
        names = VideoFieldNames(key)
        return queue_run_shards(samples, VIDEO_METHOD, names.specs(), names.score, VIDEO_OPERATOR,
                                dict(args=args, backend_spec=spec_of_backend), key, shards, shard, overwrite)
    if backend is not None:
        backend = build_backend(backend)

    spec = model = calibration = expert_threshold = None
    if expert is not None:
        spec = resolve_expert(samples, expert)
        model = spec.load(device=device)  # a broken checkpoint fails here, before any write
        cal = spec.options.get("calibration")
        calibration = Calibration.from_dict(cal) if cal and "image_scores" in cal else None
        expert_threshold = calibration.normalized_image_threshold if calibration is not None else 0.5
    if threshold is None:
        parts = [t for t in (expert_threshold, 0.5 if backend is not None else None) if t is not None]
        threshold = float(np.mean(parts))
    threshold = float(threshold)
    if backend is not None:
        backend.check()  # an unreachable server fails here, once, before a run is recorded

    scorer = FrameScorer(model=model, calibration=calibration, image_size=spec.image_size if spec else None,
                         batch_size=batch_size, backend=backend, questions=qs, combine=combine,
                         frames_per_prompt=int(frames_per_prompt), context=context, explain=bool(explain))
    job = VideoJob(
        samples, key, scorer,
        expert=spec.key if spec else None,
        expert_checkpoint=spec.checkpoint if spec else None,
        backend=describe_backend(backend) if backend is not None else None,
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
        frames_dir=frames_location(samples, frames_dir)[0],
    )
    stats = run_job(samples, job, key, overwrite=overwrite, progress=progress, shard=shard)
    return VideoResults(key=key, fields=job.names, questions=qs, threshold=threshold, num_videos=n_total,
                        num_scored=stats.num_done, num_skipped=stats.num_skipped, num_frames=stats.counts["frames"],
                        num_frame_errors=stats.counts["frame_errors"], num_errors=stats.num_errors,
                        num_flagged=stats.counts["flagged"], num_segments=stats.counts["segments"],
                        errors=stats.errors)
