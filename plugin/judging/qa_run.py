"""``evaluate_judge()``: which VLM and which prompt parts answer best, MMAD-style, on the user's own labels.

Multiple-choice questions are made from the dataset's labels (:mod:`.qa`: anomaly discrimination, defect
classification, defect localization, object classification), asked once per prompt *variant* (a set of the
judge's prompt parts: expert crops, reference image, knowledge, the expert's verdict in words), through the
same prompt the judge builds (:meth:`~.job.JudgeJob.request`) with the multiple-choice question in place of
the yes/no one. The answer is the option letter with the highest first-token probability, read the way the
judge reads P(yes), so no answer is unparsed (a server without logprobs: parsed from the text and marked).

Each answer is stored on its sample in ``<key>`` (``fo.Classifications``, see
:class:`~fiftyone_anomaly_vlm.fields.JudgeQAFieldNames`), so wrong answers can be browsed in the App::

    ds.filter_labels("qa", (F("subtask") == "defect localization") & (F("correct") == False))

and the evaluation is a recorded run (:class:`~fiftyone_anomaly_vlm.runs.JudgeEvalRunConfig`) whose results
are the report (:class:`~fiftyone_anomaly_vlm.runs.JudgeEvalRunResults`): ``dataset.load_run_results(key)``
gives it back, ``dataset.delete_run(key)`` removes it and its field.

Example:
    >>> report = fav.evaluate_judge(ds.match_tags("val"), backend=backend, expert="padim", key="qa",
    ...                             gt_field="ground_truth", defect_field="defect_type",
    ...                             mask_field="ground_truth_mask",
    ...                             variants={"plain": {}, "crops": {"crops": 3}, "ref": {"reference": "auto"}})
    >>> print(report.table())
    >>> fav.judge(ds, key="vlm", backend=backend, expert="padim", **report.best_variant("defect classification"))
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fiftyone as fo

from ..engine import BatchOutput, Job, RunStats, check_collection, check_key, check_positive_int, record_run, run_job
from ..fields import JudgeQAFieldNames
from ..ground_truth import field_kind, gt_labels, read_mask
from ..models.judge.base import JudgeBackend, JudgeRequest
from ..runs import SCORE_METHOD
from ..runs.judge_eval import JUDGE_EVAL_METHOD, JudgeEvalRunConfig, JudgeEvalRunResults
from .job import JudgeJob, describe_backend
from .prompt import SYSTEM
from .qa import (DEFECT_CLASSIFICATION, OBJECT_CLASSIFICATION, SUBTASKS, Pools, SampleTruth, accuracy_rows,
                 cells_of_boxes, cells_of_mask, choose, complete_variants, make_questions)
from .references import class_path, class_value

logger = logging.getLogger(__name__)

_PLACEHOLDER = "\x00QUESTION\x00"


def _mask_kind(dataset, mask_field: str) -> str:
    f = dataset.get_field_schema().get(mask_field)
    if f is None:
        raise ValueError(f"unknown mask_field {mask_field!r}; the dataset's fields are "
                         f"{sorted(dataset.get_field_schema())}")
    doc = getattr(f, "document_type", None)
    if doc is not None and issubclass(doc, fo.Segmentation):
        return "mask"
    if doc is not None and issubclass(doc, fo.Detections):
        return "boxes"
    raise ValueError(f"mask_field {mask_field!r} must hold fo.Segmentation masks or fo.Detections boxes")


class EvaluateJudgeJob(Job):
    """A judge evaluation for the :mod:`engine <fiftyone_anomaly_vlm.engine>`; arguments as
    :func:`evaluate_judge` (checked there). The question pools (defect types per class, classes) come from
    the whole evaluated view, so the questions of a sample do not depend on the batch it falls in."""

    verb = "evaluate_judge"
    method = JUDGE_EVAL_METHOD

    def __init__(self, samples, key: str, backend: JudgeBackend, *, variants: dict[str, dict[str, Any]],
                 gt_field: str, positive: str, defect_field: str | None, mask_field: str | None,
                 class_field: str | None, expert: str | None, subtasks: tuple[str, ...], seed: int,
                 max_options: int, batch_size: int, max_new_tokens: int, system: str) -> None:
        dataset = samples._root_dataset
        self.key, self.backend, self.expert, self.variants = key, backend, expert, variants
        self.names = JudgeQAFieldNames(key)
        self.fields = self.names.specs()
        self.error_field, self.done_field = self.names.error, self.names.answers
        self.gt_field, self.positive, self.defect_field = gt_field, positive, defect_field
        self.mask_field, self.class_field, self.subtasks = mask_field, class_field, tuple(subtasks)
        self.seed, self.max_options, self.batch_size = int(seed), int(max_options), int(batch_size)
        self.max_new_tokens, self.system = int(max_new_tokens), system
        self.prefetch = 0 if str(getattr(backend, "device", "")) == "cpu" else 1
        self.description = describe_backend(backend)
        self.jobs = {name: JudgeJob(samples, key, backend, expert=expert, class_field=class_field, batch_size=1,
                                    max_new_tokens=max_new_tokens, system=system, prefetch=0, **parts)
                     for name, parts in variants.items()}
        self.gt_kind = field_kind(dataset, gt_field, "ground-truth")
        self.paths: dict[str, str] = {}
        for job in self.jobs.values():
            self.paths.update(job.paths)
        self.paths["gt"] = f"{gt_field}.label" if self.gt_kind == "classification" else gt_field
        if defect_field:
            kind = field_kind(dataset, defect_field, "defect")
            self.paths["defect"] = f"{defect_field}.label" if kind == "classification" else defect_field
        self.mask_kind = _mask_kind(dataset, mask_field) if mask_field else None
        if mask_field:
            self.paths["mask"] = mask_field if self.mask_kind == "mask" else f"{mask_field}.detections.bounding_box"
        if class_field:
            self.paths["cls"] = class_path(dataset, class_field)
        self.pools, self.notes = self._pools(samples)
        self.results: JudgeEvalRunResults | None = None

    # --- labels ---------------------------------------------------------------------------------------------
    def _anomalous(self, value: Any) -> bool | None:
        if self.gt_kind == "mask":
            m = read_mask(value)
            return bool(m is not None and m.any())
        if value is None:
            return None
        return bool(gt_labels(self.gt_kind, [value], self.positive, 0.5)[0])

    def _pools(self, samples) -> tuple[Pools, list[str]]:
        """Defect types per class and the classes, from the whole view; what cannot be asked, said once."""
        cols = ["gt"] + [c for c in ("defect", "cls") if c in self.paths]
        vals = dict(zip(cols, samples.values([self.paths[c] for c in cols])))
        vals["gt"] = [self._anomalous(v) for v in vals["gt"]]
        n = len(vals["gt"])
        classes = vals.get("cls", [None] * n)
        defects: dict[Any, set[str]] = {}
        for gt, d, c in zip(vals["gt"], vals.get("defect", [None] * n), classes):
            if gt and d is not None and str(d) != "":
                defects.setdefault(class_value(c), set()).add(str(d))
        pools = Pools(defects={c: sorted(v) for c, v in defects.items()},
                      classes=sorted({class_value(c) for c in classes if c is not None}, key=str))
        notes = []
        if DEFECT_CLASSIFICATION in self.subtasks:
            if self.defect_field is None or not defects:
                notes.append("no defect types" + (f" in '{self.defect_field}'" if self.defect_field else "")
                             + ": no defect classification questions")
            else:
                single = [c for c, v in defects.items() if len(v) < 2]
                if single:
                    what = (f"class{'es' if len(single) > 1 else ''} {', '.join(map(repr, map(str, single)))}"
                            if self.class_field else "the dataset")
                    notes.append(f"one defect type in {what}: no defect classification questions there")
        if self.mask_field is None and "defect localization" in self.subtasks:
            notes.append("no mask_field: no defect localization questions")
        if OBJECT_CLASSIFICATION in self.subtasks and self.class_field and len(pools.classes) < 2:
            notes.append("one product class: no object classification questions")
        for note in notes:
            logger.warning("evaluate_judge: %s", note)
        return pools, notes

    def truth(self, row: dict[str, Any]) -> SampleTruth:
        """What the labels say about one sample (its mask read here)."""
        cells = None
        if self.mask_kind == "mask" and row.get("mask") is not None:
            cells = cells_of_mask(read_mask(row["mask"]))
        elif self.mask_kind == "boxes" and row.get("mask"):
            cells = cells_of_boxes(row["mask"])
        defect = row.get("defect")
        return SampleTruth(row["id"], self._anomalous(row.get("gt")), None if defect in (None, "") else str(defect),
                           class_value(row.get("cls")), cells)

    # --- what the run is ------------------------------------------------------------------------------------
    def identity(self, config) -> Any:
        """The model, the variants, the seed and the subtasks: answers to other questions are not mixed."""
        backend = config.backend or {}
        return json.dumps([backend.get("model"), config.variants, config.seed, list(config.subtasks)],
                          sort_keys=True, default=str)

    def describe_identity(self, config) -> str:
        return f"model {(config.backend or {}).get('model')!r} with variants {sorted(config.variants)}"

    def config(self) -> JudgeEvalRunConfig:
        return JudgeEvalRunConfig(
            backend=self.description, expert=self.expert, variants=self.variants, gt_field=self.gt_field,
            positive=self.positive, defect_field=self.defect_field, mask_field=self.mask_field,
            class_field=self.class_field, subtasks=list(self.subtasks), seed=self.seed, max_options=self.max_options,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, fields=self.names.all())

    # --- one batch ------------------------------------------------------------------------------------------
    #: the judge's: read ``self.paths``, cut into lists of ``batch_size`` row dicts
    columns = JudgeJob.columns
    batches = JudgeJob.batches

    def prepare(self, rows: list[dict[str, Any]]) -> _QABatch:
        """Questions made, one request per (question, variant) through the judge's own prompt, backend CPU work."""
        batch = _QABatch(rows=rows)
        for row in rows:
            sid = row["id"]
            try:
                questions, skipped = make_questions(self.truth(row), self.pools, self.seed, self.max_options,
                                                    self.subtasks)
                batch.counts.update(skipped)
                batch.questions[sid] = questions
                for name, job in self.jobs.items():
                    base = job.request(row, {}, question=_PLACEHOLDER)
                    for qi, q in enumerate(questions):
                        batch.requests.append(JudgeRequest(
                            images=base.images, user=base.user.replace(_PLACEHOLDER, q.prompt()), system=base.system,
                            max_new_tokens=self.max_new_tokens, options=q.letters,
                            meta={"id": sid, "q": qi, "variant": name}))
            except Exception as exc:  # noqa: BLE001 - one sample's problem
                batch.failed[sid] = f"{type(exc).__name__}: {exc}"
                batch.questions.pop(sid, None)
        batch.requests = [r for r in batch.requests if r.meta["id"] not in batch.failed]
        if batch.requests:
            batch.prepared = self.backend.prepare(batch.requests)
        return batch

    def compute(self, batch: _QABatch) -> BatchOutput:
        """The answers read (argmax of the option letters' probabilities, else parsed from text), one
        ``fo.Classification`` per question and variant."""
        answers = self.backend.judge_prepared(batch.prepared) if batch.requests else []
        out = BatchOutput(errors=dict(batch.failed), size=len(batch.rows), counts=batch.counts)
        labels: dict[str, list[fo.Classification]] = {sid: [] for sid in batch.questions}
        for req, ans in zip(batch.requests, answers):
            sid, q = req.meta["id"], batch.questions[req.meta["id"]][req.meta["q"]]
            letters = q.letters
            attrs = dict(subtask=q.subtask, variant=req.meta["variant"], question=q.text,
                         options=[f"{lt}. {o}" for lt, o in zip(letters, q.options)], truth=letters[q.answer],
                         truth_label=q.options[q.answer])
            if ans.error is not None:
                labels[sid].append(fo.Classification(label=None, choice=None, correct=False, from_text=False,
                                                     error=ans.error, **attrs))
                out.counts["errors"] += 1
                continue
            letter, from_text = choose(ans.option_probs, ans.text, letters)
            probs = [float(ans.option_probs[lt]) for lt in letters] if ans.option_probs else None
            labels[sid].append(fo.Classification(
                label=q.options[letters.index(letter)] if letter else None,
                confidence=probs[letters.index(letter)] if probs and letter else None,
                choice=letter, correct=letter == letters[q.answer], probs=probs, option_mass=ans.option_mass,
                from_text=from_text, answer_text=ans.text, error=None, **attrs))
            out.counts["from_text"] += from_text
            out.counts["questions"] += 1
        f = self.names
        out.values = {f.answers: {sid: fo.Classifications(classifications=v) for sid, v in labels.items()},
                      f.error: dict.fromkeys(labels)}
        return out

    def finish(self, samples, stats: RunStats) -> None:
        """The report over every answer stored for the view (this call's and resumed ones), recorded as the
        run's results."""
        names = ("subtask", "variant", "correct", "from_text", "choice")
        path = f"{self.names.answers}.classifications"
        values = samples.values([f"{path}.{n}" for n in names] + ([self.paths["cls"]] if "cls" in self.paths else []))
        classes = values[len(names)] if "cls" in self.paths else [None] * len(values[0])
        records = []
        for i, cls in enumerate(classes):
            for subtask, variant, correct, from_text, choice in zip(*(values[j][i] or [] for j in range(len(names)))):
                if subtask in self.subtasks and variant in self.variants:
                    records.append({"subtask": subtask, "variant": variant, "correct": bool(correct),
                                    "from_text": bool(from_text), "choice": choice,
                                    "cls": None if cls is None else str(class_value(cls))})
        variants = list(self.variants)
        counts = {k: int(v) for k, v in stats.counts.items()}
        notes = list(self.notes)
        if counts.get("from_text"):
            notes.append(f"{counts['from_text']} answers were parsed from the text (the backend gave no letter "
                         "probabilities)")
        config = self.config()
        self.results = JudgeEvalRunResults(
            samples._root_dataset, config, self.key, rows=accuracy_rows(records, variants),
            per_class=accuracy_rows(records, variants, by="cls") if self.class_field else [],
            variants=self.variants, notes=notes, counts=counts)
        record_run(samples._root_dataset, self.key, config, self.results)


@dataclass
class _QABatch:
    rows: list[dict[str, Any]]
    questions: dict[str, list] = field(default_factory=dict)
    requests: list[JudgeRequest] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    prepared: Any = None


def evaluate_judge(
    samples,
    *,
    backend: JudgeBackend,
    key: str = "judge_eval",
    gt_field: str = "ground_truth",
    positive: str = "anomalous",
    defect_field: str | None = None,
    mask_field: str | None = None,
    class_field: str | None = None,
    expert: str | None = None,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    subtasks: tuple[str, ...] | list[str] = SUBTASKS,
    seed: int = 0,
    max_options: int = 4,
    batch_size: int = 4,
    max_new_tokens: int = 8,
    system: str = SYSTEM,
    overwrite: bool = False,
    progress: bool | Any = None,
) -> JudgeEvalRunResults:
    """Ask a VLM MMAD-style multiple-choice questions made from ``samples``' labels, once per prompt variant,
    and report accuracy per subtask and variant (and per class) with 95 % intervals; record the run ``key``.

    Args:
        samples: a labelled dataset or view of images (e.g. ``ds.match_tags("val")``).
        backend: a :class:`~fiftyone_anomaly_vlm.models.judge.JudgeBackend` (see ``make_backend``).
        key: run key and name of the answers field (``fo.Classifications``, one per question and variant).
        gt_field: anomalous/normal ground truth (``fo.Classification``, string, boolean, probability or a
            ``fo.Segmentation`` mask).
        positive: the ground-truth label meaning anomalous.
        defect_field: defect type per sample (``fo.Classification`` or string); None: no defect classification.
        mask_field: ground-truth ``fo.Segmentation`` masks or ``fo.Detections`` boxes; None: no localization.
        class_field: product class (``fo.Classification`` or string); object classification questions, and
            distractor defect types drawn within the class.
        expert: a scoring run (:func:`score`) whose maps give the crops and scores the verdict in words.
        variants: name -> judge prompt parts (``crops``, ``reference``, ``knowledge``, ``use_expert_verdict``,
            as :func:`judge` takes them); a part a variant does not set is off. Default ``{"plain": {}}``.
        subtasks: which of :data:`~.qa.SUBTASKS` to ask.
        seed: seed of the distractors and option orders (with each sample id: the same questions every call).
        max_options: the most options per question (2 to 10).
        batch_size: samples per batch (one backend request per question and variant).
        max_new_tokens: generation budget per answer (the answer is read from the first token; the text is
            only needed where a server gives no logprobs).
        system: the system text.
        overwrite: ask again on samples already answered under ``key``; by default they are kept (resume)
            and the report counts every stored answer of the view.
        progress: FiftyOne progress convention.

    Returns:
        The report (:class:`~fiftyone_anomaly_vlm.runs.JudgeEvalRunResults`): ``.table()``, ``.summary()``,
        ``.winner(subtask)``, ``.best_variant(subtask)`` (judge keyword arguments), ``.rows``, ``.per_class``.

    Raises:
        ValueError: empty view, bad key, unknown fields or subtasks, bad variants, an expert that is not a
            scoring run, a key held by another kind of run or other questions (without ``overwrite``).
        TypeError: ``backend`` is not a ``JudgeBackend``.
        BackendUnavailable: the backend's pre-check failed; nothing recorded.
    """
    check_collection(samples, "evaluate_judge")
    key = check_key(key)
    batch_size = check_positive_int("batch_size", batch_size)
    check_positive_int("max_new_tokens", max_new_tokens)
    if not isinstance(backend, JudgeBackend):
        raise TypeError(f"backend must be a JudgeBackend (see make_backend), got {type(backend).__name__}")
    if isinstance(max_options, bool) or not isinstance(max_options, int) or not 2 <= max_options <= 10:
        raise ValueError(f"max_options must be a whole number from 2 to 10, got {max_options!r}")
    subtasks = tuple(subtasks)
    unknown = [s for s in subtasks if s not in SUBTASKS]
    if unknown or not subtasks:
        raise ValueError(f"unknown subtasks {unknown}; choose from {list(SUBTASKS)}")
    dataset = samples._root_dataset
    schema = dataset.get_field_schema()
    for name, value in (("defect_field", defect_field), ("class_field", class_field)):
        if value is not None and value not in schema:
            raise ValueError(f"{name} {value!r} is not a field of this dataset; its fields are {sorted(schema)}")
    if expert is not None and (expert not in dataset.list_runs()
                               or dataset.get_run_info(expert).config.method != SCORE_METHOD):
        raise ValueError(f"expert {expert!r} is not a scoring run on this dataset; run fav.score first")
    if expert is not None and expert == key:
        raise ValueError("the evaluation needs its own key (not the expert's)")
    full = complete_variants(variants if variants is not None else {"plain": {}}, expert)
    job = EvaluateJudgeJob(samples, key, backend, variants=full, gt_field=gt_field, positive=positive,
                           defect_field=defect_field, mask_field=mask_field, class_field=class_field, expert=expert,
                           subtasks=subtasks, seed=seed, max_options=max_options, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, system=system)
    backend.check()
    run_job(samples, job, key, overwrite=overwrite, progress=progress)
    return job.results
