"""A fixed colour scale for the heatmaps: every scoring run gives its ``<key>_map`` field a named colorscale in
the dataset's App config (so the App draws it the same in every session, whatever field colour it picks),
keeps the rest of the user's colour scheme, and ``delete_run`` takes the entry away with the field."""

from __future__ import annotations

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.fields import HEATMAP_COLORSCALE


def _scales(name: str) -> dict[str, str]:
    scheme = fo.load_dataset(name).app_config.color_scheme  # as stored, as a new App session reads it
    return {entry["path"]: entry.get("name") for entry in (scheme.colorscales or [])} if scheme else {}


def test_score_fixes_the_heatmap_colorscale_and_keeps_the_users_scheme(fitted):
    ds = fitted
    assert ds.app_config.color_scheme is None
    fav.score(ds.match_tags("train", bool=False), expert="padim", key="first", device="cpu")
    assert _scales(ds.name) == {"first_map": HEATMAP_COLORSCALE}  # a scheme is created for it

    ds.app_config.color_scheme = fo.ColorScheme(color_by="value", opacity=0.4,
                                                colorscales=[{"path": "my_heatmap", "name": "hsv"}])
    ds.save()
    fav.score(ds, expert="padim", device="cpu")
    assert _scales(ds.name) == {"my_heatmap": "hsv", "padim_map": HEATMAP_COLORSCALE}
    scheme = fo.load_dataset(ds.name).app_config.color_scheme
    assert scheme.color_by == "value" and scheme.opacity == 0.4  # the user's other settings survive
    # one range for every heatmap of the run, so a colour means the same value on every sample
    ranges = {tuple(r) for r in ds.values("padim_map.range")}
    assert len(ranges) == 1 and ranges.pop()[1] > 0

    # a colorscale the user picked for the run's field is theirs: a new run into the field keeps it
    ds.app_config.color_scheme.colorscales = [{"path": "my_heatmap", "name": "hsv"},
                                             {"path": "padim_map", "name": "jet"}]
    ds.save()
    fav.score(ds, expert="padim", device="cpu", overwrite=True)
    assert _scales(ds.name) == {"my_heatmap": "hsv", "padim_map": "jet"}

    ds.delete_run("padim")  # the field goes, and its colorscale with it
    assert _scales(ds.name) == {"my_heatmap": "hsv"}
