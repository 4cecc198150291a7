"""Heatmaps at the image's resolution, and images read at their own resolution for tiled experts.

Heatmaps and masks are written at the resolution of the image they belong to (as the App shows it: EXIF
orientation applied), up to :data:`MAP_MAX_SIDE` pixels on the longer side, so the App's overlay lines up with
small defects. An expert that sees a resized image (every untiled expert) has its map resized up to that size
(bilinear; the mask is the resized map thresholded again). A tiled expert
(:class:`~fiftyone_anomaly_vlm.models.TiledExpert`) stitches its map directly at that size.

Images for a tiled expert are decoded at their own resolution (:func:`~fiftyone_anomaly_vlm.images.decode_native`,
uint8 for 8-bit images) and grouped into loader batches of at most :data:`BATCH_PIXELS` pixels, so a batch of
large images holds a bounded amount of memory (an image larger than that is a batch of its own).

Example:
    >>> map_size((6000, 8000))
    (1536, 2048)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .images import ImageLoadError, decode_native, image_size_of
from .models.tiling import crop_tile, scaled_size, tile_boxes

#: longest side of a stored heatmap / mask (a 8000x6000 image gets a 2048x1536 map)
MAP_MAX_SIDE = 2048
#: pixels of images decoded at their own resolution per loader batch (a larger image makes a batch alone)
BATCH_PIXELS = 16 * 1024 * 1024
#: decoded images a tiled fit keeps for cutting tiles (pixels; ~400 MB of uint8 RGB)
CACHE_PIXELS = 128 * 1024 * 1024


def map_size(image_size: tuple[int, int], max_side: int = MAP_MAX_SIDE) -> tuple[int, int]:
    """``(height, width)`` of the stored map of an image of ``image_size``: the image's size, scaled down to
    ``max_side`` on its longer side when larger."""
    return scaled_size(image_size, max_side)


def resize_map(values: np.ndarray, size: tuple[int, int], *, mask: bool = False) -> np.ndarray:
    """A 2-D map resized to ``size`` (bilinear, antialiased when shrinking; nearest for a ``mask``)."""
    if tuple(values.shape) == tuple(size):
        return values
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    if mask:
        return F.interpolate(t, size=size, mode="nearest")[0, 0].numpy() > 0.5
    shrink = size[0] < values.shape[0] or size[1] < values.shape[1]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrink)[0, 0].numpy()
    return out.astype(values.dtype, copy=False)


class NativeImageList(torch.utils.data.Dataset):
    """(id, ``(H, W, 3)`` array at the image's own resolution, error, ``(H, W)``) per sample; a bad image yields
    its error message instead of an array."""

    def __init__(self, ids: list[str], paths: list[str]) -> None:
        self.ids, self.paths = ids, paths

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        try:
            arr, size = decode_native(self.paths[i])
            return self.ids[i], arr, None, size
        except ImageLoadError as exc:
            return self.ids[i], None, str(exc), None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this sample's error, not the run's
            return self.ids[i], None, f"{type(exc).__name__}: {exc}", None


def pixel_batches(paths: list[str], max_images: int, max_pixels: int = BATCH_PIXELS) -> list[list[int]]:
    """Indices of ``paths`` grouped into batches of at most ``max_images`` images and ``max_pixels`` pixels
    (sizes read from the image headers; an unreadable header counts as one pixel: its error comes at decoding)."""
    batches: list[list[int]] = []
    current: list[int] = []
    pixels = 0
    for i, path in enumerate(paths):
        try:
            h, w = image_size_of(path)
            n = h * w
        except ImageLoadError:
            n = 1
        if current and (len(current) >= max_images or pixels + n > max_pixels):
            batches.append(current)
            current, pixels = [], 0
        current.append(i)
        pixels += n
    if current:
        batches.append(current)
    return batches


def native_loader(ids: list[str], paths: list[str], batch_size: int, num_workers: int, collate_fn, pin: bool):
    """A ``DataLoader`` of :class:`NativeImageList` batches (:func:`pixel_batches`); at most two decoding workers,
    each one batch ahead, so memory stays bounded by a few batches of :data:`BATCH_PIXELS`."""
    workers = min(num_workers, 2)
    return torch.utils.data.DataLoader(
        NativeImageList(ids, paths), batch_sampler=pixel_batches(paths, batch_size), num_workers=workers,
        collate_fn=collate_fn, pin_memory=pin, persistent_workers=False, prefetch_factor=1 if workers else None)


def at_map_sizes(maps: np.ndarray, masks: np.ndarray, sizes: list, pixel_threshold: float | None) -> tuple[list, list]:
    """Each image's map and mask at its map size (``sizes``, None: as they are): the map resized, the mask the
    resized map above ``pixel_threshold`` (the rule :func:`~fiftyone_anomaly_vlm.set_threshold` applies to stored
    maps), or the mask resized when there is no threshold."""
    out_maps, out_masks = [], []
    for m, k, size in zip(maps, masks, sizes, strict=True):
        if size is not None and tuple(m.shape) != tuple(size):
            m = resize_map(m, size)
            k = m > pixel_threshold if pixel_threshold is not None else resize_map(k, size, mask=True)
        out_maps.append(m)
        out_masks.append(k)
    return out_maps, out_masks


class NativeImages(Sequence):
    """Images at their own resolution, decoded when read: float ``(3, H, W)`` tensors in ``[0, 1]`` (the held-out
    images a tiled expert is calibrated on, one at a time).

    Args:
        paths: image files, all known to decode.
        sizes: their ``(H, W)``.
    """

    def __init__(self, paths: Sequence[str], sizes: Sequence[tuple[int, int]]) -> None:
        self.paths, self.sizes = list(paths), [tuple(s) for s in sizes]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        arr = decode_native(self.paths[index])[0]
        return crop_tile(arr, (0, 0, arr.shape[0], arr.shape[1]), 0)

    def take(self, indices) -> NativeImages:
        """The images at ``indices`` (still lazy)."""
        return NativeImages([self.paths[int(i)] for i in indices], [self.sizes[int(i)] for i in indices])

    def tiles(self, tile: int, stride: int) -> ImageTiles:
        """Every tile of these images (:class:`ImageTiles`)."""
        return ImageTiles(self.paths, self.sizes, tile, stride)


class ImageTiles(Sequence):
    """The tiles of images (:func:`~fiftyone_anomaly_vlm.models.tiling.tile_boxes`), each a float
    ``(3, tile, tile)`` tensor cut when read, for fitting a tiled expert.

    Decoded images are kept (as uint8) up to :data:`CACHE_PIXELS` pixels, the least recently used dropped first:
    anomalib's training loader reads the tiles in random order.

    Attributes:
        tile_paths: the image file of each tile (anomalib's batch bookkeeping).
    """

    def __init__(self, paths: Sequence[str], sizes: Sequence[tuple[int, int]], tile: int, stride: int) -> None:
        self.paths, self.tile = list(paths), tile
        self.index = [(k, box) for k, size in enumerate(sizes) for box in tile_boxes(*size, tile, stride)]
        self.tile_paths = [self.paths[k] for k, _ in self.index]
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index)

    def _image(self, k: int) -> np.ndarray:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        arr = decode_native(self.paths[k])[0]
        self._cache[k] = arr
        while len(self._cache) > 1 and sum(a.shape[0] * a.shape[1] for a in self._cache.values()) > CACHE_PIXELS:
            self._cache.popitem(last=False)
        return arr

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        k, box = self.index[index]
        return crop_tile(self._image(k), box, self.tile)

    def take(self, indices) -> list[torch.Tensor]:
        """The tiles at ``indices``."""
        return [self[int(i)] for i in indices]


def typical_image_size(samples, max_samples: int = 20) -> tuple[int, int] | None:
    """Median ``(height, width)`` of the images of ``samples``: from ``metadata`` where it is computed, else read
    from the headers of up to ``max_samples`` files (nothing is written). None when no size can be read."""
    view = samples.limit(max_samples)
    heights, widths, paths = view.values(["metadata.height", "metadata.width", "filepath"])
    sizes = [(h, w) for h, w in zip(heights, widths) if h and w]
    if not sizes:
        for path in paths:
            try:
                sizes.append(image_size_of(path))
            except ImageLoadError:
                continue
    if not sizes:
        return None
    return int(np.median([s[0] for s in sizes])), int(np.median([s[1] for s in sizes]))


def tiling_hint(samples, model_input: int) -> str | None:
    """A hint for the fit form when the images of ``samples`` are much larger (twice or more on the longer
    side) than a ``model_input`` px model input: resizing them would erase small defects. None otherwise."""
    size = typical_image_size(samples)
    if size is None or max(size) < 2 * model_input:
        return None
    return (f"The images are about {size[1]}x{size[0]} px, {max(size) / model_input:.0f}x the {model_input} px model "
            f"input: a whole-image resize erases small defects (specks, hairline scratches). Tiling cuts them into "
            f"{model_input} px tiles at their own resolution instead.")
