"""The records of video runs (:func:`fiftyone_anomaly_vlm.score_video`) and learned question sets
(:func:`fiftyone_anomaly_vlm.learn_questions`)."""

from __future__ import annotations

from typing import Any

import fiftyone.core.runs as fors

from ..fields import VideoFieldNames
from ..storage import RootRelativePaths
from .base import QUESTIONS_METHOD, VIDEO_METHOD, AnomalyRunConfig, FieldsRun


class VideoAnomalyRunConfig(RootRelativePaths, AnomalyRunConfig):
    """Config of a video run.

    Args:
        expert: the image expert's name (None: VLM only).
        expert_checkpoint: its checkpoint (stands for the fit that scored).
        backend: the VLM backend's description (never secrets; None: expert only).
        questions: the guiding questions asked, in order.
        combine: ``"max"``, ``"mean"`` or ``"joint"`` (with a VLM).
        frames_per_prompt: frames per VLM request.
        context: scene description put before each question.
        fps: sampling rate (None: every frame).
        window: smoothing window in sampled frames.
        smoothing: ``"uniform"``, ``"gaussian"`` or ``"none"``.
        threshold: threshold on the smoothed frame score.
        expert_threshold: the expert's calibrated threshold.
        min_length: shortest segment kept, in sampled frames.
        explain: segments explained by the VLM.
        frames_dir: where sampled frames are.
        fields: the fields written.
        **legacy: parameters of earlier releases.

    ``expert_checkpoint`` and ``frames_dir`` are recorded relative to the storage root
    (:mod:`~fiftyone_anomaly_vlm.storage`) and are absolute paths on this machine once loaded.
    """

    METHOD = VIDEO_METHOD
    PATH_ATTRS = ("expert_checkpoint", "frames_dir")

    def __init__(self, expert: str | None = None, expert_checkpoint: str | None = None,
                 backend: dict[str, Any] | None = None, questions: list[str] | None = None,
                 combine: str | None = None, frames_per_prompt: int = 1, context: str | None = None,
                 fps: float | None = None, window: int = 5, smoothing: str = "uniform",
                 threshold: float | None = None, expert_threshold: float | None = None, min_length: int = 1,
                 explain: bool = False, frames_dir: str | None = None, fields: list[str] | None = None,
                 **legacy: Any) -> None:
        self.expert, self.expert_checkpoint, self.backend = expert, expert_checkpoint, backend
        self.questions, self.combine, self.frames_per_prompt = list(questions or []), combine, frames_per_prompt
        self.context, self.fps, self.window, self.smoothing = context, fps, window, smoothing
        self.threshold, self.expert_threshold, self.min_length = threshold, expert_threshold, min_length
        self.explain, self.frames_dir, self.fields = explain, frames_dir, fields
        super().__init__(**legacy)
        self.resolve_root_paths()


class VideoAnomalyRun(FieldsRun):
    """A video run; its fields are :class:`~fiftyone_anomaly_vlm.fields.VideoFieldNames` of the run key
    (frame fields included)."""

    FIELD_NAMES = VideoFieldNames


class QuestionRunConfig(AnomalyRunConfig):
    """Config of a learned question set (VERA): the best questions, their AUROC, every set tried, the settings.

    Args:
        questions: the best set.
        auroc: its AUROC on the validation view.
        level: ``"frame"`` or ``"video"`` (where the labels are).
        label_field: the labels' field.
        positive_label: the label meaning anomalous.
        task: what counts as anomalous, in words.
        combine: how question scores combine.
        fps: sampling rate.
        window: smoothing window.
        smoothing: smoothing kind.
        frames_per_prompt: frames per request.
        context: scene description.
        backend: the answering VLM's description.
        proposer: the optimizer's description.
        iterations: optimizer rounds.
        num_videos: validation videos used.
        num_frames: validation frames used.
        history: every set tried (questions, AUROC, source, status).
        **legacy: parameters of earlier releases.
    """

    METHOD = QUESTIONS_METHOD

    def __init__(self, questions: list[str] | None = None, auroc: float | None = None, level: str | None = None,
                 label_field: str | None = None, positive_label: str | None = None, task: str | None = None,
                 combine: str | None = None, fps: float | None = None, window: int | None = None,
                 smoothing: str | None = None, frames_per_prompt: int | None = None, context: str | None = None,
                 backend: dict[str, Any] | None = None, proposer: dict[str, Any] | None = None,
                 iterations: int | None = None, num_videos: int | None = None, num_frames: int | None = None,
                 history: list[dict] | None = None, **legacy: Any) -> None:
        self.questions, self.auroc, self.level = list(questions or []), auroc, level
        self.label_field, self.positive_label, self.task = label_field, positive_label, task
        self.combine, self.fps, self.window, self.smoothing = combine, fps, window, smoothing
        self.frames_per_prompt, self.context, self.backend = frames_per_prompt, context, backend
        self.proposer, self.iterations = proposer, iterations
        self.num_videos, self.num_frames, self.history = num_videos, num_frames, list(history or [])
        super().__init__(**legacy)


class QuestionRun(fors.Run):
    """A learned question set; it writes no fields."""

    def get_fields(self, samples, key):  # noqa: D102 - FiftyOne's docstring applies
        return []
