"""Import time: ``import fiftyone_anomaly_vlm`` and the App's plugin registration vs ``import fiftyone, torch``.

The App imports the plugin at start-up, so the package must not load anomalib, Lightning, transformers or
open_clip (nor timm and torchmetrics, which come with anomalib) until a model is built. Each case runs in a
fresh interpreter, the cases alternate round by round, and the table shows the median of the rounds: the
seconds the case's statements took inside the child (interpreter start-up excluded), wall clock and CPU
(the CPU time moves less when other jobs share the cores), each with its difference to the baseline, and
which heavy packages were in ``sys.modules`` afterwards.

"plugin registration" is what the App does: FiftyOne finds the plugin in ``FIFTYONE_PLUGINS_DIR`` (a
temporary folder linking to this checkout) and a ``PluginContext`` runs its ``__init__.py`` ``register(p)``.

Usage:
    .venv/bin/python benchmarks/import_time.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

from _env import isolate

_TMP = isolate("fav-bench-import-")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEAVY = ("anomalib", "lightning", "transformers", "open_clip", "timm", "torchmetrics")

CASES = {
    "import fiftyone, torch (baseline)": "import fiftyone, torch",
    "+ import fiftyone_anomaly_vlm": "import fiftyone, torch\nimport fiftyone_anomaly_vlm",
    "+ plugin registration (as the App)": """
        import fiftyone, torch
        import fiftyone.plugins as fop
        import fiftyone.plugins.context as fopc

        context = fopc.PluginContext(fop.get_plugin("@anomaly-vlm/anomaly-vlm"))
        context.register_all()
        assert not context.errors and context.instances, context.errors
    """,
}

_CHILD = """
import json, sys, time
t, cpu = time.perf_counter(), time.process_time()
{code}
seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
print(json.dumps({{"seconds": seconds, "cpu": cpu, "heavy": [m for m in {heavy!r} if m in sys.modules],
                  "torchvision": "torchvision" in sys.modules}}))
"""


def _run(code: str) -> dict:
    script = _CHILD.format(code=textwrap.dedent(code).strip(), heavy=HEAVY)
    # outside the checkout, so its folders (models/, plugin/...) cannot shadow an import
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=_TMP, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="fresh interpreters per case (median reported)")
    args = parser.parse_args()

    plugins = os.path.join(_TMP, "plugins")
    os.makedirs(plugins)
    os.symlink(ROOT, os.path.join(plugins, "anomaly-vlm"), target_is_directory=True)
    os.environ["FIFTYONE_PLUGINS_DIR"] = plugins

    results: dict[str, list[dict]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, code in CASES.items():  # alternate, so load changes hit every case alike
            results[name].append(_run(code))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nMedian of {args.rounds} fresh interpreters per case, {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"| {'case':<36} | {'wall s':>6} | {'vs baseline':>11} | {'CPU s':>6} | {'vs baseline':>11} "
          f"| {'heavy modules loaded':<28} | torchvision |")
    print(f"|{'-' * 38}|{'-' * 8}|{'-' * 13}|{'-' * 8}|{'-' * 13}|{'-' * 30}|{'-' * 13}|")
    base_wall = base_cpu = None
    for name, runs in results.items():
        wall = statistics.median(r["seconds"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        first = base_wall is None
        base_wall, base_cpu = (wall, cpu) if first else (base_wall, base_cpu)
        d_wall, d_cpu = ("-", "-") if first else (f"{wall - base_wall:+.2f}", f"{cpu - base_cpu:+.2f}")
        heavy = sorted({m for r in runs for m in r["heavy"]}, key=HEAVY.index)
        tv = "yes" if any(r["torchvision"] for r in runs) else "no"
        print(f"| {name:<36} | {wall:6.2f} | {d_wall:>11} | {cpu:6.2f} | {d_cpu:>11} "
              f"| {', '.join(heavy) or 'none':<28} | {tv:<11} |")


if __name__ == "__main__":
    main()
