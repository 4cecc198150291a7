"""anomalib's EfficientAD without hidden downloads: the class checkpoints record as ``OfflineEfficientAd``.

The class is built on first use (:func:`offline_efficient_ad`): its base, anomalib's ``EfficientAd``, loads
Lightning, timm and torchmetrics, which takes seconds, and the App imports the model adapters at start-up.
Checkpoints and run records name it ``fiftyone_anomaly_vlm.models.anomalib_expert.OfflineEfficientAd``;
that module resolves the name lazily (a module ``__getattr__``), so the class says it lives there.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

#: the module whose attribute ``OfflineEfficientAd`` is, as checkpoints record it (``fav_model_class``)
RECORDED_MODULE = f"{__package__}.anomalib_expert"


@functools.cache
def offline_efficient_ad() -> type:
    """:class:`OfflineEfficientAd`, built on first use (see the module docstring)."""
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
                self.imagenet_dir = noise_image_folder()
            super().prepare_imagenette_data(image_size)

    # the name checkpoints record (``fav_model_class``) and :meth:`AnomalibExpert.load` resolves
    OfflineEfficientAd.__qualname__ = "OfflineEfficientAd"
    OfflineEfficientAd.__module__ = RECORDED_MODULE
    return OfflineEfficientAd


def noise_image_folder(n: int = 16) -> Path:
    """A cached ImageFolder of random images (EfficientAD's penalty set when no ImageNette is available)."""
    root = Path(tempfile.gettempdir()) / "fiftyone_anomaly_vlm_noise_images"
    folder = root / "noise"
    if len(list(folder.glob("*.png"))) < n:
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root
