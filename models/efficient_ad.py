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
import urllib.error
import urllib.parse
import urllib.request
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


def reachable(url: str, timeout: float = 5.0) -> str | None:
    """None when ``url``'s server answers one HEAD request (any HTTP status), else why not (one line)."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", None) or exc)
    return None


def check_downloads(model, *, timeout: float = 5.0) -> None:
    """Fail before any work when EfficientAD would need a download that cannot be made.

    anomalib fetches the pretrained teacher (``teacher_weights="default"``) and ImageNette (when
    ``imagenet_dir`` does not exist and the teacher is not random) only once training starts, and offline
    that ends in a raw ``URLError``. Here each missing file's server gets one HEAD request.

    Args:
        model: an :func:`offline_efficient_ad` instance.
        timeout: seconds per request.

    Raises:
        FileNotFoundError: ``teacher_weights`` names a file that does not exist.
        RuntimeError: a needed download's server cannot be reached; the message names the local options
            (which file to place where, or which setting to use).
    """
    from anomalib.models.image.efficient_ad.lightning_model import IMAGENETTE_DOWNLOAD_INFO, WEIGHTS_DOWNLOAD_INFO
    from anomalib.utils.path import get_pretrained_weights_dir

    size = getattr(model.model_size, "value", model.model_size)
    teacher_name = f"pretrained_teacher_{size}.pth"
    if model.teacher_weights and model.teacher_weights != "default" and not Path(model.teacher_weights).is_file():
        msg = f"EfficientAD teacher weights file not found: {model.teacher_weights}"
        raise FileNotFoundError(msg)
    options, failures = [], []
    if model.teacher_weights == "default":
        folder = get_pretrained_weights_dir() / "efficientad_pretrained_weights"
        if not (folder / teacher_name).is_file():
            why = reachable(WEIGHTS_DOWNLOAD_INFO.url, timeout)
            if why:
                failures.append(f"{_host(WEIGHTS_DOWNLOAD_INFO.url)} ({why})")
                options.append(
                    f"its pretrained teacher: place {teacher_name} (in {WEIGHTS_DOWNLOAD_INFO.url}) at "
                    f"{folder / teacher_name}, or pass model_kwargs={{'teacher_weights': '/path/to/{teacher_name}'}}")
    if model.teacher_weights and not Path(model.imagenet_dir).is_dir():
        why = reachable(IMAGENETTE_DOWNLOAD_INFO.url, timeout)
        if why:
            failures.append(f"{_host(IMAGENETTE_DOWNLOAD_INFO.url)} ({why})")
            options.append(
                f"its penalty images: extract ImageNette ({IMAGENETTE_DOWNLOAD_INFO.url}) or any folder of natural "
                f"images in class subfolders to {Path(model.imagenet_dir).resolve()}, or pass "
                "model_kwargs={'imagenet_dir': '/path/to/imagenette'}")
    if options:
        msg = (f"EfficientAD downloads files when training starts and {' and '.join(failures)} cannot be reached. "
               f"Offline, give it {'; and '.join(options)}. Or pretrained=False: a random teacher and noise "
               "images (smoke tests only)")
        raise RuntimeError(msg)


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc
