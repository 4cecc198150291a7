"""VLM judge backends: one interface (:class:`JudgeBackend`), chosen by name.

Both backends import their heavy library (``transformers``, ``httpx``) only when one is built or used, so
importing this package stays cheap.
"""

from .base import JudgeAnswer, JudgeBackend, JudgeRequest, p_yes_from_logprobs
from .hf import TransformersBackend
from .openai_compat import OpenAICompatBackend

#: backend names accepted by :func:`make_backend`
BACKENDS = ("transformers", "openai")


def make_backend(name: str = "transformers", **kwargs) -> JudgeBackend:
    """Build a judge backend by name.

    Args:
        name: ``"transformers"`` (:class:`~.hf.TransformersBackend`: ``model``, ``revision``, ``dtype``,
            ``device``, ``max_pixels``...) or ``"openai"`` (:class:`~.openai_compat.OpenAICompatBackend`:
            ``base_url``, ``model``, ``api_key`` or ``api_key_env``...).
        **kwargs: the backend's constructor arguments.

    Returns:
        The backend.

    Raises:
        ValueError: unknown name.
    """
    if name in ("transformers", "hf", "local"):
        return TransformersBackend(**kwargs)
    if name in ("openai", "openai_compat", "server"):
        return OpenAICompatBackend(**kwargs)
    raise ValueError(f"unknown judge backend {name!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "JudgeAnswer", "JudgeBackend", "JudgeRequest", "OpenAICompatBackend", "TransformersBackend",
           "make_backend", "p_yes_from_logprobs"]
