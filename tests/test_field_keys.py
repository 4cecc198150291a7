"""Field names never contain "__" (a selection candidate ``auto__padim``, a group member ``pv__a``).

FiftyOne cannot reload the samples of a dataset that has a field named with "__" (mongoengine reads it as a path):
``sample.reload()``, and every ``set_values`` while a ``Sample`` of the dataset is in memory, then fail with
``LookUpError``. Scoring such an expert therefore writes under its name with the underscores collapsed, a key with
"__" is refused before anything is written, and a scoring run an earlier release recorded under such a key still
resumes and deletes.
"""

from __future__ import annotations

import pytest

import fiftyone_anomaly_vlm as fav
from conftest import FIT_KWARGS

SCORE_KW = dict(device="cpu", batch_size=16, num_workers=0, progress=False)


def test_scoring_an_expert_named_with_double_underscores_keeps_samples_reloadable(parts):
    fav.fit_expert(parts.match_tags("train"), key="sel__padim", **FIT_KWARGS)
    held = parts.first()  # a notebook's sample, alive while the dataset is written
    res = fav.score(parts, expert="sel__padim", **SCORE_KW)
    assert res.key == "sel_padim" and res.num_scored == len(parts)
    assert not [f for f in parts.get_field_schema() if "__" in f]
    assert None not in parts.values("sel_padim_score")
    parts.set_values("note", ["checked"] * len(parts))  # LookUpError here when a field is named sel__padim_score
    held.reload()
    assert held["note"] == "checked" and held["sel_padim_score"] is not None
    del held

    with pytest.raises(ValueError, match="would name sample fields with '__'.*use 'sel_x'"):
        fav.score(parts, expert="sel__padim", key="sel__x", **SCORE_KW)
    assert "sel__x" not in parts.list_runs() and not [f for f in parts.get_field_schema() if "__" in f]


def test_a_run_recorded_under_double_underscores_still_resumes_and_deletes(parts):
    """An earlier release scored expert ``sel__padim`` under its own name: that run and its fields stay usable."""
    fav.fit_expert(parts.match_tags("train"), key="sel__padim", **FIT_KWARGS)
    fav.score(parts, expert="sel__padim", **SCORE_KW)
    parts.rename_run("sel_padim", "sel__padim")  # what the earlier release left in the database
    for field in [f for f in parts.get_field_schema() if f.startswith("sel_padim")]:
        parts.rename_sample_field(field, field.replace("sel_padim", "sel__padim", 1))
    res = fav.score(parts, expert="sel__padim", key="sel__padim", **SCORE_KW)  # resumes: nothing left to do
    assert res.num_scored == 0 and res.num_skipped == len(parts)
    fav.evaluate(parts, "sel__padim")  # its evaluation writes under sel_padim_eval
    assert "sel_padim_eval" in parts.list_runs() and "sel_padim_eval" in parts.get_field_schema()
    parts.delete_run("sel_padim_eval")
    parts.delete_run("sel__padim")
    assert not [f for f in parts.get_field_schema() if f.startswith("sel_")]
