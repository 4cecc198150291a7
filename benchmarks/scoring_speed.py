"""Scoring speed: the plugin's ``fav.score`` vs anomalib's own inference loop, same model and images.

Both sides read the same PNG files from disk and run the same checkpoint at the same batch size. The
plugin side also writes every field to MongoDB and every heatmap/mask PNG to disk; anomalib's side
(``Engine.predict`` over ``PredictDataset``) only returns tensors. Target: plugin <= 1.10x anomalib.

Usage:
    .venv/bin/python benchmarks/scoring_speed.py [--n 200] [--size 256] [--batch-size 16] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
from _env import isolate  # noqa: E402 - before FiftyOne

_TMP = isolate("fav-bench-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images to score")
    parser.add_argument("--size", type=int, default=256, help="image side (and model input size)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="padim")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per side (best is reported)")
    args = parser.parse_args()

    import logging

    import torch
    from anomalib.data import PredictDataset
    from anomalib.engine import Engine

    import fiftyone_anomaly_vlm as fav
    from fiftyone_anomaly_vlm.models.anomalib_expert import resolve_device
    from fiftyone_anomaly_vlm.datasets import make_parts_dataset

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = resolve_device(args.device)
    ds = make_parts_dataset("bench-parts", num_normal=args.n, num_anomalous=0, size=args.size, train_fraction=0.2)
    expert = fav.fit_expert(ds.match_tags("train"), model=args.model, key="bench", pretrained=False,
                            image_size=args.size, device=str(device), progress=False)
    images_dir = os.path.dirname(ds.first().filepath)

    def run_plugin() -> float:
        t = time.perf_counter()
        res = fav.score(ds, expert="bench", key="bench", device=str(device), batch_size=args.batch_size,
                        overwrite=True, progress=False)
        assert res.num_scored == args.n
        return time.perf_counter() - t

    model = expert.load(device=device).model
    engine = Engine(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                    enable_progress_bar=False, default_root_dir=os.path.join(_TMP, "engine"))
    workers = min(4, max(0, (os.cpu_count() or 1) - 1))

    def run_anomalib() -> float:
        data = PredictDataset(path=images_dir, image_size=(args.size, args.size))
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=workers,
                                             collate_fn=data.collate_fn)
        t = time.perf_counter()
        preds = engine.predict(model=model, dataloaders=loader, return_predictions=True)
        n = sum(len(p.pred_score) for p in preds)
        assert n == args.n, n
        return time.perf_counter() - t

    run_plugin(), run_anomalib()  # warm-up (imports, worker start-up, caches)
    plugin = min(run_plugin() for _ in range(args.repeats))
    raw = min(run_anomalib() for _ in range(args.repeats))
    rows = [
        ("anomalib Engine.predict (tensors only)", raw),
        ("plugin fav.score (+ MongoDB fields, heatmap/mask PNGs)", plugin),
    ]
    print(f"\nScoring {args.n} images of {args.size}px, {args.model} (random backbone), batch {args.batch_size}, "
          f"device {device}, torch threads {torch.get_num_threads()}, loader workers {workers}")
    print(f"| {'loop':<55} | {'seconds':>8} | {'images/s':>9} | {'vs anomalib':>11} |")
    print(f"|{'-' * 57}|{'-' * 10}|{'-' * 11}|{'-' * 13}|")
    for name, secs in rows:
        print(f"| {name:<55} | {secs:8.2f} | {args.n / secs:9.1f} | {secs / raw:10.2f}x |")
    verdict = "meets" if plugin / raw <= 1.10 else "misses"
    print(f"\nplugin/anomalib = {plugin / raw:.2f}x: {verdict} the 1.10x target")


if __name__ == "__main__":
    sys.exit(main())
