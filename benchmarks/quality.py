"""Quality on real data: image AUROC / AP / F1-max of every available expert on the ELPV solar cells.

ELPV (``pip install elpv-dataset``: 2,624 real 300x300 electroluminescence images, CC BY-NC-SA, loaded from
the installed package, never copied). Split (fixed seed, as the demo): half of the defect-probability-0
cells fit the fitted experts (a fifth of those held out for calibration); the other half plus every cell
with defect probability > 0 are the test set. Every row is computed through the plugin: FiftyOne dataset
-> expert / judge -> fields -> anomalib metrics.

Rows:
  * fitted experts (anomalib PaDiM / PatchCore) on the offline EfficientNet-Lite0 ImageNet backbone;
  * the same experts fitted per cell type (mono / poly), their calibrated scores (share of the type's
    held-out normals below) compared across types;
  * a rank ensemble of the fitted rows;
  * the CLIP expert zero-shot and few-shot (WinCLIP prompts; needs the ViT-B-16-plus-240 weights: pass
    ``--clip-weights``), the VLM judge (``--vlm-model`` path / hub id, or ``--vlm-server`` URL) and the fused
    expert+VLM score. Rows that cannot run say why instead of inventing a number.
Published zero-shot image AUROC on ELPV (from the papers in ../shared/README.md) are printed beside them.

Usage:
    .venv/bin/python benchmarks/quality.py [--image-size 224] [--max-test N] [--clip-weights FILE]
        [--vlm-model PATH_OR_ID | --vlm-server URL --vlm-model NAME] [--vlm-max-samples 200]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

warnings.filterwarnings("ignore")
from _env import PATCHCORE_CPU_KWARGS, isolate  # noqa: E402 - before FiftyOne

_TMP = isolate("fav-quality-")

#: published zero-shot image AUROC on ELPV (see ../shared/README.md)
PUBLISHED = [("CLIP (zero-shot, published)", 59.2), ("WinCLIP (zero-shot, published)", 74.0),
             ("AnomalyCLIP (zero-shot, published)", 81.5), ("Anomaly-OV (zero-shot, published)", 83.0)]


class Table:
    """Rows of (name, weights, metrics or None, seconds, note)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict | None, float, str]] = []

    def add(self, name: str, weights: str, metrics: dict | None, seconds: float = 0.0, note: str = "") -> None:
        self.rows.append((name, weights, metrics, seconds, note))
        m = metrics or {}
        print(f"[quality] {name}: " + (f"AUROC {m['auroc']:.3f}" if m else note), flush=True)

    def print(self) -> None:
        print(f"| {'expert':<38} | {'weights':<34} | {'AUROC':>6} | {'AP':>6} | {'F1-max':>6} | {'seconds':>7} | note")
        print(f"|{'-' * 40}|{'-' * 36}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 9}|------")
        for name, weights, m, secs, note in self.rows:
            if m:
                print(f"| {name:<38} | {weights:<34} | {m['auroc']:6.3f} | {m['ap']:6.3f} | {m['f1_max']:6.3f} "
                      f"| {secs:7.0f} | {note}")
            else:
                print(f"| {name:<38} | {weights:<34} | {'n/a':>6} | {'n/a':>6} | {'n/a':>6} | {'-':>7} | {note}")


def _weights(ds, expert: str) -> str:
    info = ds.get_run_info(f"{expert}_expert").config
    w = getattr(info, "weights", None) or {}
    return f"{getattr(info, 'backbone', None) or info.model} ({w.get('source', 'n/a')})"


def _fit_and_score(ds, test, key: str, model: str, args, model_kwargs=None, train=None) -> tuple[dict, float]:
    import fiftyone_anomaly_vlm as fav

    t0 = time.time()
    fav.fit_expert(train if train is not None else ds.match_tags("train"), model=model, key=key,
                   image_size=args.image_size, model_kwargs=model_kwargs, device=args.device, seed=args.seed,
                   progress=False)
    fav.score(test, expert=key, device=args.device, progress=False, batch_size=32)
    return fav.image_metrics(test, key), time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-test", type=int, default=None, help="evaluate on a seeded subset of the test cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip", nargs="*", default=[], choices=["padim", "patchcore", "padim_per_type", "patchcore_per_type"],
                        help="fitted rows to leave out")
    parser.add_argument("--clip-model", default="ViT-B-16-plus-240")
    parser.add_argument("--clip-weights", default=None, help="open_clip checkpoint file (default: the hub tag, "
                        "which needs a connection)")
    parser.add_argument("--k-shot", type=int, default=4)
    parser.add_argument("--vlm-model", default=None, help="local path / hub id, or the model name on --vlm-server")
    parser.add_argument("--vlm-server", default=None, help="OpenAI-compatible base URL (vLLM, SGLang, Ollama)")
    parser.add_argument("--vlm-max-samples", type=int, default=200, help="judge a seeded subset of the test cells")
    args = parser.parse_args()

    import logging

    import numpy as np
    from scipy.stats import rankdata

    import fiftyone as fo
    from fiftyone import ViewField as F

    import fiftyone_anomaly_vlm as fav
    from fiftyone_anomaly_vlm.datasets import load_elpv
    from fiftyone_anomaly_vlm.metrics import binary_image_metrics

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    ds = load_elpv("elpv-quality", seed=args.seed, overwrite=True)
    test = ds.match_tags("test")
    if args.max_test:
        test = test.take(args.max_test, seed=args.seed)
    ids = test.values("id")
    truth = np.array([g == "anomalous" for g in test.values("ground_truth.label")])
    table = Table()
    calibrated: dict[str, np.ndarray] = {}  # for the ensemble: each row's calibrated score per test id

    for key, model, kwargs in (("padim", "padim", None), ("patchcore", "patchcore", PATCHCORE_CPU_KWARGS)):
        if key in args.skip:
            continue
        m, secs = _fit_and_score(ds, test, key, model, args, kwargs)
        note = "blocks.4, 1 % coreset (CPU budget)" if key == "patchcore" else "blocks.2 + blocks.4"
        table.add(f"{model} (fitted)", _weights(ds, key), m, secs, note)
        calibrated[key] = np.array(test.values(f"{key}_score"), dtype=float)

    for model, kwargs in (("padim", None), ("patchcore", PATCHCORE_CPU_KWARGS)):
        if f"{model}_per_type" in args.skip:
            continue
        t0 = time.time()
        per_id: dict[str, float] = {}
        for cell_type in ("mono", "poly"):
            of_type = F("cell_type.label") == cell_type
            key = f"{model}_{cell_type}"
            _fit_and_score(ds, test.match(of_type), key, model, args, kwargs,
                           train=ds.match_tags("train").match(of_type))
            per_id.update(zip(*test.match(of_type).values(["id", f"{key}_score"])))
        scores = np.array([per_id[i] for i in ids], dtype=float)
        table.add(f"{model} per cell type (mono/poly)", _weights(ds, f"{model}_mono"),
                  binary_image_metrics(scores, truth), time.time() - t0,
                  "calibrated scores of two experts, each on its type")
        calibrated[f"{model}_per_type"] = scores

    if len(calibrated) > 1:
        fused = np.mean([rankdata(v) for v in calibrated.values()], axis=0)
        table.add("rank ensemble: " + " + ".join(calibrated), "as above", binary_image_metrics(fused, truth),
                  note="mean rank of the calibrated scores")

    # --- CLIP expert (WinCLIP prompts), zero-shot and few-shot
    pretrained = args.clip_weights or "laion400m_e31"
    for name, refs in (("CLIP expert zero-shot (WinCLIP)", None),
                       (f"CLIP expert {args.k_shot}-shot (WinCLIP+)", ds.match_tags("train"))):
        key = "winclip" if refs is None else "winclip_fs"
        t0 = time.time()
        try:
            fav.create_clip_expert(ds, key, model=args.clip_model, pretrained=pretrained, object_name="solar cell",
                                   references=refs, k_shot=args.k_shot, device=args.device, progress=False)
        except (RuntimeError, OSError, ValueError) as exc:
            table.add(name, f"{args.clip_model} / {pretrained}", None,
                      note=f"not run: {type(exc).__name__}: no weights offline (pass --clip-weights FILE)")
            continue
        fav.score(test, expert=key, device=args.device, progress=False, batch_size=16)
        table.add(name, f"{args.clip_model} / {pretrained}", fav.image_metrics(test, key), time.time() - t0)

    # --- VLM judge (guided by the PaDiM expert) and the fused score
    vlm_note = None
    if not args.vlm_model:
        vlm_note = "not run: no VLM weights here (pass --vlm-model PATH or --vlm-server URL --vlm-model NAME)"
    elif "padim" in args.skip:
        vlm_note = "not run: the judge is guided by the padim row (do not skip it)"
    if vlm_note:
        table.add("VLM judge P(anomalous)", "-", None, note=vlm_note)
        table.add("fused: PaDiM + VLM (rank)", "-", None, note=vlm_note)
    else:
        from fiftyone_anomaly_vlm.models.judge import make_backend

        backend = (make_backend("openai", base_url=args.vlm_server, model=args.vlm_model) if args.vlm_server
                   else make_backend("transformers", model=args.vlm_model, device=args.device))
        sub = test.take(min(args.vlm_max_samples, len(test)), seed=args.seed)
        t0 = time.time()
        fav.judge(sub, key="vlm", backend=backend, expert="padim", reference="auto",
                  knowledge="An electroluminescence image of one solar cell. Defects: cracks, inactive (dark) "
                            "areas, broken fingers.", progress=False)
        secs = time.time() - t0
        y = np.array([g == "anomalous" for g in sub.values("ground_truth.label")])
        for name, field in (("VLM judge P(anomalous)", "vlm_p_anomalous"), ("fused: PaDiM + VLM (rank)", "vlm_fused"),
                            ("padim on the same subset", "padim_score")):
            v = np.array([np.nan if x is None else x for x in sub.values(field)], dtype=float)
            keep = ~np.isnan(v)
            table.add(name, args.vlm_model, binary_image_metrics(v[keep], y[keep]), secs if "VLM" in name else 0,
                      note=f"{int(keep.sum())} of {len(sub)} test cells")

    n_bad = int(truth.sum())
    print(f"\nELPV: fit on {len(ds.match_tags('train'))} normal cells (seed {args.seed}), test {len(ids)} cells "
          f"({n_bad} with defect probability > 0), image size {args.image_size}, device {args.device}")
    table.print()
    print("\npublished zero-shot image AUROC on ELPV (not run here):")
    for name, auroc in PUBLISHED:
        print(f"| {name:<38} | {auroc / 100:6.3f} |")
    fo.delete_dataset(ds.name)


if __name__ == "__main__":
    sys.exit(main())
