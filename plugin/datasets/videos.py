"""Small generated videos with a known anomalous stretch (no downloads), encoded by ffmpeg.

Every video shows a moving pattern on a textured background: a bright bar sweeps from left to right and
back while a soft blob circles the centre. Anomalous videos get an inserted stretch of frames in which a
saturated red square (an "intruder") appears and jitters around; the rest of the video is normal. The
frames are written through FiftyOne's video tooling (``eta.core.video.FFmpegVideoWriter``, i.e. the
system ``ffmpeg``), so tests read them back through the same decoding path as real videos.

Ground truth: ``ground_truth`` (``fo.Classification`` normal/anomalous per video), ``ground_truth_segments``
(``fo.TemporalDetections`` with the inserted stretch as ``support``, 1-based inclusive frame numbers) and
``frames.ground_truth`` (``fo.Classification`` per frame). Normal videos are tagged ``good``, a share of
them also ``train``.

Example:
    >>> ds = make_video_dataset("clips", num_normal=4, num_anomalous=2, num_frames=32, fps=8)
    >>> ds.first().ground_truth_segments.detections[0].support
    [13, 24]
"""

from __future__ import annotations

import os

import eta.core.video as etav
import numpy as np

import fiftyone as fo

from ..video.frames import ffmpeg_available

#: label of the inserted stretch
ANOMALY_LABEL = "intruder"


def render_frames(num_frames: int, size: int, rng: np.random.Generator,
                  anomaly: tuple[int, int] | None = None, scene: float = 0.0) -> np.ndarray:
    """The frames of one video as a ``(num_frames, size, size, 3)`` uint8 array.

    Args:
        num_frames: number of frames.
        size: frame side in pixels (even: H.264 with 4:2:0 chroma needs even sides).
        rng: random generator (texture, phase, the intruder's position).
        anomaly: ``(first, last)`` 1-based inclusive frame numbers of the inserted stretch, or None.
        scene: phase of the background texture; videos of one camera share it.

    Returns:
        The frames, RGB.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    texture = 0.35 + 0.08 * np.sin(12 * xx + scene) * np.cos(9 * yy) + rng.normal(0, 0.01, (size, size))
    phase = rng.uniform(0, 2 * np.pi)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    sq = max(4, size // 3)
    cx0, cy0 = rng.uniform(0.2, 0.8 - sq / size, 2)
    for i in range(num_frames):
        t = i / max(1, num_frames - 1)
        bar_x = 0.5 + 0.4 * np.sin(2 * np.pi * t + phase)
        bar = np.exp(-((xx - bar_x) ** 2) / (2 * 0.04 ** 2))
        bx, by = 0.5 + 0.2 * np.cos(4 * np.pi * t + phase), 0.5 + 0.2 * np.sin(4 * np.pi * t + phase)
        blob = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * 0.08 ** 2))
        grey = np.clip(texture + 0.45 * bar + 0.2 * blob + rng.normal(0, 0.01, (size, size)), 0, 1)
        img = np.repeat(grey[..., None], 3, axis=2)
        img[..., 2] = np.clip(img[..., 2] + 0.05, 0, 1)  # slightly blue tint: the scene's normal colour
        if anomaly is not None and anomaly[0] <= i + 1 <= anomaly[1]:
            x0 = int((cx0 + rng.uniform(-0.03, 0.03)) * size)
            y0 = int((cy0 + rng.uniform(-0.03, 0.03)) * size)
            x0, y0 = min(max(0, x0), size - sq), min(max(0, y0), size - sq)
            img[y0:y0 + sq, x0:x0 + sq] = (0.95, 0.1, 0.05)
        frames[i] = (img * 255 + 0.5).astype(np.uint8)
    return frames


def write_video(path: str, frames: np.ndarray, fps: float) -> str:
    """Encode RGB frames to an H.264 MP4 with FiftyOne's ffmpeg writer (index at the front: ``+faststart``).

    Args:
        path: output path (``.mp4``); the folder is created.
        frames: ``(N, H, W, 3)`` uint8.
        fps: frame rate.

    Returns:
        ``path``.

    Raises:
        RuntimeError: ffmpeg is not installed.
    """
    if not ffmpeg_available():
        raise RuntimeError("ffmpeg/ffprobe not found: install the system package (apt-get install ffmpeg)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    h, w = frames.shape[1:3]
    out_opts = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "12", "-pix_fmt", "yuv420p", "-g", "8",
                "-movflags", "+faststart"]
    writer = etav.FFmpegVideoWriter(path, fps, (w, h), out_opts=out_opts)
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.close()
    return path


def damage_video(src: str, dst: str, keep: float = 0.6) -> str:
    """Copy a video keeping only the first ``keep`` share of its bytes.

    With the index at the front (``+faststart``) the container still announces every frame, but the frames
    past the cut cannot be decoded: the situation of a video cut short by a failed upload or a full disk.

    Args:
        src: a video written by :func:`write_video`.
        dst: the damaged copy.
        keep: share of the bytes kept, in (0, 1).

    Returns:
        ``dst``.
    """
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: max(1, int(len(data) * keep))])
    return dst


def make_video_dataset(
    name: str = "anomaly-vlm-videos",
    num_normal: int = 4,
    num_anomalous: int = 2,
    num_frames: int = 32,
    size: int = 48,
    fps: float = 8.0,
    anomaly: tuple[int, int] | None = None,
    train_fraction: float = 0.5,
    videos_dir: str | None = None,
    seed: int = 0,
    persistent: bool = False,
    overwrite: bool = True,
) -> fo.Dataset:
    """Generate the videos and load them into a FiftyOne video dataset.

    Args:
        name: dataset name.
        num_normal: videos without an anomaly.
        num_anomalous: videos with one inserted anomalous stretch.
        num_frames: frames per video.
        size: frame side in pixels (rounded up to even).
        fps: frame rate.
        anomaly: ``(first, last)`` 1-based inclusive frames of the stretch (default: the middle ~third,
            starting on an odd frame so that sampling every 2nd frame hits its ends).
        train_fraction: share of the normal videos also tagged ``train``.
        videos_dir: where the MP4s go (default: ``<fo default dataset dir>/anomaly_vlm/generated/<name>``).
        seed: random seed; the same seed gives the same videos.
        persistent: keep the dataset across sessions.
        overwrite: replace an existing dataset of that name.

    Returns:
        The dataset (metadata computed).
    """
    if fo.dataset_exists(name):
        if not overwrite:
            return fo.load_dataset(name)
        fo.delete_dataset(name)
    size = size + (size % 2)
    if anomaly is None:
        first = (num_frames * 3 // 8) | 1
        anomaly = (first, min(num_frames, first + num_frames // 3))
    if not 1 <= anomaly[0] <= anomaly[1] <= num_frames:
        raise ValueError(f"anomaly {anomaly} is not within frames 1..{num_frames}")
    videos_dir = videos_dir or os.path.join(fo.config.default_dataset_dir, "anomaly_vlm", "generated", name)
    os.makedirs(videos_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    scene = rng.uniform(0, 2 * np.pi)  # one camera: every video shares the background
    n_train = int(round(train_fraction * num_normal))
    samples = []
    for i in range(num_normal + num_anomalous):
        anomalous = i >= num_normal
        span = anomaly if anomalous else None
        path = write_video(os.path.join(videos_dir, f"video_{i:03d}.mp4"),
                           render_frames(num_frames, size, rng, span, scene), fps)
        sample = fo.Sample(filepath=path)
        sample["ground_truth"] = fo.Classification(label="anomalous" if anomalous else "normal")
        sample["ground_truth_segments"] = fo.TemporalDetections(detections=[
            fo.TemporalDetection(label=ANOMALY_LABEL, support=list(span))] if span else [])
        if not anomalous:
            sample.tags = ["good", "train"] if i < n_train else ["good"]
        for fn in range(1, num_frames + 1):
            inside = span is not None and span[0] <= fn <= span[1]
            sample.frames[fn] = fo.Frame(ground_truth=fo.Classification(label="anomalous" if inside else "normal"))
        samples.append(sample)
    dataset = fo.Dataset(name, persistent=persistent)
    dataset.add_samples(samples, progress=False)
    dataset.compute_metadata(progress=False)
    return dataset
