"""What a reserved key, a non-finite threshold or a non-finite image must never do to a dataset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.calibration import Calibration, threshold_from_labels, threshold_from_normals
from fiftyone_anomaly_vlm.images import ImageLoadError, check_image, load_image

from conftest import FIT_KWARGS

SCORE_KW = dict(device="cpu", batch_size=16, num_workers=0)


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
