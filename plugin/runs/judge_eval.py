"""The record of a judge evaluation (:func:`fiftyone_anomaly_vlm.evaluate_judge`): MMAD-style multiple-choice
questions asked with several prompt variants; its results are the report (accuracy per subtask and variant,
per class, with confidence intervals).

Example:
    >>> report = dataset.load_run_results("qa")      # a JudgeEvalRunResults
    >>> print(report.table())
    >>> fav.judge(ds, key="vlm", backend=backend, expert="padim", **report.best_variant("defect classification"))
"""

from __future__ import annotations

from typing import Any

import fiftyone.core.runs as fors

from ..fields import JudgeQAFieldNames
from .base import AnomalyRunConfig, FieldsRun

JUDGE_EVAL_METHOD = "judge_evaluation"


class JudgeEvalRunConfig(AnomalyRunConfig):
    """Config of a judge evaluation.

    Args:
        backend: the backend's description (kind, model, revision; never secrets).
        expert: the scoring run whose maps/scores the variants may use (None: none).
        variants: variant name -> the judge keyword arguments it stands for (``crops``, ``reference``,
            ``knowledge``, ``use_expert_verdict``), complete (every part named, off when not switched on).
        gt_field: the anomalous/normal ground truth.
        positive: the ground-truth label meaning anomalous.
        defect_field: the defect type field (None: no defect classification questions).
        mask_field: ground-truth masks or boxes (None: no localization questions).
        class_field: the product class (None: no object classification questions).
        subtasks: the subtasks asked.
        seed: seed of the distractor draws and option orders.
        max_options: the most options per question.
        max_new_tokens: generation budget per answer (the answer is read from the first token).
        batch_size: samples per batch (each gives one request per question and variant).
        fields: the fields written.
        **legacy: parameters of earlier releases.
    """

    METHOD = JUDGE_EVAL_METHOD

    def __init__(self, backend: dict[str, Any] | None = None, expert: str | None = None,
                 variants: dict[str, dict[str, Any]] | None = None, gt_field: str | None = None,
                 positive: str | None = None, defect_field: str | None = None, mask_field: str | None = None,
                 class_field: str | None = None, subtasks: list[str] | None = None, seed: int = 0,
                 max_options: int = 4, max_new_tokens: int | None = None, batch_size: int | None = None,
                 fields: list[str] | None = None, **legacy: Any) -> None:
        self.backend, self.expert = dict(backend or {}), expert
        self.variants = {k: dict(v) for k, v in (variants or {}).items()}
        self.gt_field, self.positive, self.defect_field = gt_field, positive, defect_field
        self.mask_field, self.class_field = mask_field, class_field
        self.subtasks, self.seed, self.max_options = list(subtasks or []), seed, max_options
        self.max_new_tokens, self.batch_size, self.fields = max_new_tokens, batch_size, fields
        super().__init__(**legacy)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


class JudgeEvalRunResults(fors.RunResults):
    """The report of a judge evaluation (what :func:`~fiftyone_anomaly_vlm.evaluate_judge` returns and
    ``dataset.load_run_results(key)`` loads).

    Attributes:
        rows: one dict per (subtask, variant): ``subtask``, ``variant``, ``n`` (questions), ``correct``,
            ``accuracy``, ``wilson`` and ``clopper_pearson`` (95 % intervals ``[lo, hi]``), ``from_text``
            (answers parsed from text: no letter probabilities), ``unanswered`` (no option read at all).
        per_class: the same per product class (key ``cls``), with a class field.
        variants: variant name -> complete judge keyword arguments.
        notes: what was not asked and why (said once each).
        counts: questions made per subtask and questions left out per reason.
    """

    def __init__(self, samples, config, key, backend=None, rows=None, per_class=None, variants=None, notes=None,
                 counts=None, **kwargs: Any) -> None:
        super().__init__(samples, config, key, backend=backend, rows=list(rows or []),
                         per_class=list(per_class or []), variants=dict(variants or {}), notes=list(notes or []),
                         counts=dict(counts or {}), **kwargs)

    def get_meta(self) -> dict[str, Any]:
        """Questions answered, stored beside the results."""
        return {"num_answers": sum(r["n"] for r in self.rows)}

    # --- reading the report ---------------------------------------------------------------------------
    def subtasks(self) -> list[str]:
        """The subtasks with at least one question, in the order asked."""
        return list(dict.fromkeys(r["subtask"] for r in self.rows if r["n"]))

    def row(self, subtask: str, variant: str) -> dict[str, Any] | None:
        """The row of one (subtask, variant), or None."""
        return next((r for r in self.rows if r["subtask"] == subtask and r["variant"] == variant), None)

    def ranking(self, subtask: str) -> list[dict[str, Any]]:
        """The variants' rows of ``subtask``, best accuracy first (ties keep the order the variants were given).

        Raises:
            ValueError: no question of that subtask was answered.
        """
        rows = [r for r in self.rows if r["subtask"] == subtask and r["n"]]
        if not rows:
            raise ValueError(f"no {subtask!r} questions in this report; it has {self.subtasks()}")
        order = list(self.variants)
        return sorted(rows, key=lambda r: (-r["accuracy"], order.index(r["variant"])
                                           if r["variant"] in order else len(order)))

    def winner(self, subtask: str) -> dict[str, Any]:
        """Which variant won ``subtask`` and by how much: ``variant``, ``accuracy``, ``interval`` (Wilson 95 %),
        ``runner_up``, ``margin`` (accuracy points over it) and ``clear`` (the two intervals do not overlap)."""
        ranked = self.ranking(subtask)
        best = ranked[0]
        out = {"subtask": subtask, "variant": best["variant"], "accuracy": best["accuracy"], "n": best["n"],
               "interval": best["wilson"], "runner_up": None, "margin": None, "clear": None}
        if len(ranked) > 1:
            second = ranked[1]
            out.update(runner_up=second["variant"], margin=best["accuracy"] - second["accuracy"],
                       clear=best["wilson"][0] > second["wilson"][1])
        return out

    def best_variant(self, subtask: str) -> dict[str, Any]:
        """The judge keyword arguments of the variant that answered ``subtask`` best (see :meth:`winner`), to
        pass on: ``fav.judge(ds, ..., **report.best_variant("defect classification"))``."""
        return dict(self.variants[self.winner(subtask)["variant"]])

    def summary(self) -> str:
        """One line per subtask: the winning variant, its accuracy with interval, and its margin."""
        lines = []
        for subtask in self.subtasks():
            w = self.winner(subtask)
            lo, hi = w["interval"]
            line = f"{subtask}: '{w['variant']}' {_pct(w['accuracy'])} % [{_pct(lo)}, {_pct(hi)}] (n={w['n']})"
            if w["runner_up"] is not None:
                line += (f", +{100 * w['margin']:.1f} points over '{w['runner_up']}'"
                         + ("" if w["clear"] else " (intervals overlap: not a clear win)"))
            lines.append(line)
        return "\n".join(lines)

    def table(self, by_class: bool = False) -> str:
        """Subtask x variant accuracy (%) with the Wilson 95 % interval and the question count, as a markdown
        table (one column per variant); ``by_class``: one block of rows per product class."""
        variants = list(self.variants) or list(dict.fromkeys(r["variant"] for r in self.rows))
        head = ["| subtask |" + "".join(f" {v} |" for v in variants), "|---|" + "---|" * len(variants)]
        blocks = []
        groups = ([(None, self.rows)] if not by_class else
                  [(c, [r for r in self.per_class if r["cls"] == c])
                   for c in dict.fromkeys(r["cls"] for r in self.per_class)])
        for cls, rows in groups:
            lines = list(head)
            for subtask in dict.fromkeys(r["subtask"] for r in rows if r["n"]):
                cells = []
                for v in variants:
                    r = next((x for x in rows if x["subtask"] == subtask and x["variant"] == v), None)
                    if r is None or not r["n"]:
                        cells.append("—")
                        continue
                    lo, hi = r["wilson"]
                    flag = f", {r['from_text']} from text" if r["from_text"] else ""
                    cells.append(f"{_pct(r['accuracy'])} [{_pct(lo)}, {_pct(hi)}] ({r['correct']}/{r['n']}{flag})")
                lines.append(f"| {subtask} |" + "".join(f" {c} |" for c in cells))
            blocks.append(("" if cls is None else f"**{cls}**\n\n") + "\n".join(lines))
        return "\n\n".join(blocks)

    def markdown(self) -> str:
        """The report for the review panel: the table, the winners and the notes."""
        parts = [f"**Judge evaluation `{self.key}`** (accuracy %, Wilson 95 % interval, correct/asked)", "",
                 self.table(), "", self.summary().replace("\n", "  \n")]
        if self.notes:
            parts += ["", "  \n".join(f"*{n}*" for n in self.notes)]
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.table()


class JudgeEvalRun(FieldsRun):
    """A judge evaluation; its fields are :class:`~fiftyone_anomaly_vlm.fields.JudgeQAFieldNames` of the key."""

    FIELD_NAMES = JudgeQAFieldNames
