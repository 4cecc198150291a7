"""A global texture/statistics expert, built as an anomalib model so it fits, saves and loads like the others.

A patch model (PaDiM, PatchCore) scores an image by its most unusual spot, so a change that touches the
whole image a little (a finer or coarser grain, another tint, a softer focus) barely moves it. This model
describes each image by the statistics of a backbone layer's features over the whole image: per channel,
the spatial mean and standard deviation (the first two moments of the texture; a Gram matrix's diagonal
is their sum of squares) and, optionally (``gram_layers``), the whole Gram matrix of a layer's channels
(Gatys et al.'s texture descriptor: which channels fire together; its upper triangle, ``C (C + 1) / 2``
numbers for ``C`` channels, so it is meant for a shallow layer: 820 for EfficientNet-Lite's ``blocks.2``,
6,328 for ``blocks.4``, whose covariance fit would cost more than every other candidate). A Gaussian is fitted on those descriptors of the good images with scikit-learn's
Ledoit-Wolf shrinkage (the descriptor has hundreds of dimensions and a fit may see a few dozen images), and
an image's score is its squared Mahalanobis distance to it. It is an image-level model: its anomaly map is
flat at the image score.

It is an ``AnomalibModule`` (a one-pass ``MemoryBankMixin`` model, like anomalib's own DFM): the plugin
builds it by name (``fit_expert(model="texturestats")``), with the offline EfficientNet-Lite backbone, fits
it with anomalib's ``Engine``, saves a Lightning checkpoint and calibrates it like every expert.

Example:
    >>> fav.fit_expert(ds.match_tags("good"), model="texturestats", key="texture")
    >>> fav.fit_expert(ds.match_tags("good"), model="texturestats", key="gram",
    ...                model_kwargs={"layers": ["blocks.2"], "gram_layers": ["blocks.2"]})
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule, MemoryBankMixin, TimmFeatureExtractor
from anomalib.models.components.base import DynamicBufferMixin
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import nn

from .backbones import pooled_statistics

__all__ = ["TextureStats", "TextureStatsModel", "pooled_statistics"]


class TextureStatsModel(DynamicBufferMixin, nn.Module):
    """The torch model: backbone features -> pooled statistics -> squared Mahalanobis distance.

    Args:
        backbone: timm backbone name.
        layers: feature layers whose statistics are pooled.
        pre_trained: ImageNet weights (the plugin loads offline weights itself when False is passed with a
            local file; see :func:`~fiftyone_anomaly_vlm.models.anomalib_build.build_model`).
        gram_layers: layers whose channel Gram matrix is added to the descriptor (shallow ones: see above).
    """

    def __init__(self, backbone: str, layers: Sequence[str], pre_trained: bool = True,
                 gram_layers: Sequence[str] = ()) -> None:
        super().__init__()
        self.layers = list(layers)
        self.gram_layers = list(gram_layers)
        extracted = list(dict.fromkeys(self.layers + self.gram_layers))
        self.feature_extractor = TimmFeatureExtractor(backbone=backbone, pre_trained=pre_trained,
                                                      layers=extracted).eval()
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("precision", torch.empty(0))
        self.memory_bank: list[torch.Tensor] = []

    def descriptors(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled statistics of ``batch`` (pre-processed images)."""
        with torch.no_grad():
            return pooled_statistics(self.feature_extractor(batch), self.layers, self.gram_layers)

    def fit(self) -> None:
        """Fit the Gaussian (Ledoit-Wolf shrunk covariance) on the descriptors gathered during training."""
        from sklearn.covariance import LedoitWolf

        if len(self.memory_bank) == 0:
            raise ValueError("TextureStats saw no training images")
        x = torch.vstack(self.memory_bank).double().cpu().numpy()
        self.memory_bank = []
        if x.shape[0] < 2:
            raise ValueError(f"TextureStats needs 2 or more training images, got {x.shape[0]}")
        lw = LedoitWolf().fit(x)
        device = self.mean.device  # float32 buffers, like every anomalib model's (Lightning may cast them)
        self.mean = torch.as_tensor(lw.location_, dtype=torch.float32, device=device)
        self.precision = torch.as_tensor(lw.precision_, dtype=torch.float32, device=device)

    def forward(self, batch: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training: gather descriptors. Inference: image scores (squared Mahalanobis distance), no map."""
        d = self.descriptors(batch)
        if self.training:
            self.memory_bank.append(d.detach())
            return d
        if self.mean.numel() == 0:
            raise RuntimeError("TextureStats is not fitted")
        diff = d.double() - self.mean.double()
        score = torch.einsum("nd,de,ne->n", diff, self.precision.double(), diff).float()
        return InferenceBatch(pred_score=score)


class TextureStats(MemoryBankMixin, AnomalibModule):
    """Lightning module of the texture-statistics expert (one pass over the good images, then a Gaussian fit).

    Args:
        backbone: timm backbone (the plugin's default: the offline EfficientNet-Lite).
        layers: feature layers whose per-channel mean and standard deviation describe an image.
        pre_trained: ImageNet weights for the backbone.
        gram_layers: layers whose channels' Gram matrix (upper triangle) joins the descriptor; default none.
        pre_processor, post_processor, evaluator, visualizer: anomalib's components, as for every model.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        gram_layers: Sequence[str] = (),
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        self.model = TextureStatsModel(backbone=backbone, layers=list(layers), pre_trained=pre_trained,
                                       gram_layers=list(gram_layers))

    @staticmethod
    def configure_optimizers() -> None:  # pylint: disable=arguments-differ
        """No optimiser: nothing is trained by gradient."""
        return

    def training_step(self, batch: Batch, *args, **kwargs) -> torch.Tensor:
        """Gather the batch's descriptors."""
        del args, kwargs
        self.model(batch.image)
        return torch.tensor(0.0, requires_grad=True, device=self.device)

    def fit(self) -> None:
        """Fit the Gaussian on the gathered descriptors."""
        self.model.fit()

    def validation_step(self, batch: Batch, *args, **kwargs) -> Any:
        """Score the batch."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """One pass over the training images, no sanity validation."""
        return {"gradient_clip_val": 0, "max_epochs": 1, "num_sanity_val_steps": 0, "devices": 1}

    @property
    def learning_type(self) -> LearningType:
        """One-class: fitted on good images only."""
        return LearningType.ONE_CLASS
