"""Names of the sample fields a run writes, all derived from the run key.

Example:
    >>> from fiftyone_anomaly_vlm.fields import FieldNames
    >>> FieldNames("padim").map
    'padim_map'
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldNames:
    """The fields that one anomaly-scoring run writes on each sample.

    Args:
        key: the run key; every field name starts with it.
    """

    key: str

    @property
    def label(self) -> str:
        """``fo.Classification`` normal/anomalous with the normalised score as confidence."""
        return self.key

    @property
    def score(self) -> str:
        """Float image score in (0, 1): the share of known-good calibration samples scoring below it."""
        return f"{self.key}_score"

    @property
    def raw_score(self) -> str:
        """Float image anomaly score as the model produced it, before normalisation."""
        return f"{self.key}_raw_score"

    @property
    def map(self) -> str:
        """``fo.Heatmap`` of the normalised anomaly map (one ``range`` for the whole run)."""
        return f"{self.key}_map"

    @property
    def mask(self) -> str:
        """``fo.Segmentation`` of the thresholded anomaly map (1 = anomalous)."""
        return f"{self.key}_mask"

    @property
    def error(self) -> str:
        """Short message where the sample could not be scored; absent (None) otherwise."""
        return f"{self.key}_error"

    def all(self) -> list[str]:
        """Every field of the run, label first."""
        return [self.label, self.score, self.raw_score, self.map, self.mask, self.error]
