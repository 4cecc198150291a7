"""Tiling: small defects in large images, without and with tiles, same expert and backbone, in one run.

Sets:
  * generated high-resolution parts (``make_parts_dataset(size=1024, defect_types=SMALL_DEFECT_TYPES)``):
    machined discs with a dark speck (0.5-1 % of the side across) or a hairline scratch (1-2 px wide) each;
  * ELPV (real 300 px solar cells, the split of ``benchmarks/quality.py``): tiling off must match the README's
    quality table (PaDiM 0.810 at 224 px); tiling on cuts 224 px tiles at native resolution (2x2 per cell).

Rows per set: the expert fitted on the whole image resized to ``--image-size`` ("off") and the same model and
backbone fitted on ``--tile`` px tiles every ``--stride`` px at native resolution ("on"); image AUROC (raw
scores, and calibrated ``<key>_score`` as ``benchmarks/quality.py`` reports it), pixel AUROC and AUPRO
(anomalib's metrics through ``fav.evaluate``, ground-truth masks at the heatmap's size, now the image's), scoring
seconds per image. The tiled image score is measured both ways from one pass
over the test images: ``map_max`` (maximum of the stitched map) and ``tile_max`` (the model's own image score,
highest over the tiles).

Region recall (parts set): the ``<key>_regions`` that scoring writes at the run's default threshold against the
generated defects (one per defective part, its ``ground_truth_mask``). A region hits the defect when its box, in
image pixels rounded outwards, contains a pixel of the defect's mask; a defect is found when a region hits it.
Reported: defects found / defective parts, and regions that hit no defect per normal and per defective image,
keeping every region and only those of at least 0.01 % and 0.1 % of the image (:data:`RECALL_MIN_AREAS`).

Cost: peak memory (resident memory of a child process that loads the expert and scores one generated
``--large`` px image, sampled every 20 ms) and seconds, without and with tiling (the first ``--model``).

Usage:
    .venv/bin/python benchmarks/tiling.py [--size 1024] [--normal 20] [--anomalous 10] [--model padim [patchcore]]
        [--tile 256] [--stride 224] [--image-size 256] [--large 8000] [--elpv-max-test N | --no-elpv]
        [--elpv-tiled] [--no-parts]
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
from _env import PATCHCORE_CPU_KWARGS, add_threads_argument, isolate, set_threads  # noqa: E402 - before FiftyOne

_TMP = isolate("fav-tiling-")


def _model_kwargs(model: str) -> dict | None:
    return PATCHCORE_CPU_KWARGS if model == "patchcore" else None


def _fit_score_eval(fav, ds, test, key: str, args, *, model: str, tiled: bool, image_size: int, tile: int, stride: int,
                    masks: bool) -> dict:
    t0 = time.time()
    kw = dict(tile_size=tile, tile_stride=stride) if tiled else dict(image_size=image_size)
    fav.fit_expert(ds.match_tags("train"), model=model, key=key, model_kwargs=_model_kwargs(model),
                   device="cpu", seed=args.seed, progress=False, **kw)
    fit_s = time.time() - t0
    t1 = time.time()
    fav.score(test, expert=key, device="cpu", progress=False, batch_size=16, num_workers=0)
    score_s = time.time() - t1
    ev = fav.evaluate(test, key, gt_field="ground_truth", gt_mask_field="ground_truth_mask" if masks else None,
                      eval_key=f"{key}_eval", progress=False)
    m = ev.metrics
    return {"auroc": m["auroc"], "auroc_calibrated": fav.image_metrics(test, key)["auroc"],
            "pixel_auroc": m.get("pixel_auroc"), "aupro": m.get("aupro"), "fit_s": fit_s,
            "s_per_image": score_s / len(test), **(_region_recall(test, key) if masks else {})}


#: smallest region areas (share of the image) at which region recall is also read: the regions of a run scored
#: with ``min_region_area=a`` are exactly its regions at 0 whose ``area_share`` is at least ``a``
RECALL_MIN_AREAS = (0.0, 1e-4, 1e-3)


def _region_recall(test, key: str) -> dict:
    """How the ``<key>_regions`` written by scoring (the run's default threshold, ``min_region_area`` 0) meet the
    generated defects, also keeping only regions of at least each of :data:`RECALL_MIN_AREAS`.

    The generator puts one defect in each defective part, drawn into its ``ground_truth_mask``. Rule: a region
    *hits* the defect when its box, in the image's pixels rounded outwards, contains at least one pixel of the
    defect's mask; a defect is *found* when at least one region hits it. Returns, per minimum area, the recall
    (found / defective parts) and the regions that hit no defect, per normal and per defective image.
    """
    import numpy as np

    stats = {a: dict(found=0, false_on_normal=0, false_on_defective=0) for a in RECALL_MIN_AREAS}
    defective = normal = 0
    for sample in test.select_fields([f"{key}_regions", "ground_truth", "ground_truth_mask"]):
        regions = sample[f"{key}_regions"]
        dets = regions.detections if regions is not None else []
        if sample.ground_truth.label != "anomalous":
            normal += 1
            for a in RECALL_MIN_AREAS:
                stats[a]["false_on_normal"] += sum(d["area_share"] >= a for d in dets)
            continue
        defective += 1
        mask = np.asarray(sample.ground_truth_mask.get_mask()) > 0
        h, w = mask.shape
        hits = [(d["area_share"], mask[int(np.floor(y * h)):int(np.ceil((y + bh) * h)),
                                      int(np.floor(x * w)):int(np.ceil((x + bw) * w))].any())
                for d in dets for x, y, bw, bh in [d.bounding_box]]
        for a in RECALL_MIN_AREAS:
            kept = [hit for share, hit in hits if share >= a]
            stats[a]["found"] += any(kept)
            stats[a]["false_on_defective"] += kept.count(False)
    return {"defects": defective, "recall": {
        a: {"found": st["found"], "recall": st["found"] / defective if defective else None,
            "false_per_normal": st["false_on_normal"] / normal if normal else None,
            "false_per_defective": st["false_on_defective"] / defective if defective else None}
        for a, st in stats.items()}}


def _both_image_scores(fav, test, key: str) -> dict:
    """Image AUROC of ``map_max`` and ``tile_max`` from one pass of the tiled expert over the test images."""
    import numpy as np

    from fiftyone_anomaly_vlm.images import decode_native
    from fiftyone_anomaly_vlm.metrics import binary_image_metrics
    from fiftyone_anomaly_vlm.models.tiling import Stitcher

    tiled = fav.load_expert(test, key).load("cpu")
    map_max, tile_max = [], []
    for path in test.values("filepath"):
        arr, size = decode_native(path)
        stitcher, best = Stitcher(size, size), -float("inf")
        for tiles, boxes in tiled.tile_batches(arr, *size):
            out = tiled.expert.predict(tiles)
            best = max(best, float(out.raw_score.max()))
            for i, box in enumerate(boxes):
                stitcher.add(out.raw_map[i][None], box, tiled.tile)
        map_max.append(float(stitcher.result().max()))
        tile_max.append(best)
    truth = np.array([g == "anomalous" for g in test.values("ground_truth.label")])
    return {name: binary_image_metrics(np.array(s), truth)["auroc"] for name, s in
            (("map_max", map_max), ("tile_max", tile_max))}


def _peak_child(dataset: str, key: str, path: str) -> dict:
    """Peak resident memory added while scoring (MB; sampled every 20 ms, above the process with the expert
    loaded) and seconds of a fresh process that scores the one image ``path`` with expert ``key``."""
    code = f"""
import json, os, sys, threading, time
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import torch
if os.environ.get("FAV_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FAV_BENCH_THREADS"]))
import fiftyone as fo, fiftyone_anomaly_vlm as fav
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
ds = fo.load_dataset({dataset!r})
spec = fav.load_expert(ds, {key!r}); spec.load("cpu")  # imports and weights in memory before the baseline
base, peak, done = rss(), [rss()], []
def watch():
    while not done:
        peak[0] = max(peak[0], rss()); time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
view = ds.match(fo.ViewField("filepath") == {path!r})
t = time.time()
r = fav.score(view, expert={key!r}, key={key + "_large"!r}, device="cpu", num_workers=0, progress=False)
done.append(1); peak[0] = max(peak[0], rss())
print(json.dumps({{"peak_mb": peak[0] - base, "before_mb": base, "seconds": time.time() - t, "errors": r.num_errors}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--normal", type=int, default=20, help="normal parts (half fit the expert)")
    parser.add_argument("--anomalous", type=int, default=10)
    parser.add_argument("--model", nargs="+", default=["padim"], choices=["padim", "patchcore"],
                        help="one or more models (the memory rows use the first)")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--stride", type=int, default=224)
    parser.add_argument("--image-size", type=int, default=256, help="model input when not tiled")
    parser.add_argument("--large", type=int, default=8000, help="side of the image of the memory rows (0: none)")
    parser.add_argument("--no-elpv", action="store_true")
    parser.add_argument("--no-parts", action="store_true", help="skip the generated parts (their rows, region "
                        "recall and the memory rows, which score the parts' experts): ELPV only")
    parser.add_argument("--elpv-max-test", type=int, default=None, help="ELPV: a seeded subset of the test cells")
    parser.add_argument("--elpv-tiled", action="store_true", help="ELPV with tiling on too (4 tiles a cell: "
                        "four times the CPU time of the off row)")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)

    import logging

    import numpy as np
    from PIL import Image

    import fiftyone as fo

    import fiftyone_anomaly_vlm as fav
    from fiftyone_anomaly_vlm.datasets import SMALL_DEFECT_TYPES, make_parts_dataset

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("fiftyone_anomaly_vlm").setLevel(logging.ERROR)
    rows, scores, mem = [], {}, {}
    if args.no_parts:
        args.large = 0
    ds = None if args.no_parts else make_parts_dataset(
        "parts-hr", num_normal=args.normal, num_anomalous=args.anomalous, size=args.size, seed=args.seed,
        defect_types=SMALL_DEFECT_TYPES)
    models = [] if ds is None else args.model
    for model in models:
        for tiled in (False, True):
            test = ds.match_tags("train", bool=False)
            key = f"{model}_{'tiled' if tiled else 'whole'}"
            m = _fit_score_eval(fav, ds, test, key, args, model=model, tiled=tiled, image_size=args.image_size,
                                tile=args.tile, stride=args.stride, masks=True)
            rows.append((f"parts {args.size}px, {model}", "on" if tiled else "off", m))
            print("[tiling]", rows[-1], flush=True)
        scores[model] = _both_image_scores(fav, test, f"{model}_tiled")
        print("[tiling] tiled image score AUROC:", model, scores[model], flush=True)

    if args.large:
        rng = np.random.default_rng(1)
        path = os.path.join(_TMP, f"large_{args.large}.png")
        side = args.large
        base = (rng.normal(0.5, 0.02, (side // 8, side // 8)) * 255).clip(0, 255).astype(np.uint8)
        Image.fromarray(np.kron(base, np.ones((8, 8), np.uint8))).convert("RGB").save(path, compress_level=1)
        ds.add_sample(fo.Sample(filepath=path, tags=["large"]))
        for key in (f"{args.model[0]}_whole", f"{args.model[0]}_tiled"):
            mem[key] = _peak_child(ds.name, key, path)
            print("[tiling] memory", key, mem[key], flush=True)

    if not args.no_elpv:
        from fiftyone_anomaly_vlm.datasets import load_elpv

        try:
            elpv = load_elpv("elpv-tiling", seed=args.seed, overwrite=True)
        except Exception as exc:  # noqa: BLE001 - the row says why instead of a number
            rows.append(("ELPV 300px", "-", {"error": f"{type(exc).__name__}: {exc}"}))
        else:
            etest = elpv.match_tags("test")
            if args.elpv_max_test:
                etest = etest.take(args.elpv_max_test, seed=args.seed)
            for tiled in (False, True) if args.elpv_tiled else (False,):
                key = "elpv_tiled" if tiled else "elpv_whole"
                m = _fit_score_eval(fav, elpv, etest, key, args, model=args.model[0], tiled=tiled, image_size=224,
                                    tile=224, stride=76, masks=False)
                rows.append((f"ELPV 300px ({len(etest)} test cells), {args.model[0]}", "on" if tiled else "off",
                             m))
                print("[tiling]", rows[-1], flush=True)

    print()
    print("| set | tiling | image AUROC (raw) | image AUROC (calibrated) | pixel AUROC | AUPRO | fit s | s/image |")
    print("|---|---|---|---|---|---|---|---|")
    for name, tiling, m in rows:
        if "error" in m:
            print(f"| {name} | {tiling} | not run: {m['error']} | | | | | |")
            continue
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {name} | {tiling} | {fmt(m['auroc'])} | {fmt(m['auroc_calibrated'])} | {fmt(m['pixel_auroc'])} "
              f"| {fmt(m['aupro'])} "
              f"| {m['fit_s']:.0f} | {m['s_per_image']:.2f} |")
    print()
    for model, sc in scores.items():
        print(f"tiled image score (parts set, {model}, image AUROC): map_max {sc['map_max']:.3f}, "
              f"tile_max {sc['tile_max']:.3f}")
    recall_rows = [(name, tiling, m) for name, tiling, m in rows if "recall" in m]
    if recall_rows:
        print()
        print("| set | tiling | smallest region (share of the image) | defects found by a region (recall) "
              "| regions on no defect, per normal image | per defective image |")
        print("|---|---|---|---|---|---|")
        for name, tiling, m in recall_rows:
            for a, r in m["recall"].items():
                print(f"| {name} | {tiling} | {a:g} | {r['found']}/{m['defects']} = {r['recall']:.2f} "
                      f"| {r['false_per_normal']:.2f} | {r['false_per_defective']:.2f} |")
        print("(a region hits the defect when its box, in image pixels, contains a pixel of the generated defect's "
              "mask; regions at each run's default threshold, scored with min_region_area 0 and read again keeping "
              "only regions of at least the area given, as scoring with that min_region_area writes them)")
    for key, m in mem.items():
        print(f"peak memory scoring one {args.large}x{args.large} image, {key}: "
              + (f"+{m['peak_mb']:.0f} MB resident at peak (above {m['before_mb']:.0f} MB with the expert loaded), "
                 f"{m['seconds']:.1f} s" if "peak_mb" in m else f"not run: {m['error']}"))
    print(f"(tile {args.tile}, stride {args.stride}; off: whole image resized to {args.image_size}; torch threads "
          f"{args.threads or 'default'}; {os.cpu_count()} CPU cores shared with other jobs: compare quality, "
          "not seconds)")


if __name__ == "__main__":
    main()
