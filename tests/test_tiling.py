"""Tiled experts (issue #18): stitching, tile settings, tiled fit and score, maps at the image's resolution,
bad inputs and EXIF-rotated JPEGs."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.datasets import make_parts_dataset
from fiftyone_anomaly_vlm.images import load_image
from fiftyone_anomaly_vlm.models.tiling import MAX_TILE_SIZE, check_tile_settings, stitch, tile_boxes
from fiftyone_anomaly_vlm.native import MAP_MAX_SIDE
from test_panel_browser import (_click, _input_after_label, _notification, _text, _wait, browser,  # noqa: F401
                                open_operator_form, served_app, set_view)

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # the browser test skips, saying why (test_panel_browser.browser)
    pass

KW = dict(model="padim", pretrained=False, backbone="resnet18", device="cpu", model_kwargs={"layers": ["layer1"], "n_features": 32})
TILE, STRIDE = 64, 32


def _tiles_of(image: torch.Tensor, tile: int, stride: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    return torch.stack([image[y:y + th, x:x + tw] for y, x, th, tw in tile_boxes(h, w, tile, stride)])


def test_stitch_matches_anomalib_tiler_and_rebuilds_a_known_map():
    from anomalib.data.utils.tiler import Tiler

    grid = torch.rand(1, 1, 64 + 3 * 48, 64 + 2 * 48)  # a size anomalib's grid fits exactly
    tiler = Tiler(64, 48)
    tiles = tiler.tile(grid)
    ours = stitch(tiles[:, 0] * 2.0, tuple(grid.shape[-2:]), 64, 48)  # each tile's own map: twice its pixels
    assert torch.allclose(ours, tiler.untile(tiles * 2.0)[0, 0])
    # a size the grid does not fit (last tile aligned with the edge): a known map comes back exactly
    known = torch.zeros(150, 230)
    known[40:44, 200:210] = 1.0  # a small defect near the right edge
    assert torch.equal(stitch(_tiles_of(known, 64, 48), (150, 230), 64, 48), known)
    # overlaps are averaged: tiles that disagree where they overlap give the mean there
    tiles = _tiles_of(torch.zeros(64, 100), 64, 36)  # starts 0 and 36: columns 36-63 covered twice
    tiles[0] += 1.0
    out = stitch(tiles, (64, 100), 64, 36)
    assert out[:, :36].eq(1.0).all() and out[:, 36:64].eq(0.5).all() and out[:, 64:].eq(0.0).all()
    # stitched straight into a smaller output (maps above the size cap): same picture, smaller
    small = stitch(_tiles_of(known, 64, 48), (150, 230), 64, 48, out_size=(75, 115))
    assert small.shape == (75, 115) and np.unravel_index(int(small.argmax()), small.shape)[1] > 95
    # an image smaller than a tile: one padded tile, cut back to the image
    assert tile_boxes(1, 1, 64, 32) == [(0, 0, 1, 1)]
    assert stitch(torch.full((1, 64, 64), 0.25), (1, 1), 64, 32).tolist() == [[0.25]]
    # a model input smaller than the tile (maps 32 px for 64 px tiles): the padding is cut in map pixels too
    half = torch.zeros(1, 32, 32)
    half[0, :20, :25] = 1.0  # the 40x50 image's share of the padded tile; the padding reads 0
    assert stitch(half, (40, 50), 64, 64).eq(1.0).all()


@pytest.mark.parametrize(("tile", "stride", "message"), [
    (0, None, "must be positive"), (-64, 32, "must be positive"), (64, 0, "must be positive"),
    (64, 96, "larger than tile_size"), (MAX_TILE_SIZE + 1, None, f"larger than {MAX_TILE_SIZE}"),
    (64.5, None, "whole number"), (None, 32, "without tile_size"),
])
def test_invalid_tile_settings_fail_at_once(tile, stride, message):
    with pytest.raises(ValueError, match=message):
        check_tile_settings(tile, stride)


def _save(path, arr, **kw):
    Image.fromarray(arr).save(path, **kw)
    return str(path)


@pytest.fixture(scope="module")
def tiled():
    """Tiny parts set with a tiled PaDiM expert (random resnet18 layer1, 64 px tiles every 32 px)."""
    name = f"fav-tiling-{uuid.uuid4().hex[:6]}"
    ds = make_parts_dataset(name, num_normal=9, num_anomalous=2, size=96, seed=5, train_fraction=0.67)
    fav.fit_expert(ds.match_tags("train"), key="tiled", tile_size=TILE, tile_stride=STRIDE, **KW)
    yield ds
    fo.delete_dataset(name)


def test_tiled_fit_records_tiles_and_score_writes_maps_at_image_resolution(tiled, tmp_path):
    ds = tiled
    config = ds.get_run_info("tiled_expert").config
    assert (config.tile_size, config.tile_stride, config.tile_image_score) == (TILE, STRIDE, "map_max")
    assert list(config.image_size) == [TILE, TILE]  # tiles reach the model as they are cut
    # invalid tile settings: one clear message, before anything is written
    runs = ds.list_runs()
    with pytest.raises(ValueError, match="larger than tile_size"):
        fav.fit_expert(ds.match_tags("train"), key="bad", tile_size=64, tile_stride=80, **KW)
    with pytest.raises(ValueError, match="group_by"):
        fav.fit_expert(ds.match_tags("train"), key="bad", tile_size=64, group_by="defect_type", **KW)
    assert ds.list_runs() == runs

    rng = np.random.default_rng(0)
    bad = {  # bad input: each scores or gets its own <key>_error
        "small": _save(tmp_path / "small.png", rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)),  # < a tile
        "one_pixel": _save(tmp_path / "one.png", np.full((1, 1, 3), 128, np.uint8)),
        "strip": _save(tmp_path / "strip.png", rng.integers(0, 255, (4, 3000), dtype=np.uint8)),
        "wide": _save(tmp_path / "wide.png", rng.integers(0, 255, (6, MAP_MAX_SIDE + 100, 3), dtype=np.uint8)),
        "gray16": _save(tmp_path / "gray16.png", rng.integers(0, 65535, (70, 90), dtype=np.uint16)),
        "broken": str(tmp_path / "broken.png"),
    }
    with open(bad["broken"], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    ds.add_samples([fo.Sample(filepath=p, tags=["bad", name]) for name, p in bad.items()])
    result = fav.score(ds, expert="tiled", num_workers=0, batch_size=4)
    assert result.num_scored == len(ds) - 1 and result.num_errors == 1
    broken = ds.match_tags("broken").first()
    assert broken.tiled_error and broken.tiled_score is None
    expected = {"small": (40, 50), "one_pixel": (1, 1), "gray16": (70, 90),  # the image's own size
                "strip": (3, MAP_MAX_SIDE), "wide": (6, MAP_MAX_SIDE)}  # capped at MAP_MAX_SIDE on the long side
    for name, shape in expected.items():
        sample = ds.match_tags(name).first()
        assert sample.tiled_error is None and 0.0 < sample.tiled_score < 1.0, name
        heat = np.asarray(Image.open(sample.tiled_map.map_path))
        mask = np.asarray(Image.open(sample.tiled_mask.mask_path))
        assert heat.shape == mask.shape == shape, name
    for sample in ds.match_tags("good").limit(2):  # the generated parts: maps at 96 px, the image's size
        assert np.asarray(Image.open(sample.tiled_map.map_path)).shape == (96, 96)
    # a resumed call skips what is scored; the tiled settings come from the record
    assert fav.score(ds, expert="tiled", num_workers=0).num_skipped == len(ds) - 1


def test_tiled_scoring_with_decoding_workers_matches_in_process(tiled):
    """num_workers > 0 (images decoded in worker processes) gives a tiled expert the same scores, maps and
    per-sample errors as decoding in this process (the run "tiled" of the test above, num_workers=0)."""
    ds = tiled
    view = ds.exists("tiled_score").match_tags("bad", bool=False).limit(4)
    view = view.concat(ds.match_tags("bad"))  # the bad inputs, the broken file among them
    result = fav.score(view, expert="tiled", key="tiled_w2", num_workers=2, batch_size=3)
    assert (result.num_scored, result.num_errors) == (len(view) - 1, 1)
    for sample in view:
        assert (sample.tiled_w2_error is None) == (sample.tiled_error is None), sample.filepath
        if sample.tiled_error is None:
            assert sample.tiled_w2_score == pytest.approx(sample.tiled_score, abs=1e-6)
            assert np.array_equal(np.asarray(Image.open(sample.tiled_w2_map.map_path)),
                                  np.asarray(Image.open(sample.tiled_map.map_path)))


def test_an_8000px_image_scores_with_maps_at_the_cap(tiled, tmp_path):
    """An 8000x8000 image scores, tiled (1024 px tiles read by a 32 px model input: 8x8 tiles) and untiled, and
    its heatmap and mask are written at the documented cap (MAP_MAX_SIDE on the longer side)."""
    ds = tiled
    side = 8000
    rng = np.random.default_rng(3)
    arr = np.kron(rng.integers(60, 200, (side // 16, side // 16), dtype=np.uint8), np.ones((16, 16), np.uint8))
    arr[4000:4012, 6000:6012] = 255  # a bright speck 12 px across
    path = _save(tmp_path / "large.png", arr, compress_level=1)
    ds.add_sample(fo.Sample(filepath=path, tags=["large"]))
    large = ds.match_tags("large")
    kw = dict(KW, image_size=32)
    fav.fit_expert(ds.match_tags("train"), key="big_tiles", tile_size=1024, **kw)
    fav.fit_expert(ds.match_tags("train"), key="big_whole", **kw)
    for key in ("big_tiles", "big_whole"):
        result = fav.score(large, expert=key, num_workers=0)
        assert (result.num_scored, result.num_errors) == (1, 0), key
        sample = large.first()
        assert np.isfinite(sample[f"{key}_score"]), key
        heat = np.asarray(Image.open(sample[f"{key}_map"].map_path))
        mask = np.asarray(Image.open(sample[f"{key}_mask"].mask_path))
        assert heat.shape == mask.shape == (MAP_MAX_SIDE, MAP_MAX_SIDE), key
        assert sample[f"{key}_num_regions"] == len(sample[f"{key}_regions"].detections
                                                    if sample[f"{key}_regions"] else []), key


def _exif_rotated_jpeg(path, upright: np.ndarray) -> str:
    """Store ``upright`` rotated by 90 degrees with EXIF orientation 6: viewers (and the App) show ``upright``."""
    stored = np.rot90(upright, k=1).copy()  # orientation 6 = rotate 270 (clockwise 90) to display
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    return str(path)


def test_exif_rotated_jpeg_is_read_and_mapped_upright(tiled, tmp_path):
    upright = np.full((100, 60, 3), 90, np.uint8)
    upright[8:16, 44:54] = 255  # a bright defect near the top right, as the App shows the image
    path = _exif_rotated_jpeg(tmp_path / "rotated.jpg", upright)
    assert Image.open(path).size == (100, 60)  # stored landscape
    image = load_image(path, (100, 60))
    peak = np.unravel_index(int(image[0].argmax()), (100, 60))
    assert 8 <= peak[0] < 16 and 44 <= peak[1] < 54  # the defect where the App shows it
    ds = tiled
    sample = fo.Sample(filepath=path, tags=["exif"])
    ds.add_sample(sample)
    fav.score(ds.match_tags("exif"), expert="tiled", key="tiled_exif", num_workers=0)
    sample.reload()
    heat = np.asarray(Image.open(sample.tiled_exif_map.map_path))
    assert heat.shape == np.asarray(Image.open(sample.tiled_exif_mask.mask_path)).shape == (100, 60)
    assert os.path.isfile(sample.tiled_exif_map.map_path)


def test_fit_form_offers_tiling_with_a_hint_and_checks_the_settings(parts, browser):
    """In the App: the fit form hints at tiling when the images are much larger than the model input, shows a
    bad stride's message at once, and fits a tiled expert with the tile settings given."""
    ds, driver = parts, browser
    train = ds.match_tags("train")
    with served_app(driver, ds) as session:
        set_view(session, train, "the training view",
                 lambda: f"{len(train)} samples" in _text(driver))
        open_operator_form(driver, "fit vision", "Anomaly: fit vision expert")
        _click(driver, "label", "None: random backbone (smoke tests)")
        _input_after_label(driver, "Backbone (timm name)").send_keys("resnet18")
        size = _input_after_label(driver, "Image size")
        size.send_keys(Keys.CONTROL, "a")
        size.send_keys("32")  # the 96 px parts are 3x a 32 px input
        _wait("the tiling hint", lambda: "3x the 32 px model input" in _text(driver), 30)
        _click(driver, "label", "Tile large images")
        _wait("the tile inputs", lambda: "Tile stride (px)" in _text(driver), 30)
        for label, value in (("Tile size (px)", "48"), ("Tile stride (px)", "64")):
            field = _input_after_label(driver, label)
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(value)
        _wait("the stride's error", lambda: "tile_stride=64 is larger than tile_size=48" in _text(driver), 30)
        field = _input_after_label(driver, "Tile stride (px)")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys("48")
        _wait("the error gone", lambda: "is larger than tile_size" not in _text(driver), 30)
        _wait("the form to accept the values", lambda: driver.find_element(
            By.XPATH, "//button[normalize-space(.)='Execute']").is_enabled(), 30)
        _click(driver, "button", "Execute")
        _notification(driver, "Expert 'padim' fitted", timeout=240)
    ds.reload()
    config = ds.get_run_info("padim_expert").config
    assert (config.tile_size, config.tile_stride, list(config.image_size)) == (48, 48, [48, 48])
