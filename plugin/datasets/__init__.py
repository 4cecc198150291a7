"""Data for demos, tests and benchmarks: the real ELPV solar cells (from their PyPI package) and generated
parts images and videos with known defects. Library features of their own, not used by the core verbs.

Example:
    >>> from fiftyone_anomaly_vlm.datasets import load_elpv, make_parts_dataset, make_video_dataset
    >>> parts = make_parts_dataset("parts", num_normal=30, num_anomalous=12)
    >>> clips = make_video_dataset("clips", num_normal=6, num_anomalous=2)
"""

from ..video.frames import ffmpeg_available
from .elpv import elpv_root, load_elpv
from .parts import DEFECT_TYPES, SMALL_DEFECT_TYPES, make_parts_dataset
from .textures import TEXTURE_DEFECTS, TEXTURE_PARAMS, make_texture_dataset
from .videos import ANOMALY_LABEL, damage_video, make_video_dataset, render_frames, write_video

__all__ = ["ANOMALY_LABEL", "DEFECT_TYPES", "SMALL_DEFECT_TYPES", "damage_video", "elpv_root", "ffmpeg_available", "load_elpv",
           "make_parts_dataset", "make_texture_dataset", "make_video_dataset", "TEXTURE_DEFECTS", "TEXTURE_PARAMS",
           "render_frames", "write_video"]
