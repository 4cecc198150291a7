"""Shared set-up of the benchmark scripts: a private FiftyOne database and data folder per run, and the
settings the ELPV benchmarks share.

Import it before FiftyOne (``from _env import isolate; TMP = isolate("fav-bench-")``): the scripts run as
``python benchmarks/<name>.py``, so this folder is on ``sys.path``. Variables already set win, so a run can
point at an existing database on purpose.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid


def isolate(prefix: str) -> str:
    """Point FiftyOne at a fresh temporary database and data folder (unless set); return the folder."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    os.environ.setdefault("FIFTYONE_DATABASE_DIR", os.path.join(tmp, "db"))
    os.environ.setdefault("FIFTYONE_DEFAULT_DATASET_DIR", os.path.join(tmp, "data"))
    os.environ.setdefault("FIFTYONE_DATABASE_NAME", f"fav_bench_{uuid.uuid4().hex[:6]}")
    os.environ.update(FIFTYONE_DO_NOT_TRACK="true", FIFTYONE_DATABASE_VALIDATION="false",
                      FIFTYONE_SHOW_PROGRESS_BARS="false")
    return tmp


#: PatchCore on 2 CPU cores: stride-16 features and a 1 % coreset (anomalib's greedy coreset over stride-8
#: patches of 600 cells takes hours there)
PATCHCORE_CPU_KWARGS = {"layers": ["blocks.4"], "coreset_sampling_ratio": 0.01}


def add_threads_argument(parser) -> None:
    """``--threads`` (default 1): torch CPU threads of a benchmark; 0 keeps torch's default."""
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); on shared cores more than 1 makes timings "
                             "swing up to 10-20x (OpenMP threads spin while other processes hold the cores)")


def set_threads(threads: int) -> None:
    """Apply ``--threads`` (0: leave torch's default); child processes read ``FAV_BENCH_THREADS``."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
        os.environ["FAV_BENCH_THREADS"] = str(threads)


def add_speck_argument(parser) -> None:
    """``--speck-px``: the generated texture set's speck diameter in pixels (default: the generator's own
    ``TEXTURE_PARAMS["speck_radius"]``, 2 % of the side, i.e. a 4.5 px wide speck at 96 px, 12 px at 256 px)."""
    parser.add_argument("--speck-px", type=float, default=None,
                        help="speck diameter in px at --size (the mask's width: the Gaussian spot above half its "
                             "peak, 2.355 x its sigma); default: the generator's 2 %% of the side as radius")
    parser.add_argument("--speck-contrast", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="speck contrast range (intensity 0-1; default: the generator's 0.10-0.16)")


def apply_speck_args(args) -> None:
    """Set the texture generator's speck from ``--speck-px`` / ``--speck-contrast`` (None: leave it).

    The generator draws a Gaussian spot of sigma ``TEXTURE_PARAMS["speck_radius"] * size`` and masks it above
    half its peak, so the mask's width is ``2 * sqrt(2 ln 2) * sigma``; everything else stays.
    """
    from fiftyone_anomaly_vlm.datasets import TEXTURE_PARAMS

    if args.speck_px is not None:
        TEXTURE_PARAMS["speck_radius"] = float(args.speck_px) / (2 * math.sqrt(2 * math.log(2)) * args.size)
    if args.speck_contrast is not None:
        TEXTURE_PARAMS["speck_contrast"] = tuple(float(c) for c in args.speck_contrast)
