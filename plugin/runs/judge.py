"""The record of a VLM judge run (:func:`fiftyone_anomaly_vlm.judge`)."""

from __future__ import annotations

from typing import Any

from ..fields import JudgeFieldNames
from .base import JUDGE_METHOD, AnomalyRunConfig, FieldsRun


class JudgeRunConfig(AnomalyRunConfig):
    """Config of a VLM judge run.

    Args:
        backend: the backend's description (kind, model, revision, image budget; never secrets).
        expert: the scoring run whose maps/scores guided the prompt (None: none).
        prompt: every prompt part as used (system, question, crops, reference, knowledge, class field,
            expert verdict words).
        only_flagged: only samples the expert labelled anomalous were judged.
        batch_size: requests per backend call.
        max_new_tokens: answer length budget.
        fuse: how ``<key>_fused`` combines the expert score and P(anomalous) (None without an expert).
        fields: the fields written.
        review_thresholds: thresholds set from human reviews, per score field.
        threshold_history: every such change.
        **legacy: parameters of earlier releases.
    """

    METHOD = JUDGE_METHOD

    def __init__(self, backend: dict[str, Any] | None = None, expert: str | None = None,
                 prompt: dict[str, Any] | None = None, only_flagged: bool = False, batch_size: int | None = None,
                 max_new_tokens: int | None = None, fuse: str | None = None, fields: list[str] | None = None,
                 review_thresholds: dict[str, float] | None = None, threshold_history: list[dict] | None = None,
                 **legacy: Any) -> None:
        self.backend, self.expert, self.prompt = dict(backend or {}), expert, dict(prompt or {})
        self.only_flagged, self.batch_size, self.max_new_tokens = only_flagged, batch_size, max_new_tokens
        self.fuse, self.fields = fuse, fields
        self.review_thresholds = dict(review_thresholds or {})
        self.threshold_history = list(threshold_history or [])
        super().__init__(**legacy)


class JudgeRun(FieldsRun):
    """A VLM judge run; its fields are :class:`~fiftyone_anomaly_vlm.fields.JudgeFieldNames` of the run key."""

    FIELD_NAMES = JudgeFieldNames
