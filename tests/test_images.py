"""Image decoding: every storage format the issue lists, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fiftyone_anomaly_vlm.images import ImageLoadError, check_image, load_image

SIZE = (32, 48)


def _save(path, arr, **kw):
    Image.fromarray(arr, **kw).save(path)
    return str(path)


def test_rgb_gray_rgba_palette_all_give_three_channels(tmp_path):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0] = 255
    paths = {
        "rgb": _save(tmp_path / "rgb.png", rgb),
        "gray": _save(tmp_path / "gray.png", np.full((40, 60), 128, np.uint8)),
        "rgba": _save(tmp_path / "rgba.png", np.dstack([rgb, np.full((40, 60), 7, np.uint8)])),
    }
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    paths["palette"] = str(tmp_path / "pal.png")
    out = {k: load_image(p, SIZE) for k, p in paths.items()}
    for k, t in out.items():
        assert t.shape == (3, *SIZE), k
        assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    assert out["rgb"][0].mean() == pytest.approx(1.0) and out["rgb"][1].mean() == pytest.approx(0.0)
    assert out["rgba"][0].mean() == pytest.approx(1.0)  # alpha dropped, colour kept
    assert out["gray"].mean() == pytest.approx(128 / 255, abs=1e-3)
    assert np.allclose(out["gray"][0], out["gray"][2])


def test_16bit_png_uses_full_range(tmp_path):
    arr = np.full((40, 60), 30000, np.uint16)
    arr[:, :30] = 65535
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    t = load_image(str(path), (40, 60))
    assert float(t[0, 0, 0]) == pytest.approx(1.0)
    assert float(t[0, 0, -1]) == pytest.approx(30000 / 65535, abs=1e-4)  # not clipped to white as convert("RGB") would


def test_very_large_image_is_reduced(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (8000, 8000), 200).save(path, compress_level=1)
    t = load_image(str(path), (64, 64))
    assert t.shape == (3, 64, 64)
    assert float(t.mean()) == pytest.approx(200 / 255, abs=1e-2)


@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage", "empty"])
def test_bad_files_raise_short_errors(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "truncated":
        _save(path, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"this is not an image" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(ImageLoadError) as err:
        load_image(str(path), SIZE)
    assert len(str(err.value)) < 300
    with pytest.raises(ImageLoadError) as checked:  # the cheap check fitting runs first says the same
        check_image(str(path), SIZE)
    assert str(checked.value) == str(err.value)
    if kind == "missing":
        assert "not found" in str(err.value)
