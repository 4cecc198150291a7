"""Expert-guided crops (Triad): the regions of an expert's anomaly map around its highest local maxima, or
around the expert run's own defect regions (``<expert>_regions``, see :mod:`fiftyone_anomaly_vlm.regions`).

Example:
    >>> crops, boxes = expert_crops(image, "/maps/0001.png", 3)
    >>> boxes[0]
    ((0.62, 0.05, 0.33, 0.33), 0.97, 'top right')
    >>> crops, boxes = region_crops(image, sample["padim_regions"], 3)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..images import read_heatmap
from ..labels import grid_word

#: side of a crop as a share of the map's shorter side
CROP_FRACTION = 1 / 3
#: a region crop reaches this far beyond its region on each side, as a share of the region's side
REGION_MARGIN = 0.25
#: a region crop's side is at least this share of the image's shorter side (a speck is shown with its context)
MIN_REGION_CROP = 1 / 8
#: where the judge's crops come from: ``"maxima"`` (around the map's highest local maxima) or ``"regions"``
#: (the expert run's ``<expert>_regions``, most anomalous first; a sample without regions falls back to maxima)
CROP_SOURCES = ("maxima", "regions")


def top_regions(heatmap: np.ndarray, n: int, fraction: float = CROP_FRACTION) -> list[tuple[int, int, int, int, float]]:
    """Square boxes around the ``n`` highest local maxima of an anomaly map (Triad's expert-guided crops).

    The highest pixel gives the first box (centred on it, shifted to stay inside the map); that box is
    suppressed and the next maximum taken, so the boxes do not overlap.

    Args:
        heatmap: ``(H, W)`` map, higher = more anomalous.
        n: number of regions.
        fraction: box side as a share of the shorter map side.

    Returns:
        ``[(x0, y0, x1, y1, peak), ...]`` in map pixels (x1/y1 exclusive), best first.
    """
    h, w = heatmap.shape
    side = max(1, round(fraction * min(h, w)))
    work = heatmap.astype(np.float64).copy()
    boxes = []
    for _ in range(max(0, n)):
        if not np.isfinite(work).any():
            break
        idx = int(np.nanargmax(np.where(np.isfinite(work), work, -np.inf)))
        cy, cx = divmod(idx, w)
        peak = float(heatmap[cy, cx])
        x0 = min(max(0, cx - side // 2), w - side)
        y0 = min(max(0, cy - side // 2), h - side)
        boxes.append((x0, y0, x0 + side, y0 + side, peak))
        work[y0:y0 + side, x0:x0 + side] = -np.inf
    return boxes


def expert_crops(image: Image.Image, map_path: str, n: int) -> tuple[list[tuple[Image.Image, str]], list]:
    """Cut the ``n`` top regions of the expert's map (``map_path``) out of ``image``.

    Returns:
        ``(crops, boxes)``: ``[(crop, grid word), ...]`` for the prompt and ``[(box, peak, grid word), ...]``
        with ``box = (x, y, w, h)`` relative to the image, for the ``<key>_regions`` detections.
    """
    W, H = image.size
    heatmap = read_heatmap(map_path)
    h, w = heatmap.shape
    crops, boxes = [], []
    for x0, y0, x1, y1, peak in top_regions(heatmap, n):
        bx = (x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h)
        box = (round(bx[0] * W), round(bx[1] * H), round((bx[0] + bx[2]) * W), round((bx[1] + bx[3]) * H))
        crop = image.crop((box[0], box[1], max(box[0] + 1, box[2]), max(box[1] + 1, box[3])))
        where = grid_word(bx[0] + bx[2] / 2, bx[1] + bx[3] / 2)
        crops.append((crop, where))
        boxes.append((bx, peak, where))
    return crops, boxes


def region_crops(image: Image.Image, regions, n: int) -> tuple[list[tuple[Image.Image, str]], list]:
    """Cut the first ``n`` of an expert run's regions (``fo.Detections`` of ``<expert>_regions``, most anomalous
    first) out of ``image``, each grown by :data:`REGION_MARGIN` and to at least :data:`MIN_REGION_CROP`.

    Returns:
        ``(crops, boxes)`` as :func:`expert_crops`: ``box`` is the crop's ``(x, y, w, h)`` relative to the image,
        ``peak`` and the grid word are the region's.
    """
    W, H = image.size
    crops, boxes = [], []
    for det in (regions.detections if regions is not None else [])[:max(0, n)]:
        x, y, w, h = det.bounding_box
        floor = MIN_REGION_CROP * min(W, H)
        cw, ch = max(w * W * (1 + 2 * REGION_MARGIN), floor), max(h * H * (1 + 2 * REGION_MARGIN), floor)
        cx, cy = (x + w / 2) * W, (y + h / 2) * H
        x0 = round(min(max(0.0, cx - cw / 2), max(0.0, W - cw)))
        y0 = round(min(max(0.0, cy - ch / 2), max(0.0, H - ch)))
        x1, y1 = min(W, max(x0 + 1, round(x0 + cw))), min(H, max(y0 + 1, round(y0 + ch)))
        where = det["location"]
        crops.append((image.crop((x0, y0, x1, y1)), where))
        boxes.append(((x0 / W, y0 / H, (x1 - x0) / W, (y1 - y0) / H), det["peak"], where))
    return crops, boxes
