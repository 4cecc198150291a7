"""Other anomalib experts through the same path; backbone weights from a local file; offline errors."""

from __future__ import annotations

import pytest
import torch

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.models import AnomalibExpert, available_models

from conftest import IMAGE_SIZE


def test_available_models_cover_the_main_experts():
    names = available_models()
    for required in ("padim", "patchcore", "efficientad", "stfpm", "fastflow", "reversedistillation"):
        assert required in names
    assert "winclip" not in names and "vlmad" not in names


@pytest.mark.parametrize(
    "model,kwargs",
    [
        ("patchcore", dict(model_kwargs={"backbone": "resnet18", "layers": ["layer1", "layer2"],
                                         "coreset_sampling_ratio": 0.5}, image_size=IMAGE_SIZE)),
        ("efficient_ad", dict(model_kwargs={"model_size": "small"}, image_size=256, max_epochs=1, batch_size=4)),
    ],
)
def test_other_experts_fit_and_score(parts, model, kwargs):
    train = parts.match_tags("train").limit(8)
    expert = fav.fit_expert(train, model=model, key="e", pretrained=False, device="cpu", **kwargs)
    assert expert.model_class.endswith(("Patchcore", "OfflineEfficientAd"))
    view = parts.match_tags("train", bool=False).limit(6)
    res = fav.score(view, expert="e", num_workers=0)
    assert res.num_scored == 6 and res.num_errors == 0
    assert parts.count("e_map") == 6


def test_local_backbone_weights_are_loaded(tmp_path):
    import timm

    ref = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2))
    torch.nn.init.constant_(ref.conv1.weight, 0.125)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    expert = AnomalibExpert.build("padim", pretrained=str(path), backbone="resnet18", image_size=(64, 64),
                                  device="cpu",
                                  model_kwargs={"layers": ["layer1", "layer2"]})
    conv = expert.model.model.feature_extractor.feature_extractor.conv1.weight
    assert torch.all(conv == 0.125)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        AnomalibExpert.build("padim", pretrained=str(tmp_path / "nope.pth"))


def test_pretrained_download_offline_fails_clearly():
    # the tests run with HF_HUB_OFFLINE=1, like an air-gapped line PC
    with pytest.raises(RuntimeError, match="pretrained=False"):
        AnomalibExpert.build("padim", pretrained=True, backbone="resnet18", device="cpu")


def test_unknown_feature_layer_fails_at_construction_not_mid_fit():
    with pytest.raises(ValueError, match=r"\['blocks.3'\] are not feature layers"):
        AnomalibExpert.build("patchcore", image_size=(64, 64), device="cpu",
                             model_kwargs={"layers": ["blocks.3", "blocks.4"]})
