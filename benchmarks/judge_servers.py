"""Judge throughput against local OpenAI-compatible servers: verdicts/s for 1, 4, 16, 64 requests in flight,
one vs two servers, against the earlier batch-by-batch backend in the same run.

The servers (``tests/scripted_server.py``, each in its own process) are real HTTP servers on 127.0.0.1 that answer like vLLM (text +
first-token ``top_logprobs``) after an injected latency of 100-300 ms, with a per-server cap on requests
served at once (``--server-cap``, default 32; more wait in the server's queue, as with vLLM's
``--max-num-seqs``). Every row is a full ``fav.judge`` run on a dataset of small PNGs (image read, request
built and encoded, answer parsed, fields written to MongoDB), so the numbers include the judge loop's own
costs; the model costs nothing, so the ceiling found is the client's and the machine's.

"before" rows run the backend as it was before the sliding window (``git show 44b2cfd:models/judge/
openai_compat.py``, loaded from this repository's history): one batch at a time (``batch_size``, default
8), one new connection pool per batch, one server. "now" rows run the current backend (window over all
servers, ``max_concurrency`` per server, keep-alive connections kept across batches).

Usage:
    .venv/bin/python benchmarks/judge_servers.py [--server-cap 32] [--latency 0.1 0.3] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from _env import isolate  # noqa: E402

TMP = isolate("fav-bench-servers-")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import fiftyone as fo  # noqa: E402

import fiftyone_anomaly_vlm as fav  # noqa: E402
from fiftyone_anomaly_vlm.judging import build_request  # noqa: E402
from fiftyone_anomaly_vlm.models.judge.openai_compat import OpenAICompatBackend  # noqa: E402

BASELINE_COMMIT = "44b2cfd"


def old_backend_class():
    """The OpenAI-compatible backend of ``BASELINE_COMMIT`` (batch by batch), or None when git cannot show it."""
    try:
        src = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:models/judge/openai_compat.py"], cwd=HERE,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    src = src.replace("from .base import", "from fiftyone_anomaly_vlm.models.judge.base import")
    path = os.path.join(TMP, "old_openai_compat.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(src)
    sys.path.insert(0, TMP)
    import old_openai_compat  # noqa: PLC0415 - written just above

    return old_openai_compat.OpenAICompatBackend


class ServerProcess:
    """A :class:`ScriptedServer` in its own Python process (its threads never compete for the client's GIL)."""

    def __init__(self, latency, cap: int, seed: int):
        cmd = [sys.executable, os.path.join(HERE, "..", "tests", "scripted_server.py"), "--latency",
               str(latency[0]), str(latency[1]), "--max-concurrency", str(cap), "--seed", str(seed)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.base_url = self.proc.stdout.readline().strip()

    def stop(self) -> dict:
        """Stop the server; its recordings (requests, connections, most in flight)."""
        out, _ = self.proc.communicate(timeout=60)
        return json.loads(out.strip().splitlines()[-1])


def dataset(n: int) -> fo.Dataset:
    """``n`` small PNG samples (different pixels, so every request differs)."""
    folder = os.path.join(TMP, "images")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        path = os.path.join(folder, f"{i:05d}.png")
        if not os.path.exists(path):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
        samples.append(fo.Sample(filepath=path))
    ds = fo.Dataset()
    ds.add_samples(samples)
    return ds


def requests(n: int):
    """``n`` judge requests like the runs' (one 48 px image each), built in memory."""
    rng = np.random.default_rng(1)
    return [build_request(Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)), max_new_tokens=16,
                          meta={"i": i}) for i in range(n)]


def run(backend, n: int, batch_size: int, prefetch: int | None) -> float:
    ds = dataset(n)
    start = time.perf_counter()
    res = fav.judge(ds, key="vlm", backend=backend, crops=0, batch_size=batch_size, max_new_tokens=16,
                    prefetch=prefetch, progress=False)
    secs = time.perf_counter() - start
    assert res.num_judged == n and res.num_errors == 0, (res.num_judged, res.num_errors, list(res.errors.values())[:2])
    ds.delete()
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server-cap", type=int, default=32, help="requests each server serves at once")
    ap.add_argument("--latency", type=float, nargs=2, default=(0.1, 0.3), help="seconds per answer: low high")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 4, 16, 64])
    args = ap.parse_args()
    old_cls = old_backend_class()
    mean_latency = sum(args.latency) / 2
    print(f"servers: latency {args.latency[0]:g}-{args.latency[1]:g} s, cap {args.server_cap} per server; "
          f"judge batch_size {args.batch_size}; {os.cpu_count()} CPU cores (shared with other jobs)")
    print(f"| {'backend':<44} | {'in flight':>9} | {'servers':>7} | {'verdicts/s':>10} | {'backend only':>12} | "
          f"{'ideal/s':>8} | {'connections':>11} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 9}|{'-' * 12}|{'-' * 14}|{'-' * 10}|{'-' * 13}|")
    for k in args.in_flight:
        n = max(40, 12 * k)
        rows = []
        if old_cls is not None:
            rows.append((f"before: batch by batch, batch_size {args.batch_size}", 1, "old", args.batch_size))
            if k > args.batch_size:
                rows.append((f"before: batch by batch, batch_size {k}", 1, "old", k))
        else:
            print(f"| before: baseline unavailable (git show {BASELINE_COMMIT} failed) | {k:>9} | 1 | n/a |")
        rows += [("now: sliding window", 1, "new", args.batch_size), ("now: sliding window", 2, "new", args.batch_size)]
        for name, n_servers, kind, bs in rows:
            if kind == "new" and k % n_servers:
                continue
            servers = [ServerProcess(args.latency, args.server_cap, seed) for seed in range(n_servers)]
            try:
                urls = [s.base_url for s in servers]
                only = None
                if kind == "old":
                    backend = old_cls(base_url=urls[0], model="scripted", max_concurrency=k, max_retries=0)
                    secs = run(backend, n, bs, prefetch=1)
                else:
                    backend = OpenAICompatBackend(base_url=urls, model="scripted", max_concurrency=k // n_servers,
                                                  max_retries=0)
                    secs = run(backend, n, bs, prefetch=None)
                    reqs = requests(n)
                    start = time.perf_counter()
                    answers = backend.judge(reqs)
                    only = n / (time.perf_counter() - start)
                    assert all(a.error is None for a in answers)
                    backend.close()
            finally:
                stats = [s.stop() for s in servers]
            conns = sum(st["connections"] for st in stats)
            in_flight_now = min(k, bs) if kind == "old" else k
            ideal = min(in_flight_now, args.server_cap * n_servers) / mean_latency
            only_text = f"{only:.1f}" if only is not None else "-"
            print(f"| {name:<44} | {k:>9} | {n_servers:>7} | {n / secs:>10.1f} | {only_text:>12} | {ideal:>8.1f} | "
                  f"{conns:>11} |", flush=True)
    print("verdicts/s: a whole fav.judge run (image reads, requests, parsing, MongoDB writes); backend only: "
          "backend.judge() on the same requests built in memory; ideal/s: what the servers could answer at that "
          "window (in flight, at most the servers' caps, / mean latency); connections: TCP connections the "
          "servers accepted (incl. one pre-check per server)")


if __name__ == "__main__":
    main()
