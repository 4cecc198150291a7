"""What a reserved key, a non-finite threshold or a non-finite image must never do to a dataset."""

from __future__ import annotations

import pytest

import fiftyone_anomaly_vlm as fav

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
