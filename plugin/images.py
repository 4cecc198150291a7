"""Robust image decoding for scoring and fitting.

Every image becomes a float tensor ``(3, H, W)`` in ``[0, 1]`` at the expert's input size, whatever its
storage: 8/16-bit, grayscale, palette, RGBA (alpha dropped), CMYK, float, or very large. Decoding problems
(including float images with NaN or infinite pixels) raise :class:`ImageLoadError` with a short message that
the caller stores in the sample's ``<key>_error`` field.

Resizing uses torchvision's antialiased bilinear resize, exactly as anomalib's default ``PreProcessor``
does, so scores match anomalib's own loop on the same images.

Images are read in the orientation FiftyOne's App shows them: a JPEG's EXIF orientation tag is applied
(``PIL.ImageOps.exif_transpose``), so heatmaps and masks line up with the image on screen.
:func:`decode_native` gives an image at its own resolution (no resize), for tiled experts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .models.line_inference import float_array

# Decoding an image larger than this many pixels first shrinks it with PIL's cheap ``reduce`` (box filter
# by an integer factor), so an 8000x8000 photo does not become a 768 MB float tensor.
_REDUCE_ABOVE_PIXELS = 4096 * 4096
# Refuse absurd images outright (PIL's decompression-bomb guard is ~89 Mpx; we allow up to 16k x 16k).
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class ImageLoadError(Exception):
    """Raised when one image cannot be decoded; the message goes to ``<key>_error``."""


def _to_float_array(img: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image to an ``(H, W, 3)`` float32 array in ``[0, 1]``.

    The conversion is :func:`~fiftyone_anomaly_vlm.models.line_inference.float_array`, the one exported experts
    use at the line, so both see the same pixels."""
    if img.mode == "F":  # the one mode whose pixels can be NaN or infinite: this module's message
        _check_finite(np.asarray(img, dtype=np.float32))
    return float_array(img)


def _check_finite(arr: np.ndarray) -> None:
    """Float images (mode ``F``) may hold NaN or infinite pixels: no score can be computed from them."""
    bad = ~np.isfinite(arr)
    if bad.any():
        n_nan = int(np.isnan(arr).sum())
        msg = (f"image has {int(bad.sum())} non-finite pixels ({n_nan} NaN, {int(bad.sum()) - n_nan} infinite) "
               f"of {arr.size}; it cannot be scored")
        raise ImageLoadError(msg)


#: EXIF orientations (5-8) that swap width and height when applied
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def _orientation(img: Image.Image) -> int:
    """The image's EXIF orientation tag (1: as stored)."""
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is read as "as stored", as browsers do
        return 1


def _decode(path: str, image_size: tuple[int, int] | None, *, to_array: bool,
            with_size: bool = False):
    """Decode ``path`` upright (EXIF orientation applied); the float array when ``to_array``.

    With an ``image_size``, JPEGs are decoded at reduced scale and huge images reduced; None decodes at the
    image's own resolution. ``with_size``: return ``(array or None, (height, width))``, the size of the upright
    image as stored (before any reduction).
    """
    if not os.path.isfile(path):
        raise ImageLoadError(f"file not found: {path}")
    try:
        with Image.open(path) as img:
            size = (img.height, img.width)
            orientation = _orientation(img)
            if orientation in _TRANSPOSING_ORIENTATIONS:
                size = size[::-1]
            if image_size is not None:
                img.draft("RGB", (image_size[1] * 2, image_size[0] * 2))  # JPEG: decode at reduced scale
            if orientation != 1:
                img = ImageOps.exif_transpose(img)  # loads it; the copy it returns has no EXIF orientation
            n_pixels = img.width * img.height
            if (image_size is not None and n_pixels > _REDUCE_ABOVE_PIXELS
                    and img.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")):
                factor = int(np.sqrt(n_pixels / _REDUCE_ABOVE_PIXELS)) + 1
                img = img.reduce(factor)
            else:
                img.load()
            out = None
            if to_array:
                out = _to_float_array(img) if image_size is not None else _to_native_array(img)
            elif img.mode == "F":  # the one mode whose pixels can be NaN or infinite
                _check_finite(np.asarray(img, dtype=np.float32))
            return (out, size) if with_size else out
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL raises OSError for truncated/corrupt data and UnidentifiedImageError (an OSError) for non-images.
        raise ImageLoadError(f"cannot decode image: {exc}") from exc


def _to_native_array(img: Image.Image) -> np.ndarray:
    """``(H, W, 3)``: uint8 for 8-bit images (a quarter of float32's memory: large images stay large only once),
    float32 in ``[0, 1]`` for deeper ones."""
    if img.mode in ("RGB", "L", "P", "RGBA", "LA", "CMYK", "1", "YCbCr"):
        arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
        return arr
    return _to_float_array(img)


def decode_native(path: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image upright at its own resolution: ``(array (H, W, 3), (H, W))``.

    8-bit images come back as uint8, deeper ones (16-bit, float) as float32 in ``[0, 1]`` (tiled experts
    convert each tile to float as they cut it, :class:`~fiftyone_anomaly_vlm.models.TiledExpert`), so an
    8000x8000 photo takes 192 MB, not 768. Used by tiled experts, which cut the image without resizing it.

    Raises:
        ImageLoadError: as :func:`load_image`.

    Example:
        >>> arr, (h, w) = decode_native("part.png")
    """
    arr = _decode(path, None, to_array=True)
    return arr, (int(arr.shape[0]), int(arr.shape[1]))


def image_size_of(path: str) -> tuple[int, int]:
    """``(height, width)`` of the image as FiftyOne's App shows it (EXIF orientation applied), read from its
    header only.

    Raises:
        ImageLoadError: missing file or not an image.
    """
    if not os.path.isfile(path):
        raise ImageLoadError(f"file not found: {path}")
    try:
        with Image.open(path) as img:
            size = (img.height, img.width)
            return size[::-1] if _orientation(img) in _TRANSPOSING_ORIENTATIONS else size
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"cannot decode image: {exc}") from exc


def check_image(path: str, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """Raise :class:`ImageLoadError` where :func:`load_image` would fail, at a fraction of its cost.

    The file is decoded as :func:`load_image` decodes it, but not converted to floats or resized (for an
    8-bit PNG about an eighth of the time).

    ``image_size`` None checks the image at its own resolution (as tiled experts read it).

    Returns:
        ``(height, width)`` of the upright image.

    Example:
        >>> check_image("part.png", (256, 256))  # (h, w), or ImageLoadError("cannot decode image: ...")
    """
    return _decode(path, image_size, to_array=False, with_size=True)[1]


def load_image(path: str, image_size: tuple[int, int]) -> torch.Tensor:
    """Decode an image file (upright, EXIF orientation applied) and resize it to ``image_size``.

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
    return load_image_sized(path, image_size)[0]


def load_image_sized(path: str, image_size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """:func:`load_image` and the ``(height, width)`` of the upright image as stored (the resolution its
    heatmap is written at, up to a cap)."""
    arr, size = _decode(path, image_size, to_array=True, with_size=True)
    tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    if tuple(tensor.shape[-2:]) != tuple(image_size):
        # imported here: torchvision takes over a second to import, and the App imports this module at start-up
        from torchvision.transforms.v2 import functional as TF

        tensor = TF.resize(tensor, list(image_size), antialias=True)
    return tensor.clamp_(0.0, 1.0), size


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
