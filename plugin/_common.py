"""Checks and paths shared by the fitting and scoring calls."""

from __future__ import annotations

import os

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
