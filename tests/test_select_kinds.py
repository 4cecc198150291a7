"""Ranking on the synthetic kinds the user expects (``select_experts(synthetic_kinds=...)``, issue #22).

A user who knows the line's defects are local (cracks, specks) ranks the candidates on the local synthetic kinds
only: the validation set holds those kinds alone, each option's shortfall is taken over them, the record and the
texts say so, and a bad kind name fails before any fit. A tiny generated texture set (48 px).
"""

from __future__ import annotations

import pytest

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.experts.synthetic import GLOBAL_KINDS, KINDS, LOCAL_KINDS, resolve_kinds
from test_select_experts import SIZE, TEXTURE, textures  # noqa: F401 - the module's own copy of the fixture

COMMON = dict(image_size=SIZE, device="cpu", budget_s=3600, selection_share=0.4)


def test_local_kinds_only_rank_the_options_and_are_recorded(textures):
    ds = textures
    fav.select_experts(ds.match_tags("good"), candidates=[TEXTURE, "padim"], key="loc", synthetic_kinds="local",
                       **COMMON)
    sel = fav.selection_table(ds, "loc")
    assert sel["synthetic_kinds"] == list(LOCAL_KINDS) and set(sel["generators"]) == set(LOCAL_KINDS)
    assert sel["num_anomalous"] == len(LOCAL_KINDS) * sel["num_normal"]  # one of each local kind per good image
    rows = [r for r in sel["candidates"] if r["status"] == "fitted"]
    assert len(rows) == 2
    for r in rows:
        assert set(r["per_kind"]) == set(LOCAL_KINDS) and "global_auroc" not in r
        assert r["objective"] == pytest.approx(r["local_auroc"])
    # every option's shortfall is taken over the local kinds only, against each kind's best single candidate
    best = {k: max(r["per_kind"][k] for r in rows) for k in LOCAL_KINDS}
    for t in sel["ensembles"]:
        assert t["shortfall"] == pytest.approx(max(best[k] - t["per_kind"][k] for k in LOCAL_KINDS))
    assert sel["objective"].endswith("the mean AUROC of the local (perlin, cutpaste, spot, scratch) kinds")
    text = fav.format_selection(ds, "loc")
    assert "synthetic anomalies of the kinds perlin, cutpaste, spot, scratch only (" in text
    assert " global " not in text and "colour" not in text
    table = fav.selection_markdown(ds, "loc")  # the App's form: the global column empty
    assert "| - |" in table and "of the kinds perlin, cutpaste, spot, scratch only" in table


def test_kind_names_resolve_and_bad_ones_fail_before_any_fit(textures):
    assert resolve_kinds("all") == resolve_kinds(None) == KINDS
    assert resolve_kinds("global") == GLOBAL_KINDS
    assert resolve_kinds(["colour", "local", "spot"]) == LOCAL_KINDS + ("colour",)  # KINDS order, no repeats
    ds = textures
    with pytest.raises(ValueError, match="unknown synthetic anomaly kind 'dents'; name 'all', 'local', 'global'"):
        fav.select_experts(ds.match_tags("good"), candidates=[TEXTURE], key="bad", synthetic_kinds=["spot", "dents"],
                           **COMMON)
    with pytest.raises(ValueError, match="synthetic_kinds names no kind"):
        fav.select_experts(ds.match_tags("good"), candidates=[TEXTURE], key="bad", synthetic_kinds=[], **COMMON)
    assert not [k for k in ds.list_runs() if k.startswith("bad")]
