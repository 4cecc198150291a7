"""CLIP expert (WinCLIP) speed: ``ClipExpert.predict`` alone and ``fav.score`` end to end, in images/s.

By default it runs a tiny random open_clip ViT (64 px, patch 16, 2 layers) built here, which measures
the plugin's overhead and the sliding-window machinery, not a real model. Pass ``--model``/``--pretrained``
with local weights to time a real one (e.g. ``--pretrained /models/vit_b_16_plus_240-laion400m_e31.pt``).
Whatever cannot be run (no weights offline) is printed as such: no number is ever made up.

Usage:
    .venv/bin/python benchmarks/clip_speed.py [--n 64] [--batch-size 16] [--device auto] [--k-shot 0]
    .venv/bin/python benchmarks/clip_speed.py --model ViT-B-16-plus-240 --pretrained /path/to/checkpoint.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
from _env import isolate  # noqa: E402 - before FiftyOne

_TMP = isolate("fav-bench-clip-")

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                        "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _row(name: str, device: str, secs: float | None, n: int, note: str = "") -> str:
    speed = f"{n / secs:9.1f}" if secs else f"{'n/a':>9}"
    return f"| {name:<46} | {device:<6} | {speed} | {note:<60} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="images to score")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--k-shot", type=int, default=0, help="few-shot references (0: zero-shot)")
    parser.add_argument("--model", default=None, help="open_clip model to time besides the tiny one")
    parser.add_argument("--pretrained", default="laion400m_e31", help="its tag or local checkpoint")
    args = parser.parse_args()

    import torch

    import fiftyone_anomaly_vlm as fav
    from fiftyone_anomaly_vlm.models.anomalib_expert import resolve_device
    from fiftyone_anomaly_vlm.models.clip_expert import ClipExpert
    from fiftyone_anomaly_vlm.datasets import make_parts_dataset

    device = resolve_device(args.device)
    config = os.path.join(_TMP, "tiny-clip.json")
    with open(config, "w") as f:
        json.dump(TINY, f)

    def time_predict(expert: ClipExpert) -> float:
        images = torch.rand(args.n, 3, *expert.image_size, generator=torch.Generator().manual_seed(0))
        if args.k_shot:
            expert.set_references(images[: args.k_shot])
        expert.predict(images[: args.batch_size])  # warm-up (text embeddings cached here)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for batch in images.split(args.batch_size):
            expert.predict(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    rows = []
    tiny = ClipExpert.from_pretrained(config, None, object_name="part", device=device)
    rows.append(_row("tiny ViT 64px (random), ClipExpert.predict", device.type, time_predict(tiny), args.n,
                     "model only: 9 + 4 windows per image"))

    ds = make_parts_dataset("bench-clip-parts", num_normal=args.n, num_anomalous=0, size=64, train_fraction=0.1)
    refs = ds.match_tags("train") if args.k_shot else None
    fav.create_clip_expert(ds, "bench_clip", model=config, pretrained=None, object_name="part",
                           references=refs, k_shot=max(1, args.k_shot), device=str(device))
    fav.score(ds.limit(args.batch_size), expert="bench_clip", key="warmup", device=str(device), progress=False)
    t = time.perf_counter()
    res = fav.score(ds, expert="bench_clip", device=str(device), batch_size=args.batch_size, progress=False)
    secs = time.perf_counter() - t
    assert res.num_scored == len(ds), res
    rows.append(_row("tiny ViT 64px (random), fav.score end to end", device.type, secs, len(ds),
                     "+ decoding, MongoDB fields, heatmap/mask PNGs"))

    real_model = args.model or "ViT-B-16-plus-240"
    try:
        real = ClipExpert.from_pretrained(real_model, args.pretrained, object_name="part", device=device)
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        reason = "not run: no weights here (pass --pretrained /local/ckpt)"
        rows.append(_row(f"{real_model} / {os.path.basename(str(args.pretrained))}", device.type, None, args.n,
                         reason))
        print(f"({real_model}: {str(exc)[:160]}...)", file=sys.stderr)
    else:
        rows.append(_row(f"{real_model} {real.input_size[0]}px, ClipExpert.predict", device.type,
                         time_predict(real), args.n, f"{args.pretrained}"))

    mode = f"{args.k_shot}-shot" if args.k_shot else "zero-shot"
    print(f"\nCLIP expert ({mode}), {args.n} images, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"| {'model / loop':<46} | {'device':<6} | {'images/s':>9} | {'note':<60} |")
    print(f"|{'-' * 48}|{'-' * 8}|{'-' * 11}|{'-' * 62}|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    sys.exit(main())
