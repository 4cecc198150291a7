"""Robust image decoding for scoring and fitting.

Every image becomes a float tensor ``(3, H, W)`` in ``[0, 1]`` at the expert's input size, whatever its
storage: 8/16-bit, grayscale, palette, RGBA (alpha dropped), CMYK, float, or very large. Decoding problems
(including float images with NaN or infinite pixels) raise :class:`ImageLoadError` with a short message that
the caller stores in the sample's ``<key>_error`` field.

Resizing uses torchvision's antialiased bilinear resize, exactly as anomalib's default ``PreProcessor``
does, so scores match anomalib's own loop on the same images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# Decoding an image larger than this many pixels first shrinks it with PIL's cheap ``reduce`` (box filter
# by an integer factor), so an 8000x8000 photo does not become a 768 MB float tensor.
_REDUCE_ABOVE_PIXELS = 4096 * 4096
# Refuse absurd images outright (PIL's decompression-bomb guard is ~89 Mpx; we allow up to 16k x 16k).
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class ImageLoadError(Exception):
    """Raised when one image cannot be decoded; the message goes to ``<key>_error``."""


def _to_float_array(img: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image to an ``(H, W, 3)`` float32 array in ``[0, 1]``."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
    elif mode == "I":
        arr = np.asarray(img, dtype=np.int32).astype(np.float32)
        hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi, 0.0, 1.0)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        _check_finite(arr)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)
    else:
        if mode != "RGB":
            # RGBA/LA/P/CMYK/1/L: PIL's own conversions (alpha is dropped, palettes expanded).
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def _check_finite(arr: np.ndarray) -> None:
    """Float images (mode ``F``) may hold NaN or infinite pixels: no score can be computed from them."""
    bad = ~np.isfinite(arr)
    if bad.any():
        n_nan = int(np.isnan(arr).sum())
        msg = (f"image has {int(bad.sum())} non-finite pixels ({n_nan} NaN, {int(bad.sum()) - n_nan} infinite) "
               f"of {arr.size}; it cannot be scored")
        raise ImageLoadError(msg)


def _decode(path: str, image_size: tuple[int, int], *, to_array: bool) -> np.ndarray | None:
    """Decode ``path`` (JPEGs at reduced scale, huge images reduced); the float array when ``to_array``."""
    if not os.path.isfile(path):
        raise ImageLoadError(f"file not found: {path}")
    try:
        with Image.open(path) as img:
            img.draft("RGB", (image_size[1] * 2, image_size[0] * 2))  # JPEG: decode at reduced scale
            n_pixels = img.width * img.height
            if n_pixels > _REDUCE_ABOVE_PIXELS and img.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                factor = int(np.sqrt(n_pixels / _REDUCE_ABOVE_PIXELS)) + 1
                img = img.reduce(factor)
            else:
                img.load()
            if to_array:
                return _to_float_array(img)
            if img.mode == "F":  # the one mode whose pixels can be NaN or infinite
                _check_finite(np.asarray(img, dtype=np.float32))
            return None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL raises OSError for truncated/corrupt data and UnidentifiedImageError (an OSError) for non-images.
        raise ImageLoadError(f"cannot decode image: {exc}") from exc


def check_image(path: str, image_size: tuple[int, int]) -> None:
    """Raise :class:`ImageLoadError` where :func:`load_image` would fail, at a fraction of its cost.

    The file is decoded as :func:`load_image` decodes it, but not converted to floats or resized (for an
    8-bit PNG about an eighth of the time).

    Example:
        >>> check_image("part.png", (256, 256))  # None, or ImageLoadError("cannot decode image: ...")
    """
    _decode(path, image_size, to_array=False)


def load_image(path: str, image_size: tuple[int, int]) -> torch.Tensor:
    """Decode an image file and resize it to ``image_size``.

    Args:
        path: path of the image on disk.
        image_size: ``(height, width)`` of the returned tensor.

    Returns:
        A float32 tensor of shape ``(3, height, width)`` with values in ``[0, 1]``.

    Raises:
        ImageLoadError: if the file is missing, truncated, corrupt or not an image.

    Example:
        >>> load_image("part.png", (256, 256)).shape
        torch.Size([3, 256, 256])
    """
    arr = _decode(path, image_size, to_array=True)
    tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    if tuple(tensor.shape[-2:]) != tuple(image_size):
        # imported here: torchvision takes over a second to import, and the App imports this module at start-up
        from torchvision.transforms.v2 import functional as TF

        tensor = TF.resize(tensor, list(image_size), antialias=True)
    return tensor.clamp_(0.0, 1.0)


class DecodedImages(Sequence):
    """Images that decode (with :func:`load_image`, float32) when read, not before.

    Fitting holds no decoded copy of the training set: the images reach the model exactly as anomalib's own
    datamodules deliver them (decoded per batch, full precision), and memory does not grow with the set.

    Args:
        paths: image files, all already known to decode (see ``fit_expert``).
        image_size: ``(height, width)`` of each tensor.

    Example:
        >>> images = DecodedImages(["a.png", "b.png"], (224, 224))
        >>> images.take([1])[0].shape
        torch.Size([3, 224, 224])
    """

    def __init__(self, paths: Sequence[str], image_size: tuple[int, int]) -> None:
        self.paths = list(paths)
        self.image_size = tuple(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [load_image(p, self.image_size) for p in self.paths[index]]
        return load_image(self.paths[index], self.image_size)

    def take(self, indices) -> DecodedImages:
        """The images at ``indices`` (still lazy)."""
        return DecodedImages([self.paths[int(i)] for i in indices], self.image_size)


def read_heatmap(map_path: str) -> np.ndarray:
    """A stored 16-bit (or 8-bit) heatmap PNG as a float array in [0, 1]."""
    with Image.open(map_path) as im:
        arr = np.asarray(im).astype(np.float64)
    if arr.ndim == 3:
        arr = arr[..., 0]
    hi = 65535.0 if arr.max(initial=0) > 255 or str(im.mode).startswith("I") else 255.0
    return np.clip(arr / hi, 0.0, 1.0)
