"""Sampled video frames: FiftyOne's ``to_frames(sample_frames=True)`` (ffmpeg), read back per video.

Example:
    >>> frames = video_frames(ds.match_tags("train"), fps=4)      # an image view, one sample per frame
    >>> videos = extract_frames(ds, fps=4)                          # [SampledVideo(sample_id, frame_ids, ...)]
    >>> images, errors = load_frame_images(videos[0].paths)
"""

from __future__ import annotations

import shutil

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

import fiftyone as fo

from .._common import default_output_dir
from ..storage import output_folder
from ..engine import check_collection

#: the frame error of a frame the video announces but ffmpeg could not decode (e.g. a truncated file)
NOT_EXTRACTED = "frame could not be decoded from the video (no image was extracted)"



def ffmpeg_available() -> bool:
    """Whether the ``ffmpeg`` and ``ffprobe`` executables FiftyOne's video tooling calls are on the PATH."""
    return shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


def check_video_collection(samples, what: str) -> int:
    """Fail early when ``samples`` is not a non-empty collection of videos; return the video count.

    Raises:
        TypeError: not a FiftyOne dataset or view.
        ValueError: empty, not videos, or ffmpeg is missing.
    """
    if isinstance(samples, fo.core.collections.SampleCollection) and samples.media_type != "video":
        raise ValueError(f"{what}: '{samples._root_dataset.name}' holds {samples.media_type} samples, not videos")
    n = check_collection(samples, what, media_type="video")
    if not ffmpeg_available():
        raise ValueError(f"{what}: ffmpeg/ffprobe not found; FiftyOne samples video frames with them "
                         "(apt-get install ffmpeg)")
    return n


def frames_location(samples, output_dir: str | None) -> tuple[str, str | None]:
    """``(folder, rel_dir)`` of the frame images of ``samples``: ``output_dir`` (default: the plugin's folder
    for the dataset under the storage root; a relative path is taken under that root; checked writable,
    see :func:`~..storage.output_folder`) and the videos' common folder, which FiftyOne mirrors below it."""
    out = output_folder(output_dir, default_output_dir(samples, "frames"))[0]
    dirs = sorted({os.path.dirname(os.path.abspath(p)) for p in samples._root_dataset.distinct("filepath")})
    rel = os.path.commonpath(dirs) if dirs else None
    return out, rel


def video_frames(samples, fps: float | None = None, output_dir: str | None = None):
    """The sampled frames of the videos as an image view (FiftyOne's ``to_frames(sample_frames=True)``).

    Frame images are written once (ffmpeg) under ``output_dir`` (default: the plugin's folder for the
    dataset, mirroring the videos' folders) and reused by later calls; their paths go to
    ``frames.filepath``. Use the view to fit an image expert on frames of normal videos.

    Args:
        samples: a video dataset or view.
        fps: sampling rate in frames per second (None: every frame).
        output_dir: where frame images go.

    Returns:
        A ``FramesView`` (one image sample per sampled frame; ``sample_id`` and ``frame_number`` fields).
    """
    check_video_collection(samples, "video_frames")
    out, rel = frames_location(samples, output_dir)
    return samples.to_frames(sample_frames=True, fps=fps, output_dir=out, rel_dir=rel, skip_failures=True)


@dataclass
class SampledVideo:
    """The sampled frames of one video, in time order."""

    sample_id: str
    frame_ids: list[str]
    frame_numbers: list[int]
    paths: list[str]


def extract_frames(samples, fps: float | None = None, output_dir: str | None = None) -> list[SampledVideo]:
    """Sample the frames of every video (see :func:`video_frames`); videos with no frame are omitted.

    Frames the video announces but ffmpeg could not decode (e.g. a truncated file) are listed with a path
    that does not exist: loading them gives the frame's error.
    """
    frames = video_frames(samples, fps=fps, output_dir=output_dir)
    by_video: dict[str, SampledVideo] = {}
    for fid, sid, fn, path in zip(*frames.values(["id", "sample_id", "frame_number", "filepath"])):
        v = by_video.setdefault(sid, SampledVideo(sid, [], [], []))
        v.frame_ids.append(fid)
        v.frame_numbers.append(int(fn))
        v.paths.append(path)
    out = []
    for sid in samples.values("id"):
        v = by_video.get(sid)
        if v is None:
            continue
        order = np.argsort(v.frame_numbers, kind="stable")
        out.append(SampledVideo(sid, [v.frame_ids[i] for i in order], [v.frame_numbers[i] for i in order],
                                [v.paths[i] for i in order]))
    return out


def load_frame_images(paths: Sequence[str]) -> tuple[list[Image.Image | None], list[str | None]]:
    """Decode frame images to RGB; a missing or corrupt image gives None and its error message."""
    images: list[Image.Image | None] = []
    errors: list[str | None] = []
    for path in paths:
        if not os.path.isfile(path):
            images.append(None)
            errors.append(NOT_EXTRACTED)
            continue
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.convert("RGB"))
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this frame's error
            images.append(None)
            errors.append(f"cannot decode frame image: {type(exc).__name__}: {exc}")
    return images, errors
