"""VERA-style guiding questions for video: ask a VLM fine-grained yes/no questions per frame, and learn them.

VERA (Ye et al., CVPR 2025) replaces the generic "is there an anomaly?" with a few guiding questions
("Do you see people punching, kicking or wrestling?"). Each question is asked about a frame (or a short
window of frames for video-capable models) through the same judge backends as the image judge
(:mod:`fiftyone_anomaly_vlm.models.judge`), and P(yes) is read from the first answer token's
probabilities. A frame's score is the ``max`` or ``mean`` P(yes) over the questions, or (``"joint"``, one
request per frame as in VERA's inference prompt) P(yes) to "does any of these apply?".

Questions can be given per dataset, or learned by :func:`learn_questions` on a labelled validation view:
a language model (the *optimizer*, behind the :data:`Proposer` interface: any ``str -> str`` callable, a
local ``transformers`` backend or an OpenAI-compatible server) reads the sets tried so far with their
AUROC and proposes a new set; every proposal is scored on the validation frames and the set with the best
AUROC is kept. Proposals that cannot be parsed, repeat a set or fail are recorded and skipped, so a weak
optimizer can only waste iterations, never make the result worse. The learned set is recorded as a
FiftyOne run and reused by name: ``score_video(..., questions="<learn key>")``.

Example:
    >>> learned = fav.learn_questions(ds.match_tags("val"), key="fight_q", backend=vlm, proposer=llm,
    ...                               label_field="frames.ground_truth", candidates=[["Do you see a fight?"]])
    >>> learned.questions, learned.auroc
    (['Do you see people punching or kicking?', 'Is anyone lying on the ground?'], 0.87)
    >>> fav.score_video(ds, key="vera", backend=vlm, questions="fight_q", fps=2, window=5)

See Also:
    VERA: Explainable Video Anomaly Detection via Verbalized Learning of Vision-Language Models,
    https://arxiv.org/abs/2412.01095
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

import fiftyone.core.utils as fou

from ._common import check_key
from .runs import QuestionRun, QuestionRunConfig  # noqa: F401 - the run classes' path before 0.2
from .models.judge.base import JudgeBackend, JudgeRequest

logger = logging.getLogger(__name__)

#: the generic question used when no set is given (VERA's baseline)
DEFAULT_QUESTIONS = ("Is there anything unusual or anomalous happening in this scene?",)
VIDEO_SYSTEM = ("You watch frames of a video and answer questions about what you see. Answer with Yes or No "
                "as the first word.")
OPTIMIZER_SYSTEM = ("You design short yes/no questions that a vision-language model answers about video frames "
                    "in order to detect anomalous events.")
COMBINE = ("max", "mean", "joint")

#: a proposer turns the optimizer prompt into text that should list questions
Proposer = Callable[[str], str]


# --- asking the questions ----------------------------------------------------------------------------------
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
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
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


# --- parsing proposals -------------------------------------------------------------------------------------
_BULLET = re.compile(r"^\s*(?:[-*•>#]+|\(?[0-9]{1,2}[.):\]]|\(?[a-zA-Z][.)]|q(?:uestion)?\s*[0-9]*\s*[:.)-])\s*", re.I)
_QUESTION_START = re.compile(r"^(do|does|did|is|are|was|were|can|could|has|have|will|would|should)\b", re.I)


def parse_questions(text: str, max_questions: int = 5, min_words: int = 3, max_chars: int = 200) -> list[str]:
    """Read yes/no questions from a proposer's free text; garbage gives an empty list.

    A question is a sentence ending with ``?`` (bullets, numbering, quotes and Markdown stripped), or a
    line starting with an auxiliary verb ("Do you see ...") without its ``?``. It must have at least
    ``min_words`` words, mostly letters, at most ``max_chars`` characters; duplicates (case-insensitive)
    are dropped.

    Args:
        text: the proposer's output.
        max_questions: keep at most this many, in order.
        min_words: shortest accepted question, in words.
        max_chars: longest accepted question, in characters.

    Returns:
        The questions, each ending with ``?``.
    """
    found: list[str] = []
    seen: set[str] = set()

    def accept(q: str) -> None:
        q = _BULLET.sub("", q.strip()).strip().strip("*_\"'`“”‘’").strip()
        q = re.sub(r"\s+", " ", q)
        if not q.endswith("?"):
            q = q.rstrip(".:;,!") + "?"
        words = re.findall(r"[A-Za-z]+(?:'[a-z]+)?", q)
        letters = sum(c.isalpha() for c in q)
        if len(words) < min_words or len(q) > max_chars or letters < 0.6 * len(q.replace(" ", "")):
            return
        if not (_QUESTION_START.match(q) or re.match(r"^(what|which|who|where|how|any|anything)\b", q, re.I)):
            return
        norm = q.lower()
        if norm not in seen:
            seen.add(norm)
            found.append(q)

    for line in (text or "").splitlines():
        line = _BULLET.sub("", line.strip())
        if not line:
            continue
        pieces = re.findall(r"[^?]*\?", line)
        if pieces:
            for piece in pieces:
                # the question is the last sentence before the '?' ("Sure. Do you see X?")
                accept(re.split(r"(?<=[.!:])\s+", piece.strip())[-1])
        elif _QUESTION_START.match(line):
            accept(line)
        if len(found) >= max_questions:
            break
    return found[:max_questions]


# --- proposers ---------------------------------------------------------------------------------------------
def make_proposer(source: Any, *, system: str = OPTIMIZER_SYSTEM, max_new_tokens: int = 200) -> Proposer:
    """Turn a text generator into a :data:`Proposer` (``prompt -> text``).

    Args:
        source: a callable ``str -> str`` (used as is); a local ``TransformersBackend`` (its model generates
            from text alone, greedy); or any other :class:`JudgeBackend` (e.g. an OpenAI-compatible server:
            a request without images).
        system: the optimizer's system text.
        max_new_tokens: answer length budget.

    Returns:
        The proposer.

    Raises:
        TypeError: ``source`` is none of these.
    """
    if isinstance(source, JudgeBackend):
        if getattr(source, "name", "") == "transformers" and hasattr(source, "model"):
            return _LocalTextProposer(source, system, max_new_tokens)
        return _BackendTextProposer(source, system, max_new_tokens)
    if callable(source):
        return source
    raise TypeError(f"proposer must be a callable str -> str or a JudgeBackend, got {type(source).__name__}")


class _LocalTextProposer:
    """Text-only greedy generation with a local transformers backend's model and chat template."""

    def __init__(self, backend, system: str, max_new_tokens: int) -> None:
        self.backend, self.system, self.max_new_tokens = backend, system, max_new_tokens

    def describe(self) -> dict[str, Any]:
        return {"proposer": "transformers", "model": self.backend.describe().get("model")}

    def __call__(self, prompt: str) -> str:
        import torch

        b = self.backend
        text = b.prompt_text(JudgeRequest(images=[], user=prompt, system=self.system))
        enc = b.tokenizer([text], return_tensors="pt")
        enc = {k: v.to(b.device) for k, v in enc.items()}
        pad = b.tokenizer.pad_token_id if b.tokenizer.pad_token_id is not None else b.tokenizer.eos_token_id
        with torch.inference_mode():
            out = b.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        return b.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class _BackendTextProposer:
    """A text-only request through any judge backend (servers accept requests without images)."""

    def __init__(self, backend: JudgeBackend, system: str, max_new_tokens: int) -> None:
        self.backend, self.system, self.max_new_tokens = backend, system, max_new_tokens

    def describe(self) -> dict[str, Any]:
        return {"proposer": self.backend.name, "model": (self.backend.describe() or {}).get("model")}

    def __call__(self, prompt: str) -> str:
        ans = self.backend.judge([JudgeRequest(images=[], user=prompt, system=self.system,
                                               max_new_tokens=self.max_new_tokens)])[0]
        if ans.error is not None:
            raise RuntimeError(ans.error)
        return ans.text


def optimizer_prompt(history: Sequence[QuestionSetResult], *, task: str, num_questions: int, combine: str,
                     top: int = 5) -> str:
    """The optimizer's prompt: the best sets tried so far with their AUROC, and what to write."""
    tried = sorted([h for h in history if h.auroc is not None], key=lambda h: -h.auroc)[:top]
    how = {"max": "the highest P(yes) over the questions", "mean": "the mean P(yes) over the questions",
           "joint": "P(yes) to 'is any of these answered yes?'"}[combine]
    lines = [
        f"Goal: detect {task} in videos. A vision-language model answers each question about every frame; a "
        f"frame's anomaly score is {how}. Sets are compared by AUROC on labelled validation videos (1.0 is "
        "perfect, 0.5 is chance).",
        "",
        "Question sets tried so far, best first:",
    ]
    for h in tried:
        lines.append(f"AUROC {h.auroc:.3f}:")
        for q, a in zip(h.questions, h.question_aurocs or [None] * len(h.questions)):
            lines.append(f"- {q}" + (f" (alone: {a:.3f})" if a is not None else ""))
    lines += [
        "",
        f"Write a new, different set of at most {num_questions} short yes/no questions about things a camera "
        f"can see (objects, people, actions, motion, colours) that separate {task} from normal footage. "
        "Write one question per line, each ending with '?', and nothing else.",
    ]
    return "\n".join(lines)


# --- learning ----------------------------------------------------------------------------------------------
@dataclass
class QuestionSetResult:
    """One question set tried by :func:`learn_questions`.

    Attributes:
        questions: the set (empty when the proposal could not be parsed).
        auroc: its AUROC on the validation view (None when not evaluated).
        source: ``"initial"``, ``"candidate"`` (given by the user) or ``"proposal"`` (from the optimizer).
        iteration: optimizer iteration (0 for initial and candidates).
        status: ``"evaluated"``, ``"unparsed"``, ``"duplicate"``, ``"error"`` or ``"no_score"`` (every
            frame failed).
        question_aurocs: each question's AUROC alone (``max``/``mean`` only).
        text: the proposer's raw text (proposals only; cut to 1,000 characters).
        error: what went wrong, if anything.
    """

    questions: list[str]
    auroc: float | None = None
    source: str = "candidate"
    iteration: int = 0
    status: str = "evaluated"
    question_aurocs: list[float | None] | None = None
    text: str | None = None
    error: str | None = None


@dataclass
class LearnedQuestions:
    """What :func:`learn_questions` found.

    Attributes:
        key: the run key holding the result.
        questions: the best set.
        auroc: its validation AUROC.
        level: ``"frame"`` (frame labels) or ``"video"`` (one label per video; video score = max frame score).
        history: every set tried, in order.
        num_videos: validation videos used.
        num_frames: validation frames scored (frames that failed to decode are left out).
    """

    key: str
    questions: list[str]
    auroc: float | None
    level: str
    history: list[QuestionSetResult] = field(default_factory=list)
    num_videos: int = 0
    num_frames: int = 0


def _positive(value: Any, positive_label: str) -> bool | None:
    if value is None:
        return None
    label = getattr(value, "label", value)
    if isinstance(label, bool):
        return label
    if isinstance(label, (int, float)):
        return bool(label > 0)
    return str(label) == positive_label


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    ok = np.isfinite(scores)
    y, s = labels[ok], scores[ok]
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, s))


def learn_questions(
    samples,
    key: str = "questions",
    *,
    backend: JudgeBackend,
    label_field: str = "frames.ground_truth",
    positive_label: str = "anomalous",
    proposer: Any = None,
    initial: Sequence[str] | None = None,
    candidates: Sequence[Sequence[str]] = (),
    iterations: int = 3,
    num_questions: int = 5,
    task: str = "anomalous events",
    combine: str = "max",
    fps: float | None = None,
    window: int = 5,
    smoothing: str = "uniform",
    frames_per_prompt: int = 1,
    context: str | None = None,
    frames_dir: str | None = None,
    overwrite: bool = False,
    progress: bool | Any = None,
) -> LearnedQuestions:
    """Learn guiding questions on a labelled validation view (VERA's learner/optimizer loop); record run ``key``.

    The initial set (default :data:`DEFAULT_QUESTIONS`) and every user ``candidates`` set are scored first;
    then, for ``iterations`` rounds, the ``proposer`` reads the sets tried so far (best first, with each
    question's own AUROC) and writes a new set, which is parsed (:func:`parse_questions`) and scored. Each
    question's P(yes) on the validation frames is computed once and cached, so repeated questions cost
    nothing. The set with the highest AUROC wins (earliest on ties).

    Args:
        samples: a labelled video dataset or view (e.g. ``ds.match_tags("val")``).
        key: run key under which the learned set is recorded (reuse: ``score_video(questions=key)``).
        backend: the VLM that answers the questions (same backends as :func:`judge`).
        label_field: ``"frames.<field>"`` for frame labels (frame-level AUROC), or a sample field for
            video labels (video score = max smoothed frame score). Values: ``fo.Classification``, str, bool
            or numbers (> 0 is anomalous).
        positive_label: the label that means anomalous.
        proposer: the optimizer: a callable ``prompt -> text``, a judge backend (see :func:`make_proposer`),
            or None (only the initial and candidate sets are compared).
        initial: the starting set.
        candidates: more sets given by the user, all scored.
        iterations: optimizer rounds.
        num_questions: most questions per proposed set.
        task: what counts as anomalous, in words, for the optimizer prompt ("fights", "falls"...).
        combine: ``"max"``, ``"mean"`` or ``"joint"`` (see :func:`question_scores`).
        fps: frame sampling rate (None: every frame).
        window: temporal smoothing window in sampled frames (as :func:`~fiftyone_anomaly_vlm.video.score_video`).
        smoothing: ``"uniform"``, ``"gaussian"`` or ``"none"``.
        frames_per_prompt: frames per request (video-capable models).
        context: scene description put before each question.
        frames_dir: where sampled frame images go (default: the plugin's folder for this dataset).
        overwrite: replace an existing run ``key``.
        progress: FiftyOne progress convention, over the question sets scored.

    Returns:
        :class:`LearnedQuestions`.

    Raises:
        ValueError: bad key, key in use, not a video view, a label field that is missing or has only one
            class, bad ``combine``/``smoothing``, or no set could be scored.
    """
    from .video import check_video_collection, extract_frames, load_frame_images, smooth_scores

    check_video_collection(samples, "learn_questions")
    key = check_key(key)
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    smooth_scores(np.zeros(1), window, smoothing)  # a bad smoothing fails before any work
    if not isinstance(backend, JudgeBackend):
        raise TypeError(f"backend must be a JudgeBackend (see make_backend), got {type(backend).__name__}")
    dataset = samples._root_dataset
    if key in dataset.list_runs() and not overwrite:
        raise ValueError(f"run {key!r} exists; pass overwrite=True or choose another key")
    frame_level = label_field.startswith("frames.")
    name = label_field[len("frames."):] if frame_level else label_field
    schema = dataset.get_frame_field_schema() if frame_level else dataset.get_field_schema()
    if name not in (schema or {}):
        raise ValueError(f"label field {label_field!r} not found on the dataset")
    propose = make_proposer(proposer) if proposer is not None else None

    videos = extract_frames(samples, fps=fps, output_dir=frames_dir)
    sample_labels = {} if frame_level else dict(zip(*samples.values(["id", name])))
    frame_labels = {}
    if frame_level:
        ids, fids, values = samples.values(["id", "frames.id", label_field])
        for vids, vals in zip(fids, values):
            frame_labels.update(zip(vids, vals))
    # validation frames held in memory (a validation view is small); frames that fail to decode are left out
    clips = []
    for v in videos:
        images, errors = load_frame_images(v.paths)
        keep = [i for i, e in enumerate(errors) if e is None]
        if not keep:
            continue
        labels = ([_positive(frame_labels.get(v.frame_ids[i]), positive_label) for i in keep] if frame_level
                  else [_positive(sample_labels.get(v.sample_id), positive_label)])
        clips.append(([images[i] for i in keep], labels))
    if frame_level:
        y = np.array([lab for _, labels in clips for lab in labels], dtype=object)
    else:
        y = np.array([labels[0] for _, labels in clips], dtype=object)
    known = np.array([v is not None for v in y], dtype=bool)
    if known.sum() == 0 or len(set(y[known].tolist())) < 2:
        raise ValueError(f"'{label_field}' must label both normal and anomalous {'frames' if frame_level else 'videos'}"
                         " in the validation view")
    y_true = np.array([bool(v) for v in y[known]])
    num_frames = sum(len(images) for images, _ in clips)

    cache: dict[Any, list[np.ndarray]] = {}

    def columns(qs: list[str]) -> list[np.ndarray]:
        """Per-clip P(yes) arrays ``(frames, len(qs))`` (joint: one column), cached per question/set."""
        keys = [("joint", tuple(qs))] if combine == "joint" else [("q", q) for q in qs]
        for k in keys:
            if k not in cache:
                asked = list(k[1]) if k[0] == "joint" else [k[1]]
                cache[k] = [question_scores(backend, images, asked, combine=combine,
                                            frames_per_prompt=frames_per_prompt, context=context)[0][:, 0]
                            for images, _ in clips]
        return [np.stack([cache[k][c] for k in keys], axis=1) for c in range(len(clips))]

    def evaluate(per_clip: list[np.ndarray]) -> float | None:
        scores = []
        for p in per_clip:
            s = smooth_scores(combine_questions(p, "mean" if combine == "mean" else "max"), window, smoothing)
            if frame_level:
                scores.extend(s.tolist())
            else:
                scores.append(float(np.nanmax(s)) if np.isfinite(s).any() else np.nan)
        return _auroc(y_true, np.asarray(scores, dtype=np.float64)[known])

    history: list[QuestionSetResult] = []
    tried: set[tuple[str, ...]] = set()

    def score_set(qs: list[str], source: str, iteration: int, text: str | None = None) -> None:
        norm = tuple(sorted(q.strip().lower() for q in qs))
        if norm in tried:
            history.append(QuestionSetResult(list(qs), None, source, iteration, "duplicate", text=text))
            return
        tried.add(norm)
        per_clip = columns(list(qs))
        auroc = evaluate(per_clip)
        singles = None
        if combine != "joint":
            singles = [evaluate([p[:, [j]] for p in per_clip]) for j in range(len(qs))]
        history.append(QuestionSetResult(list(qs), auroc, source, iteration,
                                         "evaluated" if auroc is not None else "no_score", singles, text))

    sets = [(list(initial or DEFAULT_QUESTIONS), "initial")] + [(list(c), "candidate") for c in candidates]
    with fou.ProgressBar(total=len(sets) + (iterations if propose else 0), progress=progress) as pb:
        for qs, source in sets:
            qs = [q.strip() for q in qs if q and q.strip()]
            if not qs:
                raise ValueError(f"an empty question set was given ({source})")
            score_set(qs, source, 0)
            pb.update()
        for it in range(1, (iterations if propose else 0) + 1):
            prompt = optimizer_prompt(history, task=task, num_questions=num_questions, combine=combine)
            try:
                text = str(propose(prompt))
            except Exception as exc:  # noqa: BLE001 - a failed proposal costs one iteration, not the run
                history.append(QuestionSetResult([], None, "proposal", it, "error",
                                                 error=f"{type(exc).__name__}: {exc}"))
                pb.update()
                continue
            qs = parse_questions(text, max_questions=num_questions)
            if not qs:
                history.append(QuestionSetResult([], None, "proposal", it, "unparsed", text=text[:1000]))
            else:
                score_set(qs, "proposal", it, text[:1000])
            pb.update()

    scored = [h for h in history if h.auroc is not None]
    if not scored:
        raise ValueError("no question set could be scored (every request failed or every score is NaN)")
    best = max(scored, key=lambda h: h.auroc)  # max keeps the earliest of equal scores
    describe = getattr(propose, "describe", None)
    config = QuestionRunConfig(
        questions=best.questions,
        auroc=best.auroc,
        level="frame" if frame_level else "video",
        label_field=label_field,
        positive_label=positive_label,
        task=task,
        combine=combine,
        fps=fps,
        window=int(window),
        smoothing=smoothing,
        frames_per_prompt=int(frames_per_prompt),
        context=context,
        backend=_safe_describe(backend),
        proposer=(describe() if callable(describe) else
                  {"proposer": getattr(proposer, "__name__", type(proposer).__name__)} if proposer is not None
                  else None),
        iterations=int(iterations),
        num_videos=len(clips),
        num_frames=num_frames,
        history=[_jsonable(asdict(h)) for h in history],
    )
    dataset.register_run(key, config, overwrite=True)
    return LearnedQuestions(key=key, questions=best.questions, auroc=best.auroc,
                            level=config.level, history=history, num_videos=len(clips), num_frames=num_frames)


def load_questions(samples, key: str) -> list[str]:
    """The question set recorded by :func:`learn_questions` under ``key``.

    Raises:
        ValueError: no such run, or the run is not a question run.
    """
    dataset = samples._root_dataset
    if key not in dataset.list_runs():
        raise ValueError(f"no learned question set {key!r} on dataset '{dataset.name}'")
    cfg = dataset.get_run_info(key).config
    if not isinstance(cfg, QuestionRunConfig):
        raise ValueError(f"run {key!r} is not a learned question set")
    return list(cfg.questions)


def _safe_describe(backend: JudgeBackend) -> dict[str, Any]:
    from .judge import _safe_describe as describe

    return describe(backend)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
