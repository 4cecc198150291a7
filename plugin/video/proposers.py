"""The question optimizer of :func:`~fiftyone_anomaly_vlm.video.learning.learn_questions`: its prompt, the
text generators that answer it (:data:`Proposer`), and a robust reader of the questions in their answer.

Example:
    >>> propose = make_proposer(llm_backend)            # or any callable str -> str
    >>> parse_questions(propose(optimizer_prompt(history, task="fights", num_questions=3, combine="max")))
    ['Do you see people punching or kicking?', 'Is anyone lying on the ground?']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..models.judge.base import JudgeBackend, JudgeRequest

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


OPTIMIZER_SYSTEM = ("You design short yes/no questions that a vision-language model answers about video frames "
                    "in order to detect anomalous events.")

#: a proposer turns the optimizer prompt into text that should list questions
Proposer = Callable[[str], str]

_BULLET = re.compile(r"^\s*(?:[-*•>#]+|\(?[0-9]{1,2}[.):\]]|\(?[a-zA-Z][.)]|q(?:uestion)?\s*[0-9]*\s*[:.)-])\s*",
                     re.I)
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


def describe_proposer(propose: Proposer | None, source: Any = None) -> dict[str, Any] | None:
    """What to record about a proposer: its own ``describe()``, else the name of the callable given."""
    if propose is None:
        return None
    describe = getattr(propose, "describe", None)
    if callable(describe):
        return describe()
    return {"proposer": getattr(source, "__name__", type(source).__name__)}


class _LocalTextProposer:
    """Text-only greedy generation with a local transformers backend's model and chat template."""

    def __init__(self, backend, system: str, max_new_tokens: int) -> None:
        self.backend, self.system, self.max_new_tokens = backend, system, max_new_tokens

    def describe(self) -> dict[str, Any]:
        return {"proposer": "transformers", "model": self.backend.describe().get("model")}

    def __call__(self, prompt: str) -> str:
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
