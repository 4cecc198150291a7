"""Review queries at 100k and 1M samples, with and without :func:`fav.create_review_indexes`; database bytes per
sample of a scoring run.

For each size, generated scoring-run documents (calibrated score, raw score, label, ground truth; the heatmap,
mask and region fields a real run writes are included so the documents have their real size) are inserted with
bulk ``insert_many`` into the dataset's sample collection (no images), the run is registered and the fields
declared; then the review panel's three queries are timed (best of ``--repeats``): the score histogram split by
ground truth, threshold counts with precision/recall, and the first page (100) of flagged samples, highest score
first. Then the indexes are created (time reported) and the same queries timed again. Bytes per sample are
MongoDB's ``collStats`` (average document size, storage and index size per sample).

Usage:
    .venv/bin/python benchmarks/review_scale.py [--sizes 100000 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
import uuid
import warnings

warnings.filterwarnings("ignore")
from _env import isolate  # noqa: E402 - before FiftyOne

_TMP = isolate("fav-bench-")
from review_speed import best_of  # noqa: E402 - the same timing rule as the 100k review benchmark


def build(n: int, key: str, seed: int = 0):
    """A dataset of ``n`` generated scored samples (documents as a scoring run writes them)."""
    import numpy as np
    from bson import ObjectId

    import fiftyone as fo

    from fiftyone_anomaly_vlm.engine import record_run
    from fiftyone_anomaly_vlm.fields import FieldNames, label_spec
    from fiftyone_anomaly_vlm.runs import AnomalyScoreRunConfig
    from fiftyone_anomaly_vlm.writers import declare_fields

    rng = np.random.default_rng(seed)
    names = FieldNames(key)
    ds = fo.Dataset(f"review-scale-{uuid.uuid4().hex[:6]}")
    declare_fields(ds, [*names.specs(), label_spec("ground_truth")])
    threshold = 0.9
    record_run(ds, key, AnomalyScoreRunConfig(normalized_image_threshold=threshold, fields=names.all()))
    coll, now, chunk = ds._sample_collection, datetime.datetime.utcnow(), 50_000
    maps = "/shared/anomaly_vlm/scores/bench"
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        anomalous = rng.random(m) < 0.1
        scores = np.clip(np.where(anomalous, rng.beta(5, 1.5, m), rng.beta(2, 2, m)), 1e-6, 1 - 1e-6)
        docs = []
        for j in range(m):
            sid, s = ObjectId(), float(scores[j])
            label = "anomalous" if s > threshold else "normal"
            docs.append({
                "_id": sid, "_dataset_id": ds._doc.id, "filepath": f"/images/line-1/{start + j:07d}.png",
                "tags": [], "metadata": None, "created_at": now, "last_modified_at": now,
                names.label: {"_id": ObjectId(), "_cls": "Classification", "label": label, "confidence": s,
                              "anomaly_score": s, "tags": []},
                names.score: s, names.raw_score: s * 40.0,
                names.map: {"_id": ObjectId(), "_cls": "Heatmap", "map_path": f"{maps}/maps/{sid}.png",
                            "range": [0, 65535], "tags": []},
                names.mask: {"_id": ObjectId(), "_cls": "Segmentation", "mask_path": f"{maps}/masks/{sid}.png",
                             "tags": []},
                names.error: None,
                "ground_truth": {"_id": ObjectId(), "_cls": "Classification",
                                 "label": "anomalous" if anomalous[j] else "normal", "tags": []},
            })
        coll.insert_many(docs, ordered=False)
    return ds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import fiftyone.core.odm as foo

    import fiftyone_anomaly_vlm as fav

    key = "bench"
    queries = {
        "histogram (+gt split)": lambda ds: fav.score_histogram(ds, key, bins=40, gt_field="ground_truth")["count"],
        "threshold counts (+P/R)": lambda ds: fav.threshold_counts(ds, key, 0.95, gt_field="ground_truth")["above"],
        "first page of flagged (100)": lambda ds: len(fav.flagged_view(ds, key).limit(100).values("id")),
    }
    print(f"{os.cpu_count()} CPU cores (shared with other jobs while measured); MongoDB bundled with FiftyOne")
    rows, sizes = [], []
    for n in args.sizes:
        t = time.perf_counter()
        ds = build(n, key)
        built = time.perf_counter() - t
        before = {}
        for name, fn in queries.items():
            before[name] = best_of(lambda: fn(ds), args.repeats)
        t = time.perf_counter()
        indexes = fav.create_review_indexes(ds, key)
        indexed = time.perf_counter() - t
        for name, fn in queries.items():
            s, out = best_of(lambda: fn(ds), args.repeats)
            rows.append((n, name, before[name][0], s, out, before[name][1]))
        stats = foo.get_db_conn().command("collStats", ds._sample_collection_name)
        sizes.append((n, built, indexed, stats["avgObjSize"], stats["storageSize"] / n, stats["totalIndexSize"] / n,
                      ", ".join(indexes)))
        print(f"{n:,} samples done: {rows[-3:]}, {sizes[-1]}", flush=True)  # partial results as they come
        ds.delete()

    print("\n| samples | query | no review indexes (s) | with indexes (s) | result (same both ways) |")
    print("|---:|---|---:|---:|---|")
    for n, name, s0, s1, out, out0 in rows:
        print(f"| {n:,} | {name} | {s0:.3f} | {s1:.3f} | {out:,}{'' if out == out0 else ' (DIFFERS)'} |")
    print("\n| samples | insert (s) | create indexes (s) | avg document (bytes) | storage / sample (bytes) "
          "| all indexes / sample (bytes) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, built, indexed, avg, storage, index, names in sizes:
        print(f"| {n:,} | {built:.1f} | {indexed:.1f} | {avg:.0f} | {storage:.0f} | {index:.0f} |")
    print(f"\nindexes created: {sizes[-1][-1]}")


if __name__ == "__main__":
    main()
