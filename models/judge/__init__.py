"""VLM judge backends: one interface (:class:`JudgeBackend`), chosen by name."""

from .base import JudgeAnswer, JudgeBackend, JudgeRequest, p_yes_from_logprobs

__all__ = ["JudgeAnswer", "JudgeBackend", "JudgeRequest", "p_yes_from_logprobs"]
