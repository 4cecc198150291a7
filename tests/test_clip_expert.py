"""The CLIP (WinCLIP / WinCLIP+) expert through the real open_clip path, with a tiny model built here."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import fiftyone as fo
import fiftyone.operators as foo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.models.clip_expert import ClipExpert, sliding_windows
from conftest import IMAGE_SIZE

PLUGIN = "@anomaly-vlm/anomaly-vlm"
# 64 px / patch 16 -> a 4x4 token grid: windows of 2 (9 of them) and 3 (4) patches fit
TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                        "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    """Path of an open_clip model config for a tiny random CLIP (registered by path, no download)."""
    path = tmp_path_factory.mktemp("open_clip") / "tiny-clip.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture(scope="module")
def tiny_expert(tiny_config) -> ClipExpert:
    return ClipExpert.from_pretrained(tiny_config, None, object_name="part", device="cpu")


def _create(ds, config, key="clip", **kwargs):
    return fav.create_clip_expert(ds, key, model=config, pretrained=None, object_name="part", device="cpu",
                                  **kwargs)


def test_window_embeddings_differ_between_windows(tiny_expert):
    """Regression for anomalib #2571: every sliding window must get its own embedding."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    _, patches, windows = tiny_expert.encode_image(images)
    assert patches.shape == (2, 16, 32)
    assert set(windows) == {2, 3} and windows[2].shape == (2, 9, 32) and windows[3].shape == (2, 4, 32)
    for emb in windows.values():
        for img in emb:
            dist = torch.cdist(img, img)
            off_diagonal = dist[~torch.eye(len(img), dtype=torch.bool)]
            assert off_diagonal.min() > 1e-3, "window embeddings are identical (anomalib #2571 behaviour)"

    # a window's embedding is the class token's output when attention is masked to the class token + window
    visual = tiny_expert.model.visual
    x = visual._embeds(tiny_expert._preprocess(images[:1]))
    idx = sliding_windows((4, 4), 2)[4] + 1  # the centre 2x2 window, in sequence positions
    allowed = torch.zeros(17, dtype=torch.bool)
    allowed[0], allowed[idx] = True, True
    mask = torch.full((17, 17), float("-inf"))
    mask[:, allowed] = 0.0
    with torch.inference_mode():
        pooled, _ = tiny_expert._head(visual.transformer(x, attn_mask=mask))
    assert torch.allclose(torch.nn.functional.normalize(pooled, dim=-1)[0], windows[2][0, 4], atol=1e-5)


def test_zero_shot_writes_the_fields_of_fitted_experts(parts, tiny_config):
    bad = fo.Sample(filepath="/nonexistent/missing.png")
    parts.add_sample(bad)
    expert = _create(parts, tiny_config)
    assert expert.method == "winclip" and expert.checkpoint == "" and expert.image_size == (64, 64)
    cfg = parts.get_run_info("clip_expert").config
    assert cfg.method == "winclip" and cfg.model == tiny_config and cfg.pretrained is None and cfg.scales == [2, 3]
    assert "clip" in fav.list_experts(parts)

    res = fav.score(parts, expert="clip", device="cpu", batch_size=16, num_workers=0)
    assert res.num_scored == len(parts) - 1 and res.num_errors == 1
    assert "file not found" in parts[bad.filepath]["clip_error"]
    good = parts.exists("clip_score")
    assert len(good) == len(parts) - 1 and good.count("clip_error") == 0
    scores = np.array(good.values("clip_score"))
    assert np.all((scores >= 0) & (scores <= 1)) and scores.std() > 0
    assert np.allclose(good.values("clip_raw_score"), scores)
    labels = good.values("clip.label")
    assert labels == ["anomalous" if s > 0.5 else "normal" for s in scores]
    sample = good.first()
    heat = np.asarray(Image.open(sample.clip_map.map_path))
    mask = np.asarray(Image.open(sample.clip_mask.mask_path))
    assert heat.shape == mask.shape == (IMAGE_SIZE, IMAGE_SIZE) and sample.clip_map.range == [0, 65535]  # image's size
    assert np.mean((mask > 0) == (heat / 65535 > 0.5)) > 0.99  # mask = map > 0.5 (16-bit rounding aside)
    assert parts.get_run_info("clip").config.expert == "clip"


def test_few_shot_memory_from_a_view_is_saved_and_reloaded(parts, tiny_config):
    refs = parts.match_tags("train")
    zero = _create(parts, tiny_config, key="zs")
    few = _create(parts, tiny_config, key="fs", references=refs, k_shot=3)
    assert os.path.isfile(few.checkpoint)
    cfg = parts.get_run_info("fs_expert").config
    assert cfg.checkpoint == few.checkpoint and cfg.num_references == 3
    assert set(cfg.reference_ids) <= set(refs.values("id"))

    loaded = fav.load_expert(parts, "fs").load("cpu")
    assert loaded.memory["patch"].shape == (3 * 16, 32) and loaded.memory["window_2"].shape == (3 * 9, 32)
    # a reference is its own nearest normal patch: visual distance 0, so the score halves (WinCLIP+ fusion)
    ref = parts.select(cfg.reference_ids[:1])
    from fiftyone_anomaly_vlm.images import load_image

    image = load_image(ref.first().filepath, (64, 64))[None]
    zs_score = float(zero.load("cpu").predict(image).score[0])
    assert float(loaded.predict(image).score[0]) == pytest.approx(zs_score / 2, abs=1e-4)

    # scoring reloads the memory from the run record
    fav.score(parts, expert="fs", device="cpu", batch_size=16, num_workers=0)
    assert parts.count("fs_score") == len(parts)
    assert parts[ref.first().id]["fs_score"] == pytest.approx(zs_score / 2, abs=1e-3)

    # references as a tag and as ids; deleting the expert run removes its memory
    by_tag = _create(parts, tiny_config, key="fs_tag", references="train", k_shot=2)
    by_ids = _create(parts, tiny_config, key="fs_ids", references=refs.values("id")[:2])
    assert parts.get_run_info("fs_tag_expert").config.num_references == 2
    assert parts.get_run_info("fs_ids_expert").config.reference_ids == refs.values("id")[:2]
    parts.delete_run("fs_tag_expert")
    assert not os.path.exists(by_tag.checkpoint) and os.path.isfile(by_ids.checkpoint)
    with pytest.raises(ValueError, match="no reference samples"):
        _create(parts, tiny_config, key="none", references="no-such-tag")


def test_text_embeddings_are_cached_per_class(parts, tiny_config):
    ids = parts.values("id")
    parts.set_values("product", {sid: ("screw" if i % 2 else "nut") for i, sid in enumerate(ids)}, key_field="id")
    _create(parts, tiny_config, key="per_class", object_field="product",
            description={"nut": "This is a photo of a {} for anomaly detection, which should be hexagonal and "
                                "without any damage, flaw, defect, scratch, hole or broken part."})
    res = fav.score(parts, expert="per_class", device="cpu", batch_size=8, num_workers=0)
    assert res.num_scored == len(parts) and res.num_errors == 0

    model = fav.load_expert(parts, "per_class").load("cpu")
    assert model.needs_fields == ["product"]
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)).repeat(4, 1, 1, 1)
    out = model.predict(image, fields={"product": ["nut", "screw", "nut", None]})
    assert set(model.text_cache) == {"nut", "screw", "part"} and model.num_text_encodings == 3
    model.predict(image, fields={"product": ["screw", "nut", "nut", "screw"]})
    assert model.num_text_encodings == 3  # cached: no prompt is encoded twice
    assert out.score[0] == out.score[2] and out.score[0] != out.score[1]


def test_missing_weights_and_bad_options_fail_clearly(parts, tiny_config):
    # the default ViT-B-16-plus-240 / laion400m_e31 cannot be had offline: the error names the local options
    with pytest.raises(RuntimeError, match=r"pretrained='/path/to/checkpoint.pt'.*local-dir:"):
        fav.create_clip_expert(parts, "real", device="cpu")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        fav.create_clip_expert(parts, "real", pretrained="/nonexistent/clip.pt", device="cpu")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        fav.create_clip_expert(parts, "real", model="no-such-model", device="cpu")
    with pytest.raises(ValueError, match="does not fit"):
        _create(parts, tiny_config, key="big", scales=(5,))
    assert "real_expert" not in parts.list_runs() and "big_expert" not in parts.list_runs()


def test_operator_records_a_clip_expert(parts, tiny_config):
    foo.execute_operator(f"{PLUGIN}/create_clip_expert", ctx=dict(dataset=parts, params=dict(
        model=tiny_config, weights="none", object_name="part", reference_tag="train", k_shot=2, key="op_clip",
        device="cpu"))).raise_exceptions()
    cfg = parts.get_run_info("op_clip_expert").config
    assert cfg.method == "winclip" and cfg.num_references == 2 and os.path.isfile(cfg.checkpoint)
