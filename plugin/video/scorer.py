"""Scores of a video's sampled frames (an image expert's calibrated score and/or P(yes) to the guiding
questions), and the temporal detection of an anomalous stretch with its explanation.

The frame score is the mean of the scorers used; a frame is scored only when every scorer answered (half
a score would not be comparable with the others).

Example:
    >>> scorer = FrameScorer(model=model, calibration=cal, image_size=(256, 256), backend=vlm, questions=qs)
    >>> scores = scorer.score(scorer.load(video))       # load: CPU work (may run ahead in a thread)
    >>> scores.raw, scores.errors
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

import fiftyone as fo

from ..calibration import Calibration
from ..images import ImageLoadError, load_image
from ..labels import ANOMALOUS
from ..models.judge.base import JudgeBackend, JudgeRequest
from ..calibration import calibrated_arrays
from .frames import NOT_EXTRACTED, SampledVideo, load_frame_images
from .questions import VIDEO_SYSTEM, combine_questions, frame_windows, question_scores
from .timeline import segment_support

EXPLAIN_PROMPT = ("This part of the video was flagged as anomalous. {questions}In one sentence, say what is "
                  "unusual in what you see.")


@dataclass
class LoadedFrames:
    """The decoded frames of one video: expert input tensors (by frame index), VLM images, load errors."""

    video: SampledVideo
    tensors: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    images: list[Image.Image | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    extra: dict[str, Any] | None = None


@dataclass
class FrameScores:
    """Scores of one video's sampled frames, in time order (NaN where there is none).

    Attributes:
        raw: the frame score (mean of the scorers).
        expert: the expert's calibrated score (None without an expert).
        vlm: the questions' combined P(yes) (None without a VLM).
        per_question: P(yes) per question, ``(frames, questions)`` (one column for ``"joint"``).
        errors: why a frame has no score (None where it has one).
        images: the frames shown to the VLM (for explanations).
    """

    raw: np.ndarray
    expert: np.ndarray | None
    vlm: np.ndarray | None
    per_question: np.ndarray | None
    errors: list[str | None]
    images: list[Image.Image | None]


class FrameScorer:
    """Scores sampled frames with an image expert and/or a VLM asked guiding questions.

    Args:
        model: a loaded :class:`~fiftyone_anomaly_vlm.models.VisionExpert` (None: VLM only).
        calibration: the expert's calibration (None: the expert's own normalised scores).
        image_size: the expert's input size.
        batch_size: frames per expert forward pass.
        backend: a judge backend (None: expert only).
        questions: the guiding questions.
        combine: ``"max"``, ``"mean"`` or ``"joint"``.
        frames_per_prompt: frames per VLM request.
        context: scene description put before each question.
        explain: ask the VLM to explain each segment.
    """

    def __init__(self, *, model=None, calibration: Calibration | None = None, image_size=None, batch_size: int = 16,
                 backend: JudgeBackend | None = None, questions: Sequence[str] = (), combine: str = "max",
                 frames_per_prompt: int = 1, context: str | None = None, explain: bool = False) -> None:
        self.model, self.calibration, self.image_size, self.batch_size = model, calibration, image_size, batch_size
        self.backend, self.questions, self.combine = backend, list(questions), combine
        self.frames_per_prompt, self.context, self.explain = frames_per_prompt, context, explain

    def load(self, video: SampledVideo, extra: dict[str, Any] | None = None) -> LoadedFrames:
        """Decode the frames of ``video`` for the scorers (CPU only); ``extra``: sample fields the expert reads."""
        n = len(video.paths)
        out = LoadedFrames(video, errors=[None] * n, extra=extra)
        if self.model is not None:
            for i, path in enumerate(video.paths):
                if not os.path.isfile(path):
                    out.errors[i] = NOT_EXTRACTED
                    continue
                try:
                    out.tensors.append((i, load_image(path, self.image_size)))
                except ImageLoadError as exc:
                    out.errors[i] = str(exc)
        if self.backend is not None:
            out.images, i_err = load_frame_images(video.paths)
            out.errors = [a or b for a, b in zip(out.errors, i_err)]
        return out

    def score(self, loaded: LoadedFrames) -> FrameScores:
        """Run the expert and/or the VLM on the loaded frames."""
        n = len(loaded.video.paths)
        errors = list(loaded.errors)
        expert_s = vlm_s = per_q = None
        if self.model is not None:
            expert_s = self._expert_scores(loaded.tensors, n, loaded.extra)
        if self.backend is not None:
            ok = [i for i, im in enumerate(loaded.images) if im is not None]
            per_q = np.full((n, 1 if self.combine == "joint" else len(self.questions)), np.nan)
            if ok:
                p, q_err = question_scores(self.backend, [loaded.images[i] for i in ok], self.questions,
                                           combine=self.combine, frames_per_prompt=self.frames_per_prompt,
                                           context=self.context)
                per_q[ok] = p
                for k, i in enumerate(ok):
                    errors[i] = errors[i] or q_err[k]
            vlm_s = combine_questions(per_q, "mean" if self.combine == "mean" else "max")
        stack = np.stack([s for s in (expert_s, vlm_s) if s is not None])
        raw = np.where(np.isfinite(stack).all(axis=0), stack.mean(axis=0), np.nan)
        errors = [e if e is not None or np.isfinite(raw[i]) else "no score" for i, e in enumerate(errors)]
        return FrameScores(raw, expert_s, vlm_s, per_q, errors, loaded.images)

    def _expert_scores(self, tensors: list[tuple[int, torch.Tensor]], n: int, extra) -> np.ndarray:
        scores = np.full(n, np.nan)
        for start in range(0, len(tensors), self.batch_size):
            chunk = tensors[start:start + self.batch_size]
            batch = torch.stack([t for _, t in chunk])
            if extra:
                out = self.model.predict(batch, fields={k: [v] * len(batch) for k, v in extra.items()})
            else:
                out = self.model.predict(batch)
            s = calibrated_arrays(out, self.calibration)[0]
            for k, (i, _) in enumerate(chunk):
                scores[i] = float(s[k])
        return scores

    def detection(self, video: SampledVideo, a: int, b: int, smoothed: np.ndarray, scores: FrameScores,
                  threshold: float, last_frame: int | None) -> fo.TemporalDetection:
        """The ``fo.TemporalDetection`` of the segment of sampled frames ``a..b``, with its explanation (the
        VLM's sentence at the peak frame when asked for, else the summary of the scores)."""
        per_q, qs = scores.per_question, self.questions
        seg = smoothed[a:b + 1]
        peak = a + int(np.nanargmax(seg)) if np.isfinite(seg).any() else a
        support = segment_support(video.frame_numbers, a, b, last_frame)
        parts = [f"frames {support[0]}-{support[1]} score above {threshold:.2f} (peak {smoothed[peak]:.2f} "
                 f"at frame {video.frame_numbers[peak]})"]
        top_q = None
        if per_q is not None and qs and per_q.shape[1] == len(qs) and np.isfinite(per_q[peak]).any():
            j = int(np.nanargmax(per_q[peak]))
            top_q = qs[j]
            parts.append(f"strongest question: '{top_q}' (P(yes) {per_q[peak, j]:.2f})")
        elif scores.vlm is not None and np.isfinite(scores.vlm[peak]):
            parts.append(f"VLM P(yes) {scores.vlm[peak]:.2f}")
        if scores.expert is not None and np.isfinite(scores.expert[peak]):
            parts.append(f"expert score {scores.expert[peak]:.2f}")
        summary = "; ".join(parts)
        explanation = self._explain(scores.images, peak) or summary
        return fo.TemporalDetection(label=ANOMALOUS, support=support, confidence=float(smoothed[peak]),
                                    explanation=explanation, summary=summary,
                                    peak_frame=int(video.frame_numbers[peak]), top_question=top_q)

    def _explain(self, images: list[Image.Image | None], peak: int) -> str | None:
        """The VLM's one-sentence explanation of the frames around ``peak`` (None when not asked or failed)."""
        if not (self.explain and self.backend is not None and images and images[peak] is not None):
            return None
        ok = [i for i, im in enumerate(images) if im is not None]
        lo, hi = frame_windows(len(ok), self.frames_per_prompt)[ok.index(peak)]
        listed = ("Guiding questions: " + " ".join(self.questions) + " ") if self.questions else ""
        user = ((self.context.strip() + "\n") if self.context else "") + EXPLAIN_PROMPT.format(questions=listed)
        ans = self.backend.judge([JudgeRequest(images=[images[i] for i in ok[lo:hi]], user=user,
                                               system=VIDEO_SYSTEM, max_new_tokens=48)])[0]
        return ans.text.strip() if ans.error is None and ans.text.strip() else None
