"""MMAD-style multiple-choice questions made from a dataset's own labels, answer reading, and accuracy with
confidence intervals.

Four subtasks (MMAD's names), each asked only where the labels allow it:

- ``"anomaly discrimination"``: is there a defect? (Yes / No), every sample with ground truth;
- ``"defect classification"``: which defect? (the true defect type and distractors drawn from the other
  defect types of the same product class, or of the dataset without a class field), anomalous samples whose
  class has at least two defect types;
- ``"defect localization"``: where is it? (3x3 grid words: the cell holding most of the defect in the
  ground-truth mask or boxes, distractors from cells with none of it), anomalous samples with a mask;
- ``"object classification"``: which product? (the class and distractors from the other classes), with a
  class field of at least two classes.

Distractors and option orders are drawn with a generator seeded by ``(seed, sample id, subtask)``: the same
questions every call, whatever the batch or the order of samples. The answer is the option letter with the
highest first-token probability (:attr:`~fiftyone_anomaly_vlm.models.judge.JudgeAnswer.option_probs`); a
backend that returns no probabilities gets its letter parsed from the text (MMAD's rule: the first standalone
option letter), marked ``from_text``.

Example:
    >>> info = SampleTruth("65f0...", anomalous=True, defect="scratch", cls="screw", cells=cells_of_mask(mask))
    >>> [q.subtask for q in make_questions(info, pools, seed=0)]
    ['anomaly discrimination', 'defect classification', 'defect localization', 'object classification']
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binomtest

from .prompt import GRID

DISCRIMINATION = "anomaly discrimination"
DEFECT_CLASSIFICATION = "defect classification"
LOCALIZATION = "defect localization"
OBJECT_CLASSIFICATION = "object classification"
#: every subtask, in the order asked
SUBTASKS = (DISCRIMINATION, DEFECT_CLASSIFICATION, LOCALIZATION, OBJECT_CLASSIFICATION)
LETTERS = "ABCDEFGHIJ"
#: ends every multiple-choice question (MMAD's instruction)
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."

_TEXTS = {
    DISCRIMINATION: "Is there any defect in the sample?",
    DEFECT_CLASSIFICATION: "There is a defect in the sample. What type of defect is it?",
    LOCALIZATION: "There is a defect in the sample. Where is it?",
    OBJECT_CLASSIFICATION: "What kind of product is in the sample?",
}


@dataclass(frozen=True)
class Question:
    """One multiple-choice question.

    Attributes:
        subtask: one of :data:`SUBTASKS`.
        text: the question.
        options: the option texts, in the order shown (letter ``A`` first).
        answer: index of the right option.
    """

    subtask: str
    text: str
    options: tuple[str, ...]
    answer: int

    @property
    def letters(self) -> tuple[str, ...]:
        """The options' letters."""
        return tuple(LETTERS[: len(self.options)])

    def prompt(self) -> str:
        """The question as asked: question, lettered options, the answer instruction."""
        opts = "\n".join(f"{letter}. {opt}" for letter, opt in zip(self.letters, self.options))
        return f"Question: {self.text}\n{opts}\n{ANSWER_INSTRUCTION}"


@dataclass
class SampleTruth:
    """What the labels say about one sample.

    Attributes:
        id: the sample id (seeds its draws).
        anomalous: ground truth (None: unknown, no question).
        defect: its defect type (None: none given).
        cls: its product class (None without a class field).
        cells: the defect's share in each 3x3 grid cell (row-major, :data:`~.prompt.GRID`), None without a mask.
    """

    id: str
    anomalous: bool | None
    defect: str | None = None
    cls: Any = None
    cells: Sequence[float] | None = None


@dataclass
class Pools:
    """The label sets distractors are drawn from.

    Attributes:
        defects: product class (None without a class field) -> its defect types, sorted.
        classes: every product class, sorted (empty without a class field).
    """

    defects: dict[Any, list[str]] = field(default_factory=dict)
    classes: list[Any] = field(default_factory=list)


def _rng(seed: int, sample_id: str, subtask: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(f"{sample_id}|{subtask}".encode())])


def _question(subtask: str, truth: str, pool: Iterable[str], rng: np.random.Generator, max_options: int) -> Question:
    others = sorted({str(p) for p in pool} - {str(truth)})
    k = min(len(others), max(1, max_options - 1))
    picked = [others[i] for i in sorted(rng.choice(len(others), size=k, replace=False))] if k else []
    options = [str(truth), *picked]
    order = rng.permutation(len(options))
    shown = tuple(options[i] for i in order)
    return Question(subtask, _TEXTS[subtask], shown, int(np.flatnonzero(order == 0)[0]))


def make_questions(info: SampleTruth, pools: Pools, seed: int = 0, max_options: int = 4,
                   subtasks: Sequence[str] = SUBTASKS) -> tuple[list[Question], list[str]]:
    """The questions the labels allow about one sample.

    Args:
        info: the sample's labels.
        pools: the label sets of the evaluated view.
        seed: seed of the draws (with the sample id and the subtask).
        max_options: the most options per question (distractors = ``max_options - 1`` where the pool allows).
        subtasks: the subtasks to ask.

    Returns:
        ``(questions, skipped)``: the questions in :data:`SUBTASKS` order, and one reason per subtask left out
        (``"defect classification: one defect type in class 'screw'"``...).
    """
    questions, skipped = [], []
    if info.anomalous is None:
        return [], ["no ground truth"]
    if DISCRIMINATION in subtasks:
        questions.append(_question(DISCRIMINATION, "Yes" if info.anomalous else "No", ["Yes", "No"],
                                   _rng(seed, info.id, DISCRIMINATION), 2))
    if DEFECT_CLASSIFICATION in subtasks and info.anomalous:
        pool = pools.defects.get(info.cls, [])
        if info.defect is None:
            skipped.append(f"{DEFECT_CLASSIFICATION}: anomalous sample without a defect type")
        elif len(set(pool) | {info.defect}) < 2:
            where = f" in class {info.cls!r}" if info.cls is not None else ""
            skipped.append(f"{DEFECT_CLASSIFICATION}: one defect type{where}")
        else:
            questions.append(_question(DEFECT_CLASSIFICATION, info.defect, pool,
                                       _rng(seed, info.id, DEFECT_CLASSIFICATION), max_options))
    if LOCALIZATION in subtasks and info.anomalous:
        cells = None if info.cells is None else np.asarray(info.cells, dtype=float)
        if cells is None or not (cells > 0).any():
            skipped.append(f"{LOCALIZATION}: anomalous sample without a mask or boxes")
        elif (cells > 0).all():
            skipped.append(f"{LOCALIZATION}: the defect covers every grid cell")
        else:
            truth = GRID[int(np.argmax(cells))]
            free = [GRID[i] for i in range(len(GRID)) if cells[i] <= 0]
            questions.append(_question(LOCALIZATION, truth, free, _rng(seed, info.id, LOCALIZATION), max_options))
    if OBJECT_CLASSIFICATION in subtasks and info.cls is not None and len(pools.classes) >= 2:
        questions.append(_question(OBJECT_CLASSIFICATION, str(info.cls), [str(c) for c in pools.classes],
                                   _rng(seed, info.id, OBJECT_CLASSIFICATION), max_options))
    return questions, skipped


def cells_of_mask(mask: np.ndarray | None) -> list[float] | None:
    """The share of a boolean mask's foreground in each 3x3 grid cell (row-major), None without a mask."""
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    total = mask.sum()
    if total == 0:
        return [0.0] * 9
    rows = np.array_split(np.arange(mask.shape[0]), 3)
    cols = np.array_split(np.arange(mask.shape[1]), 3)
    return [float(mask[np.ix_(r, c)].sum() / total) for r in rows for c in cols]


def cells_of_boxes(boxes: Iterable[Sequence[float]]) -> list[float] | None:
    """The share of boxes' area (relative ``[x, y, w, h]``, FiftyOne's) in each 3x3 grid cell, None without boxes."""
    out = np.zeros(9)
    any_box = False
    for x, y, w, h in boxes:
        any_box = True
        for i in range(9):
            r, c = divmod(i, 3)
            ox = max(0.0, min(x + w, (c + 1) / 3) - max(x, c / 3))
            oy = max(0.0, min(y + h, (r + 1) / 3) - max(y, r / 3))
            out[i] += ox * oy
    if not any_box:
        return None
    total = out.sum()
    return (out / total).tolist() if total > 0 else out.tolist()


def parse_choice(text: str, letters: Sequence[str]) -> str | None:
    """The option letter an answer text names: the first standalone capital letter among ``letters``
    (``"B"``, ``"B. No"``, ``"Answer: B."``), as MMAD reads answers; None when it names none."""
    for match in re.finditer(r"\b([A-Z])\b", text or ""):
        if match.group(1) in letters:
            return match.group(1)
    return None


def choose(option_probs: dict[str, float] | None, text: str, letters: Sequence[str]) -> tuple[str | None, bool]:
    """``(letter, from_text)``: the most probable option letter, or, without probabilities, the letter parsed
    from the text (:func:`parse_choice`; ``from_text`` True)."""
    if option_probs:
        return max(letters, key=lambda letter: option_probs.get(letter, 0.0)), False
    return parse_choice(text, letters), True


def interval(correct: int, n: int, method: str) -> list[float]:
    """95 % confidence interval of an accuracy: ``"wilson"`` or ``"exact"`` (Clopper-Pearson), from scipy."""
    if n == 0:
        return [0.0, 1.0]
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=0.95, method=method)
    return [float(ci.low), float(ci.high)]


def accuracy_rows(records: Iterable[dict[str, Any]], variants: Sequence[str], by: str | None = None
                  ) -> list[dict[str, Any]]:
    """Accuracy per (subtask, variant) — and per ``records[by]`` value when given — with both intervals.

    Args:
        records: one dict per answer: ``subtask``, ``variant``, ``correct`` (bool), ``from_text`` (bool),
            ``choice`` (None: no option read), and ``by``'s key.
        variants: the variants, in the order given.
        by: an extra grouping key (``"cls"``), or None.

    Returns:
        Rows ``{subtask, variant, [by], n, correct, accuracy, wilson, clopper_pearson, from_text, unanswered}``
        in subtask order, then variant order.
    """
    groups: dict[tuple, list[int]] = {}
    for r in records:
        g = (r.get(by) if by else None, r["subtask"], r["variant"])
        counts = groups.setdefault(g, [0, 0, 0, 0])
        counts[0] += 1
        counts[1] += bool(r["correct"])
        counts[2] += bool(r["from_text"])
        counts[3] += r["choice"] is None
    order = {s: i for i, s in enumerate(SUBTASKS)}
    vorder = {v: i for i, v in enumerate(variants)}
    rows = []
    for (grp, subtask, variant), (n, k, from_text, unanswered) in sorted(
            groups.items(), key=lambda kv: (str(kv[0][0]), order.get(kv[0][1], 99), vorder.get(kv[0][2], 99))):
        row = {"subtask": subtask, "variant": variant, "n": n, "correct": k, "accuracy": k / n,
               "wilson": interval(k, n, "wilson"), "clopper_pearson": interval(k, n, "exact"),
               "from_text": from_text, "unanswered": unanswered}
        if by:
            row[by] = grp
        rows.append(row)
    return rows


#: the judge prompt parts a variant may set, and their value when a variant does not
VARIANT_DEFAULTS: dict[str, Any] = {"crops": 0, "reference": None, "knowledge": None, "use_expert_verdict": False}


def complete_variants(variants: Mapping[str, Mapping[str, Any]], expert: str | None) -> dict[str, dict[str, Any]]:
    """Every variant with all its prompt parts named (those it does not set: off, see :data:`VARIANT_DEFAULTS`).

    Raises:
        ValueError: no variant, a name that is not a non-empty string, an unknown part, or crops / the expert's
            verdict without an ``expert``.
    """
    if not isinstance(variants, Mapping) or not variants:
        raise ValueError("variants must be a non-empty dict {name: judge prompt parts}, e.g. {'plain': {}, "
                         "'ref': {'reference': 'auto'}}")
    out = {}
    for name, parts in variants.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"variant names must be non-empty strings, got {name!r}")
        if not isinstance(parts, Mapping):
            raise ValueError(f"variant {name!r} must be a dict of judge prompt parts, got {type(parts).__name__}")
        unknown = sorted(set(parts) - set(VARIANT_DEFAULTS))
        if unknown:
            raise ValueError(f"variant {name!r} sets {unknown}; a variant may set {sorted(VARIANT_DEFAULTS)}")
        full = {**VARIANT_DEFAULTS, **dict(parts)}
        if expert is None and (full["crops"] or full["use_expert_verdict"]):
            raise ValueError(f"variant {name!r} uses expert crops or the expert's verdict: pass expert=<scoring run>")
        if isinstance(full["knowledge"], Mapping):
            full["knowledge"] = {str(k): str(v) for k, v in full["knowledge"].items()}
        out[name] = full
    return out
