"""The README's demo entry point, on the generated parts (the ELPV run is the README's demo command)."""

from __future__ import annotations

import fiftyone as fo

from fiftyone_anomaly_vlm.demo import main


def test_demo_runs_end_to_end_and_leaves_a_dataset(capsys):
    m = main(["--data", "parts", "--dataset", "demo-test", "--pretrained", "false", "--image-size", "64",
              "--device", "cpu"])
    out = capsys.readouterr().out
    assert 0.0 <= m["auroc"] <= 1.0 and m["num_samples"] > 0
    assert "image AUROC" in out and "flagged anomalous" in out and "one per" not in out
    ds = fo.load_dataset("demo-test")
    assert ds.persistent and ds.count("padim_score") == m["num_samples"]
    fo.delete_dataset("demo-test")
