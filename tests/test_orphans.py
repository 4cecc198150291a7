"""Overwrites, re-scoring elsewhere, delete_run and the demo's re-run leave no heatmap / mask PNG behind."""

from __future__ import annotations

import os

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.demo import delete_dataset_and_files, main


def pngs(folder) -> set[str]:
    """Every PNG under ``folder``."""
    return {os.path.realpath(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files
            if f.endswith(".png")}


def used(ds, key) -> set[str]:
    """The PNGs run ``key``'s fields reference."""
    paths = ds.distinct(f"{key}_map.map_path") + ds.distinct(f"{key}_mask.mask_path")
    return {os.path.realpath(p) for p in paths}


def test_score_overwrite_rescore_elsewhere_and_delete_run_leave_no_png(fitted, tmp_path):
    ds = fitted
    n = len(ds)
    first = fav.score(ds, expert="padim", progress=False).output_dir
    assert pngs(first) == used(ds, "padim") and len(used(ds, "padim")) == 2 * n
    # overwrite into another folder: the first folder's PNGs are no one's any more
    fav.score(ds, expert="padim", overwrite=True, output_dir=str(tmp_path / "second"), progress=False)
    assert pngs(first) == set() and pngs(tmp_path / "second") == used(ds, "padim")
    # re-score a few samples into a third folder: their old PNGs go, the others' stay in use
    fav.score(ds.limit(3), expert="padim", overwrite=True, output_dir=str(tmp_path / "third"), progress=False)
    assert len(pngs(tmp_path / "third")) == 6 and len(pngs(tmp_path / "second")) == 2 * (n - 3)
    assert pngs(tmp_path / "second") | pngs(tmp_path / "third") == used(ds, "padim")
    # deleting the run removes every folder it wrote to
    ds.delete_run("padim")
    assert pngs(first) | pngs(tmp_path / "second") | pngs(tmp_path / "third") == set()


def test_overwrite_in_place_keeps_exactly_the_files_in_use(fitted):
    ds = fitted
    out = fav.score(ds, expert="padim", progress=False).output_dir
    fav.score(ds, expert="padim", overwrite=True, progress=False)
    assert pngs(out) == used(ds, "padim") and len(pngs(out)) == 2 * len(ds)
    assert ds.get_run_info("padim").config.output_dirs == [out]


def test_demo_rerun_replaces_the_dataset_and_leaves_only_the_files_in_use(capsys):
    name = "demo-orphans"
    folder = os.path.join(fo.config.default_dataset_dir, "anomaly_vlm", name)
    args = ["--data", "parts", "--dataset", name, "--pretrained", "false", "--image-size", "64", "--device", "cpu"]
    main(args)
    assert "replacing" not in capsys.readouterr().out
    main(args)
    out = capsys.readouterr().out
    assert f"replacing dataset '{name}'" in out and "runs padim" in out
    ds = fo.load_dataset(name)
    assert pngs(folder) == used(ds, "padim") and len(pngs(folder)) == 2 * ds.count("padim_score")
    assert "held-out normals above it" in out  # the threshold line carries its interval
    assert delete_dataset_and_files(name).startswith(f"dataset '{name}'")
    assert not fo.dataset_exists(name) and not os.path.exists(folder)
