"""VERA-style guiding questions: ask a VLM fine-grained yes/no questions about video frames.

VERA (Ye et al., CVPR 2025) replaces the generic "is there an anomaly?" with a few guiding questions
("Do you see people punching, kicking or wrestling?"). Each question is asked about a frame (or a short
window of frames for video-capable models) through the same judge backends as the image judge
(:mod:`fiftyone_anomaly_vlm.models.judge`), and P(yes) is read from the first answer token's
probabilities. A frame's score is the ``max`` or ``mean`` P(yes) over the questions, or (``"joint"``, one
request per frame as in VERA's inference prompt) P(yes) to "does any of these apply?".

Example:
    >>> p, errors = question_scores(vlm, frames, ["Do you see a fight?", "Is anyone lying down?"])
    >>> combine_questions(p, "max")          # one score per frame

See Also:
    VERA: Explainable Video Anomaly Detection via Verbalized Learning of Vision-Language Models,
    https://arxiv.org/abs/2412.01095
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..models.judge.base import JudgeBackend, JudgeRequest

#: the generic question used when no set is given (VERA's baseline)
DEFAULT_QUESTIONS = ("Is there anything unusual or anomalous happening in this scene?",)
VIDEO_SYSTEM = ("You watch frames of a video and answer questions about what you see. Answer with Yes or No "
                "as the first word.")
COMBINE = ("max", "mean", "joint")


def check_combine(combine: str) -> str:
    """``combine`` when it is one of :data:`COMBINE`.

    Raises:
        ValueError: another value.
    """
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    return combine


def _prompt(ask: str, num_frames: int, context: str | None) -> str:
    """The user text: optional context, the note on consecutive frames, then ``ask``."""
    parts = []
    if context:
        parts.append(context.strip())
    if num_frames > 1:
        parts.append(f"The {num_frames} images are consecutive frames of a video, in time order.")
    parts.append(ask)
    return "\n".join(parts)


def question_prompt(question: str, num_frames: int = 1, context: str | None = None) -> str:
    """The user text for one guiding question about one frame or a window of ``num_frames`` frames."""
    return _prompt(f"{question.strip()} Answer Yes or No.", num_frames, context)


def joint_prompt(questions: Sequence[str], num_frames: int = 1, context: str | None = None) -> str:
    """The user text asking whether any of the guiding questions is answered yes (VERA's single prompt)."""
    listed = "\n".join(f"{i + 1}. {q.strip()}" for i, q in enumerate(questions))
    return _prompt(f"Consider these questions:\n{listed}\nIs the answer to any of them yes? Answer Yes or No.",
                   num_frames, context)


def frame_windows(n: int, frames_per_prompt: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the window of frames shown for each of ``n`` frames, centred where possible."""
    k = max(1, min(int(frames_per_prompt), n)) if n else 1
    out = []
    for i in range(n):
        start = min(max(0, i - (k - 1) // 2), max(0, n - k))
        out.append((start, start + k))
    return out


def question_scores(
    backend: JudgeBackend,
    frames: Sequence[Image.Image],
    questions: Sequence[str],
    *,
    combine: str = "max",
    frames_per_prompt: int = 1,
    context: str | None = None,
    system: str = VIDEO_SYSTEM,
) -> tuple[np.ndarray, list[str | None]]:
    """P(yes) of every guiding question on every frame of one video, in one batched backend call.

    Args:
        backend: a judge backend (local ``transformers`` model or OpenAI-compatible server).
        frames: the video's frames in time order (PIL images).
        questions: the guiding questions.
        combine: ``"max"``/``"mean"`` (one request per frame and question) or ``"joint"`` (one request per
            frame listing every question).
        frames_per_prompt: frames shown per request (a window centred on the frame, for video-capable
            models; 1 for image-only models).
        context: optional scene description put before the question.
        system: system text.

    Returns:
        ``(p, errors)``: ``p`` of shape ``(len(frames), len(questions))`` (one column for ``"joint"``), NaN
        where a request failed or the model put no probability on yes/no; ``errors[i]`` the first message
        for frame ``i`` or None.
    """
    check_combine(combine)
    if not questions:
        raise ValueError("no question to ask")
    n = len(frames)
    texts = ([joint_prompt(questions, min(frames_per_prompt, max(n, 1)), context)] if combine == "joint" else
             [question_prompt(q, min(frames_per_prompt, max(n, 1)), context) for q in questions])
    p = np.full((n, len(texts)), np.nan)
    errors: list[str | None] = [None] * n
    requests = []
    for i, (a, b) in enumerate(frame_windows(n, frames_per_prompt)):
        for j, text in enumerate(texts):
            requests.append(JudgeRequest(images=list(frames[a:b]), user=text, system=system, max_new_tokens=1,
                                         meta={"frame": i, "question": j}))
    answers = backend.judge(requests) if requests else []
    for req, ans in zip(requests, answers):
        i, j = req.meta["frame"], req.meta["question"]
        if ans.error is not None:
            errors[i] = errors[i] or ans.error
        elif ans.p_yes is None:
            errors[i] = errors[i] or "the model put no probability on Yes/No"
        else:
            p[i, j] = float(ans.p_yes)
    return p, errors


def combine_questions(p: np.ndarray, combine: str = "max") -> np.ndarray:
    """Frame scores from per-question P(yes) (``(frames, questions)``): max or mean over the answered ones."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError("expected a (frames, questions) array")
    out = np.full(p.shape[0], np.nan)
    ok = np.isfinite(p).any(axis=1)
    if ok.any():
        rows = p[ok]
        out[ok] = np.nanmean(rows, axis=1) if combine == "mean" else np.nanmax(rows, axis=1)
    return out
