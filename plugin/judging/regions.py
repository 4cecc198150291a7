"""Expert-guided crops (Triad): the regions of an expert's anomaly map around its highest local maxima.

Example:
    >>> crops, boxes = expert_crops(image, "/maps/0001.png", 3)
    >>> boxes[0]
    ((0.62, 0.05, 0.33, 0.33), 0.97, 'top right')
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..images import read_heatmap
from .prompt import GRID

#: side of a crop as a share of the map's shorter side
CROP_FRACTION = 1 / 3


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


def grid_word(cx: float, cy: float) -> str:
    """The 3x3 grid word of a point given in relative coordinates [0, 1]."""
    col = min(2, int(cx * 3))
    row = min(2, int(cy * 3))
    return GRID[row * 3 + col]


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
