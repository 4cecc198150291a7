"""A threshold set from held-out normals carries the interval of its false-alarm rate, and warns when too wide."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.calibration import (
    Calibration, ThresholdUncertaintyWarning, far_uncertainty, rate_interval, threshold_from_normals,
)


def _cal(normals: np.ndarray, rule: str = "far", param: float | None = 0.01) -> Calibration:
    return Calibration.from_normals(normals, normals + 1.0, normals, rule=rule, param=param)


def test_few_normals_warn_with_a_wide_interval(caplog):
    normals = np.random.default_rng(0).normal(10, 2, 5)  # the parts demo: 5 held-out good samples, far 1 %
    with caplog.at_level(logging.WARNING, logger="fiftyone_anomaly_vlm"), \
            pytest.warns(ThresholdUncertaintyWarning, match=r"0 of 5 held-out normals.*requested 1\.00%"):
        cal = _cal(normals)
    far = cal.to_dict()["stats"]["far"]
    assert far["num_normals"] == 5 and far["num_above"] == 0 and far["too_wide"]
    lo, hi = far["interval"]
    assert lo == 0.0 and hi > 0.4  # 5 normals cannot tell 1 % from 45 %
    assert any("too few held-out normals" in r.getMessage().lower() for r in caplog.records)
    # re-thresholding to another normal rule re-checks it, and the record survives a round trip
    with pytest.warns(ThresholdUncertaintyWarning):
        cal2 = cal.with_threshold("percentile", 95)
    assert Calibration.from_dict(cal2.to_dict()).far["rate"] == pytest.approx(0.05)


def test_many_normals_do_not_warn_and_the_interval_is_tight():
    normals = np.random.default_rng(1).normal(10, 2, 5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThresholdUncertaintyWarning)
        cal = _cal(normals)
        cal.with_threshold("mean_std", 2.0)
    lo, hi = cal.far["interval"]
    assert lo < 0.01 < hi < 0.015 and not cal.far["too_wide"]


def test_value_and_labelled_rules_record_the_interval_without_a_requested_rate():
    normals = np.arange(1.0, 11.0)
    cal = _cal(np.random.default_rng(2).normal(0, 1, 2000)).with_threshold("value", 0.0)
    assert cal.far["rate"] is None and not cal.far["too_wide"]
    assert 0.45 < cal.far["interval"][0] < cal.far["interval"][1] < 0.55
    assert far_uncertainty(normals, 8.5, "f1", None)["num_above"] == 2


def test_rate_interval_edges():
    assert rate_interval(0, 0) == (0.0, 1.0)
    lo, hi = rate_interval(0, 5)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 5))
    lo, hi = rate_interval(5, 5)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 5))


@pytest.mark.parametrize("rule,param", [("far", 0.05), ("percentile", 90.0), ("mean_std", 1.5)])
def test_interval_covers_the_rate_on_fresh_normals(rule, param):
    rng = np.random.default_rng(17)
    fresh = rng.gamma(2.0, 1.0, 200_000)  # skewed, not Gaussian
    covered = 0
    trials = 300
    for _ in range(trials):
        normals = rng.gamma(2.0, 1.0, 40)
        t = threshold_from_normals(normals, rule, param)
        lo, hi = far_uncertainty(normals, t, rule, param)["interval"]
        covered += lo <= float(np.mean(fresh > t)) <= hi
    assert covered / trials >= 0.93  # a 95 % interval (exact intervals are conservative)


def test_recalibration_from_few_reviews_warns(fitted):
    ds = fitted
    fav.score(ds, expert="padim", progress=False)
    flagged = ds.sort_by("padim_score", reverse=True)
    fav.review(flagged.limit(2), "relabel", key="padim", label="anomalous", user="qa")
    fav.review(flagged.skip(2).limit(2), "relabel", key="padim", label="normal", user="qa")
    with pytest.warns(ThresholdUncertaintyWarning, match=r"from 2 anomalous and 2 normal reviews"):
        fav.recalibrate_from_review(ds, "padim", rule="f1")
    entry = ds.get_run_info("padim").config.threshold_history[-1]
    assert entry["source"] == "review" and entry["far_interval"][1] - entry["far_interval"][0] > 0.3
