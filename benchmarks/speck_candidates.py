"""Speck-oriented candidates for ``select_experts`` (issue #22): does any smaller-patch or finer-grid patch
expert find the generated texture set's local specks at the realistic subtlety, where the default candidates
stay near chance?

Each configuration is fitted with ``fit_expert`` on the training good images of ``make_texture_dataset``
(``--normal`` good images, half of them training; ``--per-defect`` images per kind, ``--size`` px, seed 0)
and scored on every other image; the table gives image AUROC per defect kind (good test images vs that kind)
and the fit + score time. With 30 specks and 60 good images the 95 % interval of an AUROC near 0.5 is about
+- 0.1, so only differences larger than that mean anything.

Usage:
    .venv/bin/python benchmarks/speck_candidates.py [--size 96] [--normal 120] [--per-defect 30]
"""

from __future__ import annotations

import argparse
import time
import warnings

warnings.filterwarnings("ignore")
from _env import isolate  # noqa: E402 - before FiftyOne

_TMP = isolate("fav-speck-")

import numpy as np  # noqa: E402

import fiftyone as fo  # noqa: E402

import fiftyone_anomaly_vlm as fav  # noqa: E402
from fiftyone_anomaly_vlm.datasets import TEXTURE_DEFECTS, make_texture_dataset  # noqa: E402
from fiftyone_anomaly_vlm.metrics import auroc  # noqa: E402


def configs(size: int) -> list[tuple[str, str, int, dict]]:
    """(name, model, image size, model_kwargs): PaDiM at half, double and native size, PaDiM on shallower
    layers (finer grid), PatchCore on the stride-8 layer."""
    return [
        (f"padim_{size // 2}", "padim", size // 2, {}),
        (f"padim_{size}_shallow", "padim", size, {"layers": ["blocks.1", "blocks.2"], "n_features": 64}),
        (f"padim_{2 * size}", "padim", 2 * size, {}),
        (f"patchcore_{size}_blocks2", "patchcore", size, {"layers": ["blocks.2"], "coreset_sampling_ratio": 0.05}),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--normal", type=int, default=120)
    p.add_argument("--per-defect", type=int, default=30)
    args = p.parse_args()
    ds = make_texture_dataset("bench-specks", num_normal=args.normal, num_per_defect=args.per_defect,
                              size=args.size, seed=0)
    train, test = ds.match_tags("train"), ds.match_tags("train", bool=False)
    print(f"{train.count()} train, {test.count()} test, {args.size} px")
    print("| candidate | " + " | ".join(TEXTURE_DEFECTS) + " | fit + score s |")
    print("|---|" + "---:|" * (len(TEXTURE_DEFECTS) + 1))
    for name, model, size, kwargs in configs(args.size):
        t = time.perf_counter()
        try:
            fav.fit_expert(train, model=model, key=name, image_size=size, model_kwargs=kwargs, device="cpu",
                           progress=False)
            fav.score(test, expert=name, key=name, progress=False)
        except Exception as exc:  # noqa: BLE001 - a configuration that cannot run says why
            print(f"| {name} | failed: {exc} |", flush=True)
            continue
        scores, labels, kinds = test.values([f"{name}_score", "ground_truth.label", "defect_type"])
        s = np.array(scores, dtype=float)
        normal = np.array([lab == "normal" for lab in labels])
        cells = []
        for kind in TEXTURE_DEFECTS:
            keep = normal | np.array([k == kind for k in kinds])
            cells.append(f"{auroc(s[keep], ~normal[keep]):.3f}")
        print(f"| {name} | " + " | ".join(cells) + f" | {time.perf_counter() - t:.0f} |", flush=True)
    fo.delete_dataset(ds.name)


if __name__ == "__main__":
    main()
