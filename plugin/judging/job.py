"""What a judge run is, for the :mod:`engine <fiftyone_anomaly_vlm.engine>`: one batch of samples becomes
requests (image read, expert crops cut, reference chosen, the backend's CPU work), is answered by the
backend, and its answers are parsed into the run's fields.

Example:
    >>> job = JudgeJob(view, "vlm", backend, expert="padim", reference="auto", crops=3, batch_size=8)
    >>> stats = run_job(view, job, "vlm")
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

import fiftyone as fo

from ..engine import BatchOutput, Job, RunStats
from ..fields import FieldNames, JudgeFieldNames
from ..labels import ANOMALOUS, UNPARSED, anomaly_label
from ..models.judge import BACKENDS, make_backend
from ..models.judge.base import JudgeBackend, JudgeRequest
from ..models.judge.hf import prepare_image
from ..runs import JUDGE_METHOD, SCORE_METHOD, JudgeRunConfig, run_method
from ..storage import local_path
from .fusion import fuse_scores
from .parse import parse_answer
from .prompt import QUESTION, SYSTEM, VERDICT_WORDS, build_request, expert_verdict_words, knowledge_for
from .references import References, class_path
from .regions import CROP_FRACTION, expert_crops, region_crops

_SECRET_WORDS = ("key", "token", "secret", "password", "authorization")


def describe_backend(backend: JudgeBackend) -> dict[str, Any]:
    """The backend's description for a run config (model, revision...), without anything that looks like a
    credential (keys naming a key, token, secret, password or authorization; ``api_key_env`` is kept)."""
    desc = dict(backend.describe() or {})
    return {k: v for k, v in desc.items() if not any(w in k.lower() for w in _SECRET_WORDS) or k == "api_key_env"}


def backend_spec(backend: JudgeBackend | Mapping[str, Any]) -> dict[str, Any]:
    """What a worker builds ``backend`` from (``make_backend``'s arguments, ``name`` included): the dict given,
    or a built backend's :meth:`~fiftyone_anomaly_vlm.models.judge.JudgeBackend.spec`.

    Raises:
        TypeError: neither a ``JudgeBackend`` nor a dict.
        ValueError: an unknown backend name, or a backend that cannot be rebuilt elsewhere.
    """
    if isinstance(backend, JudgeBackend):
        return backend.spec()
    if not isinstance(backend, Mapping):
        raise TypeError(f"backend must be a JudgeBackend (see make_backend) or make_backend's arguments as a dict, "
                        f"got {type(backend).__name__}")
    spec = dict(backend)
    if spec.get("name") not in BACKENDS:
        raise ValueError(f"backend dict needs 'name': one of {list(BACKENDS)}, got {spec.get('name')!r}")
    if spec.get("api_key") is not None:
        raise ValueError("backend dict: pass api_key_env (the environment variable or FiftyOne secret holding the "
                         "key where the workers run), not api_key: the dict is stored with the operations")
    return spec


def build_backend(backend: JudgeBackend | Mapping[str, Any]) -> JudgeBackend:
    """``backend`` itself, or the backend ``make_backend`` builds from a dict of its arguments (``name`` included).

    Raises:
        TypeError, ValueError: as :func:`backend_spec`.
    """
    if isinstance(backend, JudgeBackend):
        return backend
    spec = backend_spec(backend)
    return make_backend(spec.pop("name"), **spec)


def load_rgb(path: str) -> Image.Image:
    """An image file decoded for a VLM: RGB; 16-bit and float images rescaled to 8 bits first."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return prepare_image(im)
        return im.convert("RGB")


@dataclass
class _Batch:
    """One batch of samples on its way to the backend."""

    rows: list[dict[str, Any]]
    requests: list[JudgeRequest] = field(default_factory=list)
    regions: dict[str, list] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    prepared: Any = None


class JudgeJob(Job):
    """A VLM judge run: the arguments are those of :func:`~fiftyone_anomaly_vlm.judging.run.judge` (checked
    there); ``prefetch`` None picks 1, 0 for a local model on the CPU (both halves would share its cores), and
    for a server backend enough batches to keep its window busy (``1 + max_in_flight / batch_size``).

    Raises:
        ValueError: no candidate reference (see :class:`~.references.References`).
    """

    verb = "judge"
    method = JUDGE_METHOD

    def __init__(self, samples, key: str, backend: JudgeBackend, *, expert: str | None = None,
                 reference: str | None = None, knowledge: str | Mapping[str, str] | None = None,
                 class_field: str | None = None, crops: int = 3, use_expert_verdict: bool = True,
                 only_flagged: bool = False, batch_size: int = 8, fuse: str = "rank", max_new_tokens: int = 96,
                 system: str = SYSTEM, prefetch: int | None = None, crop_source: str = "maxima") -> None:
        dataset = samples._root_dataset
        self.key, self.backend, self.expert, self.reference = key, backend, expert, reference
        self.names = JudgeFieldNames(key)
        self.fields = self.names.specs()
        self.error_field, self.done_field = self.names.error, self.names.label
        self.efields = FieldNames(expert) if expert is not None else None
        # the expert run's map paths point under its app_root: read them where this machine mounts the storage
        self.map_root = (dataset.get_run_info(expert).config.app_root
                         if expert is not None and run_method(dataset, expert) == SCORE_METHOD else None)
        if isinstance(knowledge, str) and knowledge in dataset.get_field_schema():
            self.knowledge_kind, self.knowledge_field = "field", knowledge
        else:
            self.knowledge_kind = None if knowledge is None else ("per_class" if isinstance(knowledge, Mapping)
                                                                  else "text")
            self.knowledge_field = None
        self.knowledge, self.class_field = knowledge, class_field
        self.n_crops = int(crops) if self.efields is not None else 0
        self.crop_source = crop_source
        self.use_verdict = bool(use_expert_verdict and self.efields is not None)
        self.only_flagged, self.batch_size, self.fuse = bool(only_flagged), int(batch_size), fuse
        self.max_new_tokens, self.system = int(max_new_tokens), system
        if prefetch is None:  # a server backend: enough batches ahead to keep its whole window busy
            window = max(1, int(backend.max_in_flight))
            prefetch = 0 if str(getattr(backend, "device", "")) == "cpu" else 1 + -(-window // self.batch_size)
        self.prefetch = max(0, int(prefetch))
        self.description = describe_backend(backend)
        self.refs = References(dataset, reference, self.efields, class_field)
        # row name -> the path read for it
        self.paths = {"id": "id", "filepath": "filepath"}
        if self.efields is not None:
            self.paths.update(score=self.efields.score, map=f"{self.efields.map}.map_path")
            if self.n_crops and crop_source == "regions":
                self.paths["regions"] = self.efields.regions
        if class_field:
            self.paths["cls"] = class_path(dataset, class_field)
        if self.knowledge_field:
            self.paths["knowledge"] = self.knowledge_field

    # --- what the run is --------------------------------------------------------------------------------
    def identity(self, config) -> Any:
        """The model that answered: a run judged by another model is not added to without ``overwrite``.
        Reads ``config.backend["model"]``, as every release recorded it."""
        backend = config.backend or {}
        return backend.get("model") if isinstance(backend, Mapping) else getattr(backend, "model", None)

    def describe_identity(self, config) -> str:
        return f"model {self.identity(config)!r}"

    def config(self) -> JudgeRunConfig:
        kind = self.knowledge_kind
        return JudgeRunConfig(
            backend=self.description,
            expert=self.expert,
            prompt=dict(
                system=self.system,
                question=QUESTION,
                crops=self.n_crops,
                crop_fraction=CROP_FRACTION,
                crop_source=self.crop_source,
                reference=self.reference,
                knowledge=kind,
                knowledge_field=self.knowledge_field,
                knowledge_text=(dict(self.knowledge) if kind == "per_class" else self.knowledge if kind == "text"
                                else None),
                class_field=self.class_field,
                expert_verdict=self.use_verdict,
                verdict_words=[list(v) for v in VERDICT_WORDS],
            ),
            only_flagged=self.only_flagged,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            fuse=self.fuse if self.efields is not None else None,
            fields=self.names.all(),
        )

    def select(self, samples):
        """With ``only_flagged``: the samples the expert labelled anomalous."""
        if self.only_flagged:
            return samples.match(fo.ViewField(f"{self.efields.label}.label") == ANOMALOUS)
        return samples

    # --- one batch --------------------------------------------------------------------------------------
    def columns(self) -> list[str]:
        return list(dict.fromkeys(self.paths.values()))

    def batches(self, rows: dict[str, list]):
        n, step = len(rows["id"]), self.batch_size
        for start in range(0, n, step):
            yield [{name: rows[path][i] for name, path in self.paths.items()}
                   for i in range(start, min(n, start + step))]

    def prepare(self, rows: list[dict[str, Any]]) -> _Batch:
        """Images read, crops cut, reference chosen, requests built, and the backend's CPU work."""
        batch = _Batch(rows=rows)
        for row in rows:
            try:
                batch.requests.append(self.request(row, batch.regions))
            except Exception as exc:  # noqa: BLE001 - one sample's problem
                batch.failed[row["id"]] = f"{type(exc).__name__}: {exc}"
        if batch.requests:
            batch.prepared = self.backend.prepare(batch.requests)
        return batch

    def request(self, row: dict[str, Any], regions: dict[str, list], question: str = QUESTION) -> JudgeRequest:
        """One sample's request; the expert regions shown as crops go to ``regions[sample id]``; ``question``
        ends the user text (the judge's yes/no question, or a multiple-choice one)."""
        image = load_rgb(row["filepath"])
        if self.n_crops and row.get("regions") is not None and row["regions"].detections:
            crops, boxes = region_crops(image, row["regions"], self.n_crops)
        elif self.n_crops and row.get("map"):
            crops, boxes = expert_crops(image, local_path(row["map"], self.map_root), self.n_crops)
        else:
            crops, boxes = [], []
        regions[row["id"]] = boxes
        ref = self.refs.choose(row["id"], row["filepath"], row.get("cls"))
        if self.knowledge_field is not None:
            ktext = None if row.get("knowledge") is None else str(row["knowledge"])
        else:
            ktext = knowledge_for(self.knowledge, row.get("cls"))
        return build_request(
            image, reference=self.refs.image(ref) if ref else None, crops=crops, knowledge=ktext,
            product=None if row.get("cls") is None else str(row.get("cls")),
            verdict=expert_verdict_words(row.get("score")) if self.use_verdict else None,
            system=self.system, question=question, max_new_tokens=self.max_new_tokens,
            meta={"id": row["id"], "reference_id": ref[0] if ref else None},
        )

    def compute(self, batch: _Batch) -> BatchOutput:
        """The backend's answers, parsed; a failed request is its sample's error."""
        answers = self.backend.judge_prepared(batch.prepared) if batch.requests else []
        out = BatchOutput(errors=dict(batch.failed), size=len(batch.rows))
        f = self.names
        values: dict[str, dict[str, Any]] = {name: {} for name in f.all()}
        for req, ans in zip(batch.requests, answers):
            sid = req.meta["id"]
            if ans.error is not None and not ans.text:
                out.errors[sid] = ans.error
                continue
            # an answer with text but unusable probabilities (malformed logprobs, a P(yes) that is no
            # probability) is "unparsed": the text is kept, the reason goes to K_error
            p, mass, error = ans.p_yes, ans.answered_mass, ans.error
            if error is None and p is not None and not 0.0 <= p <= 1.0:
                error = f"malformed answer: P(yes) = {p!r} is not a probability"
            if error is not None:
                p = mass = None
            parsed = parse_answer(ans.text)
            attrs = dict(p_anomalous=p, answered_mass=mass, reference_id=req.meta.get("reference_id"))
            if ans.server is not None:
                attrs["server"] = ans.server
            if parsed.answer is None or error is not None:
                values[f.label][sid] = fo.Classification(label=UNPARSED, confidence=None, **attrs)
                out.counts["unparsed"] += 1
            else:
                anomalous = (p >= 0.5) if p is not None else parsed.answer == "yes"
                values[f.label][sid] = anomaly_label(anomalous, p, **attrs)
            values[f.p_anomalous][sid] = p
            values[f.defect][sid] = fo.Classification(label=parsed.defect) if parsed.defect else None
            values[f.location][sid] = (fo.Classification(label=parsed.location, text=parsed.location_text)
                                       if parsed.location else None)
            values[f.explanation][sid] = parsed.explanation
            values[f.answer][sid] = ans.text
            boxes = batch.regions.get(sid)
            values[f.regions][sid] = fo.Detections(detections=[
                fo.Detection(label="region", bounding_box=list(bx), confidence=peak, location=where)
                for bx, peak, where in boxes]) if boxes else None
            values[f.fused][sid] = None  # written for the whole view by finish()
            values[f.error][sid] = error
        out.values = values
        return out

    def finish(self, samples, stats: RunStats) -> None:
        """``K_fused`` for every sample of the view with an expert score and P(anomalous); the anomalous count."""
        f, dataset = self.names, samples._root_dataset
        if self.efields is not None:
            view = samples.exists(f.p_anomalous).exists(self.efields.score)
            ids, s_e, s_v = view.values(["id", self.efields.score, f.p_anomalous])
            if ids:
                fused = fuse_scores(np.asarray(s_e), np.asarray(s_v), self.fuse)
                dataset.set_values(f.fused, dict(zip(ids, map(float, fused))), key_field="id")
        stats.counts["anomalous"] = samples.match(fo.ViewField(f"{f.label}.label") == ANOMALOUS).count()

    def totals(self, samples) -> dict[str, int]:
        """Unparsed answers over the whole view (a sharded run's totals)."""
        return {"unparsed": samples.match(fo.ViewField(f"{self.names.label}.label") == UNPARSED).count()}
