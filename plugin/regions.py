"""Defect regions: the connected regions of a thresholded anomaly map as ``fo.Detections``, and a one-line
explanation of a flagged sample built from them (no VLM needed).

Every scoring run writes, per sample, ``<key>_regions`` (one ``fo.Detection`` labelled ``"anomaly"`` per
8-connected region of the mask, most anomalous first), ``<key>_num_regions`` (their count) and, for samples
labelled anomalous, ``<key>_explanation``. :func:`fiftyone_anomaly_vlm.set_threshold` recomputes all three
with the masks. Connected components come from :func:`scipy.ndimage.label` and :func:`scipy.ndimage.find_objects`.

Each detection has ``bounding_box`` (relative ``[x, y, w, h]``), ``confidence`` (= ``peak``) and the attributes
``area_px`` (the region's area in pixels of the image: map pixels scaled by the image's own size),
``area_share`` (its share of the image, 0..1), ``peak`` and ``mean`` (the highest and mean value of the
calibrated heatmap inside it: 0 is the median known-good pixel, 0.5 the highest pixel of any known-good
calibration map) and ``location`` (a 3x3 grid word, :data:`~fiftyone_anomaly_vlm.labels.GRID`).

Example:
    >>> regions = find_regions(heatmap, heatmap > 0.3, image_size=(1024, 768), min_area=0.001)
    >>> regions[0].location, regions[0].area_share
    ('top left', 0.0123)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

import fiftyone as fo

from . import images
from .labels import grid_word

#: the label of every region detection
REGION_LABEL = "anomaly"
#: attributes of a region detection and their FiftyOne field types (declared so the App can filter on them)
REGION_ATTRIBUTES = {"area_px": fo.IntField, "area_share": fo.FloatField, "peak": fo.FloatField,
                     "mean": fo.FloatField, "location": fo.StringField}
#: regions named in an explanation (the rest are counted)
EXPLAINED_REGIONS = 3
#: 8-connectivity: pixels touching at a corner belong to the same region (a diagonal hairline stays one)
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Region:
    """One connected region of a thresholded anomaly map.

    Attributes:
        box: ``(x, y, w, h)`` relative to the image, in [0, 1].
        area_px: area in image pixels (map pixels times the image's pixels per map pixel).
        area_share: area as a share of the image.
        peak: highest calibrated heatmap value in the region.
        mean: mean calibrated heatmap value in the region.
        location: 3x3 grid word of the box's centre.
    """

    box: tuple[float, float, float, float]
    area_px: int
    area_share: float
    peak: float
    mean: float
    location: str

    def detection(self) -> fo.Detection:
        """The region as an ``fo.Detection`` (label ``"anomaly"``, confidence = peak)."""
        return fo.Detection(label=REGION_LABEL, bounding_box=list(self.box), confidence=self.peak,
                            area_px=self.area_px, area_share=self.area_share, peak=self.peak, mean=self.mean,
                            location=self.location)

    @classmethod
    def from_detection(cls, det: fo.Detection) -> "Region":
        """Inverse of :meth:`detection`."""
        return cls(tuple(det.bounding_box), int(det["area_px"]), float(det["area_share"]), float(det["peak"]),
                   float(det["mean"]), str(det["location"]))


def check_min_area(min_area: float) -> float:
    """``min_area`` as a float share of the image in ``[0, 1)``.

    Raises:
        ValueError: not a number in ``[0, 1)``.
    """
    try:
        value = float(min_area)
    except (TypeError, ValueError):
        raise ValueError(f"min_region_area must be a share of the image in [0, 1), got {min_area!r}") from None
    if isinstance(min_area, bool) or not (0.0 <= value < 1.0):
        raise ValueError(f"min_region_area must be a share of the image in [0, 1) (e.g. 0.001 = 0.1 %), "
                         f"got {min_area!r}")
    return value


def find_regions(heatmap: np.ndarray, mask: np.ndarray, *, image_size: tuple[int, int] | None = None,
                 min_area: float = 0.0) -> list[Region]:
    """The 8-connected regions of ``mask`` whose share of the image is at least ``min_area``.

    Args:
        heatmap: ``(h, w)`` calibrated anomaly map (peak and mean are read from it).
        mask: ``(h, w)`` boolean mask (the map over the pixel threshold).
        image_size: ``(width, height)`` of the image, for ``area_px`` (default: the map's own size).
        min_area: smallest region kept, as a share of the image (0.001 = 0.1 %).

    Returns:
        The regions, highest peak first (ties: larger first).
    """
    mask = np.asarray(mask, dtype=bool)
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if mask.shape != heatmap.shape or mask.ndim != 2:
        raise ValueError(f"heatmap {heatmap.shape} and mask {mask.shape} must be 2-D arrays of the same shape")
    h, w = mask.shape
    labels, n = ndimage.label(mask, structure=_CONNECTIVITY)
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    areas = ndimage.sum_labels(mask, labels, index)
    peaks = ndimage.maximum(heatmap, labels, index)
    means = ndimage.mean(heatmap, labels, index)
    W, H = image_size or (w, h)
    scale = (W * H) / (w * h)
    regions = []
    for i, sl in enumerate(ndimage.find_objects(labels)):
        share = float(areas[i]) / (w * h)
        if share < min_area:
            continue
        ys, xs = sl
        box = (xs.start / w, ys.start / h, (xs.stop - xs.start) / w, (ys.stop - ys.start) / h)
        regions.append(Region(box, int(round(areas[i] * scale)), share, float(peaks[i]), float(means[i]),
                              grid_word(box[0] + box[2] / 2, box[1] + box[3] / 2)))
    regions.sort(key=lambda r: (-r.peak, -r.area_share))
    return regions


def region_detections(regions: list[Region]) -> fo.Detections:
    """``fo.Detections`` of ``regions`` (empty detections when there are none)."""
    return fo.Detections(detections=[r.detection() for r in regions])


def normal_peak(calibration) -> float | None:
    """The highest pixel of the known-good calibration maps on the calibrated heatmap scale (0.5 by the
    calibration's construction), or None without a calibration."""
    if calibration is None or not calibration.map_maxima:
        return None
    return float(calibration.normalize_map(np.array([max(calibration.map_maxima)]))[0])


def _percent(share: float) -> str:
    pct = 100.0 * share
    return f"{pct:.1f} %" if pct >= 1 else f"{pct:.2g} %"


def _score_percent(score: float) -> str:
    """``100 * score`` with one decimal, more where it would otherwise read 100 % (scores never reach 1)."""
    pct, digits = 100.0 * score, 1
    while digits < 6 and pct < 100 and round(pct, digits) >= 100:
        digits += 1
    return f"{pct:.{digits}f} %"


def _times(peak: float, normal: float | None, pixel_threshold: float) -> str:
    if normal and normal > 0:
        # the calibrated map stops at 1: a peak there is at least that many times the known-good maximum
        at_least = "at least " if peak >= 1.0 else ""
        return f"peak {at_least}{peak / normal:.1f}x the known-good maximum"
    return f"peak {peak:.2f}, pixel threshold {pixel_threshold:.2f}"


def explain(score: float, regions: list[Region], heatmap: np.ndarray | None, *, normal: float | None,
            pixel_threshold: float) -> str:
    """A one-line description of a flagged sample from its regions (how many, where, how large, how far above
    the normal range).

    Args:
        score: the calibrated image score (share of known-good samples scoring below it).
        regions: the sample's regions, most anomalous first.
        heatmap: the calibrated map (used only when there is no region, to say where its peak is).
        normal: :func:`normal_peak` of the run's calibration (None: the threshold is quoted instead).
        pixel_threshold: the run's pixel threshold on the calibrated heatmap scale.

    Example:
        >>> explain(0.997, regions, None, normal=0.5, pixel_threshold=0.41)
        'Anomalous: score 0.997 (above 99.7 % of known-good samples); 2 regions: top left (3.1 % of the image, peak 1.8x the known-good maximum), center (0.40 %, peak 1.2x)'
    """
    head = f"Anomalous: score {score:.3f} (above {_score_percent(score)} of known-good samples)"
    if not regions:
        if heatmap is None or heatmap.size == 0:
            return f"{head}; no region above the pixel threshold"
        cy, cx = divmod(int(np.argmax(heatmap)), heatmap.shape[1])
        where = grid_word((cx + 0.5) / heatmap.shape[1], (cy + 0.5) / heatmap.shape[0])
        return (f"{head}; no region above the pixel threshold, the map's highest point is at {where} "
                f"({_times(float(heatmap.max()), normal, pixel_threshold)})")
    shown = regions[:EXPLAINED_REGIONS]
    parts = []
    for i, r in enumerate(shown):
        times = _times(r.peak, normal, pixel_threshold)
        if i == 0:
            parts.append(f"{r.location} ({_percent(r.area_share)} of the image, {times})")
        else:
            parts.append(f"{r.location} ({_percent(r.area_share)}, {times.replace(' the known-good maximum', '')})")
    more = len(regions) - len(shown)
    tail = f" and {more} more" if more else ""
    noun = "region" if len(regions) == 1 else "regions"
    return f"{head}; {len(regions)} {noun}: " + ", ".join(parts) + tail


def declare_region_attributes(dataset, field: str) -> None:
    """Declare the region attributes (:data:`REGION_ATTRIBUTES`) under ``<field>.detections`` so the App's
    sidebar can filter on them (e.g. ``area_share``); attributes already declared stay."""
    for name, ftype in REGION_ATTRIBUTES.items():
        path = f"{field}.detections.{name}"
        if dataset.get_field(path) is None:
            dataset.add_sample_field(path, ftype)


@dataclass(frozen=True)
class RegionRule:
    """How a run turns a sample's calibrated map and mask into its region fields.

    Attributes:
        min_area: smallest region kept, as a share of the image (the run's ``min_region_area``).
        normal: :func:`normal_peak` of the run's calibration (None without one).
        pixel_threshold: the pixel threshold on the calibrated heatmap scale.
    """

    min_area: float = 0.0
    normal: float | None = None
    pixel_threshold: float = 0.5

    @classmethod
    def of(cls, calibration, min_area: float) -> "RegionRule":
        """The rule of a run with ``calibration`` (None: an expert that calibrates itself, threshold 0.5)."""
        threshold = calibration.normalized_pixel_threshold if calibration is not None else 0.5
        return cls(check_min_area(min_area), normal_peak(calibration), threshold)

    def values(self, heatmap: np.ndarray, mask: np.ndarray, image_size: tuple[int, int] | None, *,
               anomalous: bool, score: float) -> tuple[fo.Detections, int, str | None]:
        """One sample's ``(<key>_regions, <key>_num_regions, <key>_explanation)`` (the explanation only when
        ``anomalous``)."""
        regions = find_regions(heatmap, mask, image_size=image_size, min_area=self.min_area)
        text = explain(score, regions, heatmap, normal=self.normal,
                       pixel_threshold=self.pixel_threshold) if anomalous else None
        return region_detections(regions), len(regions), text


def image_size_of(path: str) -> tuple[int, int] | None:
    """``(width, height)`` of an image as the App shows it (:func:`~fiftyone_anomaly_vlm.images.image_size_of`,
    header only); None when it cannot be read (the area then counts map pixels)."""
    try:
        height, width = images.image_size_of(path)
    except images.ImageLoadError:
        return None
    return width, height
