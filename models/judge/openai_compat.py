"""VLM judge backend for OpenAI-compatible chat servers: vLLM, SGLang, Ollama and hosted APIs.

Every :class:`~.base.JudgeRequest` becomes one ``POST {base_url}/chat/completions``: the system text is the
first message (so server prefix caching reuses it across requests), then a user message whose ``content``
lists the images as base64 data URLs (``{"type": "image_url", "image_url": {"url": "data:image/png;base64,
..."}}``) followed by the text. Requests ask for ``"logprobs": true, "top_logprobs": 20`` and
``"temperature": 0``; P(yes) and the answered mass come from the FIRST generated token's ``top_logprobs``
(:func:`~.base.p_yes_from_logprobs`). Servers that return no logprobs still give the text (``p_yes=None``).

One server or several (``base_url`` a list): requests go through a :class:`~.server_pool.ServerPool`, a
sliding window with up to ``max_concurrency`` requests in flight per server over pooled keep-alive
connections, each free slot taking the next request (not batch by batch: :meth:`OpenAICompatBackend.prepare`
sends a batch at once and the judge prepares several ahead, :attr:`OpenAICompatBackend.max_in_flight`).
429, 5xx, timeouts and connection errors are retried (on whichever server is free) with exponential backoff
and jitter, honouring ``Retry-After``; ``max_failures`` failures in a row take a server out for ``cooldown``
seconds. A request that still fails, or gets another 4xx, becomes ``JudgeAnswer(error=...)`` and the batch
goes on; an answer whose logprobs cannot be true (``"logprob": 1000``, NaN, the sampled "Yes" without its
own logprob) keeps its text with ``error`` set (:class:`~.base.MalformedAnswer`). Answers come back in
request order, each with the server that gave it (``JudgeAnswer.server``).

The API key is passed in (e.g. a FiftyOne secret, ``ctx.secrets["FAV_VLM_API_KEY"]``) or read from the
environment variable ``api_key_env``; it is only ever put in the ``Authorization`` header, never in
:meth:`OpenAICompatBackend.describe`, ``repr``, errors or logs: every message the backend writes or logs is
redacted (:func:`~.server_pool.redact`), also when a server echoes the header in its error body.

Example:
    >>> backend = OpenAICompatBackend(base_url=["http://gpu-a:8000/v1", "http://gpu-b:8000/v1"],
    ...                               model="Qwen/Qwen2.5-VL-7B-Instruct", max_concurrency=32)
    >>> answers = backend.judge([JudgeRequest(images=[ref, img], system="You inspect parts.",
    ...                                       user="Is the second image defective? Answer Yes or No.")])
    >>> answers[0].p_yes, answers[0].answered_mass, answers[0].text

See Also:
    vLLM's OpenAI server (``--max-logprobs``, ``--limit-mm-per-prompt``, ``--mm-processor-kwargs``,
    ``--enable-prefix-caching``); Ollama's ``/v1`` endpoint (logprobs since 0.12.11, data URLs only).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .base import (BackendUnavailable, JudgeAnswer, JudgeBackend, JudgeRequest, MalformedAnswer,
                   option_probs_from_logprobs, p_yes_from_logprobs)
from .openai_wire import encode_image, error_message, first_token_logprobs, message_text, retry_after_seconds
from .server_pool import FatalError, RetryableError, ServerPool, ServerState, public_url, redact

if TYPE_CHECKING:  # httpx loads when a request is sent: this module is imported with the judge backends
    import httpx

logger = logging.getLogger(__name__)

#: statuses worth retrying: rate limit, request timeout, conflict, server errors
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
#: seconds the pre-check (:meth:`OpenAICompatBackend.check`) waits for the server, at most
CHECK_TIMEOUT = 5.0


#: the failures of one request, as the pool retries them (earlier names kept)
_Retryable, _Fatal = RetryableError, FatalError

__all__ = ["CHECK_TIMEOUT", "RETRY_STATUSES", "OpenAICompatBackend", "encode_image", "first_token_logprobs"]


class OpenAICompatBackend(JudgeBackend):
    """Judge with one or several OpenAI-compatible ``/chat/completions`` servers, many requests in flight.

    Args:
        base_url: the API root, e.g. ``http://localhost:8000/v1`` (vLLM, SGLang), ``http://localhost:11434/v1``
            (Ollama) or a hosted API's; or a list of them (servers of the same model): requests are spread
            over them, each free slot taking the next request.
        model: the served model name.
        api_key: the key, sent as ``Authorization: Bearer <key>`` (e.g. a FiftyOne secret). None: read the
            environment variable ``api_key_env``; no key at all is fine for local servers.
        api_key_env: environment variable to read the key from when ``api_key`` is None.
        max_concurrency: the most requests in flight at once, per server.
        timeout: seconds allowed per HTTP request (connect, read, write).
        max_retries: extra tries after a 429/5xx/timeout/connection error.
        backoff: first backoff in seconds; doubles each retry, with full jitter.
        max_backoff: cap on one wait (also on the server's ``Retry-After``).
        top_logprobs: how many first-token candidates to ask for (at most 20, vLLM's default cap).
        image_format: ``"PNG"`` (lossless) or ``"JPEG"`` (smaller) for the data URLs.
        jpeg_quality: JPEG quality.
        extra_body: server-specific fields merged into every request body (e.g. vLLM
            ``{"mm_processor_kwargs": {"max_pixels": 448 * 448}}``); never put secrets here.
        headers: extra HTTP headers (not recorded by :meth:`describe`; their values are redacted like the key).
        max_failures: failures in a row (5xx, timeouts, refused connections) that take a server out.
        cooldown: seconds a server stays out before one request probes it again.
    """

    name = "openai"

    def __init__(self, base_url: str | Sequence[str], model: str, api_key: str | None = None,
                 api_key_env: str = "FAV_VLM_API_KEY", max_concurrency: int = 8, timeout: float = 120.0,
                 max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 60.0, top_logprobs: int = 20,
                 image_format: str = "PNG", jpeg_quality: int = 90, extra_body: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None, max_failures: int = 5, cooldown: float = 15.0):
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if not 0 <= top_logprobs <= 20:
            raise ValueError("top_logprobs must be in [0, 20]")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls or not all(isinstance(u, str) and u.strip() for u in urls):
            raise ValueError(f"base_url must be a server URL or a list of them, got {base_url!r}")
        self.base_urls = [u.strip().rstrip("/") for u in urls]
        self.base_url = self.base_urls[0]
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
        self.max_failures, self.cooldown = int(max_failures), float(cooldown)
        passwords = [u.split("://", 1)[-1].split("@", 1)[0] for u in self.base_urls if "@" in u.split("/")[2]]
        self._secrets = [s for s in [self.__api_key, *self._headers.values(), *passwords] if s]
        self.pool = ServerPool(self.base_urls, self._post, self._client, max_concurrency=self.max_concurrency,
                               max_retries=self.max_retries, backoff=self.backoff, max_backoff=self.max_backoff,
                               max_failures=self.max_failures, cooldown=self.cooldown, secrets=self._secrets)

    @property
    def max_in_flight(self) -> int:
        """Requests this backend answers at once: ``max_concurrency`` per server."""
        return self.max_concurrency * len(self.base_urls)

    def __repr__(self) -> str:
        urls = [public_url(u) for u in self.base_urls]
        return f"OpenAICompatBackend(base_url={urls[0] if len(urls) == 1 else urls!r}, model={self.model!r})"

    def describe(self) -> dict[str, Any]:
        """Run-config description: servers, model and request settings; never the API key."""
        return {
            "backend": self.name,
            "base_url": public_url(self.base_url),
            "base_urls": [public_url(u) for u in self.base_urls],
            "model": self.model,
            "max_concurrency": self.max_concurrency,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "max_failures": self.max_failures,
            "cooldown": self.cooldown,
            "top_logprobs": self.top_logprobs,
            "image_format": self.image_format,
            "temperature": 0,
            "extra_body": self.extra_body,
        }

    def spec(self) -> dict[str, Any]:
        """The constructor's arguments but the key: a worker reads it from ``api_key_env`` (its environment
        variable, or the FiftyOne secret of that name in an operator).

        Raises:
            ValueError: extra ``headers`` (they may hold secrets and would be stored with the operations), or a
                key passed as ``api_key`` that ``api_key_env`` does not hold here.
        """
        if self._headers:
            raise ValueError("a backend with extra headers cannot be sent to workers (the headers would be stored "
                             "with the delegated operations)")
        if self.__api_key and self.__api_key != os.environ.get(self.api_key_env or ""):
            raise ValueError(f"the API key passed as api_key cannot be sent to workers (it would be stored with the "
                             f"operations): set it as the environment variable or FiftyOne secret "
                             f"{self.api_key_env!r} where the workers run, and build the backend with api_key_env")
        return {"name": self.name, "base_url": list(self.base_urls), "model": self.model,
                "api_key_env": self.api_key_env, "max_concurrency": self.max_concurrency, "timeout": self.timeout,
                "max_retries": self.max_retries, "backoff": self.backoff, "max_backoff": self.max_backoff,
                "top_logprobs": self.top_logprobs, "image_format": self.image_format,
                "jpeg_quality": self.jpeg_quality, "extra_body": self.extra_body,
                "max_failures": self.max_failures, "cooldown": self.cooldown}

    def _auth_headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **self._headers}
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        return headers

    def _client(self, limit: int) -> httpx.AsyncClient:
        """One server's client (the pool's ``make_client``): ``limit`` pooled keep-alive connections."""
        import httpx

        limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit, keepalive_expiry=60.0)
        return httpx.AsyncClient(headers=self._auth_headers(), timeout=httpx.Timeout(self.timeout), limits=limits)

    def check(self) -> None:
        """One ``GET {base_url}/models`` per server (short timeout, no retries): fail at once when no server
        can be used.

        Unreachable (refused, unknown host, no answer within :data:`CHECK_TIMEOUT` s), a refused key
        (401/403) or a server error (5xx) make a server unusable; a server without ``/models`` (404/405/501)
        passes, and a model missing from the list is only logged (servers resolve aliases such as Ollama's
        ``:latest``). With several servers, unusable ones are logged and the run goes on with the others
        (the pool takes them out after ``max_failures``); a refused key always raises.

        Raises:
            BackendUnavailable: naming the server URL (without credentials); never the API key.
        """
        problems: list[tuple[str, bool]] = []
        for url in self.base_urls:
            try:
                self._check_one(url)
            except BackendUnavailable as e:
                problems.append((str(e), "refused the API key" in str(e)))
        if problems and (len(problems) == len(self.base_urls) or any(key for _, key in problems)):
            raise BackendUnavailable("; ".join(m for m, _ in problems))
        for message, _ in problems:
            logger.warning("%s (the other servers go on)", message)

    def _check_one(self, url: str) -> None:
        import httpx

        where = public_url(url)
        headers = self._auth_headers()
        headers.pop("Content-Type")
        timeout = min(self.timeout, CHECK_TIMEOUT)
        try:
            with httpx.Client(headers=headers, timeout=httpx.Timeout(timeout)) as client:
                response = client.get(f"{url}/models")
        except httpx.TimeoutException:
            raise BackendUnavailable(f"the VLM server at {where} did not answer within {timeout:g} s; is it "
                                     "running and is base_url right?") from None
        except (httpx.HTTPError, OSError) as e:
            raise BackendUnavailable(f"cannot reach the VLM server at {where} ({type(e).__name__}: "
                                     f"{self._redact(str(e))[:200]}); start it or fix base_url") from None
        status, answer = response.status_code, error_message(response, self._redact)
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
                               self._redact(", ".join(map(str, served[:10]))))

    def _redact(self, text: str) -> str:
        """``text`` with the API key, secret header values and URL passwords blanked out (:func:`redact`)."""
        return redact(text, self._secrets)

    def close(self) -> None:
        """Close the connections now (they also close after 30 s without requests)."""
        self.pool.close()

    # -- public API ------------------------------------------------------------------------------------
    def judge(self, requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        """Answer every request, in order, with up to ``max_concurrency`` in flight per server.

        Works from plain code and from inside a running event loop (the requests run on the pool's own
        loop); async callers can ``await`` :meth:`ajudge` instead.
        """
        return self.judge_prepared(self.prepare(requests))

    def prepare(self, requests: list[JudgeRequest]) -> list[tuple[JudgeRequest, concurrent.futures.Future]]:
        """Send the requests now (they queue for a free server slot) and return at once; the answers are
        collected by :meth:`judge_prepared`. So a caller that prepares the next batches while it waits for
        this one keeps every server's window full."""
        return [(r, self.pool.submit(lambda r=r: json.dumps(self.build_body(r)).encode("utf-8"))) for r in requests]

    def judge_prepared(self, prepared: list[tuple[JudgeRequest, concurrent.futures.Future]]) -> list[JudgeAnswer]:
        """The answers of a :meth:`prepare` result, in order (waits for them)."""
        return [self._collect(request, future.result) for request, future in prepared]

    async def ajudge(self, requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        """Async :meth:`judge` (from any event loop)."""
        prepared = self.prepare(requests)
        for _, future in prepared:
            await asyncio.wrap_future(future)
        return self.judge_prepared(prepared)

    def _collect(self, request: JudgeRequest, result) -> JudgeAnswer:
        try:
            data, server = result()
        except (RetryableError, FatalError) as e:
            return JudgeAnswer(error=self._redact(str(e)), server=e.server, meta=dict(request.meta))
        answer = self._answer_from(request, data, server)
        if answer.error:
            answer.error = self._redact(answer.error)
        return answer

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

    def _answer_from(self, request: JudgeRequest, data: Any, server: str) -> JudgeAnswer:
        """One server answer (decoded JSON) as a :class:`~.base.JudgeAnswer` with the request's meta."""
        meta = dict(request.meta)
        answer = self._parse(data, meta)
        answer.server = server
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

    async def _post(self, client: httpx.AsyncClient, server: ServerState, body: bytes) -> Any:
        """Send one encoded body to one server (the pool's ``send``)."""
        import httpx

        try:
            response = await client.post(f"{server.url}/chat/completions", content=body)
        except httpx.TimeoutException as e:
            raise _Retryable(f"timeout after {self.timeout:g}s ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _Retryable(f"connection error ({type(e).__name__})") from None
        if response.status_code in RETRY_STATUSES:
            raise _Retryable(error_message(response, self._redact), retry_after_seconds(response.headers),
                             counts=response.status_code != 429)
        if response.status_code >= 400:
            raise _Fatal(error_message(response, self._redact))
        try:
            return response.json()
        except ValueError:
            raise _Fatal(f"malformed JSON from server (HTTP {response.status_code})") from None

    @staticmethod
    def _parse(data: Any, meta: dict[str, Any]) -> JudgeAnswer:
        try:
            choice = data["choices"][0]
            text = message_text(choice)
        except (KeyError, IndexError, TypeError, AttributeError):
            return JudgeAnswer(error="malformed response: no choices[0].message", meta=meta)
        try:
            items = first_token_logprobs(choice)
            if items is None:
                return JudgeAnswer(text=text, meta=meta)
            p_yes, mass = p_yes_from_logprobs(items)
        except MalformedAnswer as e:  # the text is kept; the sample is "unparsed" with this error
            return JudgeAnswer(text=text, error=f"malformed answer: {e}", meta=meta)
        except (KeyError, TypeError, ValueError, AttributeError):
            return JudgeAnswer(text=text, meta=meta)
        return JudgeAnswer(text=text, p_yes=p_yes, answered_mass=mass, meta=meta)


#: earlier name of :func:`~.server_pool.public_url`
_public_url = public_url
