"""VLM judge speed: one batched ``generate()`` per batch vs one call per image (anomalib VlmAd's way), verdicts/s.

By default it builds a tiny random Qwen2-VL (hidden 64, 2 layers; ``tests/tiny_vlms.py``), which measures
the backend's overhead (chat template, processor, padding, generate loop), not a real model. Pass
``--model`` with a local folder (or a hub id on a machine that can reach the hub) to time a real 2-8B
model, e.g. ``--model /models/Qwen2-VL-2B-Instruct``. Whatever cannot be run is printed as such: no number
is ever made up.

Each request is the judge's usual shape: the sample image plus 3 crops, a system text and the question.

The "pipelined" rows time what ``fav.judge`` does per batch, from PNG files on disk: decode the image,
cut 3 crops, build the request, run the backend's ``prepare`` (resize to the budget, chat template,
processor), then ``generate()``; once with every step in turn (``prefetch=0``) and once with the next
batch prepared in a worker thread while the model answers the current one (``prefetch=1``, the default;
the same :class:`~fiftyone_anomaly_vlm.engine.Prefetch` class the run engine uses for ``judge()``). The share
of time spent in preparation is printed too: the most overlap can save.

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

from _env import add_threads_argument, set_threads  # noqa: E402 - this folder is on sys.path when run

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _row(name: str, loop: str, device: str, secs: float | None, n: int, note: str = "") -> str:
    speed = f"{n / secs:10.2f}" if secs else f"{'n/a':>10}"
    return f"| {name:<34} | {loop:<22} | {device:<6} | {speed} | {note:<52} |"


def _requests(n: int, max_new_tokens: int, size: int = 96):
    import numpy as np
    from PIL import Image

    from fiftyone_anomaly_vlm.judging import QUESTION, SYSTEM, build_request

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


def _files(n: int, size: int) -> list[str]:
    """``n`` random ``size``x``size`` PNG files (the samples the pipelined rows read from disk)."""
    import numpy as np
    from PIL import Image

    folder = tempfile.mkdtemp(prefix="fav-bench-judge-images-")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        paths.append(os.path.join(folder, f"{i:04d}.png"))
        Image.fromarray(arr).save(paths[-1])
    return paths


def _time_pipeline(backend, paths: list[str], batch_size: int, max_new_tokens: int, prefetch: int):
    """Seconds for the judge's batch loop over ``paths``, and seconds spent preparing (whatever the thread)."""
    from PIL import Image

    from fiftyone_anomaly_vlm.engine import Prefetch
    from fiftyone_anomaly_vlm.judging import QUESTION, SYSTEM, build_request

    spent = [0.0]

    def prepare(start: int):
        t = time.perf_counter()
        reqs = []
        for i, path in enumerate(paths[start:start + batch_size]):
            with Image.open(path) as im:
                img = im.convert("RGB")
            w, h = img.size
            crops = [(img.crop((0, 0, w // 3, h // 3)), "top left"),
                     (img.crop((w // 3, h // 3, 2 * w // 3, 2 * h // 3)), "center"),
                     (img.crop((2 * w // 3, 0, w, h // 3)), "top right")]
            reqs.append(build_request(img, crops=crops, verdict="moderately suspicious", system=SYSTEM,
                                      question=QUESTION, max_new_tokens=max_new_tokens, meta={"i": start + i}))
        prepared = backend.prepare(reqs)
        spent[0] += time.perf_counter() - t
        return prepared

    backend.judge(_requests(1, max_new_tokens))  # warm-up
    t = time.perf_counter()
    with Prefetch(prepare, range(0, len(paths), batch_size), prefetch) as batches:
        for batch in batches:
            answers = backend.judge_prepared(batch)
            assert all(a.error is None for a in answers), [a.error for a in answers]
    return time.perf_counter() - t, spent[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="requests (images) to judge")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None, help="a real model folder / hub id to time besides the tiny one")
    parser.add_argument("--max-pixels", type=int, default=448 * 448, help="image budget for --model")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the PNGs the pipelined rows read")
    parser.add_argument("--tiny-max-pixels", type=int, default=56 * 56,
                        help="image budget of the tiny model (larger: more image tokens, slower generate)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the pipelined rows (best kept)")
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)

    from fiftyone_anomaly_vlm.models.judge import make_backend
    from tiny_vlms import build_qwen2_vl

    reqs = _requests(args.n, args.max_new_tokens)
    rows = []
    tiny_dir = build_qwen2_vl(tempfile.mkdtemp(prefix="fav-bench-judge-"))
    tiny = make_backend("transformers", model=tiny_dir, device=args.device, max_pixels=args.tiny_max_pixels,
                        batch_size=args.batch_size)
    for loop, bs in ((f"batched ({args.batch_size}, left pad)", args.batch_size), ("one call per image", 1)):
        rows.append(_row("tiny Qwen2-VL (random, hidden 64)", loop, tiny.device, _time(tiny, reqs, bs), args.n,
                         f"4 images/request, <= {args.max_new_tokens} new tokens"))
    paths = _files(args.n, args.image_size)
    best: dict[int, tuple[float, float]] = {}
    for _ in range(max(1, args.repeats)):  # alternate, keep each one's best: the cores are shared
        for depth in (0, 1):
            secs, prep = _time_pipeline(tiny, paths, args.batch_size, args.max_new_tokens, depth)
            if depth not in best or secs < best[depth][0]:
                best[depth] = (secs, prep)
    shares = []
    for depth, (secs, prep) in best.items():
        loop = f"from disk, prefetch={depth}"
        shares.append(f"{loop}: {prep:.2f} s of {secs:.2f} s preparing (best of {args.repeats})")
        rows.append(_row("tiny Qwen2-VL (random, hidden 64)", loop, tiny.device, secs, args.n,
                         f"{args.image_size}px PNG + 3 crops, budget {args.tiny_max_pixels} px"))

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
    print("\n".join(shares))


if __name__ == "__main__":
    sys.exit(main())
