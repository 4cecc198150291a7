"""ELPV quality and parity: PaDiM / PatchCore on the offline EfficientNet-Lite backbone.

Split (fixed seed): half of the defect-probability-0 cells fit the expert (the plugin holds out a fifth of
them for calibration); the other half plus every cell with defect probability > 0 are the test set.

For each expert, image AUROC/AP/F1-max on the test cells
  (a) through the plugin: FiftyOne dataset -> fav.fit_expert / fav.score -> fields -> anomalib metrics;
  (b) through anomalib alone: its ``Folder`` datamodule reading the same files (symlinked), ``Engine.fit``
      on the same training images and ``Engine.test`` with anomalib's own evaluator, same model
      construction, same Lite weights and seed.
Target: (a) within 0.5 AUROC points of (b); best expert >= 0.85 image AUROC.

Usage:
    .venv/bin/python benchmarks/elpv_quality.py [--models padim patchcore] [--image-size 256] [--max-test N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
from _env import PATCHCORE_CPU_KWARGS, isolate  # noqa: E402 - before FiftyOne

_TMP = isolate("fav-elpv-")

MODEL_KWARGS = {"padim": {}, "patchcore": PATCHCORE_CPU_KWARGS}


def anomalib_engine_auroc(model_name, image_size, train_paths, test_normal, test_bad, val_paths, model_kwargs,
                          seed) -> dict:
    """Fit and test with anomalib alone (Folder datamodule + Engine), same construction as the plugin."""
    import torch
    from anomalib.data import Folder
    from anomalib.engine import Engine

    from fiftyone_anomaly_vlm.models import AnomalibExpert

    root = tempfile.mkdtemp(prefix="elpv-folder-", dir=_TMP)
    for sub, paths in (("train_good", train_paths), ("test_good", test_normal), ("test_bad", test_bad),
                       ("val_good", val_paths)):
        os.makedirs(os.path.join(root, sub))
        for p in paths:
            os.symlink(p, os.path.join(root, sub, os.path.basename(p)))
    datamodule = Folder(name="elpv", root=root, normal_dir="train_good", abnormal_dir="test_bad",
                        normal_test_dir="test_good", train_batch_size=8, eval_batch_size=32, num_workers=1,
                        val_split_mode="same_as_test", seed=seed)
    torch.manual_seed(seed)
    expert = AnomalibExpert.build(model_name, image_size=(image_size, image_size), device="cpu",
                                  model_kwargs=dict(model_kwargs))
    model = expert.model
    from anomalib.metrics import AUPR, AUROC, Evaluator, F1Max

    model.evaluator = Evaluator(test_metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                                              AUPR(fields=["pred_score", "gt_label"], prefix="image_"),
                                              F1Max(fields=["pred_score", "gt_label"], prefix="image_")])
    engine = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    default_root_dir=os.path.join(root, "engine"))
    engine.fit(model=model, datamodule=datamodule)
    out = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    return {"auroc": out["image_AUROC"], "ap": out["image_AUPR"], "f1_max": out["image_F1Max"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["padim", "patchcore"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-test", type=int, default=None, help="evaluate on a seeded subset of the test cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-engine", action="store_true", help="skip anomalib's own Engine (parity) rows")
    args = parser.parse_args()

    import logging

    import numpy as np

    import fiftyone as fo

    import fiftyone_anomaly_vlm as fav
    from fiftyone_anomaly_vlm.datasets import load_elpv
    from fiftyone_anomaly_vlm.models.backbones import default_offline_backbone

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    ds = load_elpv("elpv-bench", seed=args.seed, overwrite=True)
    test = ds.match_tags("test")
    if args.max_test:
        test = test.take(args.max_test, seed=args.seed)
    rows = []
    scores = {}
    for name in args.models:
        t0 = time.time()
        fav.fit_expert(ds.match_tags("train"), model=name, key=name, image_size=args.image_size,
                                model_kwargs=MODEL_KWARGS.get(name), device="cpu", seed=args.seed, progress=False)
        fav.score(test, expert=name, progress=False, batch_size=32)
        m = fav.image_metrics(test, name)
        info = ds.get_run_info(f"{name}_expert").config
        weights = f"{info.backbone} ({info.weights['source']})"
        rows.append((f"{name} via plugin", weights, m, time.time() - t0))
        scores[name] = dict(zip(*test.values(["id", f"{name}_raw_score"])))
        if not args.no_engine:
            t0 = time.time()
            id_to_path = dict(zip(*ds.values(["id", "filepath"])))
            gt = test.values("ground_truth.label")
            paths = test.values("filepath")
            e = anomalib_engine_auroc(
                name, args.image_size, [id_to_path[i] for i in info.train_ids],
                [p for p, g in zip(paths, gt) if g == "normal"], [p for p, g in zip(paths, gt) if g != "normal"],
                [id_to_path[i] for i in info.holdout_ids], MODEL_KWARGS.get(name, {}), args.seed)
            rows.append((f"{name} via anomalib Engine", weights, e, time.time() - t0))
    if len(scores) > 1:  # rank-average ensemble of the experts' scores
        ids = list(next(iter(scores.values())))
        ranks = [np.argsort(np.argsort([scores[n][i] for i in ids])) for n in scores]
        fused = np.mean(ranks, axis=0)
        labels = dict(zip(*test.values(["id", "ground_truth.label"])))
        from fiftyone_anomaly_vlm.metrics import binary_image_metrics

        m = binary_image_metrics(fused, [labels[i] == "anomalous" for i in ids])
        rows.append(("rank ensemble " + "+".join(scores), "same", m, 0.0))

    n_test = len(test)
    n_bad = test.count_values("ground_truth.label").get("anomalous", 0)
    print(f"\nELPV: fit on {len(ds.match_tags('train'))} normal cells (seed {args.seed}), test {n_test} cells "
          f"({n_bad} with defect probability > 0), image size {args.image_size}, CPU")
    print("Published zero-shot image AUROC on ELPV for reference: CLIP 59.2, WinCLIP 74.0, AnomalyCLIP 81.5, "
          "Anomaly-OV 83.0")
    print(f"| {'expert':<34} | {'weights':<30} | {'AUROC':>6} | {'AP':>6} | {'F1-max':>6} | {'seconds':>7} |")
    print(f"|{'-' * 36}|{'-' * 32}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 9}|")
    for name, weights, m, secs in rows:
        print(f"| {name:<34} | {weights:<30} | {m['auroc']:6.3f} | {m['ap']:6.3f} | {m['f1_max']:6.3f} | {secs:7.0f} |")
    if not args.no_engine:
        for name in args.models:
            a = next(r[2]["auroc"] for r in rows if r[0] == f"{name} via plugin")
            b = next(r[2]["auroc"] for r in rows if r[0] == f"{name} via anomalib Engine")
            print(f"{name}: plugin - anomalib = {100 * (a - b):+.2f} AUROC points (target within 0.5)")
    best = max(r[2]["auroc"] for r in rows)
    print(f"best image AUROC {best:.3f} (target >= 0.85); offline backbone: {default_offline_backbone()}")
    fo.delete_dataset(ds.name)


if __name__ == "__main__":
    sys.exit(main())
