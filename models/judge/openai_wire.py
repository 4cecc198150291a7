"""The OpenAI chat-completions wire format, as the judge reads it: image data URLs, error messages,
``Retry-After``, the answer text and the first generated token's log-probabilities.

Example:
    >>> encode_image(img)[:22]
    'data:image/png;base64,'
    >>> first_token_logprobs({"logprobs": {"content": [{"token": "Yes", "logprob": -0.1, "top_logprobs": []}]}})
    [('Yes', -0.1)]
"""

from __future__ import annotations

import base64
import email.utils
import io
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from PIL import Image

from .base import NO_WORDS, YES_WORDS, MalformedAnswer, normalize_token

if TYPE_CHECKING:  # httpx loads when a request is sent
    import httpx


def encode_image(image: Image.Image, fmt: str = "PNG", quality: int = 90) -> str:
    """A PIL image as a base64 data URL (RGB; PNG is lossless, JPEG is smaller).

    Args:
        image: the image.
        fmt: ``"PNG"`` or ``"JPEG"``.
        quality: JPEG quality.

    Returns:
        ``data:image/png;base64,...`` (or ``image/jpeg``).
    """
    fmt = fmt.upper()
    buf = io.BytesIO()
    rgb = image.convert("RGB")
    if fmt in ("JPEG", "JPG"):
        rgb.save(buf, format="JPEG", quality=quality)
        mime = "jpeg"
    else:
        rgb.save(buf, format="PNG")
        mime = "png"
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date), else None."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_message(response: httpx.Response, clean=str) -> str:
    """Short ``HTTP <status>: <server message>`` for an error answer (``clean``, e.g. a redaction, is applied
    before the message is cut short, so a cut never leaves part of a secret)."""
    detail = ""
    try:
        body = response.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        detail = err.get("message", "") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        detail = response.text
    detail = " ".join(clean(str(detail)).split())[:200]
    return f"HTTP {response.status_code}" + (f": {detail}" if detail else "")


def logprob_value(value: Any) -> float | None:
    """A logprob as sent: None stays None, a number a float, anything else NaN (checked where it is used)."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def first_token_logprobs(choice: Mapping[str, Any]) -> list[tuple[str, float | None]] | None:
    """The first generated token's ``(token, logprob)`` candidates from a chat choice, or None.

    Reads ``choice["logprobs"]["content"][0]["top_logprobs"]`` (a list of ``{"token", "logprob"}``, or a
    ``{token: logprob}`` dict as some servers send) and adds the sampled token itself when it is missing.
    Values are kept as sent (None, NaN for a non-number) for :func:`~.base.p_yes_from_logprobs` to judge.

    Raises:
        MalformedAnswer: the sampled token is a yes/no word with no usable logprob and is missing from
            ``top_logprobs`` (P(yes) read from the rest would contradict the text).
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping):
        return None
    content = logprobs.get("content")
    if not content:
        return None
    first = content[0]
    top = first.get("top_logprobs") or []
    items: list[tuple[str, float | None]] = []
    if isinstance(top, Mapping):
        items = [(str(t), logprob_value(lp)) for t, lp in top.items()]
    else:
        items = [(str(e["token"]), logprob_value(e.get("logprob"))) for e in top]
    token, lp = first.get("token"), logprob_value(first.get("logprob"))
    if token is not None and all(t != token for t, _ in items):
        if lp is not None and not math.isnan(lp):
            items.append((str(token), lp))
        elif normalize_token(str(token)) in YES_WORDS + NO_WORDS:
            raise MalformedAnswer(f"the answer's first token {token!r} has no log-probability "
                                  f"({first.get('logprob')!r}) and is not among top_logprobs")
    return items or None


def message_text(choice: Mapping[str, Any]) -> str:
    """The generated text of a chat choice (string or list-of-parts content)."""
    content = (choice.get("message") or {}).get("content")
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return str(content)
