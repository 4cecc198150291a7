"""Forms that stop work on the wrong samples (issue #17, defect 4).

The fit form says how many samples of which target it fits on, and warns when no filter is applied or target
samples are labelled or tagged anomalous; "one expert per group of" never offers ground truth; the evaluate form
uses the current view (not a selection left over in the grid), says how many samples it evaluates, and the
evaluation leaves out the expert's own samples. Counting rules on the real parts dataset, then the forms in the
App served by this test (headless Chromium, one session).
"""

from __future__ import annotations

try:
    from selenium.webdriver.common.by import By
except ImportError:  # the browser test skips, saying why (test_panel_browser.browser)
    pass

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.experts.targets import check_fit_target, group_by_choices
from fiftyone_anomaly_vlm.ground_truth import gt_labels
from fiftyone_anomaly_vlm.gt_fields import anomaly_tags, count_labelled_anomalous
from fiftyone_anomaly_vlm.runs import (AnomalyEvaluationRunConfig, AnomalyScoreRunConfig, ExpertRunConfig,
                                       register_expert_run)
from test_panel_browser import (_click, _notification, _select_tiles, _text, _thumbnails_drawn, _wait,  # noqa: F401
                                browser, open_operator_form, save_png, served_app, set_view)


def test_fit_target_counts_and_ground_truth_fields(parts):
    ds = parts
    whole = check_fit_target(ds, "ground_truth")
    assert (whole.num_samples, whole.whole_dataset, whole.num_labelled_anomalous) == (42, True, 12)
    assert whole.warnings() == [
        "No filter: this fits on all 42 samples of the dataset, anomalies included. Filter the view to known-good "
        "samples first (e.g. match a 'good' tag).",
        "12 of the 42 samples are labelled anomalous in 'ground_truth': an expert must learn normal samples only."]
    train = check_fit_target(ds.match_tags("train"), "ground_truth")
    assert (train.num_samples, train.whole_dataset, train.warnings()) == (15, False, [])

    # every kind of labels field is read as evaluate reads ground truth
    truth = gt_labels("classification", ds.values("ground_truth.label"), "anomalous", 0.0)
    ds.set_values("is_bad", [bool(t) for t in truth])
    ds.set_values("p_defect", [0.7 if t else 0.0 for t in truth])
    ds.set_values("verdict", ds.values("ground_truth.label"))
    for field in ("ground_truth", "is_bad", "p_defect", "verdict", "ground_truth_mask"):
        assert count_labelled_anomalous(ds, field) == int(truth.sum()) == 12, field
    assert count_labelled_anomalous(ds, "p_defect", gt_threshold=0.8) == 0

    # tags: the word itself (any case) or the part before ':'; 'bad_lighting' is not a defect
    ids = ds.match_tags("train").values("id")
    ds.select(ids[:2]).tag_samples("Defect")
    ds.select(ids[2:3]).tag_samples("defect:scratch")
    ds.select(ids[3:4]).tag_samples("bad_lighting")
    tagged = check_fit_target(ds.match_tags("train"))
    assert tagged.tags == anomaly_tags(ds) == {"Defect": 2, "defect:scratch": 1}
    assert tagged.warnings() == ["2 tagged 'Defect', 1 tagged 'defect:scratch' among the 15 samples: an expert must "
                                 "learn normal samples only."]

    # group-by: never the ground truth (by name, or the labels field the form names)
    ds.set_values("camera", [f"cam{i % 2}" for i in range(len(ds))])
    assert "ground_truth.label" in fav.experts.group_fields(ds)  # what the form offered before
    assert group_by_choices(ds) == ["camera", "verdict"]
    assert group_by_choices(ds, "verdict") == ["camera"]
    ds.register_run("verdict_eval", AnomalyEvaluationRunConfig(run_key="x", gt_field="verdict"))  # used as truth
    assert group_by_choices(ds) == ["camera"]


def _close_form(driver) -> None:
    _click(driver, "button", "Cancel")
    _wait("the form closed", lambda: not driver.find_elements(By.XPATH, "//button[normalize-space(.)='Execute']"), 20)


def _recorded_expert_and_scores(ds) -> None:
    """An expert 'padim' fitted on the train-tagged samples (its recorded training and held-out ids) and a scoring
    run of it, written directly: the forms read these records, a real fit and score would only cost time
    (tests/test_evaluation.py evaluates a real one)."""
    ids = ds.match_tags("train").values("id")
    register_expert_run(ds, "padim_expert", ExpertRunConfig(expert="padim", model="padim", train_ids=ids[:-3],
                                                            holdout_ids=ids[-3:]))
    ds.register_run("padim", AnomalyScoreRunConfig(expert="padim", expert_run="padim_expert",
                                                   fields=fav.FieldNames("padim").all()))
    scores = [0.8 + 0.01 * i if label == "anomalous" else 0.1 + 0.01 * i
              for i, label in enumerate(ds.values("ground_truth.label"))]
    ds.set_values("padim_raw_score", scores)
    ds.set_values("padim_score", scores)


def test_forms_count_warn_and_leave_out_fit_samples_in_the_app(parts, browser):
    ds, driver = parts, browser
    _recorded_expert_and_scores(ds)
    train = ds.match_tags("train")
    n_eval = len(ds) - len(train)
    with served_app(driver, ds) as session:
        # the whole dataset: the count, the no-filter warning and the labelled anomalies
        open_operator_form(driver, "fit vision", "Anomaly: fit vision expert")
        _wait("the fit form's count", lambda: f"Fits on {len(ds)} samples of the dataset" in _text(driver), 30)
        assert f"No filter: this fits on all {len(ds)} samples of the dataset" in _text(driver)
        assert f"12 of the {len(ds)} samples are labelled anomalous in 'ground_truth'" in _text(driver)
        save_png(driver, "app-fit-form-warning")
        _close_form(driver)

        # a filtered view of known-good samples: the count, no warning
        set_view(session, train, "the training view",
                 lambda: f"{len(train)} samples" in _text(driver))
        open_operator_form(driver, "fit vision", "Anomaly: fit vision expert")
        _wait("the fit form's count", lambda: f"Fits on {len(train)} samples of the current view" in _text(driver), 30)
        assert "No filter" not in _text(driver) and "labelled anomalous" not in _text(driver)
        _close_form(driver)

        # evaluate the whole dataset with one sample left selected in the grid: the dataset is evaluated, less the
        # expert's own samples (recorded on the evaluation run)
        set_view(session, None, "the whole dataset",
                 lambda: f"{len(ds)} samples" in _text(driver))
        _wait("the thumbnails drawn", lambda: _thumbnails_drawn(driver), 30)
        _select_tiles(driver, [0])
        open_operator_form(driver, "evaluate against", "Anomaly: evaluate against ground truth")
        _wait("the evaluate form's count", lambda: f"Evaluates {n_eval} samples of the dataset" in _text(driver), 30)
        assert f"leaves out {len(train)} that expert 'padim' was fitted on" in _text(driver)
        _wait("the form's values resolved (Execute enabled)", lambda: "Required property" not in _text(driver)
              and driver.find_element(By.XPATH, "//button[normalize-space(.)='Execute']").is_enabled(), 30)
        _click(driver, "button", "Execute")
        _notification(driver, "'padim_eval': image AUROC")
        ds.reload()
        config = ds.get_run_info("padim_eval").config
        assert config.exclude_fit_samples is True and config.num_fit_samples_excluded == len(train)
        assert config.metrics["num_samples"] == n_eval
