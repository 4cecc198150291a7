"""Ask a vision-language model to judge each sample and explain: verdict, defect type, location, why.

For every sample a :class:`~fiftyone_anomaly_vlm.models.judge.JudgeRequest` is built from switchable
prompt parts (each recorded in the run config), sent in batches to a backend (local ``transformers`` or an
OpenAI-compatible server), and the answer is written under the run key ``K``:

- ``K`` (``fo.Classification``): ``"anomalous"`` / ``"normal"`` from P(yes) of the first answer token, or
  ``"unparsed"`` when the answer does not start with yes/no (the raw text is kept, the run goes on);
  attributes ``p_anomalous``, ``answered_mass`` (probability on the yes/no tokens: how much the model really
  answered the question) and ``reference_id`` (the normal image shown, if any);
- ``K_p_anomalous`` (float), ``K_defect`` and ``K_location`` (``fo.Classification``; the location is one of
  the 3x3 grid words or ``"none"``), ``K_explanation`` (str), ``K_answer`` (the raw answer text),
  ``K_regions`` (``fo.Detections``: the expert regions shown as crops), ``K_error`` (str, per sample);
- ``K_fused`` (float, with an expert): the expert's calibrated score and P(anomalous) combined by rank
  average or by averaging their log-odds.

Prompt parts (Triad, MoXpert, Anomaly-OV; see the README for when they help):
``crops`` (the top regions of the expert's ``<expert>_map`` around its local maxima, given with the full
image), ``reference`` (a normal image of the same product), ``knowledge`` (product/defect text, per class),
``use_expert_verdict`` (the expert's calibrated score in words). The shared parts (system text, knowledge,
reference image) come first so servers can reuse the cached prefix.

Example:
    >>> from fiftyone_anomaly_vlm.models.judge import make_backend
    >>> backend = make_backend("transformers", model="/models/Qwen2-VL-2B-Instruct", max_pixels=448 * 448)
    >>> results = fav.judge(ds, key="vlm", backend=backend, expert="padim", reference="auto")
    >>> ds.first()["vlm"].label, ds.first()["vlm_location"].label, ds.first()["vlm_explanation"]
    ('anomalous', 'top left', 'A thin dark scratch crosses the upper left corner.')
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

import fiftyone as fo
import fiftyone.core.utils as fou

from ._common import check_image_collection, check_key
from .fields import FieldNames, JudgeFieldNames
from .models.judge.base import JudgeBackend, JudgeRequest
from .runs import AnomalyScoreRunConfig, JudgeRunConfig

logger = logging.getLogger(__name__)

ANOMALOUS, NORMAL, UNPARSED = "anomalous", "normal", "unparsed"
#: the 3x3 location grid, row-major
GRID = ("top left", "top center", "top right", "middle left", "center", "middle right",
        "bottom left", "bottom center", "bottom right")

SYSTEM = ("You are a visual inspection expert on a production line. You look at images of a product and decide "
          "whether it has a defect (an anomaly). Answer in short, plain words a line operator understands.")
QUESTION = (
    "Is there a defect in the sample? Answer Yes or No as the first word. Then write exactly three lines:\n"
    "Defect: <the type of defect, or none>\n"
    "Location: <one of top left, top center, top right, middle left, center, middle right, bottom left, "
    "bottom center, bottom right, or none>\n"
    "Explanation: <one sentence>"
)
#: calibrated expert score (share of normals scoring below) -> words; first match wins
VERDICT_WORDS = ((0.98, "highly suspicious"), (0.9, "moderately suspicious"), (0.7, "slightly suspicious"),
                 (0.0, "not suspicious"))
#: side of a crop as a share of the map's shorter side
CROP_FRACTION = 1 / 3
#: at most this many candidate normals are embedded when the reference is chosen automatically
MAX_REFERENCE_POOL = 500
_SECRET_WORDS = ("key", "token", "secret", "password", "authorization")


@dataclass
class JudgeResults:
    """What a :func:`judge` call did.

    Attributes:
        key: the run key.
        fields: the :class:`JudgeFieldNames` written.
        num_samples: samples in the view.
        num_judged: samples answered by this call (parsed or not).
        num_skipped: samples already judged under this key (resume).
        num_not_flagged: samples left out by ``only_flagged``.
        num_errors: samples that got ``K_error`` in this call.
        num_unparsed: answers with no yes/no first word (label ``"unparsed"``).
        num_anomalous: samples of the view the VLM labelled anomalous (after this call).
        errors: sample id -> message.
    """

    key: str
    fields: JudgeFieldNames
    num_samples: int
    num_judged: int = 0
    num_skipped: int = 0
    num_not_flagged: int = 0
    num_errors: int = 0
    num_unparsed: int = 0
    num_anomalous: int = 0
    errors: dict[str, str] = field(default_factory=dict)


# --- answer parsing ---------------------------------------------------------------------------------------
@dataclass
class ParsedAnswer:
    """The parts of an answer text.

    Attributes:
        answer: ``"yes"``, ``"no"`` or None when the first word is neither.
        defect: the defect type (lower case, ``"none"`` when none), or None if absent.
        location: a :data:`GRID` word or ``"none"``, or None if absent / not on the grid.
        location_text: the location as written.
        explanation: the explanation sentence, or None if absent.
    """

    answer: str | None = None
    defect: str | None = None
    location: str | None = None
    location_text: str | None = None
    explanation: str | None = None


_PART = r"(?:defect(?:\s*type)?|location|explanation)"
_NONE_WORDS = {"none", "no defect", "n/a", "na", "nothing", "no", "not applicable", "null", "-"}


def _part(text: str, name: str) -> str | None:
    m = re.search(rf"\b{name}\s*:\s*(.*?)(?=(?:\s|[.;,])*\b{_PART}\s*:|$)", text, flags=re.I | re.S)
    if not m:
        return None
    value = m.group(1).strip().strip("*").strip()
    value = re.sub(r"[\s.;,*]+$", "", value)
    return value or None


def normalize_location(text: str | None) -> str | None:
    """A free-text location -> one of :data:`GRID`, ``"none"``, or None when it is not on the grid.

    Accepts ``"upper-left"``, ``"at the bottom right corner"``, ``"centre"``, ``"top middle"``...
    """
    if not text:
        return None
    t = " ".join(re.sub(r"[^a-z/ ]+", " ", text.lower().replace("-", " ")).split())
    if t in _NONE_WORDS:
        return "none"
    t = t.replace("upper", "top").replace("lower", "bottom").replace("centre", "center").replace("central", "center")
    words = t.split()
    row = next((w for w in words if w in ("top", "bottom")), None)
    col = next((w for w in words if w in ("left", "right")), None)
    if row and col:
        return f"{row} {col}"
    if row:
        return f"{row} center"
    if col:
        return f"middle {col}"
    if "center" in words or "middle" in words:
        return "center"
    return None


def parse_answer(text: str) -> ParsedAnswer:
    """Read the verdict word, defect, location and explanation from an answer.

    Args:
        text: e.g. ``"Yes. Defect: scratch. Location: top left. Explanation: a line crosses the part."``
            (one line or several; Markdown emphasis is ignored).

    Returns:
        A :class:`ParsedAnswer`; ``answer`` is None when the first word is not yes/no.
    """
    text = text or ""
    first = re.match(r"[\W_]*([A-Za-z]+)", text)
    word = first.group(1).lower() if first else None
    out = ParsedAnswer(answer=word if word in ("yes", "no") else None)
    defect = _part(text, r"defect(?:\s*type)?")
    if defect is not None:
        d = defect.lower()
        out.defect = "none" if d in _NONE_WORDS else d
    loc = _part(text, "location")
    out.location_text = loc
    out.location = normalize_location(loc)
    out.explanation = _part(text, "explanation")
    return out


# --- expert regions ---------------------------------------------------------------------------------------
def read_heatmap(map_path: str) -> np.ndarray:
    """A stored 16-bit (or 8-bit) heatmap PNG as a float array in [0, 1]."""
    with Image.open(map_path) as im:
        arr = np.asarray(im).astype(np.float64)
    if arr.ndim == 3:
        arr = arr[..., 0]
    hi = 65535.0 if arr.max(initial=0) > 255 or str(im.mode).startswith("I") else 255.0
    return np.clip(arr / hi, 0.0, 1.0)


def top_regions(heatmap: np.ndarray, n: int, fraction: float = CROP_FRACTION) -> list[tuple[int, int, int, int, float]]:
    """Square boxes around the ``n`` highest local maxima of an anomaly map (Triad's expert-guided crops).

    The highest pixel gives the first box (centred on it, shifted to stay inside the map); that box is
    suppressed and the next maximum taken, so the boxes do not overlap.

    Args:
        heatmap: ``(H, W)`` map, higher = more anomalous.
        n: number of regions.
        fraction: box side as a share of the shorter map side.

    Returns:
        ``[(x0, y0, x1, y1, peak), ...]`` in map pixels (x1/y1 exclusive), best first.
    """
    h, w = heatmap.shape
    side = max(1, round(fraction * min(h, w)))
    work = heatmap.astype(np.float64).copy()
    boxes = []
    for _ in range(max(0, n)):
        if not np.isfinite(work).any():
            break
        idx = int(np.nanargmax(np.where(np.isfinite(work), work, -np.inf)))
        cy, cx = divmod(idx, w)
        peak = float(heatmap[cy, cx])
        x0 = min(max(0, cx - side // 2), w - side)
        y0 = min(max(0, cy - side // 2), h - side)
        boxes.append((x0, y0, x0 + side, y0 + side, peak))
        work[y0:y0 + side, x0:x0 + side] = -np.inf
    return boxes


def grid_word(cx: float, cy: float) -> str:
    """The 3x3 grid word of a point given in relative coordinates [0, 1]."""
    col = min(2, int(cx * 3))
    row = min(2, int(cy * 3))
    return GRID[row * 3 + col]


def expert_verdict_words(score: float | None) -> str | None:
    """The expert's calibrated score in words (Anomaly-OV style), None without a score."""
    if score is None or not math.isfinite(score):
        return None
    for lo, words in VERDICT_WORDS:
        if score >= lo:
            return words
    return VERDICT_WORDS[-1][1]


# --- reference images -------------------------------------------------------------------------------------
_EMBED_CACHE: dict[tuple[str, float], np.ndarray] = {}


def cheap_embedding(path: str) -> np.ndarray:
    """A 16x16 grey thumbnail plus a colour histogram, centred and unit length; cached by path and mtime."""
    key = (path, os.path.getmtime(path))
    if key not in _EMBED_CACHE:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            rgb = im.convert("RGB")
            grey = np.asarray(rgb.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float64).ravel() / 255.0
            hist = np.concatenate([np.histogram(np.asarray(rgb)[..., c], bins=8, range=(0, 256))[0]
                                   for c in range(3)]).astype(np.float64)
        hist /= max(1.0, hist.sum())
        v = np.concatenate([grey - grey.mean(), hist * 4.0])
        v /= max(1e-12, np.linalg.norm(v))
        if len(_EMBED_CACHE) > 20000:
            _EMBED_CACHE.clear()
        _EMBED_CACHE[key] = v
    return _EMBED_CACHE[key]


class _References:
    """Chooses the reference normal image of each sample and caches the decoded images."""

    def __init__(self, dataset, mode: str | None, expert_fields: FieldNames | None, class_field: str | None):
        self.mode = mode
        self.class_field = class_field
        self.images: dict[str, Image.Image] = {}
        self.pool: dict[Any, tuple[list[str], list[str], np.ndarray | None]] = {}
        self.fixed: tuple[str, str] | None = None
        if mode is None:
            return
        if mode != "auto" and mode not in dataset.distinct("tags"):
            try:
                sample = dataset[mode]
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"reference {mode!r} is neither 'auto', a tag nor a sample id") from exc
            self.fixed = (sample.id, sample.filepath)
            return
        if mode == "auto":
            if expert_fields is not None:
                view = dataset.match(fo.ViewField(f"{expert_fields.label}.label") == NORMAL)
                what = f"samples the expert labelled normal in '{expert_fields.key}'"
            else:
                view = dataset.match_tags(["good", "normal"])
                what = "samples tagged 'good' or 'normal' (give an expert or a tag)"
        else:
            view = dataset.match_tags(mode)
            what = f"samples tagged {mode!r}"
        fields = ["id", "filepath"] + ([_class_path(dataset, class_field)] if class_field else [])
        values = view.limit(MAX_REFERENCE_POOL).values(fields)
        if not values[0]:
            raise ValueError(f"no candidate reference: no {what}")
        classes = values[2] if class_field else [None] * len(values[0])
        groups: dict[Any, tuple[list[str], list[str]]] = {}
        for sid, path, cls in zip(values[0], values[1], classes):
            groups.setdefault(_class_value(cls), ([], []))
            groups[_class_value(cls)][0].append(sid)
            groups[_class_value(cls)][1].append(path)
        self.pool = {c: (ids, paths, None) for c, (ids, paths) in groups.items()}

    def choose(self, sample_id: str, path: str, cls: Any) -> tuple[str, str] | None:
        """``(reference id, filepath)`` for a sample (never itself), or None without references."""
        if self.mode is None:
            return None
        if self.fixed is not None:
            return self.fixed
        key = _class_value(cls)
        if key not in self.pool:
            key = None if None in self.pool else next(iter(self.pool))
        ids, paths, emb = self.pool[key]
        if emb is None:
            emb = np.stack([cheap_embedding(p) for p in paths])
            self.pool[key] = (ids, paths, emb)
        sims = emb @ cheap_embedding(path)
        for j in np.argsort(-sims):
            if ids[j] != sample_id:
                return ids[j], paths[j]
        return None

    def image(self, ref: tuple[str, str]) -> Image.Image:
        if ref[0] not in self.images:
            with Image.open(ref[1]) as im:
                self.images[ref[0]] = im.convert("RGB")
        return self.images[ref[0]]


def _class_path(dataset, class_field: str) -> str:
    ftype = dataset.get_field(class_field)
    if isinstance(ftype, fo.EmbeddedDocumentField) and issubclass(ftype.document_type, fo.Classification):
        return f"{class_field}.label"
    return class_field


def _class_value(v: Any) -> Any:
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


# --- prompt -----------------------------------------------------------------------------------------------
def build_request(
    image: Image.Image,
    *,
    reference: Image.Image | None = None,
    crops: list[tuple[Image.Image, str]] | None = None,
    knowledge: str | None = None,
    product: str | None = None,
    verdict: str | None = None,
    system: str = SYSTEM,
    question: str = QUESTION,
    max_new_tokens: int = 96,
    meta: dict[str, Any] | None = None,
) -> JudgeRequest:
    """One sample's request: shared parts first (knowledge, reference image), then the sample and its crops.

    Args:
        image: the sample.
        reference: a normal image of the same product (shown first).
        crops: ``[(crop image, grid word of its centre), ...]`` from the expert's map.
        knowledge: product/defect knowledge text.
        product: the product's name (e.g. the class).
        verdict: the expert's verdict in words (``"highly suspicious"``).
        system: the system text.
        question: the question and answer format.
        max_new_tokens: generation budget.
        meta: carried back with the answer.

    Returns:
        A :class:`JudgeRequest` whose images are ``[reference?, sample, *crops]``.
    """
    images: list[Image.Image] = []
    lines: list[str] = []
    if knowledge:
        lines.append(f"Product knowledge: {knowledge.strip()}")
    if product:
        lines.append(f"The product is: {product}.")
    names = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]

    def nth(i: int) -> str:
        return names[i] if i < len(names) else f"{i + 1}th"

    if reference is not None:
        images.append(reference)
        lines.append(f"The {nth(0)} image is a normal reference of the product, without defects.")
    images.append(image)
    lines.append(f"The {nth(len(images) - 1)} image is the sample to inspect.")
    for crop, where in crops or []:
        images.append(crop)
        lines.append(f"The {nth(len(images) - 1)} image is a close-up of the sample's {where} region, which an "
                     "inspection model finds suspicious.")
    if verdict:
        lines.append(f"The inspection model finds this sample {verdict}.")
    lines.append(question)
    return JudgeRequest(images=images, user="\n".join(lines), system=system, max_new_tokens=max_new_tokens,
                        meta=dict(meta or {}))


def _knowledge_for(knowledge, cls: Any) -> str | None:
    """The knowledge text for a sample of class ``cls`` (text for all, or a per-class dict)."""
    if knowledge is None:
        return None
    if isinstance(knowledge, Mapping):
        text = knowledge.get(_class_value(cls)) if cls is not None else None
        return text if text is not None else knowledge.get("default")
    return str(knowledge)


# --- fusion -----------------------------------------------------------------------------------------------
def fuse_scores(expert: np.ndarray, vlm: np.ndarray, method: str = "rank") -> np.ndarray:
    """Combine expert scores and VLM probabilities into one score in [0, 1].

    Args:
        expert: the expert's calibrated scores in (0, 1).
        vlm: P(anomalous) from the VLM.
        method: ``"rank"``: the mean of each score's rank percentile (ties averaged) over the samples given;
            ``"logistic"``: ``sigmoid((logit(expert) + logit(vlm)) / 2)`` (equal weights; no labels needed).

    Returns:
        The fused scores, same order.
    """
    expert = np.asarray(expert, dtype=np.float64)
    vlm = np.asarray(vlm, dtype=np.float64)
    if method == "rank":
        from scipy.stats import rankdata

        n = len(expert)
        if n == 0:
            return np.zeros(0)
        if n == 1:
            return np.array([0.5 * (expert[0] + vlm[0])])
        return 0.5 * ((rankdata(expert) - 1) / (n - 1) + (rankdata(vlm) - 1) / (n - 1))
    if method == "logistic":
        eps = 1e-6

        def logit(p):
            p = np.clip(p, eps, 1 - eps)
            return np.log(p) - np.log1p(-p)

        return 1.0 / (1.0 + np.exp(-0.5 * (logit(expert) + logit(vlm))))
    raise ValueError(f"fuse must be 'rank' or 'logistic', got {method!r}")


# --- the run ----------------------------------------------------------------------------------------------
def _safe_describe(backend: JudgeBackend) -> dict[str, Any]:
    """The backend's description without anything that looks like a credential."""
    desc = dict(backend.describe() or {})
    return {k: v for k, v in desc.items() if not any(w in k.lower() for w in _SECRET_WORDS) or k == "api_key_env"}


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            from .models.judge.hf import prepare_image

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


class Prefetch:
    """Iterate ``fn(item)`` over ``items`` in order, computing up to ``depth`` results ahead in one worker thread.

    While the caller works on result ``n`` (e.g. ``generate()`` on the accelerator), the worker computes
    ``n + 1`` (reading images, cutting crops, running the processor). At most ``depth + 1`` results exist at
    once. An exception raised by ``fn`` is raised by the iteration at that item. Leaving the ``with`` block
    (normally, by an error or a cancelled run) drops what was not yet consumed: queued items are cancelled
    and the one being computed is waited for, so no work goes on after it.

    Args:
        fn: the work for one item.
        items: the items, in order.
        depth: how many items ahead; 0 computes each item in the caller's thread when it is needed.

    Example:
        >>> with Prefetch(load_batch, range(0, n, 8), depth=1) as batches:
        ...     for batch in batches:
        ...         run_model(batch)
    """

    def __init__(self, fn, items, depth: int = 1) -> None:
        self.fn = fn
        self.items = iter(items)
        self.depth = max(0, int(depth))
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def __enter__(self) -> Prefetch:
        if self.depth:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fav-judge-prepare")
            for item in itertools.islice(self.items, self.depth):
                self._pending.append(self._pool.submit(self.fn, item))
        return self

    def __iter__(self):
        if self._pool is None:
            for item in self.items:
                yield self.fn(item)
            return
        while self._pending:
            future = self._pending.popleft()
            for item in itertools.islice(self.items, 1):  # keep `depth` items queued behind this one
                self._pending.append(self._pool.submit(self.fn, item))
            yield future.result()

    def __exit__(self, *exc_info) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def judge(
    samples,
    key: str = "vlm",
    *,
    backend: JudgeBackend,
    expert: str | None = None,
    reference: str | None = None,
    knowledge: str | Mapping[str, str] | None = None,
    class_field: str | None = None,
    crops: int = 3,
    use_expert_verdict: bool = True,
    only_flagged: bool = False,
    batch_size: int = 8,
    fuse: str = "rank",
    max_new_tokens: int = 96,
    system: str = SYSTEM,
    overwrite: bool = False,
    prefetch: int | None = None,
    progress: bool | Any = None,
) -> JudgeResults:
    """Ask a VLM whether each sample is anomalous, which defect, where and why; record the run ``key``.

    Args:
        samples: a dataset or view of images.
        key: run key and field prefix (see :class:`JudgeFieldNames`).
        backend: a :class:`~fiftyone_anomaly_vlm.models.judge.JudgeBackend` (see ``make_backend``).
        expert: key of a scoring run (:func:`score`); its ``<expert>_map`` gives the crops, its
            ``<expert>_score`` the verdict in words and the fused score. None: full image only.
        reference: a normal image to compare with: a sample id, a tag (the nearest tagged sample by a cheap
            embedding), ``"auto"`` (the nearest sample the expert labelled normal; without an expert, tagged
            ``good``/``normal``), or None. With ``class_field``, references come from the same class.
        knowledge: product/defect knowledge: one text for all, a dict ``{class: text}`` (``"default"`` as
            fallback), or the name of a sample field holding the text.
        class_field: sample field with the product class (str or ``fo.Classification``); named in the prompt.
        crops: number of expert regions cut out around the map's local maxima (0: none; needs ``expert``).
        use_expert_verdict: tell the model the expert's verdict in words ("highly suspicious"...).
        only_flagged: judge only samples the expert labelled anomalous.
        batch_size: requests per backend call (and per database write).
        fuse: ``"rank"`` or ``"logistic"``, how ``K_fused`` combines the expert score and P(anomalous).
        max_new_tokens: answer length budget.
        system: the system text (placed first).
        overwrite: judge every sample again; by default samples already judged under ``key`` are skipped,
            so an interrupted run resumes.
        prefetch: batches prepared ahead in a worker thread (images read, crops cut, reference chosen,
            the backend's processor run) while the backend answers the current one; 0: no overlap. None:
            1, except for a local model on the CPU (0), where both halves would compete for the same cores.
        progress: FiftyOne progress convention: None/True/False, or a callable taking a ``ProgressBar``.

    Returns:
        :class:`JudgeResults` with counts.

    Raises:
        ValueError: empty view, bad key, unknown expert run, a ``key`` used by another kind of run or by
            another model (without ``overwrite``), no candidate reference, bad ``fuse``.
    """
    n_total = check_image_collection(samples, "judge")
    key = check_key(key)
    if fuse not in ("rank", "logistic"):
        raise ValueError(f"fuse must be 'rank' or 'logistic', got {fuse!r}")
    if not isinstance(backend, JudgeBackend):
        raise TypeError(f"backend must be a JudgeBackend (see make_backend), got {type(backend).__name__}")
    dataset = samples._root_dataset
    fields = JudgeFieldNames(key)
    runs = dataset.list_runs()
    efields = None
    if expert is not None:
        if expert not in runs or not isinstance(dataset.get_run_info(expert).config, AnomalyScoreRunConfig):
            raise ValueError(f"expert {expert!r} is not a scoring run on this dataset; run fav.score first")
        if expert == key:
            raise ValueError("the judge run needs its own key (not the expert's)")
        efields = FieldNames(expert)
    elif only_flagged:
        raise ValueError("only_flagged needs an expert (the samples it labelled anomalous)")
    schema = dataset.get_field_schema()
    if isinstance(knowledge, str) and knowledge in schema:
        knowledge_kind, knowledge_field = "field", knowledge
    else:
        knowledge_kind = None if knowledge is None else ("per_class" if isinstance(knowledge, Mapping) else "text")
        knowledge_field = None
    if class_field is not None and class_field not in schema:
        raise ValueError(f"class_field {class_field!r} is not a field of this dataset")
    description = _safe_describe(backend)
    if key in runs:
        info = dataset.get_run_info(key)
        if not isinstance(info.config, JudgeRunConfig):
            raise ValueError(f"key {key!r} is already used by a run of another kind; choose another key")
        old_model = (getattr(info.config, "backend", None) or {}).get("model")
        if not overwrite and old_model != description.get("model"):
            raise ValueError(f"run {key!r} was judged by model {old_model!r}; pass overwrite=True or choose another key")
    else:
        clash = [f for f in fields.all() if f in schema]
        if clash:
            raise ValueError(f"fields {clash} exist but belong to no judge run {key!r}; choose another key")

    refs = _References(dataset, reference, efields, class_field)
    n_crops = int(crops) if efields is not None else 0
    config = JudgeRunConfig(
        backend=description,
        expert=expert,
        prompt=dict(
            system=system,
            question=QUESTION,
            crops=n_crops,
            crop_fraction=CROP_FRACTION,
            reference=reference,
            knowledge=knowledge_kind,
            knowledge_field=knowledge_field,
            knowledge_text=(dict(knowledge) if knowledge_kind == "per_class"
                            else knowledge if knowledge_kind == "text" else None),
            class_field=class_field,
            expert_verdict=bool(use_expert_verdict and efields is not None),
            verdict_words=[list(v) for v in VERDICT_WORDS],
        ),
        only_flagged=bool(only_flagged),
        batch_size=int(batch_size),
        max_new_tokens=int(max_new_tokens),
        fuse=fuse if efields is not None else None,
        fields=fields.all(),
    )
    dataset.register_run(key, config, overwrite=True, cleanup=False)
    _declare_fields(dataset, fields)

    todo = samples
    results = JudgeResults(key=key, fields=fields, num_samples=n_total)
    if only_flagged:
        todo = todo.match(fo.ViewField(f"{efields.label}.label") == ANOMALOUS)
        results.num_not_flagged = n_total - todo.count()
    if not overwrite:
        before = todo.count()
        todo = todo.exists(fields.label, False)
        results.num_skipped = before - todo.count()

    paths = {"id": "id", "filepath": "filepath"}
    if efields is not None:
        paths.update(score=efields.score, map=f"{efields.map}.map_path")
    if class_field:
        paths["cls"] = _class_path(dataset, class_field)
    if knowledge_field:
        paths["knowledge"] = knowledge_field
    columns = dict(zip(paths, todo.values(list(paths.values()))))
    n = len(columns["id"])
    step = max(1, int(batch_size))
    use_verdict = use_expert_verdict and efields is not None

    def prepare(start: int) -> _Batch:
        """Batch ``start``: images read, crops cut, reference chosen, requests built and the backend's CPU work."""
        batch = _Batch(rows=[{k: columns[k][i] for k in columns} for i in range(start, min(n, start + step))])
        for row in batch.rows:
            try:
                req, boxes = _request_for(row, refs, knowledge, knowledge_field is not None, n_crops, use_verdict,
                                          system, max_new_tokens)
                batch.requests.append(req)
                batch.regions[row["id"]] = boxes
            except Exception as exc:  # noqa: BLE001 - one sample's problem
                batch.failed[row["id"]] = f"{type(exc).__name__}: {exc}"
        if batch.requests:
            batch.prepared = backend.prepare(batch.requests)
        return batch

    if prefetch is None:
        prefetch = 0 if str(getattr(backend, "device", "")) == "cpu" else 1
    with fou.ProgressBar(total=n, progress=progress) as pb, Prefetch(prepare, range(0, n, step), prefetch) as batches:
        for batch in batches:
            answers = backend.judge_prepared(batch.prepared) if batch.requests else []
            _write_batch(dataset, fields, batch.requests, answers, batch.regions, batch.failed, results)
            pb.update(len(batch.rows))

    if efields is not None:
        _write_fused(samples, fields, efields, fuse)
    if fields.label in dataset.get_field_schema():
        results.num_anomalous = samples.match(fo.ViewField(f"{fields.label}.label") == ANOMALOUS).count()
    return results


def _request_for(row: dict[str, Any], refs: _References, knowledge, knowledge_is_field: bool, n_crops: int,
                 use_verdict: bool, system: str, max_new_tokens: int) -> tuple[JudgeRequest, list]:
    image = _load_rgb(row["filepath"])
    W, H = image.size
    crops, boxes = [], []
    if n_crops and row.get("map"):
        hm = read_heatmap(row["map"])
        h, w = hm.shape
        for x0, y0, x1, y1, peak in top_regions(hm, n_crops):
            bx = (x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h)
            box = (round(bx[0] * W), round(bx[1] * H), round((bx[0] + bx[2]) * W), round((bx[1] + bx[3]) * H))
            crop = image.crop((box[0], box[1], max(box[0] + 1, box[2]), max(box[1] + 1, box[3])))
            where = grid_word(bx[0] + bx[2] / 2, bx[1] + bx[3] / 2)
            crops.append((crop, where))
            boxes.append((bx, peak, where))
    ref = refs.choose(row["id"], row["filepath"], row.get("cls"))
    ref_image = refs.image(ref) if ref else None
    if knowledge_is_field:
        ktext = None if row.get("knowledge") is None else str(row["knowledge"])
    else:
        ktext = _knowledge_for(knowledge, row.get("cls"))
    req = build_request(
        image, reference=ref_image, crops=crops, knowledge=ktext,
        product=None if row.get("cls") is None else str(row.get("cls")),
        verdict=expert_verdict_words(row.get("score")) if use_verdict else None,
        system=system, max_new_tokens=max_new_tokens,
        meta={"id": row["id"], "reference_id": ref[0] if ref else None},
    )
    return req, boxes


def _declare_fields(dataset, fields: JudgeFieldNames) -> None:
    schema = dataset.get_field_schema()
    emb = fo.EmbeddedDocumentField
    kinds = {
        fields.label: (emb, {"embedded_doc_type": fo.Classification}),
        fields.p_anomalous: (fo.FloatField, {}),
        fields.defect: (emb, {"embedded_doc_type": fo.Classification}),
        fields.location: (emb, {"embedded_doc_type": fo.Classification}),
        fields.explanation: (fo.StringField, {}),
        fields.answer: (fo.StringField, {}),
        fields.regions: (emb, {"embedded_doc_type": fo.Detections}),
        fields.error: (fo.StringField, {}),
        fields.fused: (fo.FloatField, {}),
    }
    for name, (ftype, kwargs) in kinds.items():
        if name not in schema:
            dataset.add_sample_field(name, ftype, **kwargs)


def _write_batch(dataset, fields: JudgeFieldNames, requests, answers, regions, failed, results: JudgeResults) -> None:
    """One batch to the database; the verdict field last (it marks a sample as done for resume)."""
    order = [fields.error, fields.p_anomalous, fields.defect, fields.location, fields.explanation, fields.answer,
             fields.regions, fields.fused, fields.label]
    values: dict[str, dict[str, Any]] = {f: {} for f in order}
    for req, ans in zip(requests, answers):
        sid = req.meta["id"]
        if ans.error is not None:
            failed[sid] = ans.error
            continue
        parsed = parse_answer(ans.text)
        p = ans.p_yes
        if parsed.answer is None:
            label, conf = UNPARSED, None
            results.num_unparsed += 1
        else:
            anomalous = (p >= 0.5) if p is not None else parsed.answer == "yes"
            label = ANOMALOUS if anomalous else NORMAL
            conf = None if p is None else (p if anomalous else 1.0 - p)
        values[fields.label][sid] = fo.Classification(
            label=label, confidence=conf, p_anomalous=p, answered_mass=ans.answered_mass,
            reference_id=req.meta.get("reference_id"))
        values[fields.p_anomalous][sid] = p
        values[fields.defect][sid] = fo.Classification(label=parsed.defect) if parsed.defect else None
        values[fields.location][sid] = (fo.Classification(label=parsed.location, text=parsed.location_text)
                                        if parsed.location else None)
        values[fields.explanation][sid] = parsed.explanation
        values[fields.answer][sid] = ans.text
        values[fields.regions][sid] = fo.Detections(detections=[
            fo.Detection(label="region", bounding_box=list(bx), confidence=peak, location=where)
            for bx, peak, where in regions.get(sid, [])]) if regions.get(sid) else None
        values[fields.fused][sid] = None
        values[fields.error][sid] = None
        results.num_judged += 1
    for sid, err in failed.items():
        for f in order:
            values[f][sid] = None
        values[fields.error][sid] = err
        results.num_errors += 1
        results.errors[sid] = err
    for f in order:
        if values[f]:
            dataset.set_values(f, values[f], key_field="id")


def _write_fused(samples, fields: JudgeFieldNames, efields: FieldNames, method: str) -> None:
    """``K_fused`` for every sample of the view with both an expert score and P(anomalous)."""
    view = samples.exists(fields.p_anomalous).exists(efields.score)
    ids, s_e, s_v = view.values(["id", efields.score, fields.p_anomalous])
    if ids:
        fused = fuse_scores(np.asarray(s_e), np.asarray(s_v), method)
        samples._root_dataset.set_values(fields.fused, dict(zip(ids, map(float, fused))), key_field="id")
