"""Learning guiding questions on labelled validation videos (VERA's learner/optimizer loop).

A language model (the *optimizer*, a :data:`~.proposers.Proposer`: any ``str -> str`` callable, a local
``transformers`` backend or an OpenAI-compatible server) reads the sets tried so far with their AUROC and
proposes a new set; every proposal is scored on the validation frames and the set with the best AUROC is
kept. Proposals that cannot be parsed, repeat a set or fail are recorded and skipped, so a weak optimizer
can only waste iterations, never make the result worse. The learned set is recorded as a FiftyOne run
(writing no fields; its key follows the engine's rules) and reused by name: ``score_video(..., questions=key)``.

Example:
    >>> learned = fav.learn_questions(ds.match_tags("val"), key="fight_q", backend=vlm, proposer=llm,
    ...                               label_field="frames.ground_truth", candidates=[["Do you see a fight?"]])
    >>> learned.questions, learned.auroc
    (['Do you see people punching or kicking?', 'Is anyone lying on the ground?'], 0.87)
    >>> fav.score_video(ds, key="vera", backend=vlm, questions="fight_q", fps=2, window=5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import fiftyone.core.utils as fou

from .._common import check_key
from ..engine import Job, check_run_key, record_run
from ..judging import describe_backend
from ..leases import RunLease
from ..metrics import auroc
from ..models.judge.base import JudgeBackend
from ..runs import QUESTIONS_METHOD, QuestionRunConfig
from .frames import check_video_collection, extract_frames, load_frame_images
from .proposers import QuestionSetResult, describe_proposer, make_proposer, optimizer_prompt, parse_questions
from .questions import DEFAULT_QUESTIONS, check_combine, combine_questions, question_scores
from .timeline import smooth_scores


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


class QuestionJob(Job):
    """A question-learning run, for the engine's key rules (:func:`~fiftyone_anomaly_vlm.engine.check_run_key`)
    and its lease: it writes no fields; its identity is the learned set, so a recorded run is replaced only
    with ``overwrite`` (a run still to learn has none)."""

    verb = "learn_questions"
    method = QUESTIONS_METHOD
    media_type = "video"
    fields: list = []
    error_field = done_field = ""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.result: dict[str, Any] = dict(questions=[], auroc=None, history=[], num_videos=0, num_frames=0)

    def identity(self, config) -> tuple[str, ...]:
        return tuple(config.questions or ())

    def describe_identity(self, config) -> str:
        questions = list(self.identity(config))
        return f"the learned questions {questions}" if questions else "a new learning run"

    def config(self) -> QuestionRunConfig:
        return QuestionRunConfig(**self.settings, **self.result)


class _SetScorer:
    """Scores question sets on the validation clips; each question's P(yes) is asked once and cached."""

    def __init__(self, backend: JudgeBackend, clips: list[list], y_true: np.ndarray, known: np.ndarray, *,
                 frame_level: bool, combine: str, window: int, smoothing: str, frames_per_prompt: int,
                 context: str | None) -> None:
        self.backend, self.clips, self.y_true, self.known = backend, clips, y_true, known
        self.frame_level, self.combine, self.window, self.smoothing = frame_level, combine, window, smoothing
        self.frames_per_prompt, self.context = frames_per_prompt, context
        self.cache: dict[Any, list[np.ndarray]] = {}
        self.tried: set[tuple[str, ...]] = set()
        self.history: list[QuestionSetResult] = []

    def columns(self, qs: list[str]) -> list[np.ndarray]:
        """Per-clip P(yes) arrays ``(frames, len(qs))`` (joint: one column), cached per question/set."""
        keys = [("joint", tuple(qs))] if self.combine == "joint" else [("q", q) for q in qs]
        for k in keys:
            if k not in self.cache:
                asked = list(k[1]) if k[0] == "joint" else [k[1]]
                self.cache[k] = [
                    question_scores(self.backend, images, asked, combine=self.combine,
                                    frames_per_prompt=self.frames_per_prompt, context=self.context)[0][:, 0]
                    for images in self.clips]
        return [np.stack([self.cache[k][c] for k in keys], axis=1) for c in range(len(self.clips))]

    def evaluate(self, per_clip: list[np.ndarray]) -> float | None:
        """AUROC of per-clip P(yes) arrays: smoothed frame scores (frame labels) or their max (video labels)."""
        scores = []
        for p in per_clip:
            s = smooth_scores(combine_questions(p, "mean" if self.combine == "mean" else "max"), self.window,
                              self.smoothing)
            if self.frame_level:
                scores.extend(s.tolist())
            else:
                scores.append(float(np.nanmax(s)) if np.isfinite(s).any() else np.nan)
        return auroc(np.asarray(scores, dtype=np.float64)[self.known], self.y_true)

    def score_set(self, qs: list[str], source: str, iteration: int, text: str | None = None) -> None:
        """Score one set and add it to the history (a set tried before is recorded as a duplicate)."""
        norm = tuple(sorted(q.strip().lower() for q in qs))
        if norm in self.tried:
            self.history.append(QuestionSetResult(list(qs), None, source, iteration, "duplicate", text=text))
            return
        self.tried.add(norm)
        per_clip = self.columns(list(qs))
        auroc = self.evaluate(per_clip)
        singles = None
        if self.combine != "joint":
            singles = [self.evaluate([p[:, [j]] for p in per_clip]) for j in range(len(qs))]
        self.history.append(QuestionSetResult(list(qs), auroc, source, iteration,
                                              "evaluated" if auroc is not None else "no_score", singles, text))


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

    The initial set (default :data:`~.questions.DEFAULT_QUESTIONS`) and every user ``candidates`` set are
    scored first; then, for ``iterations`` rounds, the ``proposer`` reads the sets tried so far (best first,
    with each question's own AUROC) and writes a new set, which is parsed (:func:`~.proposers.parse_questions`)
    and scored. Each question's P(yes) on the validation frames is computed once and cached, so repeated
    questions cost nothing. The set with the highest AUROC wins (earliest on ties).

    Args:
        samples: a labelled video dataset or view (e.g. ``ds.match_tags("val")``).
        key: run key under which the learned set is recorded (reuse: ``score_video(questions=key)``).
        backend: the VLM that answers the questions (same backends as :func:`judge`).
        label_field: ``"frames.<field>"`` for frame labels (frame-level AUROC), or a sample field for
            video labels (video score = max smoothed frame score). Values: ``fo.Classification``, str, bool
            or numbers (> 0 is anomalous).
        positive_label: the label that means anomalous.
        proposer: the optimizer: a callable ``prompt -> text``, a judge backend (see
            :func:`~.proposers.make_proposer`), or None (only the initial and candidate sets are compared).
        initial: the starting set.
        candidates: more sets given by the user, all scored.
        iterations: optimizer rounds.
        num_questions: most questions per proposed set.
        task: what counts as anomalous, in words, for the optimizer prompt ("fights", "falls"...).
        combine: ``"max"``, ``"mean"`` or ``"joint"`` (see :func:`~.questions.question_scores`).
        fps: frame sampling rate (None: every frame).
        window: temporal smoothing window in sampled frames (as :func:`~fiftyone_anomaly_vlm.score_video`).
        smoothing: ``"uniform"``, ``"gaussian"`` or ``"none"``.
        frames_per_prompt: frames per request (video-capable models).
        context: scene description put before each question.
        frames_dir: where sampled frame images go (default: the plugin's folder for this dataset).
        overwrite: replace an existing question run ``key``.
        progress: FiftyOne progress convention, over the question sets scored.

    Returns:
        :class:`LearnedQuestions`.

    Raises:
        ValueError: bad key, a key used by a run of another kind, an existing question run ``key`` without
            ``overwrite``, not a video view, a label field that is missing or has only one class, bad
            ``combine``/``smoothing``, or no set could be scored.
        BackendUnavailable: a VLM server (backend or proposer) cannot be reached; nothing recorded.
        RunBusyError: another process is working on the run ``key``.
    """
    check_video_collection(samples, "learn_questions")
    key = check_key(key)
    check_combine(combine)
    smooth_scores(np.zeros(1), window, smoothing)  # a bad smoothing fails before any work
    if not isinstance(backend, JudgeBackend):
        raise TypeError(f"backend must be a JudgeBackend (see make_backend), got {type(backend).__name__}")
    dataset = samples._root_dataset
    frame_level = label_field.startswith("frames.")
    propose = make_proposer(proposer) if proposer is not None else None
    job = QuestionJob(level="frame" if frame_level else "video", label_field=label_field,
                      positive_label=positive_label, task=task, combine=combine, fps=fps, window=int(window),
                      smoothing=smoothing, frames_per_prompt=int(frames_per_prompt), context=context,
                      backend=describe_backend(backend), proposer=describe_proposer(propose, proposer),
                      iterations=int(iterations))
    check_run_key(dataset, key, job, overwrite)
    name = label_field[len("frames."):] if frame_level else label_field
    schema = dataset.get_frame_field_schema() if frame_level else dataset.get_field_schema()
    if name not in (schema or {}):
        raise ValueError(f"label field {label_field!r} not found on the dataset")
    for vlm in {id(b): b for b in (backend, proposer) if isinstance(b, JudgeBackend)}.values():
        vlm.check()  # an unreachable server fails here, once, before any work

    with RunLease(dataset, key, job.verb):
        clips, y = _validation_clips(samples, label_field, positive_label, fps, frames_dir)
        known = np.array([v is not None for v in y], dtype=bool)
        if known.sum() == 0 or len(set(y[known].tolist())) < 2:
            raise ValueError(f"'{label_field}' must label both normal and anomalous "
                             f"{'frames' if frame_level else 'videos'} in the validation view")
        scorer = _SetScorer(backend, clips, np.array([bool(v) for v in y[known]]), known, frame_level=frame_level,
                            combine=combine, window=window, smoothing=smoothing,
                            frames_per_prompt=frames_per_prompt, context=context)
        _search(scorer, propose, initial, candidates, iterations=iterations, num_questions=num_questions,
                task=task, combine=combine, progress=progress)
        history = scorer.history
        scored = [h for h in history if h.auroc is not None]
        if not scored:
            raise ValueError("no question set could be scored (every request failed or every score is NaN)")
        best = max(scored, key=lambda h: h.auroc)  # max keeps the earliest of equal scores
        num_frames = sum(len(images) for images in clips)
        job.result = dict(questions=best.questions, auroc=best.auroc, num_videos=len(clips), num_frames=num_frames,
                          history=[_jsonable(asdict(h)) for h in history])
        record_run(dataset, key, job.config(), cleanup=True)
    return LearnedQuestions(key=key, questions=best.questions, auroc=best.auroc, level=job.settings["level"],
                            history=history, num_videos=len(clips), num_frames=num_frames)


def _validation_clips(samples, label_field: str, positive_label: str, fps, frames_dir) -> tuple[list, np.ndarray]:
    """The decodable frames of each validation video (held in memory: a validation view is small) and the
    labels, one per frame (frame labels) or per clip (video labels); None where unlabelled."""
    frame_level = label_field.startswith("frames.")
    name = label_field[len("frames."):] if frame_level else label_field
    videos = extract_frames(samples, fps=fps, output_dir=frames_dir)
    sample_labels = {} if frame_level else dict(zip(*samples.values(["id", name])))
    frame_labels = {}
    if frame_level:
        fids, values = samples.values(["frames.id", label_field])
        for vids, vals in zip(fids, values):
            frame_labels.update(zip(vids, vals))
    clips, labels = [], []
    for v in videos:
        images, errors = load_frame_images(v.paths)
        keep = [i for i, e in enumerate(errors) if e is None]
        if not keep:
            continue
        clips.append([images[i] for i in keep])
        if frame_level:
            labels.extend(_positive(frame_labels.get(v.frame_ids[i]), positive_label) for i in keep)
        else:
            labels.append(_positive(sample_labels.get(v.sample_id), positive_label))
    return clips, np.array(labels, dtype=object)


def _search(scorer: _SetScorer, propose, initial, candidates, *, iterations: int, num_questions: int, task: str,
            combine: str, progress) -> None:
    """Score the initial and candidate sets, then ``iterations`` proposals of the optimizer."""
    sets = [(list(initial or DEFAULT_QUESTIONS), "initial")] + [(list(c), "candidate") for c in candidates]
    rounds = iterations if propose else 0
    history = scorer.history
    with fou.ProgressBar(total=len(sets) + rounds, progress=progress) as pb:
        for qs, source in sets:
            qs = [q.strip() for q in qs if q and q.strip()]
            if not qs:
                raise ValueError(f"an empty question set was given ({source})")
            scorer.score_set(qs, source, 0)
            pb.update()
        for it in range(1, rounds + 1):
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
                scorer.score_set(qs, "proposal", it, text[:1000])
            pb.update()


def load_questions(samples, key: str) -> list[str]:
    """The question set recorded by :func:`learn_questions` under ``key``.

    Raises:
        ValueError: no such run, or the run is not a question run.
    """
    dataset = samples._root_dataset
    if key not in dataset.list_runs():
        raise ValueError(f"no learned question set {key!r} on dataset '{dataset.name}'")
    cfg = dataset.get_run_info(key).config
    if cfg.method != QUESTIONS_METHOD:
        raise ValueError(f"run {key!r} is not a learned question set")
    return list(cfg.questions)


def _positive(value: Any, positive_label: str) -> bool | None:
    if value is None:
        return None
    label = getattr(value, "label", value)
    if isinstance(label, bool):
        return label
    if isinstance(label, (int, float)):
        return bool(label > 0)
    return str(label) == positive_label


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
