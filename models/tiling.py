"""Tiled anomalib experts: cut each image into tiles at its own resolution, score the tiles, stitch the maps.

A small defect (a speck, a hairline scratch) in a 2000 px image vanishes when the whole image is resized to a
256 px model input. A :class:`TiledExpert` never resizes the image: it cuts it into ``tile_size`` tiles every
``tile_stride`` pixels, runs the wrapped :class:`~.anomalib_expert.AnomalibExpert` on batches of tiles, and
blends the tiles' maps where they overlap (the mean, as anomalib's ``Tiler.untile`` does).

What is anomalib's and what is not:

- the tile grid and the stride rule are ``anomalib.data.utils.tiler.Tiler``'s (a tile every ``stride`` pixels,
  ``stride <= tile``); overlaps are averaged as its ``untile`` does: where the image size fits the grid,
  :func:`stitch` gives exactly ``Tiler.untile``'s result (tested against it);
- written here, because ``Tiler`` does not fit: ``Tiler.tile`` materialises every tile of an image at once (an
  8000x8000 image with 256/224 tiles is 1225 float tiles, ~1 GB) and ``untile`` needs them all back, so tiles
  are cut, scored and added to the stitched map in batches of ``batch_size`` instead; ``Tiler`` refuses
  images smaller than a tile and pads the grid's overhang with zeros (a black band the model reads as a
  defect edge), so the last tile of a row is aligned with the image edge instead, and an image smaller
  than a tile is padded by repeating its edge pixels;
- the stitched map can be accumulated directly at a reduced output size (each tile's map resized into its
  place), so memory stays bounded by the output size, not the image's.

Image score (``image_score``): ``"map_max"`` (default) is the maximum of the stitched raw map; ``"tile_max"``
is the highest of the model's own image scores over the tiles. ``benchmarks/tiling.py`` measures both.

Example:
    >>> tiled = TiledExpert(AnomalibExpert.load("model.ckpt"), tile_size=256, tile_stride=224)
    >>> out = tiled.predict_array(uint8_image_hwc)               # maps at the image's resolution
    >>> out.anomaly_map.shape
    torch.Size([1, 2048, 3072])
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .base import ExpertOutput, VisionExpert

#: largest accepted tile side (a tile is one model input; larger ones are a mistake, e.g. pixels for tiles)
MAX_TILE_SIZE = 2048
#: the image scores a tiled expert can report (see the module docs)
TILE_IMAGE_SCORES = ("map_max", "tile_max")


def check_tile_settings(tile_size: int | None, tile_stride: int | None = None) -> tuple[int, int] | None:
    """``(tile_size, tile_stride)`` checked, or None when tiling is off (``tile_size`` None).

    ``tile_stride`` None means no overlap (stride = tile size).

    Raises:
        ValueError: one message naming the bad setting: not an integer, non-positive, a tile above
            :data:`MAX_TILE_SIZE`, a stride without a tile, or a stride larger than the tile (gaps no tile sees).
    """
    if tile_size is None:
        if tile_stride is not None:
            raise ValueError(f"tile_stride={tile_stride!r} given without tile_size; set tile_size too (or neither)")
        return None
    for name, value in (("tile_size", tile_size), ("tile_stride", tile_stride)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise ValueError(f"{name} must be a whole number of pixels, got {value!r}")
    tile = int(tile_size)
    stride = tile if tile_stride is None else int(tile_stride)
    if tile <= 0 or stride <= 0:
        raise ValueError(f"tile_size and tile_stride must be positive, got tile_size={tile}, tile_stride={stride}")
    if tile > MAX_TILE_SIZE:
        raise ValueError(f"tile_size={tile} is larger than {MAX_TILE_SIZE} px: a tile is one model input "
                         f"(typically 224-512 px); choose a smaller tile")
    if stride > tile:
        raise ValueError(f"tile_stride={stride} is larger than tile_size={tile}: parts of the image would be in no "
                         "tile (anomalib's Tiler refuses this too); use a stride <= the tile size")
    return tile, stride


def scaled_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``size`` scaled down so that its longer side is at most ``max_side`` (None: as it is)."""
    h, w = int(size[0]), int(size[1])
    scale = 1.0 if max_side is None else min(1.0, max_side / max(h, w, 1))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of the tiles along one side of ``length`` pixels: every ``stride`` pixels as anomalib's
    ``Tiler`` does, the last one aligned with the edge instead of overhanging it; ``[0]`` when the side is not
    longer than a tile (that tile is padded)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_boxes(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(y0, x0, h, w)`` of every tile of a ``height x width`` image, row by row (``h``/``w`` are less than
    ``tile`` only where the image is smaller than a tile)."""
    return [(y, x, min(tile, height), min(tile, width))
            for y in tile_starts(height, tile, stride) for x in tile_starts(width, tile, stride)]


def crop_tile(image: np.ndarray | torch.Tensor, box: tuple[int, int, int, int], tile: int) -> torch.Tensor:
    """The tile ``box`` of an ``(H, W, 3)`` array (uint8 or float in [0, 1]) or a ``(3, H, W)`` tensor, as a float
    ``(3, tile, tile)`` tensor in ``[0, 1]``; a tile cut from an image smaller than ``tile`` is padded by
    repeating the edge pixels (zeros would read as a dark defect edge)."""
    y, x, h, w = box
    if isinstance(image, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(image[y:y + h, x:x + w])).permute(2, 0, 1)
    else:
        t = image[:, y:y + h, x:x + w]
    t = t.float().div(255.0) if t.dtype == torch.uint8 else t.float().clamp(0.0, 1.0)
    if h < tile or w < tile:
        t = F.pad(t[None], (0, tile - w, 0, tile - h), mode="replicate")[0]
    return t


class Stitcher:
    """Adds tile maps into one map of ``out_size`` for an image of ``image_size`` and averages the overlaps.

    At ``out_size == image_size`` each tile's map is added in place (the mean over the tiles covering a pixel,
    as anomalib's ``Tiler.untile``); at a smaller ``out_size`` each tile's map is first resized (bilinear,
    antialiased) to the box it covers there, so memory is that of the output map only.
    """

    def __init__(self, image_size: tuple[int, int], out_size: tuple[int, int], channels: int = 1) -> None:
        self.image_size, self.out_size = tuple(image_size), tuple(out_size)
        self.sy = out_size[0] / image_size[0]
        self.sx = out_size[1] / image_size[1]
        self.sum = torch.zeros((channels, *out_size), dtype=torch.float32)
        self.count = torch.zeros(out_size, dtype=torch.float32)

    def out_box(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """``box`` (image pixels) in output pixels: ``(y0, y1, x0, x1)``, at least one pixel each way."""
        y, x, h, w = box
        y0, x0 = min(int(round(y * self.sy)), self.out_size[0] - 1), min(int(round(x * self.sx)), self.out_size[1] - 1)
        y1 = max(y0 + 1, min(int(round((y + h) * self.sy)), self.out_size[0]))
        x1 = max(x0 + 1, min(int(round((x + w) * self.sx)), self.out_size[1]))
        return y0, y1, x0, x1

    def add(self, maps: torch.Tensor, box: tuple[int, int, int, int], tile: int | None = None) -> None:
        """Add ``maps`` ``(channels, m, m)`` of the tile ``box`` (its padding, if any, is cut off).

        ``tile`` is the side of the (padded) tile the maps cover; None means the maps are at the tile's size
        (``m`` = tile). A model input smaller than the tile gives smaller maps: the padding is then cut in map
        pixels (the same share of the map as of the tile).
        """
        _, _, h, w = box
        if tile is not None and maps.shape[-1] != tile:
            mh, mw = maps.shape[-2:]
            h_map, w_map = max(1, round(h * mh / tile)), max(1, round(w * mw / tile))
            maps = maps[:, :h_map, :w_map].float()
            h, w = h_map, w_map  # map pixels: resized into the output box below
        else:
            maps = maps[:, :h, :w].float()
        y0, y1, x0, x1 = self.out_box(box)
        if tuple(maps.shape[-2:]) != (y1 - y0, x1 - x0):
            maps = F.interpolate(maps[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False,
                                 antialias=(y1 - y0) < maps.shape[-2])[0]
        self.sum[:, y0:y1, x0:x1] += maps
        self.count[y0:y1, x0:x1] += 1.0

    def result(self) -> torch.Tensor:
        """The blended ``(channels, *out_size)`` map."""
        return self.sum / self.count.clamp(min=1.0)


def stitch(tile_maps: torch.Tensor, image_size: tuple[int, int], tile: int, stride: int,
           out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Blend ``(n_tiles, tile, tile)`` maps (in :func:`tile_boxes` order) into one ``out_size`` map (default: the
    image's size). The streamed scorer adds tiles batch by batch through a :class:`Stitcher`; this is the same
    for maps already in hand (tests, tools)."""
    stitcher = Stitcher(image_size, out_size or image_size)
    for m, box in zip(tile_maps, tile_boxes(*image_size, tile, stride), strict=True):
        stitcher.add(m[None], box, tile)
    return stitcher.result()[0]


class TiledExpert(VisionExpert):
    """An :class:`~.anomalib_expert.AnomalibExpert` applied tile by tile at the image's own resolution.

    Args:
        expert: the fitted model; its input size should be the tile size (tiles are fed as they are cut).
        tile_size: tile side in pixels.
        tile_stride: pixels between tile starts (None: ``tile_size``, no overlap).
        image_score: ``"map_max"`` or ``"tile_max"`` (see the module docs).
        batch_size: tiles per forward pass (memory is bounded by it, whatever the image size).
        max_map_side: :meth:`predict` stitches maps at most this long on their longer side (None: the image's
            size); :meth:`predict_array` takes the output size it is given.
    """

    #: images are read at their own resolution (:meth:`predict_array`), not resized to :attr:`image_size`
    native_resolution = True

    def __init__(self, expert, tile_size: int, tile_stride: int | None = None, *, image_score: str = "map_max",
                 batch_size: int = 16, max_map_side: int | None = None) -> None:
        self.tile, self.stride = check_tile_settings(tile_size, tile_stride)
        if image_score not in TILE_IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {TILE_IMAGE_SCORES}, got {image_score!r}")
        self.expert, self.image_score, self.batch_size = expert, image_score, max(1, int(batch_size))
        self.max_map_side = max_map_side
        self.image_size = (self.tile, self.tile)
        self.device = expert.device

    def tile_batches(self, image, height: int, width: int) -> Iterator[tuple[torch.Tensor, list]]:
        """``(tiles (n, 3, tile, tile), boxes)`` batches of ``image`` (see :func:`crop_tile` for its forms)."""
        boxes = tile_boxes(height, width, self.tile, self.stride)
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start:start + self.batch_size]
            yield torch.stack([crop_tile(image, box, self.tile) for box in chunk]), chunk

    def predict_array(self, image, out_size: tuple[int, int] | None = None) -> ExpertOutput:
        """Score one image, an ``(H, W, 3)`` array (uint8, or float in [0, 1]) or a ``(3, H, W)`` tensor.

        Returns an :class:`ExpertOutput` of one image whose maps are ``out_size`` (default: the image's size).
        """
        height, width = (image.shape[0], image.shape[1]) if isinstance(image, np.ndarray) else image.shape[-2:]
        out_size = tuple(out_size or (height, width))
        stitcher = Stitcher((height, width), out_size, channels=2)
        raw_best, score_best = -float("inf"), -float("inf")
        for tiles, boxes in self.tile_batches(image, height, width):
            out = self.expert.predict(tiles)
            raw_best = max(raw_best, float(out.raw_score.max()))
            score_best = max(score_best, float(out.score.max()))
            raw_map = out.raw_map if out.raw_map is not None else out.anomaly_map
            for i, box in enumerate(boxes):
                stitcher.add(torch.stack([raw_map[i], out.anomaly_map[i]]), box, self.tile)
        raw_map, anomaly_map = stitcher.result()
        if self.image_score == "map_max":
            raw_best, score_best = float(raw_map.max()), float(anomaly_map.max())
        score = torch.tensor([score_best], dtype=torch.float32)
        return ExpertOutput(raw_score=torch.tensor([raw_best], dtype=torch.float32), score=score, label=score > 0.5,
                            anomaly_map=anomaly_map[None], mask=(anomaly_map > 0.5)[None], raw_map=raw_map[None])

    def predict(self, images: torch.Tensor) -> ExpertOutput:
        """Score a batch ``(N, 3, H, W)`` of same-sized images (float in [0, 1] or uint8) at their own size."""
        outs = [self.predict_array(image, scaled_size(image.shape[-2:], self.max_map_side)) for image in images]
        return ExpertOutput(**{name: torch.cat([getattr(o, name) for o in outs])
                               for name in ("raw_score", "score", "label", "anomaly_map", "mask", "raw_map")})
