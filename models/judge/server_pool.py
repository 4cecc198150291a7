"""Keeping many requests in flight over one or several inference servers: a sliding window, not batch by batch.

A :class:`ServerPool` owns one event loop on a daemon thread and, per server, pooled keep-alive
``httpx.AsyncClient`` connections (one client per :data:`CLIENT_CONNECTIONS` of them) and
``max_concurrency`` worker tasks. Requests from any thread are queued in the order
they arrive (:meth:`ServerPool.submit` returns a ``concurrent.futures.Future`` at once); every worker that
is free takes the next one, so a server never has more than ``max_concurrency`` requests in flight and a
slow answer never holds the others back. A caller that submits the next batches before waiting for the
current one (the judge does: :attr:`~.base.JudgeBackend.max_in_flight`) keeps every server busy.

Failures: a retryable failure (5xx, timeout, connection error; 429 too, but a rate limit does not count
against the server) is retried up to ``max_retries`` times, on whichever server is free, after a backoff
with jitter (or the server's ``Retry-After``). ``max_failures`` consecutive failures take a server out for
``cooldown`` seconds; then one request probes it and a success brings it back. While every server is out,
the waiting requests fail at once with the last error (the run goes on; a resume retries them) instead of
queueing behind a dead server. Each answer records the server that gave it.

The loop stops after ``idle_close`` seconds without work (its connections closed); the next request starts
a new one.

Example:
    >>> pool = ServerPool(["http://gpu-a:8000/v1", "http://gpu-b:8000/v1"], send=send, max_concurrency=16)
    >>> futures = [pool.submit(body, meta) for body, meta in work]
    >>> [f.result() for f in futures]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # httpx loads when a request is sent
    import httpx

logger = logging.getLogger(__name__)

#: connections per ``httpx.AsyncClient``: httpcore 1.0's pool spends time quadratic in its connections on
#: every request (encode/httpx#3215; measured here: 64 connections in one client gave a third of the
#: verdicts/s of 16), so a server's ``max_concurrency`` slots share several small keep-alive pools
CLIENT_CONNECTIONS = 8
#: how a redacted secret reads
REDACTED = "***"
_AUTH_WORDS = r"(?:bearer|basic|token|api[-_ ]?key|x-api-key|authorization|password|secret)"
#: ``Bearer abc``, ``"authorization": "Bearer abc"``, ``api-key=abc``, ``'password': 'abc'``...
_SECRET_PATTERNS = (
    re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9._~+/=:-]+"),
    re.compile(r"\b([Bb]asic|BASIC)(\s+)(?=[a-z]*[A-Z0-9+/=])[A-Za-z0-9+/=]{8,}"),  # base64, not a plain word
    re.compile(rf"(?i)({_AUTH_WORDS}[\"']?\s*[:=]\s*[\"']?)(?!(?:bearer|basic)\s)([^\s\"',;}}\]]+)"),
    re.compile(r"(?i)(://)[^/@\s:]+:[^/@\s]+@"),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret blanked out: the given ``secrets`` (and their first 8+ characters, in case
    an echo was cut short), ``Bearer``/``Basic`` credentials, values after ``authorization``/``api-key``/
    ``token``/``password`` names, and ``user:password@`` in URLs. For every message a backend writes or logs."""
    text = str(text)
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
        if len(secret) >= 12:  # an echo cut short still starts with the key
            text = re.sub(re.escape(secret[:8]) + r"[^\s\"',;}\]]*", REDACTED, text)
    text = _SECRET_PATTERNS[0].sub(rf"\1\2{REDACTED}", text)
    text = _SECRET_PATTERNS[1].sub(rf"\1\2{REDACTED}", text)
    text = _SECRET_PATTERNS[2].sub(rf"\1{REDACTED}", text)
    return _SECRET_PATTERNS[3].sub(rf"\1{REDACTED}@", text)


def public_url(url: str) -> str:
    """The URL without any ``user:password@`` part (safe to record)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class RetryableError(Exception):
    """A failure worth another try (carries the server's Retry-After, in seconds, if any).

    Attributes:
        retry_after: seconds the server asked to wait, or None.
        counts: whether it counts against the server's health (a rate limit does not).
        server: the server that failed last (set by the pool), or None.
    """

    def __init__(self, message: str, retry_after: float | None = None, counts: bool = True):
        super().__init__(message)
        self.retry_after = retry_after
        self.counts = counts
        self.server: str | None = None


class FatalError(Exception):
    """A failure that another try will not fix (4xx, malformed answer); ``server``: the server that answered."""

    def __init__(self, message: str):
        super().__init__(message)
        self.server: str | None = None


@dataclass
class ServerState:
    """One server of a :class:`ServerPool`: where it is and how it is doing.

    Attributes:
        url: the base URL requests go to (may carry credentials).
        name: the URL without credentials (recorded on each answer).
        failures: consecutive failed requests (a success resets it).
        down_until: ``time.monotonic()`` before which the server is out (after ``max_failures`` failures).
        probing: a request is testing the server after its cool-down.
        in_flight / max_in_flight: requests now and at most at once.
        answered / failed: requests that got an answer / failed, in total.
    """

    url: str
    name: str
    failures: int = 0
    down_until: float = 0.0
    probing: bool = False
    in_flight: int = 0
    max_in_flight: int = 0
    answered: int = 0
    failed: int = 0


@dataclass(order=True)
class _Entry:
    seq: int
    body: Any = field(compare=False)
    future: asyncio.Future = field(compare=False)
    attempt: int = field(default=0, compare=False)


#: ``send(client, server, body)`` -> the result (raises RetryableError / FatalError)
Send = Callable[["httpx.AsyncClient", ServerState, Any], Awaitable[Any]]


class ServerPool:
    """A sliding window of requests over one or several servers (see the module docstring).

    Args:
        urls: the servers' base URLs (at least one).
        send: the coroutine that sends one body to one server through its client.
        make_client: builds an ``httpx.AsyncClient`` (called on the pool's loop), given its connection limit.
        max_concurrency: requests in flight per server, at most.
        max_retries: extra tries of a request after retryable failures.
        backoff / max_backoff: first backoff in seconds (doubles each try, full jitter) and its cap.
        max_failures: consecutive failures that take a server out.
        cooldown: seconds a server stays out before one request probes it.
        secrets: strings blanked out of every message and log line (:func:`redact`).
        idle_close: seconds without work after which the loop and its connections close.
    """

    def __init__(self, urls: list[str], send: Send, make_client: Callable[[int], httpx.AsyncClient], *,
                 max_concurrency: int = 8, max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 60.0,
                 max_failures: int = 5, cooldown: float = 15.0, secrets: Iterable[str] = (),
                 idle_close: float = 30.0):
        if not urls:
            raise ValueError("give at least one server URL")
        self.servers = [ServerState(url=u, name=public_url(u)) for u in urls]
        self.send, self.make_client = send, make_client
        self.max_concurrency, self.max_retries = int(max_concurrency), int(max_retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.max_failures, self.cooldown = max(1, int(max_failures)), float(cooldown)
        self.secrets = [s for s in secrets if s]
        self.idle_close = float(idle_close)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.PriorityQueue | None = None
        self._active = 0
        self._generation = 0
        self._seq = itertools.count()
        self._clients: list[httpx.AsyncClient] = []
        self._tasks: list[asyncio.Task] = []

    def redact(self, text: str) -> str:
        """``text`` without this pool's secrets (:func:`redact`)."""
        return redact(text, self.secrets)

    # -- submitting (any thread) -----------------------------------------------------------------------
    def submit(self, build: Callable[[], Any]) -> concurrent.futures.Future:
        """Queue one request: ``build()`` makes its body (CPU work such as image encoding, run in a thread of
        the loop before the request waits for a server); the future gives ``(result, server name)`` or
        raises the last error (:class:`RetryableError`/:class:`FatalError`, message redacted, ``server``
        set where a server was tried)."""
        with self._lock:
            if self._loop is None:
                self._start()
            self._active += 1
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(self._one(build), loop)

    def close(self) -> None:
        """Stop the loop now and close its connections (a later :meth:`submit` starts a new one)."""
        with self._lock:
            loop, self._loop = self._loop, None
            tasks, clients = self._tasks, self._clients
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(loop, tasks, clients), loop).result(timeout=30)

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        threading.Thread(target=run, name="fav-server-pool", daemon=True).start()
        ready.wait()
        self._loop = loop
        asyncio.run_coroutine_threadsafe(self._spawn(), loop).result()

    async def _spawn(self) -> None:
        queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        clients, tasks = [], []
        for server in self.servers:  # one small keep-alive pool per CLIENT_CONNECTIONS slots of a server
            for first in range(0, self.max_concurrency, CLIENT_CONNECTIONS):
                slots = min(CLIENT_CONNECTIONS, self.max_concurrency - first)
                client = self.make_client(slots)
                clients.append(client)
                tasks += [asyncio.create_task(self._worker(server, client, queue)) for _ in range(slots)]
        self._queue, self._clients, self._tasks = queue, clients, tasks

    @staticmethod
    async def _shutdown(loop: asyncio.AbstractEventLoop, tasks: list[asyncio.Task], clients: list) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.aclose()
        loop.call_soon(loop.stop)

    # -- on the loop -----------------------------------------------------------------------------------
    async def _one(self, build: Callable[[], Any]) -> tuple[Any, str]:
        try:
            seq = next(self._seq)  # the order of submission, whatever the time building takes
            try:
                body = await asyncio.to_thread(build)
            except Exception as e:  # a bad input fails its request only
                raise FatalError(self.redact(f"bad request input: {type(e).__name__}: {str(e)[:200]}")) from None
            entry = _Entry(seq, body, asyncio.get_running_loop().create_future())
            self._enqueue(entry)
            return await entry.future
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._active -= 1
            self._generation += 1
            idle, generation = self._active == 0, self._generation
        if idle and self.idle_close > 0:
            asyncio.get_running_loop().call_later(self.idle_close, self._maybe_stop, generation)

    def _maybe_stop(self, generation: int) -> None:
        with self._lock:
            if self._active or generation != self._generation or self._loop is None:
                return
            loop, self._loop = self._loop, None
            tasks, clients = self._tasks, self._clients
        loop.create_task(self._shutdown(loop, tasks, clients))

    def all_out(self) -> bool:
        """Every server is out (cooling down after ``max_failures`` failures, not yet probed)."""
        now = time.monotonic()
        return all(s.failures >= self.max_failures and s.down_until > now for s in self.servers)

    def _enqueue(self, entry: _Entry, last: Exception | None = None) -> None:
        if entry.future.done():
            return
        if self.all_out():
            down = ", ".join(s.name for s in self.servers)
            why = f" (last: {last})" if last is not None else ""
            entry.future.set_exception(RetryableError(self.redact(
                f"no server can answer: {down} out after {self.max_failures} failures in a row{why}")))
            return
        self._queue.put_nowait(entry)

    def _usable(self, s: ServerState) -> bool:
        if s.failures < self.max_failures:
            return True
        return s.down_until <= time.monotonic() and not s.probing

    async def _worker(self, s: ServerState, client: httpx.AsyncClient, queue: asyncio.PriorityQueue) -> None:
        while True:
            while not self._usable(s):
                await asyncio.sleep(max(0.02, min(1.0, s.down_until - time.monotonic())))
            entry = await queue.get()
            if not self._usable(s):  # the server went out while this worker waited
                queue.put_nowait(entry)
                continue
            probe = s.failures >= self.max_failures
            s.probing = s.probing or probe
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
            try:
                result = await self.send(client, s, entry.body)
            except FatalError as e:
                s.failures, s.failed = 0, s.failed + 1  # the server answered: it is up
                error = FatalError(self.redact(str(e)))
                error.server = s.name
                if not entry.future.done():
                    entry.future.set_exception(error)
            except RetryableError as e:
                s.failed += 1
                self._retry(s, entry, e, probe)
            except Exception as e:  # noqa: BLE001 - never lose a worker; the request fails alone
                s.failed += 1
                error = FatalError(self.redact(f"{type(e).__name__}: {e}"))
                error.server = s.name
                if not entry.future.done():
                    entry.future.set_exception(error)
            else:
                s.failures, s.down_until, s.answered = 0, 0.0, s.answered + 1
                if not entry.future.done():
                    entry.future.set_result((result, s.name))
            finally:
                s.in_flight -= 1
                if probe:
                    s.probing = False

    def _retry(self, s: ServerState, entry: _Entry, e: RetryableError, probe: bool) -> None:
        message = self.redact(str(e))
        if e.counts or probe:
            s.failures += 1
            now = time.monotonic()
            if s.failures >= self.max_failures and (probe or s.down_until <= now):  # newly out, or a failed probe
                s.down_until = now + self.cooldown
                logger.warning("VLM server %s taken out for %gs after %d failures in a row (last: %s)", s.name,
                               self.cooldown, s.failures, message)
                if self.all_out():  # the requests waiting would wait for nothing: they fail now
                    while not self._queue.empty():
                        self._enqueue(self._queue.get_nowait(), RetryableError(message))
        entry.attempt += 1
        if entry.attempt > self.max_retries:
            error = RetryableError(f"{message} (after {entry.attempt} tries)")
            error.server = s.name
            if not entry.future.done():
                entry.future.set_exception(error)
            return
        wait = e.retry_after if e.retry_after is not None else random.uniform(0, self.backoff * 2 ** (entry.attempt - 1))
        wait = min(wait, self.max_backoff)
        logger.warning("VLM server %s request failed (%s); retry %d/%d in %.2fs", s.name, message, entry.attempt,
                       self.max_retries, wait)
        asyncio.get_running_loop().call_later(wait, self._enqueue, entry, RetryableError(message))
