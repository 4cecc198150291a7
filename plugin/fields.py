"""Names of the sample fields a run writes, all derived from the run key.

Example:
    >>> from fiftyone_anomaly_vlm.fields import FieldNames
    >>> FieldNames("padim").map
    'padim_map'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import fiftyone as fo


@dataclass(frozen=True)
class FieldSpec:
    """One field a run writes: its name, FiftyOne field type and where it lives.

    Args:
        name: the field name (without ``frames.``).
        ftype: the FiftyOne field class (``fo.FloatField``, ``fo.EmbeddedDocumentField``...).
        kwargs: arguments of ``add_sample_field`` (e.g. ``embedded_doc_type``).
        frame: a frame field of a video dataset.
    """

    name: str
    ftype: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    frame: bool = False

    @property
    def path(self) -> str:
        """The field's path in a view (``frames.<name>`` for frame fields)."""
        return f"frames.{self.name}" if self.frame else self.name


def label_spec(name: str, doc_type: type = fo.Classification, frame: bool = False) -> FieldSpec:
    """A field holding one FiftyOne label of ``doc_type``."""
    return FieldSpec(name, fo.EmbeddedDocumentField, {"embedded_doc_type": doc_type}, frame)


def float_spec(name: str, frame: bool = False) -> FieldSpec:
    """A float field."""
    return FieldSpec(name, fo.FloatField, {}, frame)


def str_spec(name: str, frame: bool = False) -> FieldSpec:
    """A string field."""
    return FieldSpec(name, fo.StringField, {}, frame)


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

    def specs(self) -> list[FieldSpec]:
        """The fields in write order: the error first, the score (a sample's "done" marker) last."""
        return [str_spec(self.error), label_spec(self.label), label_spec(self.map, fo.Heatmap),
                label_spec(self.mask, fo.Segmentation), float_spec(self.raw_score), float_spec(self.score)]
