"""What a reserved key, a non-finite threshold or a non-finite image must never do to a dataset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.calibration import Calibration, threshold_from_labels, threshold_from_normals

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
