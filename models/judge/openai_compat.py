"""VLM judge backend for OpenAI-compatible chat servers: vLLM, SGLang, Ollama and hosted APIs.

Every :class:`~.base.JudgeRequest` becomes one ``POST {base_url}/chat/completions``: the system text is the
first message (so server prefix caching reuses it across requests), then a user message whose ``content``
lists the images as base64 data URLs (``{"type": "image_url", "image_url": {"url": "data:image/png;base64,
..."}}``) followed by the text. Requests ask for ``"logprobs": true, "top_logprobs": 20`` and
``"temperature": 0``; P(yes) and the answered mass come from the FIRST generated token's ``top_logprobs``
(:func:`~.base.p_yes_from_logprobs`). Servers that return no logprobs still give the text (``p_yes=None``).

Many requests are in flight at once (``asyncio`` + ``httpx.AsyncClient``, bounded by ``max_concurrency``).
429, 5xx, timeouts and connection errors are retried with exponential backoff and jitter, honouring
``Retry-After``; a request that still fails, or gets another 4xx, becomes ``JudgeAnswer(error=...)`` and the
batch goes on. Answers come back in request order.

The API key is passed in (e.g. a FiftyOne secret, ``ctx.secrets["FAV_VLM_API_KEY"]``) or read from the
environment variable ``api_key_env``; it is only ever put in the ``Authorization`` header, never in
:meth:`OpenAICompatBackend.describe`, ``repr``, errors or logs.

Example:
    >>> backend = OpenAICompatBackend(base_url="http://localhost:8000/v1", model="Qwen/Qwen2.5-VL-7B-Instruct",
    ...                               max_concurrency=32)
    >>> answers = backend.judge([JudgeRequest(images=[ref, img], system="You inspect parts.",
    ...                                       user="Is the second image defective? Answer Yes or No.")])
    >>> answers[0].p_yes, answers[0].answered_mass, answers[0].text

See Also:
    vLLM's OpenAI server (``--max-logprobs``, ``--limit-mm-per-prompt``, ``--mm-processor-kwargs``,
    ``--enable-prefix-caching``); Ollama's ``/v1`` endpoint (logprobs since 0.12.11, data URLs only).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import email.utils
import io
import json
import logging
import os
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from PIL import Image

from .base import (BackendUnavailable, JudgeAnswer, JudgeBackend, JudgeRequest, option_probs_from_logprobs,
                   p_yes_from_logprobs)

if TYPE_CHECKING:  # httpx loads when a request is sent: this module is imported with the judge backends
    import httpx

logger = logging.getLogger(__name__)

#: statuses worth retrying: rate limit, request timeout, conflict, server errors
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
#: seconds the pre-check (:meth:`OpenAICompatBackend.check`) waits for the server, at most
CHECK_TIMEOUT = 5.0


class _Retryable(Exception):
    """A failure worth another try (carries the server's Retry-After, in seconds, if any)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure that another try will not fix (4xx, malformed answer)."""


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


def _retry_after(headers: Mapping[str, str]) -> float | None:
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


def _error_message(response: httpx.Response) -> str:
    """Short ``HTTP <status>: <server message>`` for an error answer."""
    detail = ""
    try:
        body = response.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        detail = err.get("message", "") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        detail = response.text
    detail = " ".join(str(detail).split())[:200]
    return f"HTTP {response.status_code}" + (f": {detail}" if detail else "")


def first_token_logprobs(choice: Mapping[str, Any]) -> list[tuple[str, float]] | None:
    """The first generated token's ``(token, logprob)`` candidates from a chat choice, or None.

    Reads ``choice["logprobs"]["content"][0]["top_logprobs"]`` (a list of ``{"token", "logprob"}``, or a
    ``{token: logprob}`` dict as some servers send) and adds the sampled token itself when it is missing.
    """
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping):
        return None
    content = logprobs.get("content")
    if not content:
        return None
    first = content[0]
    top = first.get("top_logprobs") or []
    items: list[tuple[str, float]] = []
    if isinstance(top, Mapping):
        items = [(str(t), float(lp)) for t, lp in top.items()]
    else:
        items = [(str(e["token"]), float(e["logprob"])) for e in top if e.get("logprob") is not None]
    token, lp = first.get("token"), first.get("logprob")
    if token is not None and lp is not None and all(t != token for t, _ in items):
        items.append((str(token), float(lp)))
    return items or None


def _message_text(choice: Mapping[str, Any]) -> str:
    """The generated text of a chat choice (string or list-of-parts content)."""
    content = (choice.get("message") or {}).get("content")
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return str(content)


class OpenAICompatBackend(JudgeBackend):
    """Judge with any OpenAI-compatible ``/chat/completions`` server, many requests in flight.

    Args:
        base_url: the API root, e.g. ``http://localhost:8000/v1`` (vLLM, SGLang), ``http://localhost:11434/v1``
            (Ollama) or a hosted API's.
        model: the served model name.
        api_key: the key, sent as ``Authorization: Bearer <key>`` (e.g. a FiftyOne secret). None: read the
            environment variable ``api_key_env``; no key at all is fine for local servers.
        api_key_env: environment variable to read the key from when ``api_key`` is None.
        max_concurrency: the most requests in flight at once.
        timeout: seconds allowed per HTTP request (connect, read, write).
        max_retries: extra tries after a 429/5xx/timeout/connection error.
        backoff: first backoff in seconds; doubles each retry, with full jitter.
        max_backoff: cap on one wait (also on the server's ``Retry-After``).
        top_logprobs: how many first-token candidates to ask for (at most 20, vLLM's default cap).
        image_format: ``"PNG"`` (lossless) or ``"JPEG"`` (smaller) for the data URLs.
        jpeg_quality: JPEG quality.
        extra_body: server-specific fields merged into every request body (e.g. vLLM
            ``{"mm_processor_kwargs": {"max_pixels": 448 * 448}}``); never put secrets here.
        headers: extra HTTP headers (not recorded by :meth:`describe`).
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, api_key_env: str = "FAV_VLM_API_KEY",
                 max_concurrency: int = 8, timeout: float = 120.0, max_retries: int = 4, backoff: float = 1.0,
                 max_backoff: float = 60.0, top_logprobs: int = 20, image_format: str = "PNG",
                 jpeg_quality: int = 90, extra_body: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None):
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if not 0 <= top_logprobs <= 20:
            raise ValueError("top_logprobs must be in [0, 20]")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.__api_key = api_key if api_key is not None else (os.environ.get(api_key_env) if api_key_env else None)
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.top_logprobs = int(top_logprobs)
        self.image_format = image_format.upper()
        self.jpeg_quality = int(jpeg_quality)
        self.extra_body = dict(extra_body or {})
        self._headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"OpenAICompatBackend(base_url={_public_url(self.base_url)!r}, model={self.model!r})"

    def describe(self) -> dict[str, Any]:
        """Run-config description: server, model and request settings; never the API key."""
        return {
            "backend": self.name,
            "base_url": _public_url(self.base_url),
            "model": self.model,
            "max_concurrency": self.max_concurrency,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "top_logprobs": self.top_logprobs,
            "image_format": self.image_format,
            "temperature": 0,
            "extra_body": self.extra_body,
        }

    def check(self) -> None:
        """One ``GET {base_url}/models`` (short timeout, no retries): fail at once when the server cannot be used.

        Unreachable (refused, unknown host, no answer within :data:`CHECK_TIMEOUT` s), a refused key
        (401/403) or a server error (5xx) raise; a server without ``/models`` (404/405/501) passes, and a
        model missing from the list is only logged (servers resolve aliases such as Ollama's ``:latest``).

        Raises:
            BackendUnavailable: naming the server URL (without credentials); never the API key.
        """
        import httpx

        where = _public_url(self.base_url)
        headers = dict(self._headers)
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        timeout = min(self.timeout, CHECK_TIMEOUT)
        try:
            with httpx.Client(headers=headers, timeout=httpx.Timeout(timeout)) as client:
                response = client.get(f"{self.base_url}/models")
        except httpx.TimeoutException:
            raise BackendUnavailable(f"the VLM server at {where} did not answer within {timeout:g} s; is it "
                                     "running and is base_url right?") from None
        except (httpx.HTTPError, OSError) as e:
            raise BackendUnavailable(f"cannot reach the VLM server at {where} ({type(e).__name__}: "
                                     f"{self._redact(str(e))[:200]}); start it or fix base_url") from None
        status, answer = response.status_code, self._redact(_error_message(response))
        if status in (401, 403):
            raise BackendUnavailable(f"the VLM server at {where} refused the API key ({answer}); check the key "
                                     f"(api_key or ${self.api_key_env})")
        if status >= 500 and status != 501:
            raise BackendUnavailable(f"the VLM server at {where} answered {answer}")
        if status == 200:
            try:
                served = [m.get("id") for m in response.json().get("data", []) if isinstance(m, Mapping)]
            except (ValueError, AttributeError):
                served = []
            if served and self.model not in served:
                logger.warning("the VLM server at %s does not list model %r (it serves %s)", where, self.model,
                               ", ".join(map(str, served[:10])))

    def _redact(self, text: str) -> str:
        """``text`` with the API key, if any, blanked out."""
        return text.replace(self.__api_key, "***") if self.__api_key else text

    # -- public API ------------------------------------------------------------------------------------
    def judge(self, requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        """Answer every request, in order, with up to ``max_concurrency`` in flight.

        Works from plain code and from inside a running event loop (the async work then runs on a worker
        thread with its own loop); async callers can ``await`` :meth:`ajudge` instead.
        """
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.ajudge(requests))
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fav-openai") as pool:
            return pool.submit(asyncio.run, self.ajudge(requests)).result()

    async def ajudge(self, requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        """Async :meth:`judge`."""
        import httpx

        headers = {"Content-Type": "application/json", **self._headers}
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        semaphore = asyncio.Semaphore(self.max_concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.timeout), limits=limits) as client:
            async def one(request: JudgeRequest) -> JudgeAnswer:
                async with semaphore:
                    return await self._answer(client, request)

            return list(await asyncio.gather(*(one(r) for r in requests)))

    # -- one request -----------------------------------------------------------------------------------
    def build_body(self, request: JudgeRequest) -> dict[str, Any]:
        """The chat-completions body for one request (system first, then images, then the user text)."""
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": encode_image(img, self.image_format, self.jpeg_quality)}}
            for img in request.images
        ]
        content.append({"type": "text", "text": request.user})
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0,
                                "max_tokens": int(request.max_new_tokens)}
        if self.top_logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        body.update(self.extra_body)
        return body

    async def _answer(self, client: httpx.AsyncClient, request: JudgeRequest) -> JudgeAnswer:
        meta = dict(request.meta)
        try:
            # PNG/JPEG encoding is CPU work: keep it off the event loop so other requests stay in flight
            body = await asyncio.to_thread(self.build_body, request)
        except Exception as e:  # a bad image fails this request only
            return JudgeAnswer(error=f"bad request input: {type(e).__name__}: {str(e)[:200]}", meta=meta)
        url = f"{self.base_url}/chat/completions"
        attempt = 0
        while True:
            try:
                data = await self._post(client, url, body)
                break
            except _Fatal as e:
                return JudgeAnswer(error=str(e), meta=meta)
            except _Retryable as e:
                if attempt >= self.max_retries:
                    return JudgeAnswer(error=f"{e} (after {attempt + 1} tries)", meta=meta)
                wait = e.retry_after if e.retry_after is not None else random.uniform(0, self.backoff * 2 ** attempt)
                wait = min(wait, self.max_backoff)
                logger.warning("VLM server request failed (%s); retry %d/%d in %.2fs", e, attempt + 1,
                               self.max_retries, wait)
                attempt += 1
                await asyncio.sleep(wait)
        answer = self._parse(data, meta)
        return self.read_options(answer, data, request.options) if request.options else answer

    @staticmethod
    def read_options(answer: JudgeAnswer, data: Any, letters: tuple[str, ...]) -> JudgeAnswer:
        """Set ``answer.option_probs`` / ``option_mass`` from the first token's ``top_logprobs`` in ``data``
        (left None when the server sent no logprobs or no option letter among them)."""
        try:
            items = first_token_logprobs(data["choices"][0])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            items = None
        if items:
            probs, mass = option_probs_from_logprobs(items, letters)
            if probs is not None:
                answer.option_probs, answer.option_mass = probs, mass
        return answer

    async def _post(self, client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Any:
        import httpx

        try:
            response = await client.post(url, content=json.dumps(body).encode("utf-8"))
        except httpx.TimeoutException as e:
            raise _Retryable(f"timeout after {self.timeout:g}s ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _Retryable(f"connection error ({type(e).__name__})") from None
        if response.status_code in RETRY_STATUSES:
            raise _Retryable(_error_message(response), _retry_after(response.headers))
        if response.status_code >= 400:
            raise _Fatal(_error_message(response))
        try:
            return response.json()
        except ValueError:
            raise _Fatal(f"malformed JSON from server (HTTP {response.status_code})") from None

    @staticmethod
    def _parse(data: Any, meta: dict[str, Any]) -> JudgeAnswer:
        try:
            choice = data["choices"][0]
            text = _message_text(choice)
        except (KeyError, IndexError, TypeError, AttributeError):
            return JudgeAnswer(error="malformed response: no choices[0].message", meta=meta)
        try:
            items = first_token_logprobs(choice)
        except (KeyError, TypeError, ValueError, AttributeError):
            items = None
        if items is None:
            return JudgeAnswer(text=text, meta=meta)
        p_yes, mass = p_yes_from_logprobs(items)
        return JudgeAnswer(text=text, p_yes=p_yes, answered_mass=mass, meta=meta)


def _public_url(url: str) -> str:
    """The URL without any ``user:password@`` part (safe to record)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
