"""Load open_clip models for the CLIP expert without surprise downloads.

:func:`load_open_clip` accepts a model name with a pretrained tag or a local checkpoint, a ``.json``
config, a local folder, or a hub id; when the weights are neither local nor in the Hugging Face cache and
the hub is off (``HF_HUB_OFFLINE``) or unreachable, it fails at once with a message saying what to pass,
instead of letting huggingface_hub retry for a minute.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

logger = logging.getLogger(__name__)

#: WinCLIP's default backbone and weights
DEFAULT_MODEL = "ViT-B-16-plus-240"
DEFAULT_PRETRAINED = "laion400m_e31"


def _hf_cached(repo_and_file: str) -> bool | None:
    """Whether an open_clip ``hf_hub`` entry is in the local Hugging Face cache (None: cannot tell)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - open_clip depends on huggingface_hub
        return None
    model_id, filename = os.path.split(repo_and_file)
    for name in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
        found = try_to_load_from_cache(model_id, name)
        if isinstance(found, str):
            return True
    return False


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return bool(os.environ.get("HF_HUB_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within ``timeout`` seconds.

    huggingface_hub retries an unreachable host for about a minute before giving up; this probe makes an
    air-gapped machine fail at once. Behind an HTTP(S) proxy the probe is skipped (the proxy decides).
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def _offline_hint(model: str, pretrained: Any) -> str:
    return (
        f"Pass local weights instead: pretrained='/path/to/checkpoint.pt' (the open_clip checkpoint of "
        f"{model!r}, e.g. downloaded once with open_clip on a connected machine), or "
        "model='local-dir:/path/to/folder' (a folder holding open_clip_config.json and "
        "open_clip_model.safetensors, as open_clip's push_to_hub/save writes)"
    )


def load_open_clip(model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED):
    """Create an open_clip model, its tokenizer and preprocessing config without surprise downloads.

    Args:
        model: an open_clip model name (``open_clip.list_models()``), a config registered with
            ``open_clip.add_model_config``, the path of such a ``.json`` config (registered here), a
            ``"local-dir:/path"`` folder (``open_clip_config.json`` + weights) or a plain folder path, or
            ``"hf-hub:org/repo"``.
        pretrained: a pretrained tag of ``model`` (``open_clip.list_pretrained_tags_by_model``), a local
            checkpoint file, or None/"" for random weights (tests only; seeded, so every load gives the same
            model). Ignored for folders and hub ids.

    Returns:
        ``(clip_model, tokenizer, preprocess_cfg)``; the model is in eval mode on the CPU.

    Raises:
        RuntimeError: the weights are neither local nor downloadable (the message says what to pass).
        ValueError: unknown model name or pretrained tag.
        FileNotFoundError: a local folder or file that does not exist.
    """
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("the CLIP expert needs open_clip: pip install open_clip_torch") from exc

    name = str(model)
    if name.endswith(".json") and os.path.isfile(name):
        open_clip.add_model_config(name)
        name = Path(name).stem
    elif os.path.isdir(name):
        name = f"local-dir:{os.path.abspath(name)}"
    tag = pretrained or None
    if name.startswith(("local-dir:", "hf-hub:")):
        tag = None
        if name.startswith("local-dir:") and not os.path.isdir(name[len("local-dir:"):]):
            raise FileNotFoundError(f"open_clip model folder not found: {name[len('local-dir:'):]}")
        if name.startswith("hf-hub:") and _hub_offline():
            msg = f"cannot load {name!r}: HF_HUB_OFFLINE is set. {_offline_hint(name, pretrained)}"
            raise RuntimeError(msg)
    else:
        if name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {name!r}; known: {', '.join(open_clip.list_models())}")
        if tag is not None and not os.path.isfile(str(tag)):
            cfg = open_clip.get_pretrained_cfg(name, str(tag))
            if not cfg:
                if os.sep in str(tag) or str(tag).endswith((".pt", ".pth", ".bin", ".safetensors")):
                    raise FileNotFoundError(f"open_clip checkpoint not found: {tag}")
                tags = open_clip.list_pretrained_tags_by_model(name)
                raise ValueError(f"unknown pretrained tag {tag!r} for {name!r}; known: {tags or 'none'}")
            # fail fast (no network attempt) when the weights are not cached and the hub is off
            cached = _hf_cached(cfg["hf_hub"]) if cfg.get("hf_hub") else None
            if cached is False and (_hub_offline() or not _hub_reachable()):
                why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the Hugging Face hub cannot be reached"
                msg = (f"the weights of open_clip {name!r} / {tag!r} are not in the local Hugging Face cache "
                       f"and {why}, so they cannot be downloaded. {_offline_hint(name, tag)}")
                raise RuntimeError(msg)
        elif tag is None:
            logger.warning("CLIP expert %r with random weights (pretrained=None): for tests only", name)
    try:
        # random weights (tests) are seeded, so a recorded expert rebuilds the same model in any process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip_model, _, _ = open_clip.create_model_and_transforms(name, pretrained=tag)
    except RuntimeError as exc:
        text = str(exc).lower()
        if any(w in text for w in ("download", "connection", "offline", "resolve", "hub", "http", "url")):
            raise RuntimeError(f"could not get the weights of open_clip {name!r} / {tag!r}: {exc}. "
                               f"{_offline_hint(name, tag)}") from exc
        raise
    tokenizer = open_clip.get_tokenizer(name)
    preprocess_cfg = dict(getattr(clip_model.visual, "preprocess_cfg", None) or {})
    clip_model.eval()
    return clip_model, tokenizer, preprocess_cfg

