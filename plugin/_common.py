"""Checks and paths shared by the fitting and scoring calls."""

from __future__ import annotations

import os
import re

import fiftyone as fo
from fiftyone.core.odm import DatasetSampleDocument, get_default_fields

from .storage import storage_root


def check_image_collection(samples, what: str) -> int:
    """Fail early, with one clear message, when ``samples`` cannot be used; return the sample count.

    Raises:
        TypeError: ``samples`` is not a FiftyOne dataset or view.
        ValueError: the collection is empty or does not hold images.
    """
    if not isinstance(samples, fo.core.collections.SampleCollection):
        msg = f"{what}: expected a FiftyOne dataset or view, got {type(samples).__name__}"
        raise TypeError(msg)
    media_type = samples.media_type
    if media_type != "image":
        msg = (
            f"{what}: '{samples._root_dataset.name}' holds {media_type} samples; image experts need image "
            "samples (for video, score frames with `dataset.to_frames(sample_frames=True)`)"
        )
        raise ValueError(msg)
    count = samples.count()
    if count == 0:
        msg = f"{what}: the view is empty; nothing to do"
        raise ValueError(msg)
    return count


#: fields every FiftyOne sample (or frame) has, and names FiftyOne reserves for them: no run may write these
BUILTIN_FIELDS = frozenset(set(get_default_fields(DatasetSampleDocument, include_private=True))
                           | {"id", "_id", "media_type", "frames", "frame_number"})


def field_key(name: str) -> str:
    """The run key whose fields an expert named ``name`` writes by default: runs of underscores collapsed
    (``"auto__padim_128"`` -> ``"auto_padim_128"``; names without ``"__"`` unchanged). See :func:`check_field_key`."""
    return re.sub(r"__+", "_", name)


def check_field_key(key: str) -> str:
    """A run key that names sample fields must not contain ``"__"``: FiftyOne cannot reload the samples of a
    dataset with such a field (mongoengine reads ``"__"`` as a path separator), so ``sample.reload()``, and every
    ``set_values`` while a ``Sample`` of the dataset is in memory, would fail with ``LookUpError`` from then on.

    Raises:
        ValueError: ``key`` contains ``"__"`` (the message names the key to use instead).
    """
    if "__" in key:
        raise ValueError(f"run key {key!r} would name sample fields with '__', which FiftyOne cannot reload "
                         f"(mongoengine reads '__' as a path: sample.reload() and set_values would fail from then "
                         f"on); use {field_key(key)!r}")
    return key


def check_key(key: str) -> str:
    """Run keys become field names: they must be Python identifiers that are not FiftyOne's own fields.

    Raises:
        ValueError: ``key`` is not an identifier, starts with an underscore (FiftyOne reserves those names
            for private fields such as ``_rand``), or is a built-in sample field (``id``, ``filepath``,
            ``tags``, ``metadata``, ``media_type``...). Raised before anything is written.
    """
    if not isinstance(key, str) or not key.isidentifier() or key.startswith("_") or key in BUILTIN_FIELDS:
        msg = (f"invalid key {key!r}: use letters, digits and underscores, starting with a letter, and not the "
               "name of a built-in sample field (id, filepath, tags, metadata, media_type, created_at, "
               "last_modified_at, frames)")
        raise ValueError(msg)
    return key


def default_output_dir(samples, *parts: str) -> str:
    """``<storage root>/<dataset name>/<parts...>`` (the root: ``$FAV_STORAGE_ROOT``, else
    ``<fo.config.default_dataset_dir>/anomaly_vlm``, see :mod:`.storage`)."""
    return os.path.join(storage_root(), samples._root_dataset.name, *parts)
