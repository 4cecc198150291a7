"""The verdict labels every run writes, built in one place.

Example:
    >>> anomaly_label(True, 0.97, anomaly_score=0.97)
    <Classification: {'label': 'anomalous', 'confidence': 0.97, 'anomaly_score': 0.97, ...}>
"""

from __future__ import annotations

from typing import Any

import fiftyone as fo

ANOMALOUS = "anomalous"
NORMAL = "normal"
#: a VLM answer that does not start with Yes/No
UNPARSED = "unparsed"
#: the 3x3 location grid, row-major: the words the judge asks for and the expert's regions are placed with
GRID = ("top left", "top center", "top right", "middle left", "center", "middle right",
        "bottom left", "bottom center", "bottom right")


def grid_word(cx: float, cy: float) -> str:
    """The 3x3 grid word (:data:`GRID`) of a point given in relative coordinates [0, 1]."""
    col = min(2, max(0, int(cx * 3)))
    row = min(2, max(0, int(cy * 3)))
    return GRID[row * 3 + col]


def anomaly_label(anomalous: bool, score: float | None, **attributes: Any) -> fo.Classification:
    """``fo.Classification`` anomalous/normal whose confidence is that of the label: ``score`` when
    anomalous, ``1 - score`` when normal (None without a score); ``attributes`` are set on the label."""
    confidence = None if score is None else (score if anomalous else 1.0 - score)
    return fo.Classification(label=ANOMALOUS if anomalous else NORMAL, confidence=confidence, **attributes)
