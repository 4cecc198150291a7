"""How much of ``select_experts``' shortfall on faint specks is the validation set's noise (issue #22)?

One fit of the ``"auto"`` candidates on the generated 256 px texture set (specks ~10 px at contrast 0.50-0.80,
as ``experts_select.py --size 256 --speck-px 10 --speck-contrast 0.50 0.80``), validated on synthetic anomalies
made from ``--val-normals`` good images; then, with every candidate's validation and test scores in hand and no
refit, the selection is repeated on ``--draws`` random subsets of 10 and 20 of those validation normals (each
with its own synthetic anomalies) and on all of them, under:

* ``current``: ``select_experts``' own rule (:func:`~fiftyone_anomaly_vlm.experts.options.rank_options`);
* ``tie 0.02``: the same with near-ties of shortfall / objective at 0.02 instead of 0.005;
* ``worst-kind z``: among options tied on shortfall and member count, the largest worst-kind separation
  (mean of a synthetic kind minus the normals' mean, in the normals' standard deviations) instead of the
  higher mean AUROC: a continuous criterion that does not saturate at AUROC 1 on the strong synthetic kinds;
* ``z cap 3``: the current rule, with each member's standardised validation scores capped at 3 when the weighted
  sums are ranked: a synthetic anomaly a member scores far beyond its normals then cannot carry a small weight
  of that member past the others' noise (a faint real defect would not).

* ``current + calibration normals``: the current rule on the set ``select_experts`` now ranks on: those
  validation normals plus the good images the candidates held out for calibration (and their synthetic
  anomalies).

Each row: the chosen option's test AUROC minus the best single candidate's, per kind, averaged over draws,
and the mean of the worst kind; the last row is the option ranked first on the test labels (the oracle: the
most any choice among these candidates reaches). ~15 min on 2 CPU cores.

Usage:
    .venv/bin/python benchmarks/selection_noise.py [--val-normals 40] [--draws 8] [--normal 200] [--dump F]
"""

from __future__ import annotations

import argparse
import pickle
import time
import warnings

warnings.filterwarnings("ignore")
import experts_select as bench  # noqa: E402 - isolates FiftyOne's database first (its main() does not run)

import numpy as np  # noqa: E402
from fiftyone import ViewField as F  # noqa: E402

import fiftyone_anomaly_vlm as fav  # noqa: E402
from fiftyone_anomaly_vlm.experts import options  # noqa: E402
from fiftyone_anomaly_vlm.experts import select as select_module  # noqa: E402
from fiftyone_anomaly_vlm.experts.validation import ValidationSet  # noqa: E402
from fiftyone_anomaly_vlm.experts.synthetic import KINDS  # noqa: E402

KIND_COUNT = len(KINDS)  # synthetic anomalies per validation normal, in this order after the normals


RULES = ("current", "tie 0.02", "worst-kind z", "z cap 3")


def worst_z(scores: np.ndarray, labels: np.ndarray, kinds: list[str]) -> float:
    normal = scores[labels == 0]
    sd = normal.std(ddof=1) + 1e-12
    return min((scores[np.array([k == kind for k in kinds])].mean() - normal.mean()) / sd
               for kind in set(kinds) - {"normal"})


def choose(rule: str, val: dict, idx: np.ndarray) -> dict:
    labels, kinds = val["labels"][idx], [val["kinds"][i] for i in idx]
    vs = ValidationSet("synthetic", [], labels, kinds, [])
    cols = {c: s[idx] for c, s in val["columns"].items()}
    std = {c: s[idx] if rule != "z cap 3" else np.clip(s[idx], -3.0, 3.0) for c, s in val["standardised"].items()}
    rows = [{"candidate": c, **vs.metrics(cols[c])} for c in cols]
    tried = options.rank_options(rows, cols, std, vs.metrics, 3, tie=0.02 if rule == "tie 0.02" else options.TIE)
    if rule != "worst-kind z":
        return tried[0]
    return min(tried, key=lambda t: (round(t.get("shortfall", 0.0) / options.TIE), len(t["members"]),
                                     -worst_z(options.combined_scores(t, cols, std), labels, kinds)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--normal", type=int, default=200)
    p.add_argument("--per-defect", type=int, default=30)
    p.add_argument("--val-normals", type=int, default=40)
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--budget", type=float, default=1500.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dump", help="pickle the validation and test scores here (to study other rules offline)")
    bench.add_speck_argument(p)
    args = p.parse_args()
    if args.speck_px is None and args.speck_contrast is None:
        args.speck_px, args.speck_contrast = 10.0, (0.50, 0.80)
    bench.apply_speck_args(args)
    t0 = time.perf_counter()
    ds = bench.make_texture_dataset("bench-noise", num_normal=args.normal, num_per_defect=args.per_defect,
                                    size=args.size, seed=args.seed)
    train = ds.match_tags("train")
    rest = ds.match_tags("good").match_tags("train", bool=False).values("id")
    val_ids = rest[:args.val_normals]
    test = ds.exclude(train.values("id") + val_ids)
    print(f"{train.count()} train, {len(val_ids)} validation normals, {test.count()} test "
          f"({test.match(F('ground_truth.label') == 'normal').count()} good)", flush=True)

    captured = {}
    rank = select_module.rank_options

    def capture(rows, columns, standardised, metrics, max_members):  # the validation scores select_experts ranks
        captured.update(columns=columns, standardised=standardised, labels=np.asarray(metrics.__self__.labels),
                        kinds=list(metrics.__self__.kinds))
        return rank(rows, columns, standardised, metrics, max_members)

    select_module.rank_options = capture
    fav.select_experts(train, ds.select(val_ids), key="sel", image_size=args.size, budget_s=args.budget,
                       keep_candidates=True, device="cpu")
    print(fav.format_selection(ds, "sel"), flush=True)

    test_rows = {c: bench.kind_aurocs(test, f"sel__{c}", "defect_type", bench.TEXTURE_DEFECTS)
                 for c in captured["columns"]}
    normal, kinds_of = test_rows[next(iter(test_rows))]["_per_sample"][1:]
    test_cols, test_std = bench.test_columns(ds, test_rows, "sel")
    best = {k: max(m[k] for m in test_rows.values()) for k in bench.TEXTURE_DEFECTS}

    def minus_best(option: dict) -> list[float]:
        s = options.combined_scores(option, test_cols, test_std)
        stats = bench.kind_stats(s, normal, kinds_of, bench.TEXTURE_DEFECTS)
        return [stats[k] - best[k] for k in bench.TEXTURE_DEFECTS]

    if args.dump:
        with open(args.dump, "wb") as f:
            pickle.dump(dict(val=captured, test_cols=test_cols, test_std=test_std, normal=normal, kinds=kinds_of,
                             best=best), f)
    n_all = int((captured["labels"] == 0).sum())  # the validation normals, then the calibration hold-out's
    n_val = len(val_ids)
    calibration = np.arange(n_val, n_all)
    rng = np.random.default_rng(args.seed)
    print("\n| validation normals | rule | " + " | ".join(f"{k} minus best single" for k in bench.TEXTURE_DEFECTS)
          + " | worst kind, mean | draws |")
    print("|---:|---|" + "---:|" * (len(bench.TEXTURE_DEFECTS) + 2))
    for size in sorted({min(10, n_val), min(20, n_val), n_val}):
        draws = [np.arange(n_val)] if size == n_val else \
            [np.sort(rng.choice(n_val, size, replace=False)) for _ in range(args.draws)]
        # each rule on the drawn validation normals; the current one also with the calibration hold-out's added
        # (select_experts' own set)
        for rule, extra in [(r, np.arange(0)) for r in RULES] + [("current", calibration)]:
            diffs = []
            for normals in draws:
                normals = np.r_[normals, extra]
                idx = np.r_[normals, [n_all + KIND_COUNT * i + j for i in normals for j in range(KIND_COUNT)]]
                diffs.append(minus_best(choose(rule, captured, idx)))
            d = np.array(diffs)
            label, name = (f"{size} + {len(extra)}", f"{rule} + calibration normals") if len(extra) else (size, rule)
            print(f"| {label} | {name} | " + " | ".join(f"{x:+.3f}" for x in d.mean(0))
                  + f" | {d.min(1).mean():+.3f} | {len(d)} |", flush=True)
    oracle_name, oracle, note = bench.oracle_row(test_rows, (test_cols, test_std), bench.TEXTURE_DEFECTS)
    d = [oracle[k] - best[k] for k in bench.TEXTURE_DEFECTS]
    print(f"| - | {oracle_name}: {note} | " + " | ".join(f"{x:+.3f}" for x in d) + f" | {min(d):+.3f} | - |")
    print(f"\nbest single per kind on the test set: {({k: round(v, 3) for k, v in best.items()})}; "
          f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
