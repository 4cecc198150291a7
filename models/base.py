"""The interface every vision expert implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class ExpertOutput:
    """Predictions of a vision expert for a batch of ``N`` images.

    Attributes:
        raw_score: ``(N,)`` image scores as the model produced them.
        score: ``(N,)`` normalised image scores in ``[0, 1]``; ``> threshold`` means anomalous.
        label: ``(N,)`` bool, True where the image is predicted anomalous.
        anomaly_map: ``(N, H, W)`` normalised pixel scores in ``[0, 1]`` (same scale for every image).
        mask: ``(N, H, W)`` bool, the thresholded anomaly map.
        raw_map: ``(N, H, W)`` pixel scores as the model produced them (None when the expert has none);
            the plugin's normal-only calibration normalises these itself.
    """

    raw_score: torch.Tensor
    score: torch.Tensor
    label: torch.Tensor
    anomaly_map: torch.Tensor
    mask: torch.Tensor
    raw_map: torch.Tensor | None = None


@runtime_checkable
class VisionExpert(Protocol):
    """A model that scores images for anomalies.

    Implementations take float images ``(N, 3, H, W)`` in ``[0, 1]`` at :attr:`image_size` and apply their
    own normalisation. An expert that needs per-sample values (e.g. the object name of each sample's
    class) lists the sample fields in ``needs_fields``; :func:`fiftyone_anomaly_vlm.score` then calls
    ``predict(images, fields={name: [one value per image]})``.
    """

    image_size: tuple[int, int]
    device: torch.device

    def predict(self, images: torch.Tensor) -> ExpertOutput:
        """Score a batch of images."""
        ...
