"""The reference normal image shown next to a sample (MoXpert): a fixed sample, or the nearest normal one.

Candidates are the samples of a tag, or with ``"auto"`` the samples the expert labelled normal (without an
expert, those tagged ``good``/``normal``); with a class field, a sample's reference comes from its class.
"Nearest" uses :func:`cheap_embedding` (a grey thumbnail plus a colour histogram), no model.

Example:
    >>> refs = References(dataset, "auto", FieldNames("padim"), class_field=None)
    >>> refs.choose(sample.id, sample.filepath, None)
    ('65f0c1...', '/data/parts/good/012.png')
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

import fiftyone as fo

from ..fields import FieldNames
from ..labels import NORMAL

#: at most this many candidate normals are embedded when the reference is chosen automatically
MAX_REFERENCE_POOL = 500

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


def class_path(dataset, class_field: str) -> str:
    """The path to read a sample's class from: ``<field>.label`` for a ``fo.Classification``, else the field."""
    ftype = dataset.get_field(class_field)
    if isinstance(ftype, fo.EmbeddedDocumentField) and issubclass(ftype.document_type, fo.Classification):
        return f"{class_field}.label"
    return class_field


def class_value(v: Any) -> Any:
    """A sample's class as a dict key (plain values as they are, anything else as text)."""
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


class References:
    """Chooses the reference normal image of each sample and caches the decoded images.

    Args:
        dataset: the dataset the candidates come from.
        mode: a sample id, a tag, ``"auto"``, or None (no reference).
        expert_fields: the expert run's fields (``"auto"`` takes the samples it labelled normal), or None.
        class_field: sample field with the product class, or None.

    Raises:
        ValueError: ``mode`` is neither ``"auto"``, a tag nor a sample id; or there is no candidate.
    """

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
        fields = ["id", "filepath"] + ([class_path(dataset, class_field)] if class_field else [])
        values = view.limit(MAX_REFERENCE_POOL).values(fields)
        if not values[0]:
            raise ValueError(f"no candidate reference: no {what}")
        classes = values[2] if class_field else [None] * len(values[0])
        groups: dict[Any, tuple[list[str], list[str]]] = {}
        for sid, path, cls in zip(values[0], values[1], classes):
            ids, paths = groups.setdefault(class_value(cls), ([], []))
            ids.append(sid)
            paths.append(path)
        self.pool = {c: (ids, paths, None) for c, (ids, paths) in groups.items()}

    def choose(self, sample_id: str, path: str, cls: Any) -> tuple[str, str] | None:
        """``(reference id, filepath)`` for a sample (never itself), or None without references."""
        if self.mode is None:
            return None
        if self.fixed is not None:
            return self.fixed
        key = class_value(cls)
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
        """The decoded RGB image of a chosen reference (decoded once per reference)."""
        if ref[0] not in self.images:
            with Image.open(ref[1]) as im:
                self.images[ref[0]] = im.convert("RGB")
        return self.images[ref[0]]
