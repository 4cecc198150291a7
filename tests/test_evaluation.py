"""Evaluation: metric values against direct sklearn computations, recorded runs, the operator."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import fiftyone as fo
import fiftyone.operators as foo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.metrics import binary_image_metrics, image_curves, pixel_metrics, threshold_metrics

from conftest import FIT_KWARGS, subprocess_env

PLUGIN = "@anomaly-vlm/anomaly-vlm"


def _f1_max(y, s) -> float:
    p, r, _ = precision_recall_curve(y, s)
    return float(np.max(2 * p * r / np.maximum(p + r, 1e-12)))


CASES = {
    # many ties across the classes, and inside each class
    "ties": ([0.1, 0.4, 0.4, 0.4, 0.8, 0.2, 0.9, 0.4, 0.4, 0.1], [0, 1, 0, 1, 1, 0, 0, 0, 1, 0]),
    # raw scores far above 1 (torchmetrics would read them as logits): scaled, not saturated
    "raw_scale": ([20.0, 25.0, 30.0, 35.0, 1.0, 25.0, 80.0], [0, 1, 0, 1, 0, 0, 1]),
    "perfect": ([0.1, 0.2, 0.3, 0.7, 0.9], [0, 0, 0, 1, 1]),
    "all_tied": ([0.5] * 6, [0, 1, 0, 1, 0, 0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_image_metrics_match_sklearn(case):
    s, y = CASES[case]
    m = binary_image_metrics(s, y)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-5)
    assert m["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-5)
    assert m["f1_max"] == pytest.approx(_f1_max(y, s), abs=1e-5)
    curves = image_curves(s, y)
    # the stored ROC curve integrates to the AUROC; PR points are sklearn's
    assert np.trapezoid(curves["roc"]["tpr"], curves["roc"]["fpr"]) == pytest.approx(m["auroc"], abs=1e-5)
    p, r, _ = precision_recall_curve(y, s)
    assert sorted(zip(np.round(r, 5), np.round(p, 5))) == \
        sorted(set(zip(np.round(curves["pr"]["recall"], 5), np.round(curves["pr"]["precision"], 5))))


def test_one_class_and_threshold_counts():
    with pytest.raises(ValueError, match="both classes"):
        binary_image_metrics([0.1, 0.5, 0.9], [0, 0, 0])
    with pytest.raises(ValueError, match="all 3 samples are normal"):
        image_curves([0.1, 0.5, 0.9], [0, 0, 0])
    t = threshold_metrics([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert (t["tp"], t["fp"], t["fn"], t["tn"]) == (2, 1, 1, 1)
    assert t["precision"] == pytest.approx(2 / 3) and t["recall"] == pytest.approx(2 / 3)
    assert threshold_metrics([0, 0], [1, 0])["f1"] == 0.0  # nothing predicted: 0, not a division error


def test_pixel_auroc_matches_sklearn_and_aupro_of_perfect_map():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 12, 12), np.uint8)
    masks[0, 2:5, 2:6] = 1
    masks[1, 7:10, 1:3] = 1
    masks[1, 0:2, 9:12] = 1                      # two regions in one image; image 2 all normal
    maps = rng.random(masks.shape).astype(np.float32) * 0.6 + masks * 0.3
    maps[0, 0, 0] = maps[2, 5, 5] = maps[0, 3, 3]  # ties across classes
    m = pixel_metrics(maps, masks)
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-5)
    assert m["num_anomalous_pixels"] == int(masks.sum())
    assert 0 < m["aupro"] < 1
    # a map that ranks every defect pixel above every normal one: every region fully covered at FPR 0
    perfect = pixel_metrics(masks.astype(np.float32) * 0.5 + 0.1, masks)
    assert perfect["pixel_auroc"] == pytest.approx(1.0) and perfect["aupro"] == pytest.approx(1.0)
    # an inverted map covers no region below FPR 0.3 (defect pixels are the lowest): AUPRO 0
    assert pixel_metrics(1.0 - masks.astype(np.float32), masks)["aupro"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="pixels are normal"):
        pixel_metrics(maps, np.zeros_like(masks))


def test_label_accuracy_on_hand_made_fields():
    ds = fo.Dataset()
    rows = [("anomalous", "anomalous", "scratch", "scratch"), ("normal", "anomalous", "dent", "scratch"),
            ("normal", "normal", None, None), ("anomalous", "normal", None, None), (None, "normal", None, None)]
    ds.add_samples([fo.Sample(filepath=f"/tmp/fav_acc_{i}.png",
                              verdict=fo.Classification(label=v) if v else None,
                              ground_truth=fo.Classification(label=g), defect=d, true_defect=td)
                    for i, (v, g, d, td) in enumerate(rows)])
    acc = fav.label_accuracy(ds, "verdict", "ground_truth")
    assert (acc["num_samples"], acc["num_correct"], acc["num_missing"]) == (4, 2, 1)
    assert acc["per_label"]["anomalous"] == {"support": 2, "correct": 1, "accuracy": 0.5}
    assert fav.label_accuracy(ds, "defect", "true_defect")["accuracy"] == 0.5
    with pytest.raises(ValueError, match="unknown label field"):
        fav.label_accuracy(ds, "nope", "ground_truth")
    ds.delete()


def test_evaluate_scoring_run_end_to_end(fitted):
    # one fitted expert serves the whole flow (fitting is the slow part): errors, metrics, reload, operator
    ds = fitted
    with pytest.raises(ValueError, match="no score field 'padim_raw_score'"):
        fav.evaluate(ds, "padim")
    fav.score(ds, expert="padim", device="cpu", num_workers=0)
    with pytest.raises(ValueError, match="unknown ground-truth field 'gt'"):
        fav.evaluate(ds, "padim", gt_field="gt")
    with pytest.raises(ValueError, match="all 30 evaluated samples are normal"):
        fav.evaluate(ds.match_tags("good"), "padim", exclude_fit_samples=False)
    with pytest.raises(ValueError, match="another kind"):
        fav.evaluate(ds, "padim", eval_key="padim_expert")
    assert not [k for k in ds.list_runs() if k.endswith("_eval")]

    test = ds.match_tags("train", bool=False)
    res = fav.evaluate(test, "padim", gt_mask_field="ground_truth_mask")
    m = res.metrics
    raw, gt = test.values(["padim_raw_score", "ground_truth.label"])
    y = [g == "anomalous" for g in gt]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, raw), abs=1e-4)
    assert m["ap"] == pytest.approx(average_precision_score(y, raw), abs=1e-4)
    assert m["f1_max"] == pytest.approx(_f1_max(y, raw), abs=1e-4)
    assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == m["num_samples"] == len(test)
    assert m["tp"] == len(test.match((fo.ViewField("padim.label") == "anomalous")
                                     & (fo.ViewField("ground_truth.label") == "anomalous")))
    assert 0 <= m["pixel_auroc"] <= 1 and 0 <= m["aupro"] <= 1 and m["num_anomalous_pixels"] > 0
    assert test.count_values("padim_eval") == {k.upper(): m[k] for k in ("tp", "fp", "fn", "tn") if m[k]}
    assert "padim_eval" in ds.list_runs()
    assert ds.get_run_info("padim_eval").config.metrics["auroc"] == m["auroc"]
    assert res.plot_roc_curve().data[0].x[-1] == 1.0 and res.plot_pr_curve().layout.title.text.startswith("Prec")
    assert res.plot_roc_curve(pixel=True).data and res.plot_pro_curve().data

    # ground truth from the masks alone: same labels here (every defective sample has a mask)
    by_mask = fav.evaluate(test, "padim", gt_field="ground_truth_mask", eval_key="by_mask")
    assert by_mask.metrics["auroc"] == m["auroc"] and by_mask.metrics["aupro"] == pytest.approx(m["aupro"])
    # a probability field mapped to labels (> gt_threshold)
    probs = {sid: (0.66 if g == "anomalous" else 0.0) for sid, g in zip(*test.values(["id", "ground_truth.label"]))}
    ds.set_values("defect_probability", probs, key_field="id")
    by_prob = fav.evaluate(test, "padim", gt_field="defect_probability", eval_key="by_prob", score="calibrated")
    assert by_prob.metrics["num_anomalous"] == m["num_anomalous"]

    # results come back in a fresh process
    code = ("import json, sys, fiftyone as fo; ds = fo.load_dataset(sys.argv[1]); r = ds.load_run_results('padim_eval');"
            "r.print_report(); print(json.dumps([type(r).__name__, r.metrics['auroc'], len(r.roc['fpr']),"
            " type(r.plot_roc_curve()).__module__]))")
    out = subprocess.run([sys.executable, "-c", code, ds.name], env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "image AUROC" in out.stdout and "AUPRO" in out.stdout
    name, auroc, n_roc, module = json.loads(out.stdout.strip().splitlines()[-1])
    assert (name, auroc, n_roc) == ("AnomalyEvaluationResults", m["auroc"], len(res.roc["fpr"]))
    assert module.startswith("plotly.graph_objs")

    # the operator, executed for real, records the same evaluation under its own key
    foo.execute_operator(f"{PLUGIN}/evaluate_anomalies", ctx=dict(view=test, params=dict(
        run="padim", gt_field="ground_truth", gt_mask_field="ground_truth_mask", eval_key="op_eval",
    ))).raise_exceptions()
    op_cfg = ds.get_run_info("op_eval").config
    assert op_cfg.run_key == "padim" and op_cfg.metrics["aupro"] == pytest.approx(m["aupro"])
    assert op_cfg.metrics["auroc"] == m["auroc"]

    ds.delete_run("padim_eval")
    assert "padim_eval" not in ds.list_runs() and "padim_eval" not in ds.get_field_schema()
    assert "padim" in ds.list_runs() and "padim_raw_score" in ds.get_field_schema()


def test_operator_form(parts):
    from fiftyone.operators.executor import ExecutionContext

    from fiftyone_anomaly_vlm.operators import EvaluateAnomalies
    from fiftyone_anomaly_vlm.runs import AnomalyScoreRunConfig

    ctx = ExecutionContext(request_params=dict(dataset_name=parts.name, params={}))
    assert EvaluateAnomalies().resolve_input(ctx).type.properties["no_run"].invalid
    # a scoring run record is enough for the form (run choices; gt and mask fields; key validation)
    parts.register_run("s1", AnomalyScoreRunConfig(expert="x", fields=fav.FieldNames("s1").all()))
    ctx = ExecutionContext(request_params=dict(dataset_name=parts.name, params={"eval_key": "s1"}))
    form = EvaluateAnomalies().resolve_input(ctx).type.properties
    assert form["run"].type.values == ["s1"]
    assert "ground_truth" in form["gt_field"].type.values and form["gt_mask_field"].type.values == ["ground_truth_mask"]
    assert form["eval_key"].invalid  # the scoring run's own key


def test_fit_progress_follows_the_phases_and_evaluate_leaves_out_the_fit_samples(parts):
    # issue #17: the fit's progress said "decoding normal images 30/30" through the whole fit; evaluating the whole
    # dataset scored the expert's own training samples (AUROC 1.000, no word)
    from fiftyone.operators.executor import ExecutionContext

    from fiftyone_anomaly_vlm.eval_samples import evaluation_counts
    from fiftyone_anomaly_vlm.experts.targets import expert_fit_samples
    from fiftyone_anomaly_vlm.operators import EvaluateAnomalies
    from fiftyone_anomaly_vlm.runs import (CLIP_METHOD, COMPOSITE_METHOD, AnomalyScoreRunConfig, ExpertRunConfig,
                                           register_expert_run)

    ds = parts
    train = ds.match_tags("train")
    labels = []
    fav.fit_expert(train, key="padim", batch_size=4, progress=lambda pb: labels.append(pb.phase_label), **FIT_KWARGS)
    phases = list(dict.fromkeys(label.split(":")[0] for label in labels))
    assert phases[0] == "decoding images" and phases[1] == "extracting features", phases
    assert phases[2:4] == ["fitting Padim", "validating"] and phases[-1].startswith("calibrating on "), phases
    n_train = ds.get_run_info("padim_expert").config.num_train
    batches = -(-n_train // 4)
    assert f"decoding images: {len(train)}/{len(train)} images" in labels
    extracting = [label for label in labels if label.startswith("extracting features")]
    assert extracting == [f"extracting features: batch {i}/{batches}" for i in range(batches + 1)]
    fav.score(ds, expert="padim", device="cpu", batch_size=16)
    seen = expert_fit_samples(ds, "padim")
    assert seen.ids == set(train.values("id")) and seen.unknown == []  # training + held-out calibration samples
    res = fav.evaluate(ds, "padim")
    cfg = ds.get_run_info("padim_eval").config
    assert (cfg.exclude_fit_samples, cfg.num_fit_samples_excluded, cfg.fit_experts) == (True, len(train), ["padim"])
    assert res.metrics["num_samples"] == len(ds) - len(train)
    assert set(ds.exists("padim_eval").values("id")).isdisjoint(seen.ids)  # no outcome written for them either
    every = fav.evaluate(ds, "padim", eval_key="all_eval", exclude_fit_samples=False)
    assert every.metrics["num_samples"] == len(ds)
    assert ds.get_run_info("all_eval").config.num_fit_samples_excluded == 0
    with pytest.raises(ValueError, match=f"all {len(train)} scored samples of the view were used to fit expert"):
        fav.evaluate(train, "padim", eval_key="train_eval")
    assert "train_eval" not in ds.list_runs()

    # a composite's own calibration samples, its members' (recursively) and a CLIP member's references; a member
    # whose fitted samples were never recorded (an earlier release) is reported, and nothing of it is left out
    others = ds.match_tags("train", bool=False).values("id")
    register_expert_run(ds, "clip_expert", ExpertRunConfig(method=CLIP_METHOD, expert="clip",
                                                           reference_ids=others[:2]))
    ds.register_run("old_expert", ExpertRunConfig(expert="old", model="padim"))  # 0.1: no ids, no results
    register_expert_run(ds, "ens_expert", ExpertRunConfig(method=COMPOSITE_METHOD, expert="ens", members={
        "*": ["padim", "clip", "old"]}, holdout_ids=others[2:3]))
    union = expert_fit_samples(ds, "ens")
    assert union.ids == seen.ids | set(others[:3]) and union.unknown == ["old"]
    assert "not recorded" in union.warning()

    # a scoring run of an expert whose fit samples are unknown: a warning, nothing left out, still evaluated
    ds.register_run("legacy", AnomalyScoreRunConfig(expert="old", fields=fav.FieldNames("legacy").all()))
    ds.set_values("legacy_raw_score", ds.values("padim_raw_score"))
    ds.set_values("legacy_score", ds.values("padim_score"))
    with pytest.warns(UserWarning, match=r"expert\(s\) \['old'\] were fitted on are not recorded"):
        legacy = fav.evaluate(ds, "legacy")
    assert legacy.metrics["num_samples"] == len(ds)
    assert ds.get_run_info("legacy_eval").config.fit_samples_unknown == ["old"]

    # the form: the current view, not a selection left over in the grid; how many it evaluates; a free key
    ctx = ExecutionContext(request_params=dict(dataset_name=ds.name, selected=others[:1], params={"run": "padim"}))
    form = EvaluateAnomalies().resolve_input(ctx).type.properties
    assert form["view_target"].default == "DATASET"
    n, left_out, _ = evaluation_counts(ds, "padim", "ground_truth")
    assert (n, left_out) == (len(ds) - len(train), len(train))
    assert form["eval_target"].view.label == (f"Evaluates {n} samples of the dataset (scored, with ground truth); "
                                              f"leaves out {left_out} that expert 'padim' was fitted on")
    assert form["eval_key"].default == "padim_eval_2" and not form["eval_key"].invalid  # padim_eval is taken
    ctx = ExecutionContext(request_params=dict(dataset_name=ds.name, params={"run": "padim", "eval_key": "padim_eval"}))
    form = EvaluateAnomalies().resolve_input(ctx).type.properties
    assert form["eval_key"].invalid and "overwrite" in form  # replacing an evaluation takes a tick
