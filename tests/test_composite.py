"""Composite experts: one expert per group (fit_expert(group_by=...)) and ensembles of experts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIT_KWARGS

import fiftyone as fo
from fiftyone import ViewField as F

import fiftyone_anomaly_vlm as fav


def _add_variant(ds: fo.Dataset) -> None:
    """Two product variants, alternating over the samples (both in train and test)."""
    ids = ds.values("id")
    ds.set_values("variant", {sid: fo.Classification(label="a" if i % 2 else "b") for i, sid in enumerate(ids)},
                  key_field="id")


def test_grouped_expert_routes_each_sample_to_its_group(parts):
    _add_variant(parts)
    train, test = parts.match_tags("train"), parts.match_tags("train", bool=False)
    spec = fav.fit_expert(train, key="pv", group_by="variant.label", **FIT_KWARGS)
    assert spec.method == "composite_expert"
    assert {"pv__a_expert", "pv__b_expert", "pv_expert"} <= set(parts.list_runs())
    cfg = parts.get_run_info("pv_expert").config
    assert cfg.members == {"a": ["pv__a"], "b": ["pv__b"]} and cfg.group_field == "variant.label"
    # calibrated on the groups' own held-out normals, which no member trained on
    a_cfg = parts.load_run_results("pv__a_expert")  # fitted state (ids, calibration) is in the run's results
    held = parts.load_run_results("pv_expert").holdout_ids
    assert set(a_cfg.holdout_ids) <= set(held) and not set(a_cfg.train_ids) & set(held)
    assert set(parts.select(a_cfg.train_ids).values("variant.label")) == {"a"}

    res = fav.score(test, expert="pv", device="cpu")
    assert res.num_scored == len(test) and res.num_errors == 0
    # within a group the composite ranks samples exactly as that group's expert does alone
    for group in ("a", "b"):
        view = test.match(F("variant.label") == group)
        fav.score(view, expert=f"pv__{group}", device="cpu")
        alone, combined = view.values(f"pv_{group}_raw_score"), view.values("pv_raw_score")  # no "__" in fields
        assert np.array_equal(np.argsort(alone, kind="stable"), np.argsort(combined, kind="stable"))
        # and its raw score is the member's calibrated score
        np.testing.assert_allclose(combined, view.values(f"pv_{group}_score"), atol=1e-6)
    m = fav.image_metrics(test, "pv")
    assert 0.0 <= m["auroc"] <= 1.0
    heat = test.first()["pv_map"]
    assert isinstance(heat, fo.Heatmap) and heat.get_map().shape == (FIT_KWARGS["image_size"],) * 2


def test_grouped_expert_gives_an_error_to_samples_of_unfitted_groups(parts):
    _add_variant(parts)
    fav.fit_expert(parts.match_tags("train"), key="pv", group_by="variant.label", **FIT_KWARGS)
    test = parts.match_tags("train", bool=False)
    odd, none = test.take(2, seed=1).values("id")
    parts.select(odd).set_values("variant", [fo.Classification(label="c")])
    parts.select(none).set_values("variant", [None])
    res = fav.score(test, expert="pv", device="cpu")
    assert res.num_errors == 2 and res.num_scored == len(test) - 2
    assert "no expert for variant.label = 'c'" in parts[odd]["pv_error"]
    assert "no value in field 'variant.label'" in parts[none]["pv_error"]
    assert parts[odd]["pv_score"] is None


def test_grouped_expert_refits_per_group_with_reviewed_normals_and_deletes_its_groups(parts):
    _add_variant(parts)
    fav.fit_expert(parts.match_tags("train"), key="pv", group_by="variant.label", **FIT_KWARGS)
    test = parts.match_tags("train", bool=False)
    fav.score(test, expert="pv", device="cpu")
    extra = test.match(F("ground_truth.label") == "normal").limit(2)
    fav.review(extra, "relabel", key="pv", label="normal")
    new = fav.refit_with_reviewed(parts, "pv", device="cpu")
    cfg = parts.get_run_info(new.run_key).config
    assert new.key == "pv_reviewed" and cfg.group_field == "variant.label"
    for group in ("a", "b"):
        member = parts.load_run_results(f"pv_reviewed__{group}_expert")
        added = extra.match(F("variant.label") == group).values("id")
        assert set(added) <= set(member.train_ids) | set(member.holdout_ids)
        assert set(parts.select(member.train_ids).values("variant.label")) == {group}

    parts.delete_run("pv_expert")
    assert not {"pv_expert", "pv__a_expert", "pv__b_expert"} & set(parts.list_runs())
    assert {"pv_reviewed_expert", "pv_reviewed__a_expert"} <= set(parts.list_runs())


def test_grouped_fit_names_the_group_that_is_too_small_and_rejects_bad_fields(parts):
    train = parts.match_tags("train")
    first = train.first().id
    parts.set_values("variant", {sid: ("rare" if sid == first else "common") for sid in train.values("id")},
                     key_field="id")
    with pytest.raises(ValueError, match="group variant = 'rare'"):
        fav.fit_expert(train, key="pv", group_by="variant", **FIT_KWARGS)
    with pytest.raises(ValueError, match="no_such_field"):
        fav.fit_expert(train, key="pv2", group_by="no_such_field", **FIT_KWARGS)


def test_ensemble_score_is_the_mean_of_the_members_calibrated_scores(parts):
    _add_variant(parts)
    train, test = parts.match_tags("train"), parts.match_tags("train", bool=False)
    fav.fit_expert(train, key="padim", **FIT_KWARGS)
    fav.fit_expert(train, key="pv", group_by="variant.label", **FIT_KWARGS)  # a composite as a member
    kw = dict(FIT_KWARGS, model="patchcore", model_kwargs={"layers": ["layer2"], "coreset_sampling_ratio": 0.5})
    fav.fit_expert(train, key="patchcore", **kw)
    spec = fav.ensemble_experts(parts, ["padim", "pv", "patchcore"], key="ens", device="cpu")
    cfg = parts.get_run_info("ens_expert").config
    assert cfg.members == {"*": ["padim", "pv", "patchcore"]} and cfg.num_holdout > 0
    held = {m: set(parts.load_run_results(f"{m}_expert").holdout_ids) for m in ("padim", "pv", "patchcore")}
    assert held["padim"] == held["patchcore"]  # same view, same seed: the same held-out samples
    # a group's fit holds out at least one sample even when none hashes below `holdout`, so the grouped
    # member may hold out a few more; the ensemble calibrates on what no member trained on
    assert held["padim"] <= held["pv"] and set(parts.load_run_results("ens_expert").holdout_ids) == \
        held["padim"] & held["pv"]

    fav.score(test, expert=spec, device="cpu")
    for member in ("padim", "pv", "patchcore"):
        fav.score(test, expert=member, device="cpu")
    mean = np.mean([test.values(f"{m}_score") for m in ("padim", "pv", "patchcore")], axis=0)
    np.testing.assert_allclose(test.values("ens_raw_score"), mean, atol=1e-6)
    s = np.array(test.values("ens_score"))
    assert np.all((s > 0) & (s < 1))
    # the ensemble is calibrated on its own normals: about 1 % of them above the threshold
    assert parts.load_run_results("ens_expert").calibration["rule"] == "far"

    # combine="max": the highest member calibrated score (one member's alarm is not averaged away), recorded,
    # reloaded in this process from the record, and shown in the expert's kind
    fav.ensemble_experts(parts, ["padim", "pv", "patchcore"], key="ens_max", combine="max", device="cpu")
    assert parts.get_run_info("ens_max_expert").config.combine.startswith("max of")
    assert fav.load_expert(parts, "ens_max").model.startswith("max-ensemble of")
    fav.score(test, expert="ens_max", device="cpu")
    highest = np.max([test.values(f"{m}_score") for m in ("padim", "pv", "patchcore")], axis=0)
    np.testing.assert_allclose(test.values("ens_max_raw_score"), highest, atol=1e-6)
    assert not np.allclose(highest, mean, atol=1e-3)
    with pytest.raises(ValueError, match="combine must be one of"):
        fav.ensemble_experts(parts, ["padim", "pv"], key="ens_bad", combine="median")

    # combine="weighted": the weighted sum of each member's standardised score, (raw - median) / std of its
    # calibration normals (how far beyond normal, which the calibrated share compresses)
    weights = [1.0, 0.5, 0.25]
    fav.ensemble_experts(parts, ["padim", "pv", "patchcore"], key="ens_w", combine="weighted", weights=weights,
                         device="cpu")
    assert parts.get_run_info("ens_w_expert").config.weights == weights
    fav.score(test, expert="ens_w", device="cpu")
    expected = 0.0
    for w, m in zip(weights, ("padim", "pv", "patchcore")):
        normals = np.array(parts.load_run_results(f"{m}_expert").calibration["image_scores"])
        scale = normals.std() or abs(normals.max()) * 0.1 or 1.0  # one held-out normal: no spread to divide by
        expected = expected + w * (np.array(test.values(f"{m}_raw_score")) - np.median(normals)) / scale
    np.testing.assert_allclose(test.values("ens_w_raw_score"), expected, rtol=1e-5, atol=1e-5)
    for bad in (None, [1.0, 0.5], [1.0, 0.0, 1.0]):
        with pytest.raises(ValueError, match="one positive weight per member"):
            fav.ensemble_experts(parts, ["padim", "pv", "patchcore"], key="ens_bad", combine="weighted", weights=bad)


def test_ensemble_needs_shared_holdouts_or_calibration_samples(parts):
    train = parts.match_tags("train")
    half = train.take(len(train) // 2, seed=0)
    other = train.exclude(half.values("id"))
    fav.fit_expert(half, key="p1", **FIT_KWARGS)
    fav.fit_expert(other, key="p2", **FIT_KWARGS)
    with pytest.raises(ValueError, match="share no held-out"):
        fav.ensemble_experts(parts, ["p1", "p2"], key="ens", device="cpu")
    with pytest.raises(ValueError, match="two or more"):
        fav.ensemble_experts(parts, ["p1", "p1"], key="ens", device="cpu")
    with pytest.raises(ValueError, match="no expert named 'nope'"):
        fav.ensemble_experts(parts, ["p1", "nope"], key="ens", device="cpu")
    normals = parts.match_tags("good").match_tags("train", bool=False)
    spec = fav.ensemble_experts(parts, ["p1", "p2"], key="ens", calibration_samples=normals, device="cpu")
    assert parts.get_run_info("ens_expert").config.num_holdout == len(normals)
    res = fav.score(parts.match_tags("train", bool=False), expert=spec, device="cpu")
    assert res.num_errors == 0
    with pytest.raises(ValueError, match="is an ensemble"):
        fav.refit_with_reviewed(parts, "ens", device="cpu")
    # a member that is gone: a clear error when the ensemble is used
    parts.delete_run("p2_expert")
    with pytest.raises(ValueError, match="no longer exists"):
        fav.score(parts, expert="ens", key="ens2", device="cpu")


def test_refit_under_the_same_key_deletes_the_old_groups_experts(parts):
    _add_variant(parts)
    train = parts.match_tags("train")
    fav.fit_expert(train, key="pv", group_by="variant.label", **FIT_KWARGS)
    parts.set_values("line", [fo.Classification(label="north")] * len(parts))
    fav.fit_expert(train, key="pv", group_by="line.label", overwrite=True, **FIT_KWARGS)
    runs = set(parts.list_runs())
    assert {"pv_expert", "pv__north_expert"} <= runs and not {"pv__a_expert", "pv__b_expert"} & runs
    fav.fit_expert(train, key="pv", overwrite=True, **FIT_KWARGS)  # one expert for all: no members left
    assert not [r for r in parts.list_runs() if r.startswith("pv__")]
    assert fav.score(parts.match_tags("train", bool=False), expert="pv", device="cpu").num_errors == 0
