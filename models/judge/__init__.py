"""VLM judge backends: one interface (:class:`JudgeBackend`), chosen by name."""

from .base import JudgeAnswer, JudgeBackend, JudgeRequest, p_yes_from_logprobs

#: backend names accepted by :func:`make_backend`
BACKENDS = ("transformers", "openai")


def make_backend(name: str = "transformers", **kwargs) -> JudgeBackend:
    """Build a judge backend by name; its module (and heavy imports) load only when chosen.

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
        from .hf import TransformersBackend

        return TransformersBackend(**kwargs)
    if name in ("openai", "openai_compat", "server"):
        from .openai_compat import OpenAICompatBackend

        return OpenAICompatBackend(**kwargs)
    raise ValueError(f"unknown judge backend {name!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "JudgeAnswer", "JudgeBackend", "JudgeRequest", "make_backend", "p_yes_from_logprobs"]
