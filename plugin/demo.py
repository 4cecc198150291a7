"""The README's demo: generate a parts dataset, fit an expert on good parts, score everything, report.

Run ``python -m fiftyone_anomaly_vlm.demo`` (the README's demo command installs first and then runs this).
"""

from __future__ import annotations

import argparse
import time

import fiftyone as fo

from .experts import fit_expert
from .metrics import image_metrics
from .scoring import score
from .synthetic import make_parts_dataset


def main(argv: list[str] | None = None) -> dict:
    """Run the demo and print a result table; returns the metrics."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="anomaly-vlm-demo")
    parser.add_argument("--model", default="padim", help="any anomalib image model name")
    parser.add_argument("--pretrained", default="false",
                        help="'false' (random backbone, no download), 'true' (ImageNet via the hub) or a weights file")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    pretrained = {"false": False, "true": True}.get(args.pretrained.lower(), args.pretrained)
    key = args.model.replace("-", "_")

    t0 = time.time()
    ds = make_parts_dataset(args.dataset, persistent=True)
    print(f"built dataset '{ds.name}': {len(ds)} parts ({ds.count_values('ground_truth.label')})")
    fit_expert(ds.match_tags("train"), model=args.model, key=key, pretrained=pretrained,
               device=args.device, overwrite=True, progress=False)
    res = score(ds, expert=key, device=args.device, overwrite=True, progress=False)
    test = ds.match_tags("train", bool=False)
    m = image_metrics(test, key, gt_field="ground_truth")
    f = res.fields
    rows = [
        ("model", f"{args.model} (pretrained={args.pretrained})"),
        ("test samples (not used to fit)", f"{m['num_samples']} ({m['num_anomalous']} defective)"),
        ("image AUROC", f"{m['auroc']:.3f}"),
        ("image AP", f"{m['ap']:.3f}"),
        ("image F1-max", f"{m['f1_max']:.3f}"),
        ("flagged anomalous (all samples)", f"{res.num_flagged} of {res.num_samples}"),
        ("scoring errors", str(res.num_errors)),
        ("fields", f"{f.label}, {f.score}, {f.raw_score}, {f.map}, {f.mask}, {f.error}"),
        ("runs", ", ".join(ds.list_runs())),
        ("heatmaps/masks", res.output_dir),
        ("time", f"{time.time() - t0:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"\nOpen it in the App:\n  python -c \"import fiftyone as fo; "
          f"fo.launch_app(fo.load_dataset('{ds.name}')).wait()\"")
    return m


if __name__ == "__main__":
    main()
