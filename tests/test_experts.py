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


def test_fit_matches_anomalib_engine_on_the_same_files(parts, tmp_path):
    """PatchCore fitted through the plugin holds the memory bank anomalib's own Folder + Engine builds.

    PatchCore's greedy coreset amplifies any change in the inputs (a float16 copy of the images, another
    resize, another training order) into other memory-bank rows, so this checks the whole fit path.
    """
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from lightning.fabric.utilities.seed import seed_everything

    kwargs = dict(pretrained=False, backbone="resnet18", image_size=(IMAGE_SIZE, IMAGE_SIZE), device="cpu",
                  model_kwargs={"layers": ["layer2"], "coreset_sampling_ratio": 0.05})
    fav.fit_expert(parts.match_tags("train"), model="patchcore", key="pc", seed=0, **kwargs)
    config = parts.load_run_results("pc_expert")  # train/held-out ids are fitted state: the run's results
    plugin_bank = fav.load_expert(parts, "pc").load(device="cpu").model.model.memory_bank

    path_of = dict(zip(*parts.values(["id", "filepath"])))
    bad = parts.match_tags("train", bool=False).match({"ground_truth.label": "anomalous"}).values("filepath")
    for sub, paths in (("train", [path_of[i] for i in config.train_ids]),
                       ("good", [path_of[i] for i in config.holdout_ids]), ("bad", bad)):
        (tmp_path / sub).mkdir()
        for i, p in enumerate(paths):  # Folder sorts by name: keep the plugin's training order
            (tmp_path / sub / f"{i:04d}.png").symlink_to(p)
    datamodule = Folder(name="parts", root=tmp_path, normal_dir="train", abnormal_dir="bad",
                        normal_test_dir="good", train_batch_size=8, eval_batch_size=8, num_workers=0,
                        val_split_mode="same_as_test", seed=0)
    torch.manual_seed(0)  # as fit_expert: the same random backbone
    model = AnomalibExpert.build("patchcore", **kwargs).model
    seed_everything(0, verbose=False)  # as fit_expert: the same shuffle and coreset draws
    Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
           default_root_dir=tmp_path / "engine").fit(model=model, datamodule=datamodule)

    engine_bank = model.model.memory_bank
    assert plugin_bank.shape == engine_bank.shape
    torch.testing.assert_close(plugin_bank, engine_bank, atol=1e-4, rtol=1e-4)
