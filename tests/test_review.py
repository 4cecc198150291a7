"""Review core (histogram, threshold counts, verdicts, feed-back) and the review panel's handlers, on a real DB."""

from __future__ import annotations

import numpy as np
import pytest

import fiftyone as fo
import fiftyone.operators as foo
from fiftyone.operators.executor import ExecutionContext, Executor

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.calibration import Calibration
from fiftyone_anomaly_vlm.panels.review import NO_GT, ReviewPanel, counts_markdown
from fiftyone_anomaly_vlm.reviewing import default_threshold

PLUGIN = "@anomaly-vlm/anomaly-vlm"


@pytest.fixture
def scored(fitted) -> fo.Dataset:
    fav.score(fitted, expert="padim", device="cpu", batch_size=16)
    return fitted


def _model_fields(ds, key="padim"):
    """Every value of the run's own fields, to check that reviews leave them alone."""
    fields = [f for f in ds.get_field_schema() if f == key or f.startswith(f"{key}_")]
    return {f: [v.to_dict() if hasattr(v, "to_dict") else v for v in ds.values(f)] for f in fields}


def test_scoring_runs_lists_only_scoring_runs(scored):
    assert fav.scoring_runs(scored) == ["padim"]  # not padim_expert
    assert fav.scoring_runs(scored.limit(3)) == ["padim"]


def test_histogram_matches_numpy_and_splits_by_ground_truth(scored):
    ds = scored
    scores = np.array(ds.values("padim_score"), dtype=float)
    hist = fav.score_histogram(ds, "padim", bins=20)
    assert hist["count"] == len(ds) == sum(hist["counts"])
    ref, ref_edges = np.histogram(scores, bins=20, range=(0.0, 1.0))
    assert hist["counts"] == ref.tolist()
    np.testing.assert_allclose(hist["edges"], ref_edges)
    assert hist["bounds"] == pytest.approx((scores.min(), scores.max()))

    split = fav.score_histogram(ds, "padim", bins=20, gt_field="ground_truth")
    gts = np.array(ds.values("ground_truth.label"))
    assert split["series"]["anomalous"] == np.histogram(scores[gts == "anomalous"], 20, (0, 1))[0].tolist()
    assert split["series"]["normal"] == np.histogram(scores[gts == "normal"], 20, (0, 1))[0].tolist()
    assert sum(split["series"]["unlabelled"]) == 0
    # a view: only its samples, and a score exactly on the top edge lands in the last bin (as numpy)
    view = ds.limit(10)
    top = view.first()
    top["padim_score"] = 1.0
    top.save()
    sub = fav.score_histogram(view, "padim", bins=20)
    assert sum(sub["counts"]) == 10 and sub["counts"][-1] >= 1
    assert sub["counts"] == np.histogram(view.values("padim_score"), 20, (0, 1))[0].tolist()


def test_threshold_counts_match_direct_computation(scored):
    ds = scored
    scores = np.array(ds.values("padim_score"), dtype=float)
    pos = np.array(ds.values("ground_truth.label")) == "anomalous"
    for t in (0.0, 0.5, float(np.median(scores)), default_threshold(ds, "padim"), 0.999999):
        c = fav.threshold_counts(ds, "padim", t, gt_field="ground_truth")
        flagged = scores > t
        tp, fp = int((flagged & pos).sum()), int((flagged & ~pos).sum())
        assert (c["above"], c["below"], c["total"]) == (flagged.sum(), (~flagged).sum(), len(ds))
        assert (c["tp"], c["fp"], c["fn"]) == (tp, fp, int(pos.sum()) - tp)
        assert c["precision"] == (pytest.approx(tp / (tp + fp)) if tp + fp else None)
        assert c["recall"] == pytest.approx(tp / pos.sum())
    assert "precision" not in fav.threshold_counts(ds, "padim", 0.5)


def test_flagged_view_sorted_by_score(scored):
    ds = scored
    t = default_threshold(ds, "padim")
    view = fav.flagged_view(ds, "padim", threshold=t)
    vals = view.values("padim_score")
    assert vals == sorted(vals, reverse=True) and all(v > t for v in vals)
    assert len(view) == fav.threshold_counts(ds, "padim", t)["above"]
    labelled = fav.flagged_view(ds, "padim")
    assert set(labelled.values("padim.label")) <= {"anomalous"}
    assert len(labelled) == ds.count_values("padim.label").get("anomalous", 0)


def test_review_writes_review_field_and_tags_only(scored):
    ds = scored
    before = _model_fields(ds)
    view = ds.sort_by("padim_score", reverse=True)
    top, low, odd = view.limit(3), view.skip(3).limit(2), view.skip(5).limit(1)
    assert fav.review(top, "accept", key="padim", user="qa") == 3
    assert fav.review(low, "reject", key="padim", user="qa") == 2
    assert fav.review(odd, "relabel", key="padim", label="scratch") == 1

    for s in top:
        r = s["review"]
        assert r.label == s["padim"].label and r.verdict == "accept" and r.reviewer == "qa"
        assert r.run_key == "padim" and r.timestamp is not None
        assert {"reviewed", "review:accept"} <= set(s.tags)
    for s in low:
        assert s["review"].label != s["padim"].label and s["review"].verdict == "reject"
    s = odd.first()
    assert s["review"].label == "scratch" and s["review"].anomalous is True and s["review"].reviewer
    assert ds.count("review") == 6 and ds.count_sample_tags()["reviewed"] == 6

    # a changed mind replaces the verdict and its tag
    fav.review(odd, "reject", key="padim", user="qa")
    s = odd.first()
    assert "review:relabel" not in s.tags and "review:reject" in s.tags
    assert _model_fields(ds) == before  # padim* fields untouched

    with pytest.raises(ValueError, match="verdict"):
        fav.review(top, "maybe", key="padim")
    with pytest.raises(ValueError, match="label"):
        fav.review(top, "relabel", key="padim")
    with pytest.raises(ValueError, match="belongs to run"):
        fav.review(top, "accept", key="padim", field="padim_score")


def test_reviewed_normals_and_recalibration_recorded(scored):
    ds = scored
    gt = dict(zip(ds.values("id"), ds.values("ground_truth.label")))
    model = dict(zip(ds.values("id"), ds.values("padim.label")))
    # the human agrees with the ground truth on every sample
    agree = [i for i in gt if gt[i] == model[i]]
    disagree = [i for i in gt if gt[i] != model[i]]
    fav.review(ds.select(agree), "accept", key="padim")
    fav.review(ds.select(disagree), "reject", key="padim")
    normals = fav.reviewed_normals(ds)
    assert set(normals.values("id")) == {i for i in gt if gt[i] == "normal"}
    assert fav.reviewed_anomalies(ds).count() == sum(v == "anomalous" for v in gt.values())

    history_before = len(ds.get_run_info("padim").config.threshold_history)
    before = _model_fields(ds)
    fav.recalibrate_from_review(ds, "padim", rule="f1")
    cfg = ds.get_run_info("padim").config
    assert len(cfg.threshold_history) == history_before + 1
    entry = cfg.threshold_history[-1]
    assert entry["rule"] == "f1" and entry["source"] == "review" and entry["gt_field"] == "review"
    assert not [f for f in ds.get_field_schema() if f.startswith("fav_review_gt")]  # scratch field gone
    # the same threshold as set_threshold on the ground truth itself (the reviews equal it here)
    after = _model_fields(ds)
    assert after["padim_score"] == before["padim_score"]
    fav.set_threshold(ds, "padim", rule="f1", gt_field="ground_truth")
    assert ds.get_run_info("padim").config.threshold_history[-1]["image_threshold"] == entry["image_threshold"]


def test_recalibrate_needs_reviewed_anomalies(scored):
    with pytest.raises(ValueError, match="no sample reviewed as anomalous"):
        fav.recalibrate_from_review(scored, "padim")


def test_refit_with_reviewed_normals(scored):
    ds = scored
    cfg = ds.get_run_info("padim_expert").config
    extra = ds.match_tags("train", bool=False).match(fo.ViewField("ground_truth.label") == "normal").limit(2)
    fav.review(extra, "relabel", key="padim", label="normal")
    expert = fav.refit_with_reviewed(ds, "padim", device="cpu")
    new = ds.get_run_info(expert.run_key).config
    assert expert.key == "padim_reviewed"
    assert new.num_train + new.num_holdout == cfg.num_train + cfg.num_holdout + 2
    state = ds.load_run_results(expert.run_key)
    assert set(extra.values("id")) <= set(state.train_ids) | set(state.holdout_ids)
    assert new.model == cfg.model and new.image_size == cfg.image_size


# ---- operator -------------------------------------------------------------------------------------------------
def test_review_operator_executes(scored):
    ds = scored
    ids = ds.sort_by("padim_score", reverse=True).limit(2).values("id")
    result = foo.execute_operator(f"{PLUGIN}/review_anomalies", ctx=dict(
        dataset=ds, selected=ids, params=dict(key="padim", verdict="relabel", label="pit")))
    result.raise_exceptions()
    assert result.result == {"reviewed": 2}
    assert ds.select(ids).values("review.label") == ["pit", "pit"]


# ---- panel ----------------------------------------------------------------------------------------------------
def _panel_ctx(ds, state, selected=None, **params):
    """A real ExecutionContext as the App sends it to a panel method; triggered operations are recorded."""
    executor = Executor()
    request = dict(dataset_name=ds.name, selected=selected or [],
                   params=dict(panel_id="panel-1", panel_state=state, **params))
    return ExecutionContext(request_params=request, executor=executor), executor


def _triggered(executor):
    return [(r.operator_uri, r.params) for r in executor._requests]


def test_panel_handlers_drive_the_core(scored):
    ds = scored
    panel = ReviewPanel()
    assert panel.config.name == "anomaly_review" and panel.config.surfaces == "grid"
    state: dict = {}

    ctx, ex = _panel_ctx(ds, state)
    panel.on_load(ctx)
    assert state["run"] == "padim" and state["gt_field"] == "ground_truth" and state["runs"] == ["padim"]
    assert state["threshold"] == pytest.approx(default_threshold(ds, "padim"))
    assert state["counts"] == fav.threshold_counts(ds, "padim", state["threshold"], gt_field="ground_truth")
    data = [p for uri, p in _triggered(ex) if uri == "patch_panel_data"]
    traces = data[-1]["data"]["histogram"]
    assert {t["name"] for t in traces} == {"anomalous", "normal", "unlabelled"}
    assert sum(sum(t["y"]) for t in traces) == len(ds)
    # render reads state only and lays out the plot, the slider and the buttons
    form = panel.render(ctx).type.properties
    assert {"controls", "histogram", "threshold", "counts_text", "actions"} <= set(form)
    buttons = set(form["actions"].type.properties) | set(form["threshold_actions"].type.properties)
    assert {"show_flagged", "accept", "reject", "relabel", "recalibrate"} <= buttons
    assert "precision" in counts_markdown(state["counts"])

    ctx, _ = _panel_ctx(ds, state, value=0.5)
    panel.on_change_threshold(ctx)
    assert state["threshold"] == 0.5 and state["counts"]["above"] == len(fav.flagged_view(ds, "padim", 0.5))
    ctx, _ = _panel_ctx(ds, state, value=NO_GT)
    panel.on_change_gt(ctx)
    assert "precision" not in state["counts"]

    ctx, ex = _panel_ctx(ds, state)
    panel.show_flagged(ctx)
    ops = dict(_triggered(ex))
    assert "set_view" in ops and ops["set_active_fields"]["fields"][:2] == ["padim", "padim_map"]
    view = fo.DatasetView._build(ds, ops["set_view"]["view"])
    assert view.values("padim_score") == fav.flagged_view(ds, "padim", 0.5).values("padim_score")

    ctx, ex = _panel_ctx(ds, state, range=[0.9, 1.0])
    panel.on_histogram_click(ctx)
    assert "set_view" in dict(_triggered(ex))

    # accept / relabel the selection; nothing selected -> a warning, nothing written
    ids = view.limit(2).values("id")
    ctx, ex = _panel_ctx(ds, state, selected=ids)
    panel.accept(ctx)
    assert ds.select(ids).values("review.verdict") == ["accept", "accept"]
    state["actions"] = {"relabel_label": "stain"}  # the App sends the input under its stack (the Relabel bug)
    ctx, _ = _panel_ctx(ds, state, selected=ids[:1])
    panel.relabel(ctx)
    assert ds[ids[0]]["review"].label == "stain"
    ctx, ex = _panel_ctx(ds, state)
    panel.reject(ctx)
    assert dict(_triggered(ex))["notify"]["variant"] == "warning" and ds.count("review") == 2

    # recalibrate from the reviews: a new threshold on the run, shown in the panel
    n_hist = len(ds.get_run_info("padim").config.threshold_history)
    ctx, _ = _panel_ctx(ds, state)
    panel.recalibrate(ctx)
    cfg = ds.get_run_info("padim").config
    assert len(cfg.threshold_history) == n_hist + 1
    assert state["threshold"] == pytest.approx(cfg.normalized_image_threshold)


def test_panel_without_runs_says_what_to_do(parts):
    state: dict = {}
    ctx, _ = _panel_ctx(parts, state)
    ReviewPanel().on_load(ctx)
    assert state["run"] is None
    form = ReviewPanel().render(ctx).type.properties
    assert "empty" in form and "histogram" not in form


@pytest.mark.parametrize("value", [0.0, 1e-6, 0.01, 0.3, 0.5, 0.777, 0.999, 1.0])
def test_apply_threshold_inverts_the_calibrated_scale(value):
    rng = np.random.default_rng(0)
    cal = Calibration.from_normals(rng.normal(10, 2, 60), rng.normal(5, 1, 60), rng.normal(1, 0.5, 500))
    raw = cal.raw_from_normalized(value)  # -inf at 0 (every raw score is above), +inf at 1
    samples = rng.normal(10, 6, 5000)
    if 0 < value < 1:  # the boundary itself (at 0 and 1 no raw score has that calibrated score)
        samples = np.concatenate([samples, [raw, np.nextafter(raw, np.inf)]])
    # a raw score is above the raw threshold exactly when its calibrated score is above the slider's value
    assert ((samples > raw) == (cal.normalize_scores(samples) > value)).all()


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    from tiny_vlms import build_qwen2_vl

    from fiftyone_anomaly_vlm.models.judge import make_backend

    path = build_qwen2_vl(str(tmp_path_factory.mktemp("tiny-qwen2-vl")))
    return make_backend("transformers", model=path, device="cpu", max_pixels=56 * 56, batch_size=8)


def test_judge_runs_and_fused_scores_are_reviewable_and_evaluable(scored, tiny_judge):
    ds = scored
    label = fo.ViewField("ground_truth.label")
    unseen = ds.match_tags("train", bool=False)  # evaluate leaves the expert's own samples out
    ids = (unseen.match(label == "anomalous").limit(5).values("id")
           + unseen.match(label == "normal").limit(5).values("id"))
    view = ds.select(ids, ordered=True)
    fav.judge(view, key="vlm", backend=tiny_judge, expert="padim", crops=2, max_new_tokens=4, batch_size=5)
    assert fav.scoring_runs(ds) == ["padim", "vlm", "vlm_fused"]

    target = fav.review_target(ds, "vlm")
    assert (target.kind, target.score, target.label, target.threshold) == ("vlm", "vlm_p_anomalous", "vlm", 0.5)
    # "Show flagged" on the judge run shows its verdict, defect, location, explanation, regions and the heatmap
    assert {"vlm", "vlm_defect", "vlm_location", "vlm_explanation", "vlm_regions", "padim_map"} <= set(
        fav.run_fields(ds, "vlm"))
    # ... and on the expert run, the VLM's fields next to the heatmap
    assert {"padim", "padim_map", "vlm", "vlm_explanation"} <= set(fav.run_fields(ds, "padim"))

    p = np.array(view.values("vlm_p_anomalous"), dtype=float)
    hist = fav.score_histogram(ds, "vlm", bins=10, gt_field="ground_truth")
    assert hist["field"] == "vlm_p_anomalous" and hist["count"] == 10
    assert hist["counts"] == np.histogram(p, 10, (0, 1))[0].tolist()
    counts = fav.threshold_counts(ds, "vlm", 0.5)
    assert counts["total"] == 10 and counts["above"] == int((p > 0.5).sum())
    fused = np.array(view.values("vlm_fused"), dtype=float)
    assert fav.threshold_counts(ds, "vlm_fused", 0.5)["above"] == int((fused > 0.5).sum())
    flagged = fav.flagged_view(ds, "vlm_fused")
    assert flagged.values("vlm_fused") == sorted(fused[fused > 0.5].tolist(), reverse=True)

    # reviews of a judge run: accept copies the VLM's label (unparsed answers are skipped); never touches its fields
    before = _model_fields(ds, "vlm")
    labels = dict(zip(*view.values(["id", "vlm.label"])))
    n = fav.review(view, "accept", key="vlm", user="qa")
    assert n == sum(v in ("anomalous", "normal") for v in labels.values())
    for s in view.exists("review"):
        assert s.review.label == labels[s.id] and s.review.run_key == "vlm"
    assert _model_fields(ds, "vlm") == before
    with pytest.raises(ValueError, match="belongs to run"):
        fav.review(view, "accept", key="vlm_fused", field="vlm_explanation")

    # recalibrating the fused score from human verdicts: recorded on the judge run, used by the review functions
    ids, gt = view.values(["id", "ground_truth.label"])
    for sid, g in zip(ids, gt):
        fav.review(ds.select(sid), "relabel", key="vlm_fused", label=g)
    thr = fav.recalibrate_from_review(ds, "vlm_fused", rule="recall", param=1.0)
    assert thr < min(f for f, g in zip(view.values("vlm_fused"), gt) if g == "anomalous")
    cfg = ds.get_run_info("vlm").config
    assert cfg.review_thresholds == {"vlm_fused": thr} and cfg.threshold_history[-1]["source"] == "review"
    assert default_threshold(ds, "vlm_fused") == thr
    assert fav.flagged_view(ds, "vlm_fused").count() == int((fused > thr).sum())
    assert _model_fields(ds, "vlm") == before

    with pytest.raises(ValueError, match="not a scoring run"):
        fav.review_target(ds, "nope")

    # evaluation of the VLM's P(anomalous) (verdict metrics leave unparsed answers out) and of the fused score
    from sklearn.metrics import roc_auc_score

    y = np.array([g == "anomalous" for g in gt])
    assert y.sum() == 5
    res = fav.evaluate(view, "vlm", "ground_truth")
    assert res.metrics["auroc"] == pytest.approx(roc_auc_score(y, view.values("vlm_p_anomalous")), abs=1e-6)
    verdicts = view.values("vlm.label")
    assert res.metrics["num_unlabelled"] == sum(v not in ("anomalous", "normal") for v in verdicts)
    assert ds.get_run_info("vlm_eval").config.score_field == "vlm_p_anomalous"
    res = fav.evaluate(view, "vlm_fused", "ground_truth")
    # rank-fused scores tie where their rank sums tie; float64 noise (1e-16) must not break those ties
    fused = np.round(np.array(view.values("vlm_fused")), 9)
    assert res.metrics["auroc"] == pytest.approx(roc_auc_score(y, fused), abs=1e-6)
    with pytest.raises(ValueError, match="heatmap"):
        fav.evaluate(view, "vlm", "ground_truth", gt_mask_field="ground_truth_mask", eval_key="vlm_px")


@pytest.mark.parametrize("bins", [7, 20, 40])
def test_histogram_puts_values_on_bin_edges_where_numpy_does(bins):
    from fiftyone_anomaly_vlm.runs import AnomalyScoreRunConfig

    edges = np.linspace(0, 1, bins + 1)
    rng = np.random.default_rng(bins)
    # every edge, values one ulp either side of each edge, 0, 1 and random values; one sample unscored
    values = np.concatenate([edges, np.nextafter(edges, 2)[:-1], np.nextafter(edges, -1)[1:], rng.random(50),
                             np.arange(0, 1.0001, 0.05), [1 / 3, 2 / 3]])
    ds = fo.Dataset()
    ds.add_samples([fo.Sample(filepath=f"/none/{i}.png") for i in range(len(values) + 1)])
    ds.set_values("h_score", values.tolist() + [None])
    gt = ["anomalous" if i % 3 == 0 else ("normal" if i % 3 == 1 else None) for i in range(len(values) + 1)]
    ds.set_values("gt", [fo.Classification(label=g) if g else None for g in gt])
    ds.register_run("h", AnomalyScoreRunConfig(normalized_image_threshold=0.5))
    try:
        hist = fav.score_histogram(ds, "h", bins=bins, gt_field="gt")
        assert hist["count"] == len(values)
        ref, ref_edges = np.histogram(values, bins=bins, range=(0, 1))
        assert hist["counts"] == ref.tolist() and hist["edges"] == ref_edges.tolist()
        labels = np.array(gt[:-1], dtype=object)
        assert hist["series"]["anomalous"] == np.histogram(values[labels == "anomalous"], bins, (0, 1))[0].tolist()
        assert hist["series"]["normal"] == np.histogram(values[labels == "normal"], bins, (0, 1))[0].tolist()
        assert hist["series"]["unlabelled"] == np.histogram(values[labels == None], bins, (0, 1))[0].tolist()  # noqa: E711
    finally:
        ds.delete()
