"""What a killed fit, a reserved key, a non-finite threshold or a non-finite image must never do to a dataset.

Kills are real: a child process fits against the same database and sends itself SIGKILL at a chosen point.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.calibration import Calibration, threshold_from_labels, threshold_from_normals
from fiftyone_anomaly_vlm.experts.fits import FitFolder, remove_orphan_fits
from fiftyone_anomaly_vlm.images import ImageLoadError, check_image, load_image
from fiftyone_anomaly_vlm.runs import ExpertRunConfig

from conftest import FIT_KWARGS, subprocess_env

SCORE_KW = dict(device="cpu", batch_size=16, num_workers=0)
# a tiny random open_clip model (64 px, 4x4 patches), as in test_clip_expert.py
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                             "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}

# A child that fits an expert and kills itself at one point. argv: dataset name, json of fit_expert kwargs,
# the samples ("train": the train-tagged normals, "other": the other normals), and where to die:
# "module.function@when" or "module:Class.method@when", when = "call" (as it is called) or "after" (once it
# has returned); "none" fits to completion.
_CHILD = r"""
import importlib, json, os, signal, sys
import fiftyone as fo
import fiftyone_anomaly_vlm as fav

name, kwargs, which, target = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
if target != "none":
    where, _, when = target.partition("@")
    if ":" in where:
        module_name, _, path = where.partition(":")
        class_name, _, attr = path.rpartition(".")
        owner = getattr(importlib.import_module(module_name), class_name)
    else:
        module_name, _, attr = where.rpartition(".")
        owner = importlib.import_module(module_name)
    original = getattr(owner, attr)

    def killer(*args, **kw):
        if when == "after":
            original(*args, **kw)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(owner, attr, killer)
ds = fo.load_dataset(name)
view = ds.match_tags("train") if which == "train" else ds.match_tags("good").match_tags("train", bool=False)
fav.fit_expert(view, **kwargs)
print("finished")
"""


def _child_fit(ds, key: str, which: str, target: str, *, overwrite: bool = False, tmpdir=None):
    kwargs = dict(FIT_KWARGS, key=key, overwrite=overwrite, progress=False)
    env = subprocess_env()
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run([sys.executable, "-c", _CHILD, ds.name, json.dumps(kwargs), which, target], env=env,
                          capture_output=True, text=True, timeout=600)


def _scores(ds, key: str) -> dict:
    ids, raw, score = ds.values(["id", f"{key}_raw_score", f"{key}_score"])
    return {"ids": ids, "raw": raw, "score": score}


def _expert_record(ds, key: str) -> dict:
    ds.reload()
    config = ds.get_run_info(f"{key}_expert").config  # paths as this machine sees them (stored relative to the root)
    return json.loads(json.dumps({name: getattr(config, name) for name in config.attributes()}))


# ----------------------------------------------------------------- defect 1: a killed re-fit
def test_refit_killed_during_calibration_leaves_the_old_expert_exactly_as_it_was(parts):
    fav.fit_expert(parts.match_tags("train"), key="A", **FIT_KWARGS)
    before_record = _expert_record(parts, "A")
    fav.score(parts, expert="A", key="before", **SCORE_KW)
    before = _scores(parts, "before")
    assert len(before["ids"]) >= 20 and all(s is not None for s in before["raw"])

    # re-fit on other normals under the same key; the child kills itself when calibration starts
    out = _child_fit(parts, "A", "other", "fiftyone_anomaly_vlm.experts.single.calibrate_expert@call", overwrite=True)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert "finished" not in out.stdout

    assert _expert_record(parts, "A") == before_record  # training ids, checkpoint, calibration...
    fav.score(parts, expert="A", key="after", **SCORE_KW)
    after = _scores(parts, "after")
    assert after == before  # exactly the same values, not approximately
    assert before_record["fit_id"] and os.path.isfile(before_record["checkpoint"])

    # a completed re-fit switches to a new folder and removes the old one (and the killed fit's leftovers)
    refit = fav.fit_expert(parts.match_tags("good").match_tags("train", bool=False), key="A", overwrite=True,
                           **FIT_KWARGS)
    record = _expert_record(parts, "A")
    assert record["fit_id"] != before_record["fit_id"] and refit.checkpoint == record["checkpoint"]
    assert record["checkpoint"] == os.path.join(record["output_dir"], record["fit_id"], "model.ckpt")
    assert not os.path.exists(os.path.dirname(before_record["checkpoint"]))
    assert os.listdir(record["output_dir"]) == [record["fit_id"]]


# ----------------------------------------------------------------- defect 2: leftovers of killed fits
def test_killed_fits_leave_no_checkpoint_nor_anomalib_folder_once_the_next_fit_runs(parts, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # killed after the checkpoint is saved, before the record exists
    out = _child_fit(parts, "B", "train", "fiftyone_anomaly_vlm.models.anomalib_expert:AnomalibExpert.save@after",
                     tmpdir=tmp)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    # killed in the middle of anomalib's training
    out = _child_fit(parts, "B", "train", "anomalib.engine:Engine.fit@call", tmpdir=tmp)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    parts.reload()
    assert "B_expert" not in parts.list_runs()

    out = _child_fit(parts, "B", "train", "none", tmpdir=tmp)  # the next fit, to completion
    assert out.returncode == 0 and "finished" in out.stdout, out.stderr[-3000:]
    # nothing of anomalib's in the temp folder, not even from the fit killed mid-training (torch's own
    # compile cache may appear there: it is not ours)
    assert [n for n in os.listdir(tmp) if not n.startswith("torchinductor")] == []
    record = _expert_record(parts, "B")
    fit_dir = os.path.join(record["output_dir"], record["fit_id"])
    assert os.listdir(record["output_dir"]) == [record["fit_id"]]  # the killed fits' folders are gone
    assert sorted(os.listdir(fit_dir)) == ["fit.json", "model.ckpt"]  # anomalib's work folder too
    assert glob.glob(os.path.join(record["output_dir"], "**", "*.ckpt"), recursive=True) == [record["checkpoint"]]


def test_orphan_cleanup_leaves_running_fits_and_other_datasets_alone(parts, tmp_path):
    out_dir = str(tmp_path / "shared")
    other = fo.Dataset()
    try:
        with FitFolder(parts, out_dir, "x") as running:
            theirs = FitFolder(other, out_dir, "y").__enter__()
            theirs.committed = True  # as if killed: the lock goes with the process, the folder stays
            theirs.__exit__(None, None, None)
            assert remove_orphan_fits(parts, out_dir) == []  # "y" is another dataset's; "x" is running
            assert sorted(os.listdir(out_dir)) == sorted([running.fit_id, theirs.fit_id])
            assert remove_orphan_fits(other, out_dir) == [theirs.path]  # its own dataset removes it
        assert not os.path.exists(out_dir) or os.listdir(out_dir) == []  # "x" failed to commit: removed
        # a user's own folders in a shared output folder are never touched
        os.makedirs(os.path.join(out_dir, "mine"))
        assert remove_orphan_fits(parts, out_dir) == [] and os.listdir(out_dir) == ["mine"]
    finally:
        other.delete()


def test_messages_name_the_expert_not_its_run_key(parts):
    fav.fit_expert(parts.match_tags("train"), key="fk1", **FIT_KWARGS)
    with pytest.raises(ValueError) as exc:
        fav.fit_expert(parts.match_tags("train"), key="fk1", **FIT_KWARGS)
    assert "'fk1'" in str(exc.value) and "fk1_expert" not in str(exc.value)
    with pytest.raises(ValueError) as exc:
        fav.load_expert(parts, "nope")
    assert "fitted experts: fk1" in str(exc.value) and "fk1_expert" not in str(exc.value)
    shutil.rmtree(os.path.dirname(fav.load_expert(parts, "fk1").checkpoint))
    with pytest.raises(FileNotFoundError) as exc:
        fav.load_expert(parts, "fk1_expert")
    assert "expert 'fk1'" in str(exc.value)


# ----------------------------------------------------------------- records of the earlier layout
def test_runs_recorded_before_fit_folders_still_load_score_refit_and_delete(parts):
    """Earlier releases saved the checkpoint straight into the output folder and recorded no fit_id."""
    fav.fit_expert(parts.match_tags("train"), key="old", **FIT_KWARGS)
    fav.fit_expert(parts.match_tags("train"), key="old2", **FIT_KWARGS)
    for key in ("old", "old2"):
        cfg = parts.get_run_info(f"{key}_expert").config
        legacy = os.path.join(cfg.output_dir, "model.ckpt")
        shutil.move(cfg.checkpoint, legacy)
        shutil.rmtree(os.path.join(cfg.output_dir, cfg.fit_id))
        d = cfg.serialize()
        d.pop("fit_id")
        d.pop("cls", None)
        d.pop("type", None)
        d["checkpoint"] = legacy
        parts.update_run_config(f"{key}_expert", ExpertRunConfig(**d))
    parts.reload()
    assert parts.get_run_info("old_expert").config.checkpoint.endswith(os.path.join("old", "model.ckpt"))

    res = fav.score(parts, expert="old", **SCORE_KW)
    assert res.num_scored == len(parts)
    out_dir = parts.get_run_info("old_expert").config.output_dir
    fav.fit_expert(parts.match_tags("train"), key="old", overwrite=True, **FIT_KWARGS)  # the old file goes
    record = _expert_record(parts, "old")
    assert os.listdir(out_dir) == [record["fit_id"]]
    parts.delete_run("old_expert")
    assert not os.path.exists(out_dir)

    out_dir2 = parts.get_run_info("old2_expert").config.output_dir
    parts.delete_run("old2_expert")  # deleting an earlier-layout run removes its folder as before
    assert not os.path.exists(out_dir2)


def test_per_group_ensemble_and_clip_experts_write_into_fit_folders(parts, tmp_path):
    parts.set_values("station", ["a" if i % 2 else "b" for i in range(len(parts))])
    grouped = fav.fit_expert(parts.match_tags("train"), key="g", group_by="station", output_dir=str(tmp_path / "g"),
                             **FIT_KWARGS)
    cfg = parts.get_run_info("g_expert").config
    assert grouped.checkpoint == os.path.join(str(tmp_path / "g"), cfg.fit_id, "composite.json")
    first = cfg.fit_id
    fav.fit_expert(parts.match_tags("train"), key="g", group_by="station", output_dir=str(tmp_path / "g"),
                   overwrite=True, **FIT_KWARGS)
    parts.reload()
    cfg = parts.get_run_info("g_expert").config
    assert cfg.fit_id != first and sorted(os.listdir(tmp_path / "g")) == sorted(["a", "b", cfg.fit_id])
    for slug in ("a", "b"):
        member = parts.get_run_info(f"g__{slug}_expert").config
        assert os.listdir(tmp_path / "g" / slug) == [member.fit_id]

    fav.fit_expert(parts.match_tags("train"), key="p2", **FIT_KWARGS)
    ens = fav.ensemble_experts(parts, ["g", "p2"], key="ens")
    ens_cfg = parts.get_run_info("ens_expert").config
    assert ens.checkpoint == os.path.join(ens_cfg.output_dir, ens_cfg.fit_id, "composite.json")

    # the CLIP expert's few-shot memory (a tiny random open_clip model built from a config, no download)
    config = tmp_path / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    clip_kw = dict(model=str(config), pretrained=None, object_name="part", device="cpu", references="train",
                   k_shot=2)
    first = fav.create_clip_expert(parts, "c", **clip_kw)
    cfg = parts.get_run_info("c_expert").config
    assert first.checkpoint == os.path.join(cfg.output_dir, cfg.fit_id, "memory.pt")
    second = fav.create_clip_expert(parts, "c", overwrite=True, **clip_kw)
    assert os.path.isfile(second.checkpoint) and not os.path.exists(os.path.dirname(first.checkpoint))
    fav.create_clip_expert(parts, "c", overwrite=True, **dict(clip_kw, references=None))  # zero-shot: no memory
    parts.reload()
    cfg = parts.get_run_info("c_expert").config
    assert cfg.checkpoint == "" and os.listdir(cfg.output_dir) == [cfg.fit_id]
    parts.delete_run("c_expert")
    assert not os.path.exists(cfg.output_dir)


# ----------------------------------------------------------------- defect 3: reserved keys
def test_reserved_keys_are_refused_before_any_write(fitted):
    runs, schema = fitted.list_runs(), list(fitted.get_field_schema())
    for key in ["_rand", "_media_type", "_x", "media_type", "filepath", "tags", "metadata", "id", "created_at",
                "last_modified_at", "frames"]:
        with pytest.raises(ValueError, match="built-in sample field"):
            fav.score(fitted, expert="padim", key=key, **SCORE_KW)
        with pytest.raises(ValueError, match="invalid key"):
            fav.fit_expert(fitted.match_tags("train"), key=key, **FIT_KWARGS)
        fitted.reload()
        assert fitted.list_runs() == runs and list(fitted.get_field_schema()) == schema, key


# ----------------------------------------------------------------- defect 4: non-finite thresholds
def test_non_finite_threshold_parameters_are_refused_before_any_write(fitted):
    fav.score(fitted, expert="padim", **SCORE_KW)
    labels = fitted.values("padim.label")
    cfg = json.loads(json.dumps(fitted.get_run_info("padim").config.serialize()))
    for rule, param in [("value", float("nan")), ("value", float("inf")), ("value", -math.inf),
                        ("far", float("nan")), ("percentile", float("nan")), ("mean_std", float("inf"))]:
        with pytest.raises(ValueError, match="finite"):
            fav.set_threshold(fitted, "padim", rule=rule, param=param)
    with pytest.raises(ValueError, match="finite"):
        fav.set_threshold(fitted, "padim", rule="value", param=1.0, pixel_threshold=float("nan"))
    fitted.reload()
    assert fitted.values("padim.label") == labels
    assert json.loads(json.dumps(fitted.get_run_info("padim").config.serialize())) == cfg

    # and no rule may produce one from non-finite scores
    with pytest.raises(ValueError, match="finite"):
        threshold_from_normals(np.array([1.0, np.nan, 2.0]), "mean_std", 3)
    with pytest.raises(ValueError, match="finite"):
        threshold_from_labels(np.array([0.1, np.nan, 0.9]), np.array([0, 0, 1], bool), "f1", None)
    with pytest.raises(ValueError, match="finite"):
        Calibration.from_normals([1.0, 2.0, np.inf], [1.0, 2.0, 3.0], [0.5, 1.0], rule="far", param=0.01)
    with pytest.raises(ValueError, match="finite"):
        fav.fit_expert(fitted.match_tags("train"), key="bad", threshold="value", threshold_param=float("nan"),
                       **FIT_KWARGS)
    assert "bad_expert" not in fitted.list_runs()


# ----------------------------------------------------------------- defect 5: non-finite pixels
def _float_tiff(path, fill=None) -> str:
    rng = np.random.default_rng(0)
    arr = rng.random((96, 96), dtype=np.float32) * 1000.0  # e.g. a temperature or height image
    if fill is not None:
        arr[10:14, 20:30] = fill
    Image.fromarray(arr).save(path)
    with Image.open(path) as img:
        assert img.mode == "F"  # a real float TIFF, read back as float
    return str(path)


def test_float_tiffs_with_nan_or_inf_pixels_get_an_error_not_a_label(fitted, tmp_path):
    paths = {"nan": _float_tiff(tmp_path / "nan.tif", np.nan), "inf": _float_tiff(tmp_path / "inf.tif", np.inf),
             "ninf": _float_tiff(tmp_path / "ninf.tif", -np.inf), "finite": _float_tiff(tmp_path / "ok.tif")}
    for name in ("nan", "inf", "ninf"):
        with pytest.raises(ImageLoadError, match="non-finite"):
            load_image(paths[name], (96, 96))
        with pytest.raises(ImageLoadError, match="non-finite"):
            check_image(paths[name], (96, 96))
    assert bool(np.isfinite(load_image(paths["finite"], (96, 96)).numpy()).all())

    fav.score(fitted, expert="padim", key="base", **SCORE_KW)
    base = dict(zip(*fitted.values(["id", "base_raw_score"])))
    new_ids = dict(zip(paths, fitted.add_samples([fo.Sample(filepath=p) for p in paths.values()])))
    fav.score(fitted, expert="padim", **SCORE_KW)

    for name in ("nan", "inf", "ninf"):
        sample = fitted[new_ids[name]]
        assert "non-finite pixels" in (sample["padim_error"] or "")
        assert sample["padim"] is None and sample["padim_score"] is None and sample["padim_raw_score"] is None
    ok = fitted[new_ids["finite"]]
    assert ok["padim_error"] is None and ok["padim"].label in ("normal", "anomalous")
    assert math.isfinite(ok["padim_score"])
    # the other samples are unaffected (scored in other batches: equal up to float rounding)
    others = fitted.select(list(base))
    now = dict(zip(*others.values(["id", "padim_raw_score"])))
    assert now == pytest.approx(base, rel=1e-5)
    assert others.exists("padim_error").count() == 0 and others.exists("padim").count() == len(base)
