"""VLM judge speed: one batched ``generate()`` per batch vs one call per image (anomalib VlmAd's way), verdicts/s.

By default it builds a tiny random Qwen2-VL (hidden 64, 2 layers; ``tests/tiny_vlms.py``), which measures
the backend's overhead (chat template, processor, padding, generate loop), not a real model. Pass
``--model`` with a local folder (or a hub id on a machine that can reach the hub) to time a real 2-8B
model, e.g. ``--model /models/Qwen2-VL-2B-Instruct``. Whatever cannot be run is printed as such: no number
is ever made up.

Each request is the judge's usual shape: the sample image plus 3 crops, a system text and the question.

Usage:
    .venv/bin/python benchmarks/judge_speed.py [--n 32] [--batch-size 8] [--max-new-tokens 24] [--device auto]
    .venv/bin/python benchmarks/judge_speed.py --model /models/Qwen2-VL-2B-Instruct --max-pixels 200704
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _row(name: str, loop: str, device: str, secs: float | None, n: int, note: str = "") -> str:
    speed = f"{n / secs:10.2f}" if secs else f"{'n/a':>10}"
    return f"| {name:<34} | {loop:<22} | {device:<6} | {speed} | {note:<52} |"


def _requests(n: int, max_new_tokens: int, size: int = 96):
    import numpy as np
    from PIL import Image

    from fiftyone_anomaly_vlm.judge import QUESTION, SYSTEM, build_request

    rng = np.random.default_rng(0)
    reqs = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        crops = [(img.crop((0, 0, size // 3, size // 3)), "top left"),
                 (img.crop((size // 3, size // 3, 2 * size // 3, 2 * size // 3)), "center"),
                 (img.crop((2 * size // 3, 0, size, size // 3)), "top right")]
        reqs.append(build_request(img, crops=crops, verdict="moderately suspicious", system=SYSTEM,
                                  question=QUESTION, max_new_tokens=max_new_tokens, meta={"i": i}))
    return reqs


def _time(backend, reqs, batch_size: int) -> float:
    import torch

    backend.judge(reqs[:1])  # warm-up
    if backend.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for start in range(0, len(reqs), batch_size):
        backend.judge(reqs[start:start + batch_size])
    if backend.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="requests (images) to judge")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None, help="a real model folder / hub id to time besides the tiny one")
    parser.add_argument("--max-pixels", type=int, default=448 * 448, help="image budget for --model")
    args = parser.parse_args()

    import torch

    from fiftyone_anomaly_vlm.models.judge import make_backend
    from tiny_vlms import build_qwen2_vl

    reqs = _requests(args.n, args.max_new_tokens)
    rows = []
    tiny_dir = build_qwen2_vl(tempfile.mkdtemp(prefix="fav-bench-judge-"))
    tiny = make_backend("transformers", model=tiny_dir, device=args.device, max_pixels=56 * 56,
                        batch_size=args.batch_size)
    for loop, bs in ((f"batched ({args.batch_size}, left pad)", args.batch_size), ("one call per image", 1)):
        rows.append(_row("tiny Qwen2-VL (random, hidden 64)", loop, tiny.device, _time(tiny, reqs, bs), args.n,
                         f"4 images/request, <= {args.max_new_tokens} new tokens"))

    real = args.model or "Qwen/Qwen2-VL-2B-Instruct (or 7B)"
    if args.model is None:
        for loop in ("batched", "one call per image"):
            rows.append(_row(real[:34], loop, "-", None, args.n, "not run: no weights here (pass --model /path)"))
    else:
        try:
            backend = make_backend("transformers", model=args.model, device=args.device,
                                   max_pixels=args.max_pixels, batch_size=args.batch_size)
        except (OSError, ValueError, ImportError) as exc:
            rows.append(_row(os.path.basename(real)[:34], "-", "-", None, args.n, "not run: could not load"))
            print(f"({real}: {str(exc)[:200]})", file=sys.stderr)
        else:
            for loop, bs in ((f"batched ({args.batch_size}, left pad)", args.batch_size), ("one call per image", 1)):
                rows.append(_row(os.path.basename(real.rstrip("/"))[:34], loop, backend.device,
                                 _time(backend, reqs, bs), args.n, f"max_pixels {args.max_pixels}"))

    print(f"\nVLM judge, {args.n} requests, torch threads {torch.get_num_threads()}")
    print(f"| {'model':<34} | {'loop':<22} | {'device':<6} | {'verdicts/s':>10} | {'note':<52} |")
    print(f"|{'-' * 36}|{'-' * 24}|{'-' * 8}|{'-' * 12}|{'-' * 54}|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    sys.exit(main())
