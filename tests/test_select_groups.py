"""Choosing experts per product group (``select_experts(group_by=...)``, issue #22).

Every candidate is fitted one expert per group, each validation image (and each synthetic anomaly made from it)
is scored by its own group's expert, exactly as scoring does later; the chosen expert is an ensemble of per-group
candidates that scores, reloads and deletes with everything it owns; a bad ``group_by`` and labelled validation
samples of a group nobody trained on fail before any fit. A tiny generated texture set (48 px) in two "stations"
whose good images differ in brightness, so a station's expert scores the other station's images as anomalies.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fiftyone as fo
from fiftyone import ViewField as F

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.datasets import make_texture_dataset
from fiftyone_anomaly_vlm.experts import select as select_module
from fiftyone_anomaly_vlm.experts.synthetic import KINDS

SIZE = 48
COMMON = dict(image_size=SIZE, device="cpu", budget_s=3600)
TEXTURE = {"name": "texture", "model": "texturestats", "model_kwargs": {"layers": ["blocks.2", "blocks.4"]}}
SEEN: dict = {}


@pytest.fixture(scope="module")
def stations():
    """28 good (14 train) and 6 per defect kind; every other sample is "dark" (station b)."""
    ds = make_texture_dataset("fav-select-groups", num_normal=28, num_per_defect=6, size=SIZE, seed=2)
    from PIL import Image

    for i, sample in enumerate(ds.iter_samples(autosave=True)):
        sample["station"] = "b" if i % 2 else "a"
        if i % 2:  # station b's camera sees everything darker
            img = np.asarray(Image.open(sample.filepath).convert("RGB"), dtype=np.float32)
            Image.fromarray((img * 0.45).astype(np.uint8)).save(sample.filepath)
    yield ds
    fo.delete_dataset(ds.name)


@pytest.fixture(scope="module")
def selected(stations):
    """select_experts(group_by="station") on synthetic anomalies, keeping what it ranked on."""
    ds = stations
    rank, validation = select_module.rank_options, select_module.validation_set

    def keep_ranked(rows, columns, standardised, *args):
        SEEN.update(columns=dict(columns))
        return rank(rows, columns, standardised, *args)

    def keep_validation(*args, **kwargs):
        SEEN["val"], fit_view = validation(*args, **kwargs)
        return SEEN["val"], fit_view

    select_module.rank_options, select_module.validation_set = keep_ranked, keep_validation
    try:
        fav.select_experts(ds.match_tags("good"), candidates=[TEXTURE, "padim"], key="grp", group_by="station",
                           selection_share=0.4, keep_candidates=True, **COMMON)
    finally:
        select_module.rank_options, select_module.validation_set = rank, validation
    return ds


def test_each_validation_image_is_scored_by_its_groups_expert(selected):
    ds, val = selected, SEEN["val"]
    n_normal = int((val.labels == 0).sum())
    by_id = dict(zip(*ds.values(["id", "station"])))
    assert val.groups[:n_normal] == [by_id[i] for i in val.normal_ids]  # the good images' own stations
    # a synthetic anomaly belongs to its good image's group (len(KINDS) anomalies per good image, in its order)
    assert val.groups[n_normal:] == [g for g in val.groups[:n_normal] for _ in KINDS]
    assert set(val.groups) == {"a", "b"}
    for name in ("texture", f"padim_{SIZE}"):
        config = ds.get_run_info(f"grp__{name}_expert").config
        assert config.group_field == "station" and set(config.members) == {"a", "b"}
        # what selection ranked = what scoring the same good images with the candidate gives (routed by station)
        normals = ds.select(val.normal_ids, ordered=True)
        fav.score(normals, expert=f"grp__{name}", progress=False)
        scored = np.array(normals.values(f"grp_{name}_score"))  # scored under the name without "__"
        np.testing.assert_allclose(SEEN["columns"][name][:n_normal], scored, rtol=1e-4, atol=1e-5)
    # routed to the other station's expert, a dark good image is far from normal: routing matters here (raw
    # distances: calibrated shares of a few held-out normals saturate near 1)
    dark = [i for i, g in enumerate(val.groups[:n_normal]) if g == "b"]
    x = torch.stack([val.images[i].float() for i in dark])
    own, other = (fav.load_expert(ds, f"grp__texture__{g}").load(device="cpu").predict(x).raw_score.numpy()
                  for g in ("b", "a"))
    # image by image, not min-vs-max: one of station b's own good images can sit as far out as a typical dark
    # image under station a's expert (CI: 1,211 own vs 965 other), the pairing is what routing decides
    assert (other > own).mean() >= 0.75 and np.median(other) > 1.3 * np.median(own)


def test_group_selection_records_scores_and_deletes_what_it_owns(selected):
    ds = selected
    sel = fav.selection_table(ds, "grp")
    assert sel["group_by"] == "station" and sel["validation"] == "synthetic"
    assert sel["num_calibration_normals"] > 0 and "candidates fitted one per station" in fav.format_selection(ds, "grp")
    assert "candidates fitted one per station" in fav.selection_markdown(ds, "grp")
    members = [f"grp__{m}" for m in sel["chosen"]["members"]]
    config = ds.get_run_info("grp_expert").config
    assert config.members == {"*": members} and config.group_field is None and config.owned_members == members
    # scores a test view like any expert (each sample through its station's members)
    test = ds.match_tags("train", bool=False)
    fav.score(test, expert="grp", progress=False)
    scores, labels, kinds = test.values(["grp_score", "ground_truth.label", "defect_type"])
    normal = np.array([lab == "normal" for lab in labels])
    colour = normal | np.array([k == "colour" for k in kinds])
    assert None not in scores and fav.load_expert(ds, "grp").options["members"] == {"*": members}
    assert np.mean(np.array(scores)[colour][~normal[colour]]) > np.mean(np.array(scores)[normal])
    # deleting the choice deletes its per-group candidates and their groups' experts; kept candidates stay
    ds.delete_run("grp_expert")
    kept = [f"grp__{n}" for n in ("texture", f"padim_{SIZE}") if f"grp__{n}" not in members]
    assert set(fav.list_experts(ds)) == {f"{k}{g}" for k in kept for g in ("", "__a", "__b")}
    for k in kept:
        ds.delete_run(f"{k}_expert")
    assert fav.list_experts(ds) == []


def test_bad_group_inputs_fail_before_any_fit(stations):
    ds = stations
    train = ds.match_tags("train")
    with pytest.raises(ValueError, match="group_by 'nope' is not a field"):
        fav.select_experts(train, candidates=[TEXTURE], key="bad", group_by="nope", **COMMON)
    val = ds.match_tags("train", bool=False)
    ids = val.match(F("ground_truth.label") == "anomalous").limit(1).values("id")
    ds.select(ids).set_values("station", ["c"])
    try:
        with pytest.raises(ValueError, match="station = c have no training sample of their group"):
            fav.select_experts(train, val, candidates=[TEXTURE], key="bad", group_by="station", **COMMON)
    finally:
        ds.select(ids).set_values("station", ["a"])
    assert not [k for k in ds.list_runs() if k.startswith("bad")]
