"""Review speed on a large dataset: the review panel's queries as database aggregations vs. loading scores.

Builds a dataset of ``--n`` samples (default 100,000) holding what a scoring run writes for review
(``<key>_score``, the ``<key>`` label) plus a ground-truth label, registers the scoring run, and times
what the review panel does on each event:

* open the panel / pick a run: :func:`fav.score_histogram` split by ground truth (3 ``histogram_values``
  aggregations and a ``Count``/``Bounds``);
* move the threshold: :func:`fav.threshold_counts` with precision/recall (``count`` aggregations);
* "Show flagged": :func:`fav.flagged_view`, first grid page (100 ids, sorted by score);

against the baseline of loading the scores into Python (``values()`` of score and label, then numpy
histogram / counts), and of iterating samples (``iter_samples``, what a naive panel would do). Images are
not needed (the fields are written directly), so the numbers are the database's, not the model's.

Usage:
    .venv/bin/python benchmarks/review_speed.py [--n 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import uuid
import warnings

warnings.filterwarnings("ignore")
from _env import isolate  # noqa: E402 - before FiftyOne

_TMP = isolate("fav-bench-")


def build(n: int, key: str, seed: int = 0):
    """A dataset of ``n`` samples with a scoring run's review fields and ground truth (no image files)."""
    import numpy as np

    import fiftyone as fo

    from fiftyone_anomaly_vlm.fields import FieldNames
    from fiftyone_anomaly_vlm.runs import AnomalyScoreRunConfig

    rng = np.random.default_rng(seed)
    anomalous = rng.random(n) < 0.1
    # calibrated scores: normals spread over (0, 1), anomalies pushed up
    scores = np.clip(np.where(anomalous, rng.beta(5, 1.5, n), rng.beta(2, 2, n)), 1e-6, 1 - 1e-6)
    threshold = 0.9
    fields = FieldNames(key)
    ds = fo.Dataset(f"review-bench-{uuid.uuid4().hex[:6]}")
    ds.add_samples([fo.Sample(filepath=f"/nonexistent/{i:06d}.png") for i in range(n)], progress=False)
    ds.add_sample_field(fields.label, fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    ds.add_sample_field("ground_truth", fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    ds.set_values(fields.score, scores.tolist())
    ds.set_values(fields.label, [fo.Classification(label="anomalous" if s > threshold else "normal") for s in scores])
    ds.set_values("ground_truth", [fo.Classification(label="anomalous" if a else "normal") for a in anomalous])
    ds.register_run(key, AnomalyScoreRunConfig(normalized_image_threshold=threshold, fields=fields.all()))
    return ds


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls (and the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="samples in the dataset")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row (best is reported)")
    parser.add_argument("--bins", type=int, default=40, help="histogram bins (the panel uses 40)")
    args = parser.parse_args()

    import numpy as np
    import resource

    import fiftyone_anomaly_vlm as fav
    from fiftyone_anomaly_vlm.fields import FieldNames

    key = "bench"
    field = FieldNames(key).score
    t = time.perf_counter()
    ds = build(args.n, key)
    print(f"built {len(ds):,} samples in {time.perf_counter() - t:.1f} s")

    rows = []

    def row(event: str, how: str, seconds: float, check: str) -> None:
        rows.append((event, how, seconds, check))

    # --- open the panel: histogram split by ground truth
    s, hist = best_of(lambda: fav.score_histogram(ds, key, bins=args.bins, gt_field="ground_truth"), args.repeats)
    row("histogram (+gt split)", "plugin: aggregations", s, f"{sum(hist['counts']):,} counted")

    def bucket_hist():  # FiftyOne's histogram_values ($bucket), one call per ground-truth class as before
        from fiftyone import ViewField as F

        scored, label = ds.exists(field), F("ground_truth.label")
        return [scored.match(m).histogram_values(field, bins=args.bins, range=[0, 1])[0]
                for m in (label == "anomalous", label != "anomalous")]

    s, ref = best_of(bucket_hist, args.repeats)
    same = ref[0] == hist["series"]["anomalous"] and ref[1] == hist["series"]["normal"]
    row("histogram (+gt split)", "FiftyOne histogram_values ($bucket)", s, "same counts" if same else "COUNTS DIFFER")

    def numpy_hist():
        scores, gts = ds.values([field, "ground_truth.label"])
        scores, gts = np.asarray(scores, float), np.asarray(gts)
        return [np.histogram(scores[m], args.bins, (0, 1))[0] for m in (gts == "anomalous", gts != "anomalous")]

    s, ref = best_of(numpy_hist, args.repeats)
    same = ref[0].tolist() == hist["series"]["anomalous"] and ref[1].tolist() == hist["series"]["normal"]
    row("histogram (+gt split)", "baseline: values() + numpy", s, "same counts" if same else "COUNTS DIFFER")

    def iterate():
        scores, gts = [], []
        for sample in ds.iter_samples():
            scores.append(sample[field])
            gts.append(sample.ground_truth.label)
        return len(scores)

    s, _ = best_of(iterate, 1)
    row("histogram (+gt split)", "baseline: iter_samples()", s, "1 run")

    # --- move the threshold: counts and precision/recall
    s, counts = best_of(lambda: fav.threshold_counts(ds, key, 0.95, gt_field="ground_truth"), args.repeats)
    row("threshold counts (+P/R)", "plugin: aggregations", s,
        f"{counts['above']:,} above, P {counts['precision']:.3f} R {counts['recall']:.3f}")

    def numpy_counts():
        scores, gts = ds.values([field, "ground_truth.label"])
        scores, pos = np.asarray(scores, float), np.asarray(gts) == "anomalous"
        above = scores > 0.95
        return int(above.sum()), int((above & pos).sum())

    s, (above, tp) = best_of(numpy_counts, args.repeats)
    row("threshold counts (+P/R)", "baseline: values() + numpy", s,
        "same counts" if (above, tp) == (counts["above"], counts["tp"]) else "COUNTS DIFFER")

    # --- show flagged: the first grid page, highest score first
    s, first = best_of(lambda: fav.flagged_view(ds, key).limit(100).values("id"), args.repeats)
    row("show flagged (first 100)", "plugin: match + sort (index)", s, f"{len(first)} ids")

    def python_sort():
        ids, scores, labels = ds.values(["id", field, f"{key}.label"])
        flagged = [(sc, i) for i, sc, lab in zip(ids, scores, labels) if lab == "anomalous"]
        return [i for _, i in sorted(flagged, reverse=True)[:100]]

    s, ref_ids = best_of(python_sort, args.repeats)
    row("show flagged (first 100)", "baseline: values() + sorted()", s,
        "same scores" if sorted(ds.select(ref_ids).values(field)) == sorted(ds.select(first).values(field))
        else "ORDER DIFFERS")

    width = max(len(r[1]) for r in rows)
    print(f"\nreview on {len(ds):,} samples (best of {args.repeats}; iter_samples once)\n")
    print(f"| event | how | seconds | check |\n|---|{'-' * 3}|---:|---|")
    for event, how, sec, check in rows:
        print(f"| {event} | {how:<{width}} | {sec:.3f} | {check} |")
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          "(the baselines load every score into Python; the plugin rows do not)")
    ds.delete()


if __name__ == "__main__":
    main()
