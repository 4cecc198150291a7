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


def anomaly_label(anomalous: bool, score: float | None, **attributes: Any) -> fo.Classification:
    """``fo.Classification`` anomalous/normal whose confidence is that of the label: ``score`` when
    anomalous, ``1 - score`` when normal (None without a score); ``attributes`` are set on the label."""
    confidence = None if score is None else (score if anomalous else 1.0 - score)
    return fo.Classification(label=ANOMALOUS if anomalous else NORMAL, confidence=confidence, **attributes)
