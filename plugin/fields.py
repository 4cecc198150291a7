"""Names of the sample fields a run writes, all derived from the run key.

Example:
    >>> from fiftyone_anomaly_vlm.fields import FieldNames
    >>> FieldNames("padim").map
    'padim_map'
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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
        colorscale: a named plotly colorscale the App draws this field with (heatmaps), fixed in the dataset's
            App config when the field is declared, so colours mean the same in every session.
    """

    name: str
    ftype: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    frame: bool = False
    colorscale: str | None = None

    @property
    def path(self) -> str:
        """The field's path in a view (``frames.<name>`` for frame fields)."""
        return f"frames.{self.name}" if self.frame else self.name


def label_spec(name: str, doc_type: type = fo.Classification, frame: bool = False) -> FieldSpec:
    """A field holding one FiftyOne label of ``doc_type``."""
    return FieldSpec(name, fo.EmbeddedDocumentField, {"embedded_doc_type": doc_type}, frame)


#: the colorscale of every heatmap field the plugin writes (perceptually uniform; dark = normal, yellow = anomalous)
HEATMAP_COLORSCALE = "viridis"


def heatmap_spec(name: str, frame: bool = False) -> FieldSpec:
    """A ``fo.Heatmap`` field drawn with :data:`HEATMAP_COLORSCALE`."""
    return FieldSpec(name, fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Heatmap}, frame,
                     colorscale=HEATMAP_COLORSCALE)


def float_spec(name: str, frame: bool = False) -> FieldSpec:
    """A float field."""
    return FieldSpec(name, fo.FloatField, {}, frame)


def str_spec(name: str, frame: bool = False) -> FieldSpec:
    """A string field."""
    return FieldSpec(name, fo.StringField, {}, frame)


def int_spec(name: str, frame: bool = False) -> FieldSpec:
    """An integer field."""
    return FieldSpec(name, fo.IntField, {}, frame)


class Suffix:
    """A field name made of the run key and a suffix: ``Suffix("_score", doc)`` on a field-names class gives
    ``"<key>_score"`` on its instances (``doc`` says what the field holds)."""

    def __init__(self, suffix: str, doc: str) -> None:
        self.suffix, self.__doc__ = suffix, doc

    def __get__(self, names, owner=None):
        return self if names is None else f"{names.key}{self.suffix}"


@dataclass(frozen=True)
class RunFieldNames(ABC):
    """Base of the field names of one run kind: every name derives from the run key.

    Args:
        key: the run key; every field name starts with it.
    """

    key: str

    @abstractmethod
    def specs(self) -> list[FieldSpec]:
        """The run's fields with their types, in write order (the "done" marker last)."""

    def all(self) -> list[str]:
        """Every field's path (frame fields with ``frames.``)."""
        return list(dict.fromkeys(s.path for s in self.specs()))


@dataclass(frozen=True)
class FieldNames(RunFieldNames):
    """The fields that one anomaly-scoring run writes on each sample.

    Args:
        key: the run key; every field name starts with it.
    """

    key: str

    label = Suffix("", "``fo.Classification`` normal/anomalous with the normalised score as confidence.")
    score = Suffix("_score", "Float image score in (0, 1): the share of known-good calibration samples scoring below"
                             " it.")
    raw_score = Suffix("_raw_score", "Float image anomaly score as the model produced it, before normalisation.")
    map = Suffix("_map", "``fo.Heatmap`` of the normalised anomaly map (one ``range`` for the whole run).")
    mask = Suffix("_mask", "``fo.Segmentation`` of the thresholded anomaly map (1 = anomalous).")
    error = Suffix("_error", "Short message where the sample could not be scored; absent (None) otherwise.")
    regions = Suffix("_regions", '``fo.Detections``: one ``"anomaly"`` box per connected region of the mask, with '
                                 "``area_px``, ``area_share``, ``peak``, ``mean``, ``location`` (see "
                                 ":mod:`~fiftyone_anomaly_vlm.regions`).")
    num_regions = Suffix("_num_regions", "Int: how many regions ``<key>_regions`` holds (sortable in the App).")
    explanation = Suffix("_explanation", "One line built from the regions, for samples labelled anomalous; None "
                                         "otherwise.")

    def all(self) -> list[str]:
        """Every field of the run, label first."""
        return [self.label, self.score, self.raw_score, self.map, self.mask, self.error, self.regions,
                self.num_regions, self.explanation]

    def specs(self) -> list[FieldSpec]:
        """The fields in write order: the error first, the score (a sample's "done" marker) last."""
        return [str_spec(self.error), label_spec(self.label), heatmap_spec(self.map),
                label_spec(self.mask, fo.Segmentation), label_spec(self.regions, fo.Detections),
                int_spec(self.num_regions), str_spec(self.explanation), float_spec(self.raw_score),
                float_spec(self.score)]


@dataclass(frozen=True)
class JudgeFieldNames(RunFieldNames):
    """The fields one judge run writes, all named from the run key.

    Args:
        key: the run key.
    """

    key: str

    label = Suffix("", "``fo.Classification`` anomalous / normal / unparsed, with ``p_anomalous`` and "
                       "``answered_mass``.")
    p_anomalous = Suffix("_p_anomalous", "Float P(anomalous) from the first answer token's yes/no probabilities.")
    defect = Suffix("_defect", '``fo.Classification`` of the defect type the model named (``"none"`` when it saw '
                               "none).")
    location = Suffix("_location", '``fo.Classification`` with a 3x3 grid word (``"top left"`` ... ``"bottom '
                                   'right"``) or ``"none"``.')
    explanation = Suffix("_explanation", "The model's one-sentence explanation.")
    answer = Suffix("_answer", "The raw answer text (generated tokens only).")
    regions = Suffix("_regions", "``fo.Detections`` of the expert regions shown to the model as crops.")
    error = Suffix("_error", "Message where the sample could not be judged; None otherwise.")
    fused = Suffix("_fused", "Float: the expert's score and P(anomalous) combined (only with an expert).")

    def all(self) -> list[str]:
        """Every field of the run, label first."""
        return [self.label, self.p_anomalous, self.defect, self.location, self.explanation, self.answer,
                self.regions, self.error, self.fused]

    def specs(self) -> list[FieldSpec]:
        """The fields in write order: the error first, the verdict (a sample's "done" marker) last."""
        return [str_spec(self.error), float_spec(self.p_anomalous), label_spec(self.defect),
                label_spec(self.location), str_spec(self.explanation), str_spec(self.answer),
                label_spec(self.regions, fo.Detections), float_spec(self.fused), label_spec(self.label)]


@dataclass(frozen=True)
class JudgeQAFieldNames(RunFieldNames):
    """The fields one judge evaluation (:func:`~fiftyone_anomaly_vlm.judging.qa_run.evaluate_judge`) writes.

    Args:
        key: the run key.
    """

    key: str

    answers = Suffix("", "``fo.Classifications``: one per (question, variant) asked about the sample; ``label`` the "
                         "option the model chose, ``confidence`` its probability, attributes ``subtask``, "
                         "``variant``, ``question``, ``options``, ``truth``, ``choice``, ``correct``, ``probs``, "
                         "``option_mass``, ``from_text``, ``answer_text``, ``error``.")
    error = Suffix("_error", "Message where no question could be asked about the sample; None otherwise.")

    def all(self) -> list[str]:
        """Every field of the run, answers first."""
        return [self.answers, self.error]

    def specs(self) -> list[FieldSpec]:
        """The fields in write order: the error first, the answers (a sample's "done" marker) last."""
        return [str_spec(self.error), label_spec(self.answers, fo.Classifications)]


@dataclass(frozen=True)
class VideoFieldNames(RunFieldNames):
    """The sample and frame fields one video run writes, all named from the run key.

    Args:
        key: the run key.
    """

    key: str

    label = Suffix("", "Video ``fo.Classification`` anomalous / normal (anomalous when a segment was found).")
    score = Suffix("_score", "Video score: the highest smoothed frame score.")
    segments = Suffix("_segments", "``fo.TemporalDetections`` of the anomalous stretches (shown on the App's "
                                   "timeline).")
    error = Suffix("_error", "Why the video could not be scored (e.g. no frame could be decoded); None otherwise.")
    frame_label = Suffix("", "Frame field: ``fo.Classification`` anomalous / normal (smoothed score vs threshold).")
    frame_score = Suffix("_score", "Frame field: the smoothed score.")
    frame_raw_score = Suffix("_raw_score", "Frame field: the score before smoothing.")
    frame_expert_score = Suffix("_expert_score", "Frame field: the expert's calibrated score (with an expert).")
    frame_vlm_score = Suffix("_vlm_score", "Frame field: the questions' combined P(yes) (with a VLM).")
    frame_question_scores = Suffix("_question_scores", "Frame field: list of P(yes), one per question, in the run's "
                                                       'order (not with ``combine="joint"``).')
    frame_error = Suffix("_error", "Frame field: why this sampled frame could not be scored; None otherwise.")

    def sample_fields(self) -> list[str]:
        """The video-level fields."""
        return [self.label, self.score, self.segments, self.error]

    def frame_fields(self) -> list[str]:
        """The frame-level fields (names without the ``frames.`` prefix)."""
        return [self.frame_label, self.frame_score, self.frame_raw_score, self.frame_expert_score,
                self.frame_vlm_score, self.frame_question_scores, self.frame_error]

    def all(self) -> list[str]:
        """Every field, frame fields with their ``frames.`` prefix."""
        return self.sample_fields() + [f"frames.{f}" for f in self.frame_fields()]

    def specs(self) -> list[FieldSpec]:
        """The fields in write order: frame fields, then the video's error, segments, label, and its score
        (the video's "done" marker) last."""
        return [label_spec(self.frame_label, frame=True), float_spec(self.frame_score, frame=True),
                float_spec(self.frame_raw_score, frame=True), float_spec(self.frame_expert_score, frame=True),
                float_spec(self.frame_vlm_score, frame=True),
                FieldSpec(self.frame_question_scores, fo.ListField, {"subfield": fo.FloatField}, frame=True),
                str_spec(self.frame_error, frame=True),
                str_spec(self.error), label_spec(self.segments, fo.TemporalDetections), label_spec(self.label),
                float_spec(self.score)]
