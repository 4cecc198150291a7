"""Thresholds on the calibrated scale and on raw scores agree: the exact inverse of the calibration
(``Calibration.raw_from_normalized``), and the review panel's counts equal the labels a threshold wrote.

Before the fix the panel counted calibrated scores against the calibrated threshold while the labels were
decided on raw scores against the raw threshold; far in the calibration's tails several raw floats share one
calibrated float, so a threshold one ulp below a sample's raw score (what an F1 recalibration on reviews of
anomalies only gives) labelled the sample anomalous while the panel counted it below.
"""

from __future__ import annotations

import uuid
import warnings

import numpy as np
import pytest

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from conftest import FIT_KWARGS
from fiftyone_anomaly_vlm.calibration import Calibration, ThresholdUncertaintyWarning
from fiftyone_anomaly_vlm.floatgrid import code_floats, float_codes, largest_at_most
from fiftyone_anomaly_vlm.panels.review import ReviewPanel
from fiftyone_anomaly_vlm.reviewing import default_threshold, raw_threshold, run_errors
from fiftyone_anomaly_vlm.runs import expert_state
from test_review import _panel_ctx


@pytest.fixture(scope="module")
def scored_once(parts_template):
    """One fitted and scored parts clone for this module (the tests re-threshold it, never re-score)."""
    name = f"parts-thresholds-{uuid.uuid4().hex[:6]}"
    ds = parts_template.clone(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThresholdUncertaintyWarning)
        fav.fit_expert(ds.match_tags("train"), key="padim", **FIT_KWARGS)
        fav.score(ds, expert="padim", device="cpu", batch_size=16)
    yield ds
    if fo.dataset_exists(name):
        fo.delete_dataset(name)


def _raws_around(cal: Calibration, extra) -> np.ndarray:
    """Raw scores at and one ulp either side of every calibration score and of ``extra``, plus far tails."""
    c = np.asarray(cal.image_scores)
    span = float(c[-1] - c[0]) or 1.0
    base = np.concatenate([c, np.asarray(extra, dtype=float), np.linspace(c[0] - 50 * span, c[-1] + 50 * span, 400),
                           [c[0] - 1e6 * span, c[-1] + 1e6 * span]])
    return np.unique(np.concatenate([base, np.nextafter(base, -np.inf), np.nextafter(base, np.inf)]))


def _check_inverse(cal: Calibration, values, raws) -> None:
    """Each value's raw threshold flags exactly the raw scores whose calibrated score is above the value."""
    norm = cal.normalize_scores(raws)
    for v, t in zip(values, cal.raw_from_normalized(values)):
        probe = np.concatenate([raws, [t, np.nextafter(t, -np.inf), np.nextafter(t, np.inf)]]) if np.isfinite(t) \
            else raws
        assert ((probe > t) == (cal.normalize_scores(probe) > v)).all(), (v, t)
    assert (np.diff(norm) >= 0).all()  # what exactness rests on: the float normalisation never goes down


def _calibrations(fitted_cal: Calibration) -> list[Calibration]:
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThresholdUncertaintyWarning)
        return [fitted_cal,
                Calibration.from_normals(rng.normal(10, 2, 60), rng.normal(5, 1, 60), rng.normal(1, 0.5, 500)),
                Calibration.from_normals([3.5], [2.0], [1.0, 1.5]),                       # one normal: tails only
                Calibration.from_normals([1.0, 2.0, 2.0, 2.0, 5.0], [1, 2, 3, 4, 5], [0.5, 1.0]),  # ties
                Calibration.from_normals([-4.0, -3.0, 0.0, 1e-3], [1, 2], [0.0, 0.5])]  # negative and tiny raws


def test_raw_from_normalized_round_trips_on_real_calibrations(scored_once):
    fitted = Calibration.from_dict(expert_state(scored_once, "padim_expert")["calibration"])
    sample_raws = scored_once.values("padim_raw_score")
    for cal in _calibrations(fitted):
        c, n = np.asarray(cal.image_scores), len(cal.image_scores)
        raws = _raws_around(cal, sample_raws if cal is fitted else [cal.image_threshold])
        norm = cal.normalize_scores(raws)
        # raw -> calibrated -> raw: the largest raw float with that calibrated score (itself or a close neighbour)
        back = cal.raw_from_normalized(norm)
        assert (back >= raws).all() and (cal.normalize_scores(back) == norm).all()
        finite = np.isfinite(back)  # +inf where the float normalisation reaches 1.0 (raw scores ~1e16 scales out)
        assert (cal.normalize_scores(np.nextafter(back[finite], np.inf)) > norm[finite]).all()
        inner = (raws >= c[0]) & (raws <= c[-1])
        if n > 1 and len(set(c.tolist())) == n:  # the linear middle is one-to-one up to float resolution
            assert np.allclose(back[inner], raws[inner], rtol=0, atol=1e-9 * max(1.0, np.abs(c).max()))
        # calibrated -> raw: exact flags at the threshold, the calibration's ranks (segment ends), near the ends
        ranks = np.arange(1, n + 1) / (n + 1)
        values = np.concatenate([[cal.normalized_image_threshold], ranks, np.nextafter(ranks, 0),
                                 np.nextafter(ranks, 1), np.unique(norm)[:: max(1, norm.size // 60)],
                                 [1e-12, 1e-6, 0.001, 0.5, 0.999, 1 - 1e-6, 1 - 1e-12, np.nextafter(1.0, 0)]])
        _check_inverse(cal, values, raws)
        # the recorded threshold maps back to the largest raw float of the same calibrated score, a few floats
        # above the raw threshold at most: raw_threshold() therefore answers the run's own value with its own
        t = cal.raw_from_normalized([cal.normalized_image_threshold])[0]
        assert t >= cal.image_threshold and cal.normalize_scores(t) == cal.normalized_image_threshold
        assert t <= cal.image_threshold + 1e-9 * max(1.0, abs(cal.image_threshold))
        # the ends: every raw score is above 0 and below 1 on the calibrated scale
        ends = cal.raw_from_normalized([0.0, -0.5, 1.0, 2.0, np.nan])
        assert ends[:2].tolist() == [-np.inf, -np.inf] and ends[2:4].tolist() == [np.inf, np.inf]
        assert np.isnan(ends[4])
    assert fitted.raw_from_normalized(0.5).shape == ()  # a scalar in, a 0-d array out, as normalize_scores


def _anomalous_ids(ds) -> set[str]:
    return set(ds.match(fo.ViewField("padim.label") == "anomalous").values("id"))


def _expect_counts_equal_labels(ds, what: str) -> None:
    """The panel's numbers at the run's threshold equal the labels written: the counts and Show flagged."""
    t = default_threshold(ds, "padim")
    labelled = _anomalous_ids(ds)
    counts = fav.threshold_counts(ds, "padim", t, gt_field="ground_truth")
    assert counts["above"] == ds.count_values("padim.label").get("anomalous", 0) == len(labelled), what
    assert set(fav.flagged_view(ds, "padim", threshold=t).values("id")) == labelled, what
    assert counts["tp"] + counts["fp"] == len(labelled), what


def test_counts_equal_the_labels_written_after_apply_threshold_and_recalibrate(scored_once):
    ds = scored_once
    raw = np.array(ds.values("padim_raw_score"), dtype=float)
    order = np.argsort(raw)
    top, mid = raw[order[-3]], raw[order[len(raw) // 2]]  # a high sample (in the upper tail) and a median one
    for t in (top, mid, np.nextafter(top, -np.inf), np.nextafter(mid, -np.inf), np.nextafter(top, np.inf)):
        fav.set_threshold(ds, "padim", rule="value", param=float(t))
        _expect_counts_equal_labels(ds, f"set_threshold value {t!r}")

    # Recalibrate from reviews of anomalies only: F1 puts the threshold one ulp below the lowest reviewed score
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThresholdUncertaintyWarning)
        ids = ds.values("id")
        fav.review(ds.select([ids[i] for i in order[-3:]]), "relabel", key="padim", label="anomalous")
        fav.recalibrate_from_review(ds, "padim", rule="f1")
    assert ds.get_run_info("padim").config.calibration["image_threshold"] == np.nextafter(raw[order[-3]], -np.inf)
    _expect_counts_equal_labels(ds, "recalibrated from reviews")
    # three reviews, none normal: the caution names the false-alarm interval; the panel shows it and warns
    caution = fav.reviewing.recalibration_caution(ds, "padim")
    assert "from 3 anomalous and 0 normal reviews: false-alarm rate 0%-100%" in caution
    panel, state = ReviewPanel(), {}
    panel.on_load(_panel_ctx(ds, state)[0])
    shown = ["Threshold from few reviews", caution]  # the panel's note: title and text
    assert list(state["caution"]) == shown  # while the run's threshold rests on those reviews, also after a reload
    ctx, executor = _panel_ctx(ds, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThresholdUncertaintyWarning)
        panel.recalibrate(ctx)
    assert list(state["caution"]) == shown and "caution" in panel.render(ctx).type.properties
    notify = [r.params for r in executor._requests if r.operator_uri == "notify"][-1]
    assert notify["variant"] == "warning" and caution in notify["message"]
    _expect_counts_equal_labels(ds, "recalibrated in the panel")

    # Apply threshold in the panel at slider values: exactly a sample's calibrated score, others, and the ends
    scores = np.array(ds.values("padim_score"), dtype=float)
    for value in (float(np.sort(scores)[-3]), float(np.median(scores)), 0.3, 0.999, 0.0, 1.0):
        panel.on_change_threshold(_panel_ctx(ds, state, value=value)[0])
        shown = state["counts"]["above"]  # what the confirmation promises
        panel.ask_apply_threshold(_panel_ctx(ds, state)[0])
        panel.apply_threshold(_panel_ctx(ds, state)[0])
        assert ds.count_values("padim.label").get("anomalous", 0) == shown, value
        assert state["counts"]["above"] == shown, value
        _expect_counts_equal_labels(ds, f"panel apply at {value}")
        assert raw_threshold(ds, "padim", state["threshold"]) == ds.get_run_info("padim").config.calibration[
            "image_threshold"]
        assert state["caution"] is None  # an applied threshold does not rest on the reviews


def test_run_errors_counts_a_runs_errors_and_returns_the_first(scored_once):
    ds = scored_once
    assert run_errors(ds, "padim") == {"count": 0, "first": []}
    ds.add_samples([fo.Sample(filepath=f"/nonexistent/fav/part_{i}.png", tags=["broken"]) for i in range(4)])
    fav.score(ds.match_tags("broken"), expert="padim", key="broken", device="cpu")
    errors = run_errors(ds, "broken", first=2)
    assert errors["count"] == 4 and [name for name, _ in errors["first"]] == ["part_0.png", "part_1.png"]
    assert "file not found: /nonexistent/fav/part_0.png" in errors["first"][0][1]
    assert run_errors(ds.match_tags("broken").limit(1), "broken")["count"] == 1  # a view: its samples only
    assert run_errors(ds, "padim")["count"] == 0


def test_float_grid_search_finds_the_last_float_and_the_ends():
    big = np.finfo(np.float64).max
    x = np.array([0.0, 5e-324, -5e-324, 1.0, -1.0, big, -big])
    assert (code_floats(float_codes(x)) == x).all() and float_codes([5e-324, -5e-324]).tolist() == [1, -1]
    # identity: the value itself, from guesses far off; a step function: the last float before the step
    assert largest_at_most(lambda a: a, [1.0, -3.0, 1e-300], [0.0, 1e300, -1e300]).tolist() == [1.0, -3.0, 1e-300]
    step = largest_at_most(lambda a: (a > 2.5).astype(float), [0.5], [100.0])[0]
    assert step == 2.5
    assert largest_at_most(lambda a: np.zeros_like(a), [1.0], [0.0])[0] == np.inf  # every float is at most 1
    assert largest_at_most(lambda a: np.ones_like(a), [0.0], [5.0])[0] == -np.inf  # none is at most 0
