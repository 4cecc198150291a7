"""1 vs 2 vs 4 real ``fiftyone delegated launch`` workers scoring one dataset: ``fav.score(..., shards=N)``.

A generated parts dataset (``--n`` images at ``--size`` px) and a small PaDiM (random ResNet-18, layers 1-2) fitted
on its train normals; then, for each worker count N, N workers are started (one torch thread each:
``OMP_NUM_THREADS=1``, one image-decoding process each), and once all of them are up the run is queued as N
shards under a fresh key; the time from queueing to the last shard's completion (the run's ledger) is the wall
time. Every row checks that each sample was scored once. Worker start-up (imports) is not in the time.

Usage:
    .venv/bin/python benchmarks/workers.py [--n 240] [--size 128] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

warnings.filterwarnings("ignore")
from _env import isolate  # noqa: E402 - before FiftyOne

_TMP = isolate("fav-bench-")
os.environ.setdefault("FIFTYONE_PLUGINS_DIR", os.path.join(_TMP, "plugins"))  # the plugin is linked there


def _wait_for(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=240, help="images to score")
    parser.add_argument("--size", type=int, default=128, help="image size (px)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    import fiftyone_anomaly_vlm as fav
    from fiftyone_anomaly_vlm.app_launch import plugins_dir_with_plugin, start_workers, stop_workers
    from fiftyone_anomaly_vlm.datasets import make_parts_dataset
    from fiftyone_anomaly_vlm.shards import sharded_run

    plugins = plugins_dir_with_plugin()
    env = dict(os.environ, FIFTYONE_PLUGINS_DIR=str(plugins), FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS="true",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    n_anom = max(1, args.n // 5)
    ds = make_parts_dataset("workers-bench", num_normal=args.n - n_anom + 20, num_anomalous=n_anom, size=args.size,
                            train_fraction=20 / (args.n - n_anom + 20), seed=0)
    fav.fit_expert(ds.match_tags("train"), key="padim", model="padim", pretrained=False, backbone="resnet18",
                   image_size=args.size, device="cpu", model_kwargs={"layers": ["layer1", "layer2"]})
    target = ds.match_tags("train", bool=False)
    n = len(target)
    print(f"{os.cpu_count()} CPU cores, shared with other jobs while measured; {n} images at {args.size} px, "
          "PaDiM (random ResNet-18, layers 1-2), batch 16, one torch thread and one decoding process per worker")
    rows = []
    for w in args.workers:
        logs = os.path.join(_TMP, f"logs-{w}")
        os.makedirs(logs, exist_ok=True)
        workers = start_workers(w, env, log_dir=logs)
        try:
            _wait_for(lambda: all("service running" in open(os.path.join(logs, f"worker-{i}.log")).read()
                                  for i in range(w)), 600, "workers to start")
            key = f"w{w}"
            t = time.perf_counter()
            fav.score(target, expert="padim", key=key, device="cpu", batch_size=16, shards=w)
            _wait_for(lambda: (lambda r: r is not None and r.complete and r.totals)(sharded_run(ds, key)), 1800,
                      f"the run with {w} workers")
            wall = time.perf_counter() - t
            ds.reload()
            once = ds.count(f"{key}_score") == n and sharded_run(ds, key).totals["num_done"] == n
            rows.append((w, wall, n / wall, "yes" if once else "NO"))
        finally:
            stop_workers(workers)
    base = rows[0][1]
    print("\n| workers | wall time (s) | images/s | speed-up | every sample scored once |")
    print("|---:|---:|---:|---:|---|")
    for w, wall, ips, once in rows:
        print(f"| {w} | {wall:.1f} | {ips:.1f} | {base / wall:.2f}x | {once} |")
    ds.delete()


if __name__ == "__main__":
    main()
