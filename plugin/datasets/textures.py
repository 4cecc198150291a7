"""A generated texture dataset with local and global defects at realistic subtlety (no downloads).

Each image is a surface texture (fabric, paper, a solar cell's grain): band-pass filtered noise whose grain
size, contrast, brightness and tint vary a little from good image to good image, with a slow shading. Defects
come in two families an inspection meets:

* ``"speck"`` (local): one small spot (about 2 % of the side in radius, ~5 px in a 128 px image) a little
  darker or brighter than its surroundings; it has a pixel mask;
* ``"grain"`` (global): the whole texture's grain a little coarser or finer than any good image's;
* ``"colour"`` (global): the whole image a little off in tint and brightness.

The parameters (:data:`TEXTURE_PARAMS`) are chosen so that each defect is visible to a careful eye side by
side with a good image, but lies just outside the good images' own spread.

Example:
    >>> ds = make_texture_dataset("textures", num_normal=80, num_per_defect=20)
    >>> ds.count_values("defect_type")
    {None: 80, 'speck': 20, 'grain': 20, 'colour': 20}
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from scipy import ndimage

import fiftyone as fo

from .parts import save_generated, start_generated

TEXTURE_DEFECTS = ("speck", "grain", "colour")
#: the generator's parameters (relative to the image side where they are sizes)
TEXTURE_PARAMS = {
    "grain_sigma": 0.012,          # grain size: Gaussian band-pass scale, share of the side (1.5 px at 128)
    "grain_jitter": 0.04,          # good images: grain size x (1 +- this), uniform
    "contrast": 0.16,              # texture standard deviation (intensity 0-1)
    "contrast_jitter": 0.06,       # good images: contrast x (1 +- this)
    "brightness_jitter": 0.02,     # good images: mean level 0.5 +- this
    "tint_jitter": 0.01,           # good images: per-channel gain 1 +- this
    "speck_radius": 0.02,          # speck radius, share of the side (2.6 px at 128)
    "speck_contrast": (0.10, 0.16),  # speck: darker or brighter by this (soft edge)
    "grain_change": (1.18, 1.30),  # grain defect: grain size x this, or / this
    "colour_change": (0.04, 0.07),  # colour defect: one channel's gain +- this, brightness +- half of it
}


def _texture(rng: np.random.Generator, size: int, grain: float, contrast: float, level: float,
             gains: np.ndarray) -> np.ndarray:
    noise = rng.normal(0, 1, (size, size))
    fine = ndimage.gaussian_filter(noise, grain * size)
    coarse = ndimage.gaussian_filter(noise, 2.5 * grain * size)
    band = fine - 0.6 * coarse
    band = band / (band.std() + 1e-8) * contrast
    yy, xx = np.mgrid[0:size, 0:size] / size
    shade = 0.03 * np.sin(2 * np.pi * (xx * rng.uniform(0.3, 0.8) + yy * rng.uniform(0.3, 0.8)) + rng.uniform(0, 6))
    grey = level + band + shade
    rgb = np.stack([grey * g for g in (gains * np.array([1.0, 0.96, 0.88]))], axis=-1)
    return np.clip(rgb, 0, 1)


def _normal_params(rng: np.random.Generator) -> dict:
    p = TEXTURE_PARAMS
    return {"grain": p["grain_sigma"] * (1 + rng.uniform(-p["grain_jitter"], p["grain_jitter"])),
            "contrast": p["contrast"] * (1 + rng.uniform(-p["contrast_jitter"], p["contrast_jitter"])),
            "level": 0.5 + rng.uniform(-p["brightness_jitter"], p["brightness_jitter"]),
            "gains": 1 + rng.uniform(-p["tint_jitter"], p["tint_jitter"], 3)}


def make_texture_image(rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, np.ndarray]:
    """One texture image ``(size, size, 3)`` in [0, 1] with ``defect`` (None: good) and its mask ``(size, size)``."""
    p = TEXTURE_PARAMS
    params = _normal_params(rng)
    mask = np.zeros((size, size), bool)
    if defect == "grain":
        f = rng.uniform(*p["grain_change"])
        params["grain"] *= f if rng.random() < 0.5 else 1 / f
    elif defect == "colour":
        ch = rng.integers(3)
        d = rng.uniform(*p["colour_change"]) * (1 if rng.random() < 0.5 else -1)
        params["gains"][ch] += d
        params["level"] += d / 2
    img = _texture(rng, size, **params)
    if defect == "speck":
        r = p["speck_radius"] * size
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        yy, xx = np.mgrid[0:size, 0:size]
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        blob = np.exp(-d2 / (2 * r * r))
        delta = rng.uniform(*p["speck_contrast"]) * (1 if rng.random() < 0.5 else -1)
        img = np.clip(img + delta * blob[..., None], 0, 1)
        mask = blob > 0.5
    elif defect is not None and defect not in TEXTURE_DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; defects: {TEXTURE_DEFECTS}")
    return img, mask


def make_texture_dataset(
    name: str = "anomaly-vlm-textures",
    num_normal: int = 80,
    num_per_defect: int = 20,
    size: int = 128,
    train_fraction: float = 0.5,
    images_dir: str | None = None,
    seed: int = 0,
    persistent: bool = False,
    overwrite: bool = True,
) -> fo.Dataset:
    """Generate the texture dataset and load it into FiftyOne.

    Fields: ``ground_truth`` (``fo.Classification`` normal/anomalous), ``defect_type`` (``"speck"``,
    ``"grain"``, ``"colour"`` or None), ``defect_family`` (``"local"``/``"global"``), ``ground_truth_mask``
    (``fo.Segmentation``, specks only). Tags: every normal sample ``good``; a ``train_fraction`` of them also
    ``train``.

    Args:
        name: dataset name.
        num_normal: good images.
        num_per_defect: images of each defect kind (:data:`TEXTURE_DEFECTS`).
        size: image side in pixels.
        train_fraction: share of the good images tagged ``train``.
        images_dir: where the PNGs go (default: ``<fo default dataset dir>/anomaly_vlm/generated/<name>``).
        seed: random seed; the same seed gives the same images.
        persistent: keep the dataset across sessions.
        overwrite: replace an existing dataset of that name.
    """
    existing, images_dir = start_generated(name, images_dir, overwrite)
    if existing is not None:
        return existing
    rng = np.random.default_rng(seed)
    n_train = int(round(train_fraction * num_normal))
    kinds = [None] * num_normal + [k for _ in range(num_per_defect) for k in TEXTURE_DEFECTS]
    samples = []
    for i, kind in enumerate(kinds):
        img, mask = make_texture_image(rng, size, kind)
        path = os.path.join(images_dir, f"texture_{i:04d}.png")
        Image.fromarray((img * 255).round().astype(np.uint8)).save(path)
        sample = fo.Sample(filepath=path)
        if kind is None:
            sample["ground_truth"] = fo.Classification(label="normal")
            sample.tags = ["good", "train"] if i < n_train else ["good"]
        else:
            sample["ground_truth"] = fo.Classification(label="anomalous")
            sample["defect_type"] = kind
            sample["defect_family"] = "local" if kind == "speck" else "global"
            if mask.any():
                mask_path = os.path.join(images_dir, f"texture_{i:04d}_mask.png")
                Image.fromarray(mask.astype(np.uint8)).save(mask_path)
                sample["ground_truth_mask"] = fo.Segmentation(mask_path=mask_path)
        samples.append(sample)
    return save_generated(name, samples, persistent)
