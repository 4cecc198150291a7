"""A real OpenAI-compatible HTTP server on 127.0.0.1 that answers from a script instead of a model.

Test and benchmark helper (not a test file). Fast enough to keep hundreds of requests in flight, with the
faults a real fleet of vLLM/SGLang servers shows: latency (uniform in ``latency``), a cap on requests
served at once (``max_concurrency``: more wait in the server's queue, as vLLM's ``--max-num-seqs`` makes
them), a failing server (``fail_status``: every chat request gets that status, with ``fail_first`` only the
first N), error bodies that echo the request headers (``Authorization`` included, as some proxies do), and
malformed answers chosen by a marker in the user text:

- ``[[overflow]]``: the first token "Yes" with ``"logprob": 1000``;
- ``[[nan]]``: the first token's logprob ``NaN`` (Python's JSON writes it bare);
- ``[[nullyes]]``: first token "Yes" with ``"logprob": null`` and only "No" in ``top_logprobs``;
- ``[[echo400]]`` / ``[[echo500]]``: that status, the body echoing every request header.

Other requests get a normal answer. P(yes) is a fixed function of the request body (its images and
text), so every server gives the same answer to the same request, like replicas of one model: text
"Yes. ..." when P(yes) >= 0.5, else "No. ...", with vLLM-style ``logprobs.content[0].top_logprobs``.

The server records requests, the largest number in flight at once, and the TCP connections opened.

Example:
    >>> with ScriptedServer(latency=(0.1, 0.3), max_concurrency=8) as server:
    ...     backend = OpenAICompatBackend(base_url=server.base_url, model="scripted")
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def p_yes_of(body: bytes) -> float:
    """The scripted model's P(yes) for a request body: in [0.02, 0.98], a fixed function of the bytes."""
    h = int.from_bytes(hashlib.sha256(body).digest()[:4], "big") / 2 ** 32
    return 0.02 + 0.96 * h


def answer_payload(p_yes: float, model: str) -> dict[str, Any]:
    """A chat-completions answer whose first token carries ``p_yes`` (the rest of the mass on "The")."""
    yes = p_yes >= 0.5
    text = ("Yes. Defect: scratch. Location: top left. Explanation: a thin line." if yes
            else "No. Defect: none. Location: none. Explanation: the part looks normal.")
    p_no, rest = (1.0 - p_yes) * 0.9, 0.1
    top = [{"token": "Yes", "logprob": math.log(p_yes * 0.9)}, {"token": "No", "logprob": math.log(p_no)},
           {"token": "The", "logprob": math.log(rest)}]
    first = {"token": "Yes" if yes else "No", "logprob": math.log(p_yes * 0.9 if yes else p_no), "top_logprobs": top}
    return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": {"content": [first]}}]}


def malformed_payload(kind: str, model: str) -> dict[str, Any]:
    """The answers of the ``[[overflow]]``, ``[[nan]]`` and ``[[nullyes]]`` markers."""
    text = "Yes. Defect: crack. Location: center. Explanation: a dark line."
    if kind == "overflow":
        first = {"token": "Yes", "logprob": 1000, "top_logprobs": [{"token": "Yes", "logprob": 1000},
                                                                    {"token": "No", "logprob": -3.0}]}
    elif kind == "nan":
        first = {"token": "Yes", "logprob": float("nan"), "top_logprobs": [{"token": "Yes", "logprob": float("nan")},
                                                                            {"token": "No", "logprob": -2.0}]}
    else:  # nullyes
        first = {"token": "Yes", "logprob": None, "top_logprobs": [{"token": "No", "logprob": -2.5}]}
    return {"id": "chatcmpl-bad", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": {"content": [first]}}]}


class ScriptedServer:
    """An OpenAI-compatible ``/v1/chat/completions`` (and ``/v1/models``) server in a thread; see the module.

    Args:
        latency: (low, high) seconds each answer takes, drawn uniformly.
        max_concurrency: requests served at once at most (others wait); None: no cap.
        fail_status: answer every chat request with this status (the body echoes the headers).
        fail_first: with ``fail_status``, fail only the first N chat requests, then answer normally.
        seed: seed of the latency draws.
        port: the port to listen on (0: a free one).
    """

    def __init__(self, latency: tuple[float, float] = (0.0, 0.0), max_concurrency: int | None = None,
                 fail_status: int | None = None, fail_first: int | None = None, seed: int = 0, port: int = 0):
        self.latency, self.fail_status, self.fail_first = latency, fail_status, fail_first
        self._rng = random.Random(seed)
        self._cap = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
        self._lock = threading.Lock()
        self.n_requests = self.in_flight = self.max_in_flight = self.connections = self.answered = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()  # no Nagle delay between the header and body writes
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with outer._lock:
                    outer.connections += 1

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer._send(self, 200, {"object": "list", "data": [{"id": "scripted"}]})

            def do_POST(self) -> None:  # noqa: N802
                outer._handle(self)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 512  # many clients connect at once

        self._httpd = Server(("127.0.0.1", port), Handler)
        self._httpd.handle_error = lambda request, address: None
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        with self._lock:
            self.n_requests += 1
            n = self.n_requests
            delay = self._rng.uniform(*self.latency)
        if self._cap is not None:
            self._cap.acquire()
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if delay:
                time.sleep(delay)
            headers = sorted(h.headers.items(), key=lambda kv: kv[0].lower() != "authorization")  # the key first
            echo = {"error": {"message": "request headers: " + json.dumps(dict(headers))}}
            if self.fail_status and (self.fail_first is None or n <= self.fail_first):
                return self._send(h, self.fail_status, echo)
            text = raw.decode("utf-8", "replace")
            for status in (400, 500):
                if f"[[echo{status}]]" in text:
                    return self._send(h, status, echo)
            model = json.loads(raw).get("model", "scripted")
            for kind in ("overflow", "nan", "nullyes"):
                if f"[[{kind}]]" in text:
                    return self._send(h, 200, malformed_payload(kind, model))
            self._send(h, 200, answer_payload(p_yes_of(raw), model))
            with self._lock:
                self.answered += 1
        finally:
            with self._lock:
                self.in_flight -= 1
            if self._cap is not None:
                self._cap.release()

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()  # NaN stays bare NaN, as Python servers send it
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


def main() -> None:
    """Serve in this process until stdin closes (benchmarks run servers apart from the client's GIL): prints
    the base URL on the first line, then, when stdin closes, the recordings as one JSON line."""
    ap = argparse.ArgumentParser(description="a scripted OpenAI-compatible server on 127.0.0.1")
    ap.add_argument("--latency", type=float, nargs=2, default=(0.0, 0.0))
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with ScriptedServer(latency=tuple(args.latency), max_concurrency=args.max_concurrency, seed=args.seed) as server:
        print(server.base_url, flush=True)
        sys.stdin.read()
        print(json.dumps({"n_requests": server.n_requests, "answered": server.answered,
                          "max_in_flight": server.max_in_flight, "connections": server.connections}), flush=True)


if __name__ == "__main__":
    main()
