"""fit_expert / score through the script API on a real MongoDB with real anomalib models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from conftest import FIT_KWARGS, IMAGE_SIZE, subprocess_env


def test_fit_and_score_write_native_fields(fitted):
    ds = fitted
    res = fav.score(ds, expert="padim")
    f = fav.FieldNames("padim")
    assert res.num_scored == len(ds) and res.num_errors == 0
    assert sorted(ds.list_runs()) == ["padim", "padim_expert"]
    schema = ds.get_field_schema()
    assert schema[f.label].document_type is fo.Classification
    assert schema[f.map].document_type is fo.Heatmap
    assert schema[f.mask].document_type is fo.Segmentation
    assert ds.count(f.score) == len(ds) and ds.count(f.error) == 0

    sample = ds.first()
    assert sample[f.label].label in ("normal", "anomalous")
    assert 0.0 <= sample[f.label].confidence <= 1.0
    assert sample[f.map].range == [0, 65535]
    heat = np.asarray(Image.open(sample[f.map].map_path))
    assert heat.dtype == np.uint16 and heat.shape == (IMAGE_SIZE, IMAGE_SIZE)
    mask = np.asarray(Image.open(sample[f.mask].mask_path))
    assert set(np.unique(mask)) <= {0, 1}
    # the mask is the thresholded heatmap (anomalib's normalised threshold is 0.5)
    norm = heat / 65535.0
    level = ds.get_run_info("padim").config.normalized_pixel_threshold
    differs = mask.astype(bool) != (norm > level)
    assert not differs[np.abs(norm - level) > 1e-4].any()  # equal except within 16-bit rounding of the threshold
    assert ds.mask_targets[f.mask] == {1: "anomalous"}
    assert res.num_flagged == ds.count_values(f"{f.label}.label").get("anomalous", 0)

    # scores separate the generated defects from normal parts (random backbone, no pretrained weights)
    m = fav.image_metrics(ds.match_tags("train", bool=False), "padim")
    assert m["auroc"] > 0.75, m

    info = ds.get_run_info("padim_expert").config
    assert info.model == "padim" and os.path.isfile(info.checkpoint)
    assert info.pretrained is False and info.num_train + info.num_holdout == len(ds.match_tags("train"))
    assert ds.get_run_info("padim").config.expert == "padim"


def test_score_a_view_and_new_process_reload(fitted):
    ds = fitted
    view = ds.match_tags("good", bool=False)  # defects only
    res = fav.score(view, expert="padim", key="defects")
    assert res.num_samples == len(view) and ds.count("defects_score") == len(view)
    ours = dict(zip(*view.values(["id", "defects_score"])))
    code = (
        "import json, fiftyone as fo, fiftyone_anomaly_vlm as fav\n"
        f"ds = fo.load_dataset({ds.name!r})\n"
        "view = ds.match_tags('good', bool=False)\n"
        "fav.score(view, expert='padim', key='again', device='cpu', num_workers=0)\n"
        "print(json.dumps(dict(zip(*view.values(['id', 'again_score'])))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    assert theirs.keys() == ours.keys()
    assert np.allclose([theirs[k] for k in ours], list(ours.values()), atol=1e-5)


def test_delete_run_removes_fields_and_files(fitted):
    ds = fitted
    res = fav.score(ds, expert="padim")
    maps_dir = os.path.join(res.output_dir, "maps")
    assert len(os.listdir(maps_dir)) == len(ds)
    ds.delete_run("padim")
    schema = ds.get_field_schema()
    assert not [f for f in fav.FieldNames("padim").all() if f in schema]
    assert "padim_mask" not in ds.mask_targets
    assert not os.path.exists(maps_dir)
    assert ds.list_runs() == ["padim_expert"]
    ckpt = ds.get_run_info("padim_expert").config.checkpoint
    ds.delete_run("padim_expert")
    assert not os.path.exists(ckpt)


def _add_bad_samples(ds, tmp_path):
    rng = np.random.default_rng(1)
    good = np.asarray(Image.open(ds.first().filepath).convert("RGB"))
    paths = {}
    paths["missing"] = str(tmp_path / "missing.png")
    p = tmp_path / "truncated.png"
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:300])
    paths["truncated"] = str(p)
    p = tmp_path / "corrupt.jpg"
    p.write_bytes(b"\xff\xd8\xff garbage" * 50)
    paths["corrupt"] = str(p)
    p = tmp_path / "deep16.png"
    Image.fromarray((good[..., 0].astype(np.uint16) * 257)).save(p)
    paths["16bit"] = str(p)
    p = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([good, np.full(good.shape[:2], 255, np.uint8)])).save(p)
    paths["rgba"] = str(p)
    p = tmp_path / "gray.png"
    Image.fromarray(good[..., 0]).save(p)
    paths["gray"] = str(p)
    p = tmp_path / "huge.png"
    Image.fromarray(good).resize((8000, 8000), Image.NEAREST).save(p, compress_level=1)
    paths["huge"] = str(p)
    ids = ds.add_samples([fo.Sample(filepath=v, case=k) for k, v in paths.items()])
    return dict(zip(paths, ids))


def test_bad_samples_get_errors_and_others_are_untouched(fitted, tmp_path):
    ds = fitted
    base_ids = ds.values("id")
    baseline = fav.score(ds, expert="padim", key="before")
    assert baseline.num_errors == 0
    before = dict(zip(*ds.values(["id", "before_score"])))
    cases = _add_bad_samples(ds, tmp_path)

    res = fav.score(ds, expert="padim", key="after")
    assert res.num_errors == 3 and res.num_scored == len(ds) - 3
    errors = dict(zip(*ds.values(["id", "after_error"])))
    for case in ("missing", "truncated", "corrupt"):
        sid = cases[case]
        assert errors[sid], case
        sample = ds[sid]
        assert sample["after_score"] is None and sample["after"] is None and sample["after_map"] is None
    assert "not found" in errors[cases["missing"]]
    for case in ("16bit", "rgba", "gray", "huge"):
        assert errors[cases[case]] is None and ds[cases[case]]["after_score"] is not None, case
    # grayscale/RGBA/16-bit copies of a scored part decode to the same pixels, hence the same score
    first = base_ids[0]
    for case in ("rgba", "gray", "16bit"):
        assert ds[cases[case]]["after_score"] == pytest.approx(before[first], abs=1e-3), case
    # the good samples keep exactly their scores; earlier run untouched
    after = dict(zip(*ds.select(base_ids).values(["id", "after_score"])))
    assert np.allclose([after[k] for k in base_ids], [before[k] for k in base_ids], atol=1e-6)
    assert ds.count("before_score") == len(base_ids)


def test_whole_run_problems_fail_before_any_work(fitted, tmp_path):
    ds = fitted
    with pytest.raises(ValueError, match="empty"):
        fav.score(ds.match_tags("no-such-tag"), expert="padim")
    with pytest.raises(ValueError, match="no expert named"):
        fav.score(ds, expert="nope")
    with pytest.raises(ValueError, match="unknown anomalib model"):
        fav.fit_expert(ds.match_tags("train"), model="padimm", key="x", pretrained=False)
    with pytest.raises(ValueError, match="invalid key"):
        fav.score(ds, expert="padim", key="bad key")
    with pytest.raises(ValueError, match="already exists"):
        fav.fit_expert(ds.match_tags("train"), key="padim", **FIT_KWARGS)
    video = fo.Dataset()
    video.add_sample(fo.Sample(filepath=str(tmp_path / "clip.mp4")))
    with pytest.raises(ValueError, match="video"):
        fav.score(video, expert="padim")
    with pytest.raises(ValueError, match="video"):
        fav.fit_expert(video, model="padim", pretrained=False)
    ckpt = ds.get_run_info("padim_expert").config.checkpoint
    os.remove(ckpt)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        fav.score(ds, expert="padim")
    assert "padim" not in ds.list_runs()  # nothing was registered or written
    assert "padim_score" not in ds.get_field_schema()


_KILL_SCRIPT = """
import os, sys, fiftyone as fo, fiftyone_anomaly_vlm as fav
ds = fo.load_dataset(sys.argv[1])
calls = {"n": 0}
def progress(pb):
    calls["n"] += 1
    if pb.iteration >= int(sys.argv[2]):
        os._exit(9)   # hard kill, mid-run: no cleanup, no flush
fav.score(ds, expert="padim", device="cpu", batch_size=4, num_workers=0, progress=progress)
"""


def test_killed_run_resumes_without_duplicates_or_losses(fitted):
    ds = fitted
    out = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, ds.name, "12"], env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 9, out.stderr[-2000:]
    ds.reload()
    partial = ds.count("padim_score")
    assert 0 < partial < len(ds)
    res = fav.score(ds, expert="padim", batch_size=4)
    assert res.num_skipped == partial and res.num_scored == len(ds) - partial
    assert ds.count("padim_score") == ds.count("padim") == ds.count("padim_map") == len(ds)
    assert len(os.listdir(os.path.join(res.output_dir, "maps"))) == len(ds)
    resumed = dict(zip(*ds.values(["id", "padim_score"])))
    fav.score(ds, expert="padim", key="full")
    full = dict(zip(*ds.values(["id", "full_score"])))
    assert np.allclose([resumed[k] for k in full], list(full.values()), atol=1e-6)
    assert ds.list_runs().count("padim") == 1
