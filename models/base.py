"""The interface every vision expert implements, and the device rule they share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None -> CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    ``predict(images, fields={name: [one value per image]})``, after asking :meth:`unscorable` which
    images it cannot score.

    The adapters subclass this protocol explicitly, so they inherit the defaults of its optional
    capabilities (no sample fields; every image scorable) and callers use them without probing.
    """

    image_size: tuple[int, int]
    device: torch.device
    #: sample fields whose per-image values :meth:`predict` needs (empty: none)
    needs_fields: Sequence[str] = ()

    def predict(self, images: torch.Tensor) -> ExpertOutput:
        """Score a batch of images."""
        ...

    def unscorable(self, fields: Mapping[str, Sequence[Any]] | None) -> list[str | None]:
        """Per image (one value per image in each of ``fields``): why it cannot be scored, or None.

        The default scores every image.
        """
        return [None] * len(next(iter(fields.values()))) if fields else []
