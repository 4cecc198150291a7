"""A small generated inspection dataset with known defects (no downloads).

Each image is a machined metal disc (concentric tool marks, grain noise, small pose jitter) on a dark
background. Defective parts get one of: a scratch, a dark pit, or a bright stain, with a pixel mask; or, for
high-resolution sets (``defect_types=SMALL_DEFECT_TYPES``), a small defect: a dark speck (diameter 0.5-1 % of
the image side) or a hairline scratch (1-2 px wide, 3-6 % of the side long), which a whole-image resize to a
256 px model input all but erases.

Example:
    >>> ds = make_parts_dataset("parts", num_normal=60, num_anomalous=20)
    >>> ds.count_values("ground_truth.label")
    {'normal': 60, 'anomalous': 20}
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

import fiftyone as fo

DEFECT_TYPES = ("scratch", "pit", "stain")
#: defects at most 1 % of the image side across (see the module docs): for tiling benchmarks at >= 1024 px
SMALL_DEFECT_TYPES = ("speck", "hairline")


def _part(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.normal(0, size * 0.01, 2)
    r = np.hypot(xx - cx, yy - cy)
    radius = size * (0.40 + rng.normal(0, 0.005))
    disc = r < radius
    rings = 0.06 * np.sin(r / (size / 60.0) + rng.uniform(0, 2 * np.pi))
    shade = 0.55 + 0.15 * (xx - cx) / size + rings
    img = np.where(disc, shade, 0.08) + rng.normal(0, 0.02, (size, size))
    hole = r < size * 0.08
    img[hole] = 0.05
    return np.clip(img, 0, 1)


def _defect(rng: np.random.Generator, img: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    mask_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_img)
    c = size / 2
    ang = rng.uniform(0, 2 * np.pi)
    rad = rng.uniform(0.15, 0.30) * size
    px, py = c + rad * np.cos(ang), c + rad * np.sin(ang)
    if kind == "speck":
        rr = rng.uniform(0.0025, 0.005) * size  # diameter 0.5-1 % of the side
        draw.ellipse([px - rr, py - rr, px + rr, py + rr], fill=255)
        value = max(0.0, float(img[int(py), int(px)]) - 0.15)  # faint: a whole-image resize blurs it into the grain
    elif kind == "hairline":
        d = rng.uniform(0.015, 0.03) * size  # 3-6 % of the side long
        a2 = rng.uniform(0, np.pi)
        draw.line([(px - d * np.cos(a2), py - d * np.sin(a2)), (px + d * np.cos(a2), py + d * np.sin(a2))],
                  fill=255, width=max(1, size // 600))
        value = max(0.0, float(img[int(py), int(px)]) - 0.12)
    elif kind == "scratch":
        d = rng.uniform(0.10, 0.18) * size
        a2 = rng.uniform(0, np.pi)
        draw.line([(px - d * np.cos(a2), py - d * np.sin(a2)), (px + d * np.cos(a2), py + d * np.sin(a2))],
                  fill=255, width=max(2, size // 64))
        value = 0.15
    elif kind == "pit":
        rr = rng.uniform(0.03, 0.05) * size
        draw.ellipse([px - rr, py - rr, px + rr, py + rr], fill=255)
        value = 0.12
    else:  # stain
        rr = rng.uniform(0.05, 0.08) * size
        draw.ellipse([px - rr, py - rr * 0.7, px + rr, py + rr * 0.7], fill=255)
        value = 0.95
    mask = np.asarray(mask_img) > 0
    out = img.copy()
    out[mask] = value + rng.normal(0, 0.02, int(mask.sum()))
    return np.clip(out, 0, 1), mask


def make_parts_dataset(
    name: str = "anomaly-vlm-parts",
    num_normal: int = 60,
    num_anomalous: int = 24,
    size: int = 128,
    train_fraction: float = 0.5,
    images_dir: str | None = None,
    seed: int = 0,
    defect_types: tuple[str, ...] = DEFECT_TYPES,
    persistent: bool = False,
    overwrite: bool = True,
) -> fo.Dataset:
    """Generate the parts dataset and load it into FiftyOne.

    Fields: ``ground_truth`` (``fo.Classification`` normal/anomalous), ``defect_type`` (str),
    ``ground_truth_mask`` (``fo.Segmentation``, 1 = defect). Tags: every normal sample ``good``; a
    ``train_fraction`` of them also ``train`` (fit on ``ds.match_tags("train")``, evaluate on the rest).

    Args:
        name: dataset name.
        num_normal: normal parts.
        num_anomalous: defective parts (defect types cycle through scratch, pit, stain).
        size: image side in pixels.
        train_fraction: share of the normal parts tagged ``train``.
        images_dir: where the PNGs go (default: ``<fo default dataset dir>/anomaly_vlm/generated/<name>``).
        seed: random seed; the same seed gives the same images.
        defect_types: the defects cycled through (:data:`DEFECT_TYPES`, or :data:`SMALL_DEFECT_TYPES` for
            small defects in large images; any mix of both).
        persistent: keep the dataset across sessions.
        overwrite: replace an existing dataset of that name.
    """
    existing, images_dir = start_generated(name, images_dir, overwrite)
    if existing is not None:
        return existing
    rng = np.random.default_rng(seed)
    n_train = int(round(train_fraction * num_normal))
    samples = []
    for i in range(num_normal + num_anomalous):
        img = _part(rng, size)
        anomalous = i >= num_normal
        path = os.path.join(images_dir, f"part_{i:04d}.png")
        sample = fo.Sample(filepath=path)
        if anomalous:
            kind = defect_types[(i - num_normal) % len(defect_types)]
            img, mask = _defect(rng, img, kind)
            mask_path = os.path.join(images_dir, f"part_{i:04d}_mask.png")
            Image.fromarray(mask.astype(np.uint8)).save(mask_path)
            sample["ground_truth"] = fo.Classification(label="anomalous")
            sample["defect_type"] = kind
            sample["ground_truth_mask"] = fo.Segmentation(mask_path=mask_path)
        else:
            sample["ground_truth"] = fo.Classification(label="normal")
            sample.tags = ["good", "train"] if i < n_train else ["good"]
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        samples.append(sample)
    return save_generated(name, samples, persistent)


def start_generated(name: str, images_dir: str | None, overwrite: bool) -> tuple[fo.Dataset | None, str]:
    """Before generating dataset ``name``: (the existing dataset when it is kept, else None; the images folder,
    created; default ``<fo default dataset dir>/anomaly_vlm/generated/<name>``)."""
    if fo.dataset_exists(name):
        if not overwrite:
            return fo.load_dataset(name), ""
        fo.delete_dataset(name)
    images_dir = images_dir or os.path.join(fo.config.default_dataset_dir, "anomaly_vlm", "generated", name)
    os.makedirs(images_dir, exist_ok=True)
    return None, images_dir


def save_generated(name: str, samples: list[fo.Sample], persistent: bool) -> fo.Dataset:
    """The generated ``samples`` as dataset ``name``, its ``ground_truth_mask`` targets set (1 = defect)."""
    dataset = fo.Dataset(name, persistent=persistent)
    dataset.add_samples(samples, progress=False)
    dataset.mask_targets = {"ground_truth_mask": {1: "defect"}}
    dataset.save()
    return dataset
