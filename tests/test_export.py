"""Export of experts to the line (ONNX, OpenVINO, torch) and import of anomalib models trained elsewhere.

Parity: the exported folder's standalone inference (models/line_inference.py, copied as infer.py) gives the
plugin's raw score (1e-4 relative), calibrated score and label on the same images, per format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.datasets import make_parts_dataset
from fiftyone_anomaly_vlm.fields import FieldNames
from fiftyone_anomaly_vlm.images import load_image
from fiftyone_anomaly_vlm.models import line_inference
from fiftyone_anomaly_vlm.models.anomalib_fit import TensorDataset, make_datamodule
from test_panel_browser import (_click, _dismiss_notifications, _notification, _text, _wait, browser,  # noqa: F401
                                run_operator, served_app)

SIZE = 32
FIT = dict(pretrained=False, backbone="resnet18", image_size=SIZE, device="cpu")
PADIM = dict(model="padim", model_kwargs={"layers": ["layer1", "layer2"]}, **FIT)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    name = f"line-parts-{uuid.uuid4().hex[:6]}"
    dataset = make_parts_dataset(name, num_normal=16, num_anomalous=4, size=SIZE, seed=5,
                                 images_dir=str(tmp_path_factory.mktemp("parts")), persistent=True)
    for i, sample in enumerate(dataset.iter_samples(autosave=True)):
        sample["line"] = "a" if i % 2 else "b"
    fav.fit_expert(dataset.match_tags("train"), key="padim", **PADIM)
    fav.score(dataset, expert="padim", device="cpu", num_workers=0)
    yield dataset
    fo.delete_dataset(name)


def test_export_operator_in_the_app(ds, tmp_path, browser):
    # first in the module: run after the other tests of this module, the served App lost the dataset (shown, then
    # 'No dataset selected') in 2 of 2 runs on the loaded test machine; cause not found
    out = tmp_path / "from_app"
    with served_app(browser, ds):
        _wait("the dataset", lambda: f"{len(ds)} samples" in _text(browser), 60)
        run_operator(browser, "export expert", "Anomaly: export expert", texts={"Output folder": str(out)},
                     dropdowns={"onnx": "torch"})
        _notification(browser, "Exported 'padim'", timeout=180)
        meta = json.loads((out / "expert.json").read_text())
        assert meta["format"] == "torch" and meta["expert"] == "padim" and (out / "infer.py").is_file()
        _click(browser, "button", "Done")  # the progress dialog
        _dismiss_notifications(browser)
        run_operator(browser, "export expert", "Anomaly: export expert", texts={"Output folder": str(out)},
                     dropdowns={"onnx": "torch"})  # the folder is not empty now: an error, nothing replaced
        assert "not empty" in _notification(browser, "not empty", timeout=120)
    assert json.loads((out / "expert.json").read_text())["exported_at"] == meta["exported_at"]


def plugin_fields(dataset, key):
    names = FieldNames(key)
    raw, score, label = dataset.values([names.raw_score, names.score, f"{names.label}.label"])
    return np.array(raw), np.array(score), np.array([lab == "anomalous" for lab in label])


def line_fields(folder, dataset, groups=None):
    line = line_inference.LineExpert(folder)
    outs = [line.predict_path(p, None if groups is None else g)
            for p, g in zip(dataset.values("filepath"), groups or [None] * len(dataset))]
    return (np.array([o["raw_score"][0] for o in outs]), np.array([o["score"][0] for o in outs]),
            np.array([bool(o["label"][0]) for o in outs]))


def assert_parity(folder, dataset, key, groups=None):
    raw, score, label = plugin_fields(dataset, key)
    lraw, lscore, llabel = line_fields(folder, dataset, groups)
    # relative 1e-4, plus 1e-6 absolute: a weighted ensemble's raw score is a sum of (raw - median) / std, 0 for
    # a sample at its members' medians (with one held-out normal, that normal itself: the image threshold is 0)
    off = np.abs(lraw - raw) > 1e-4 * np.abs(raw) + 1e-6
    if off.any():  # PatchCore only, so far: see assert_batch_effect
        assert_batch_effect(dataset, key, lraw, off)
    np.testing.assert_allclose(lraw[~off], raw[~off], rtol=1e-4, atol=1e-6)
    calibration = fo.load_dataset(dataset.name).get_run_info(key).config.calibration
    # the calibrated score can jump at the calibration normals themselves (a composite's held-out normals score
    # exactly i/(n+1) on their members' scales, so a few normals tie or nearly tie and the tails' scale is
    # tiny): a raw score within 1e-4 of a calibration normal (the held-out samples) is compared raw only
    normals = np.asarray(calibration["image_scores"])
    smooth = np.array([not np.any(np.abs(r - normals) <= 1e-4 * abs(r)) for r in raw])
    np.testing.assert_allclose(lscore[smooth], score[smooth], rtol=1e-4, atol=1e-6)
    assert smooth.sum() >= len(raw) - len(normals)
    # labels identical, except for a sample sitting exactly on the threshold: the "far" rule puts the image
    # threshold at a held-out normal's own score, which fp32 batch composition moves by ~1e-7 either way
    threshold = calibration["image_threshold"]
    off = np.abs(raw - threshold) > 1e-4 * abs(threshold) + 1e-6
    assert (llabel == label)[off].all() and label.any() and not label.all() and off.sum() >= len(raw) - 2


def assert_batch_effect(dataset, key, lraw, off):
    """Samples whose line score is off the field by more than 1e-4: the plugin's own model, given the line's input
    alone, must give the line's score.

    anomalib's PatchCore scores an image by its highest patch distance, reweighted by that patch's neighbours in
    the memory bank; distances come from a matmul expansion (|x|^2 - 2xy + |y|^2, chosen for ONNX export), whose
    fp32 rounding depends on the batch shape and the CPU's kernels. Where two patches nearly tie for the highest
    distance, scoring an image alone (the line) or in a batch of 16 (fav.score) can pick the other patch: once in
    ~20 CI runs, 1 of 17 images moved by 1.5e-4 relative. That is the model's batch dependence, not the export's,
    so the exported network is held to the plugin's network on the same input; at most one such image per run.
    """
    from fiftyone_anomaly_vlm.experts import load_expert

    assert off.sum() <= 1, f"{off.sum()} images off by more than 1e-4"
    spec = load_expert(dataset, key)
    model = spec.load("cpu")
    paths = np.array(dataset.values("filepath"))[off]
    x = torch.stack([torch.from_numpy(line_inference.load_image(p, tuple(spec.image_size))) for p in paths])
    alone = np.concatenate([model.predict(x[i:i + 1]).raw_score.numpy() for i in range(len(x))])
    np.testing.assert_allclose(lraw[off], alone, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "torch"])
def test_padim_export_parity(ds, tmp_path, fmt):
    folder = fav.export_expert(ds, "padim", format=fmt, output_dir=str(tmp_path / fmt))
    meta = json.loads(open(os.path.join(folder, "expert.json")).read())
    assert meta["format"] == fmt and meta["input"]["size"] == [SIZE, SIZE] and meta["threshold"]["source"] == \
        "scoring run 'padim'"
    assert os.path.isfile(os.path.join(folder, meta["model_file"])) and os.path.isfile(os.path.join(folder, "infer.py"))
    assert meta["parity"]["max_rel_raw_score_diff"] <= 1e-4
    assert_parity(folder, ds, "padim")
    if fmt == "onnx":  # the copied script runs with FiftyOne, anomalib and torch unimportable
        image = ds.match(fo.ViewField("ground_truth.label") == "anomalous").first().filepath
        heatmap = tmp_path / "map.png"
        block = "import sys; sys.modules.update(fiftyone=None, anomalib=None, torch=None); sys.argv = sys.argv[1:]; "
        run = subprocess.run([sys.executable, "-c", block + "import runpy; runpy.run_path(sys.argv[0], run_name='__main__')",
                              os.path.join(folder, "infer.py"), image, "--heatmap", str(heatmap)],
                             capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
        assert run.returncode == 0, run.stderr
        printed = json.loads(run.stdout)
        want = ds[image]["padim_score"]
        assert printed["label"] == ds[image]["padim"].label and abs(printed["score"] - want) < 1e-5
        from PIL import Image
        stored = np.asarray(Image.open(ds[image]["padim_map"].map_path)).astype(int)
        assert np.abs(np.asarray(Image.open(heatmap)).astype(int) - stored).max() <= 2


def test_threshold_follows_set_threshold_and_bad_export_inputs(ds, tmp_path):
    fav.set_threshold(ds, "padim", rule="value", param=float(np.median(ds.values("padim_raw_score"))))
    folder = fav.export_expert(ds, "padim", format="torch", output_dir=str(tmp_path / "t"))
    assert_parity(folder, ds, "padim")  # the labels set_threshold rewrote
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        fav.export_expert(ds, "padim", format="tflite", output_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="not empty"):
        fav.export_expert(ds, "padim", format="torch", output_dir=folder)
    with pytest.raises(ValueError, match="not a calibrated scoring run"):
        fav.export_expert(ds, "padim", format="torch", output_dir=str(tmp_path / "y"), score_key="nope")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_composite_export_routes_by_group(ds, tmp_path):
    # held-out normals follow a hash of each file's path (the test's tmp folder): a small holdout share keeps
    # 2+ training images in each line's group wherever the files land
    fav.fit_expert(ds.match_tags("train"), key="per_line", group_by="line", holdout=0.1, **PADIM)
    fav.score(ds, expert="per_line", device="cpu", num_workers=0)
    folder = fav.export_expert(ds, "per_line", format="torch", output_dir=str(tmp_path / "c"))
    meta = json.loads(open(os.path.join(folder, "expert.json")).read())
    assert meta["kind"] == "composite" and meta["routing"]["group_field"] == "line"
    assert sorted(os.listdir(os.path.join(folder, "members"))) == ["per_line__a", "per_line__b"]
    assert_parity(folder, ds, "per_line", groups=ds.values("line"))
    with pytest.raises(ValueError, match="routes on field 'line'"):
        line_inference.LineExpert(folder).predict_path(ds.first().filepath)


def test_max_and_weighted_ensembles_export_combine_as_the_plugin(ds, tmp_path):
    # ensembles that take the highest member calibrated score, or a weighted sum of standardised ones: infer.py
    # must combine the same way (a line running the mean would flag other images than the review did)
    fav.fit_expert(ds.match_tags("train"), key="padim_l3", **dict(PADIM, model_kwargs={"layers": ["layer2", "layer3"]}))
    for rule, weights in (("max", None), ("weighted", [1.0, 0.25])):
        key = f"ens_{rule}"
        fav.ensemble_experts(ds, ["padim", "padim_l3"], key=key, combine=rule, weights=weights, device="cpu")
        fav.score(ds, expert=key, device="cpu", num_workers=0)
        folder = fav.export_expert(ds, key, format="torch", output_dir=str(tmp_path / rule))
        meta = json.loads(open(os.path.join(folder, "expert.json")).read())
        assert meta["kind"] == "composite" and meta["routing"]["combine"] == rule
        assert meta["routing"]["weights"] == weights
        assert_parity(folder, ds, key)


def test_patchcore_round_trip_through_torch_export(ds, tmp_path):
    fav.fit_expert(ds.match_tags("train"), key="pc", model="patchcore", model_kwargs={"layers": ["layer2"]}, **FIT)
    fav.score(ds, expert="pc", device="cpu", num_workers=0)
    # a 32 px PatchCore on random features flags little at its fit threshold: put it mid-way, so both labels occur
    fav.set_threshold(ds, "pc", rule="value", param=float(np.median(ds.values("pc_raw_score"))))
    folder = fav.export_expert(ds, "pc", format="torch", output_dir=str(tmp_path / "pc"))
    assert_parity(folder, ds, "pc")
    held = ds.select(ds.load_run_results("pc_expert").holdout_ids)
    spec = fav.import_expert(held, checkpoint=os.path.join(folder, "model.pt"), key="pc_in")
    assert spec.image_size == (SIZE, SIZE)
    fav.score(ds, expert="pc_in", device="cpu", num_workers=0)
    np.testing.assert_allclose(plugin_fields(ds, "pc_in")[0], plugin_fields(ds, "pc")[0], rtol=1e-5)
    # the same held-out normals calibrate it: the same calibrated scores
    np.testing.assert_allclose(plugin_fields(ds, "pc_in")[1], plugin_fields(ds, "pc")[1], rtol=1e-5)
    weights = ds.get_run_info("pc_in_expert").config.weights
    assert weights["source"] == "import" and weights["path"].endswith("model.pt")


def engine_checkpoint(tmp_path, size=SIZE):
    """A PaDiM fitted with anomalib's own Engine (as a team would elsewhere); its Lightning checkpoint."""
    from anomalib.engine import Engine
    from anomalib.models import Padim

    torch.manual_seed(0)
    model = Padim(backbone="resnet18", layers=["layer1", "layer2"], pre_trained=False, n_features=50,
                  pre_processor=Padim.configure_pre_processor(image_size=(48, 48)), evaluator=False, visualizer=False)
    images = [torch.rand(3, size, size) for _ in range(6)]
    dm = make_datamodule(TensorDataset(images[:4], [f"t{i}" for i in range(4)]), TensorDataset(images[4:], ["v0", "v1"]),
                         4, 4)
    engine = Engine(default_root_dir=str(tmp_path / "engine"), accelerator="cpu", enable_progress_bar=False,
                    enable_model_summary=False, logger=False)
    engine.fit(model=model, datamodule=dm)
    path = str(tmp_path / "padim.ckpt")
    engine.trainer.save_checkpoint(path)
    return path, model


def test_import_engine_checkpoint_and_bad_inputs(ds, tmp_path):
    ckpt, model = engine_checkpoint(tmp_path)
    runs = set(ds.list_runs())
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(open(ckpt, "rb").read()[:5000])
    with pytest.raises(ValueError, match="not a readable anomalib checkpoint"):
        fav.import_expert(ds, checkpoint=str(bad), key="bad")
    unknown = tmp_path / "unknown.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"wavelet_levels": 3}}, unknown)
    with pytest.raises(ValueError, match="anomalib does not know"):
        fav.import_expert(ds, checkpoint=str(unknown), key="bad")
    with pytest.raises(ValueError, match="disagrees"):
        fav.import_expert(ds, checkpoint=ckpt, key="bad", image_size=64)
    assert set(ds.list_runs()) == runs
    assert not os.path.exists(os.path.join(fo.config.default_dataset_dir, "anomaly_vlm", ds.name, "experts", "bad"))

    known_good = ds.match_tags("train")
    spec = fav.import_expert(known_good, checkpoint=ckpt, key="ext")
    assert spec.model_class.endswith("Padim") and spec.image_size == (48, 48)  # from its pre-processor
    fav.score(ds, expert="ext", device="cpu", num_workers=0)
    raw = plugin_fields(ds, "ext")[0]
    x = torch.stack([load_image(p, (48, 48)) for p in ds.values("filepath")])
    with torch.no_grad():
        want = model.eval().model(model.pre_processor(x)).pred_score.reshape(-1).numpy()
    np.testing.assert_allclose(raw, want, rtol=1e-5)
    cal = ds.get_run_info("ext_expert").config
    assert cal.weights["source"] == "import" and cal.num_holdout == len(known_good)
    assert fav.evaluate(ds, "ext", gt_field="ground_truth") is not None
