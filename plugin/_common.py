"""Checks and paths shared by the fitting and scoring calls."""

from __future__ import annotations

import os

import fiftyone as fo


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


def check_key(key: str) -> str:
    """Run keys become field names: they must be Python identifiers."""
    if not isinstance(key, str) or not key.isidentifier():
        msg = f"invalid key {key!r}: use letters, digits and underscores, not starting with a digit"
        raise ValueError(msg)
    return key


def default_output_dir(samples, *parts: str) -> str:
    """``<fo.config.default_dataset_dir>/anomaly_vlm/<dataset name>/<parts...>``."""
    return os.path.join(fo.config.default_dataset_dir, "anomaly_vlm", samples._root_dataset.name, *parts)
