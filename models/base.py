"""The interface every vision expert implements, and the device rule they share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None -> CUDA when present, else CPU; anything else is checked and passed to ``torch.device``.

    Every expert, judge and video verb resolves its device here before it writes anything, so a device
    the machine does not have fails with one clear message instead of torch's driver error mid-run.

    Raises:
        ValueError: not a device name, or a CUDA/MPS device this machine does not have.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as exc:
        msg = f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        raise ValueError(msg) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            msg = f"device {str(device)!r} requested but no CUDA GPU is available; use 'cpu' or 'auto'"
            raise ValueError(msg)
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            msg = (f"device {str(device)!r} requested but this machine has {count} CUDA GPU(s) "
                   f"(cuda:0 to cuda:{count - 1}); use one of them, 'cpu' or 'auto'")
            raise ValueError(msg)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        msg = f"device {str(device)!r} requested but Apple MPS is not available; use 'cpu' or 'auto'"
        raise ValueError(msg)
    return dev


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
    #: True for an expert that reads each image at its own resolution (a tiled expert): the scorer then calls
    #: ``predict_array(image (H, W, 3), out_size)`` per image instead of :meth:`predict` on resized batches
    native_resolution: bool = False

    def predict(self, images: torch.Tensor) -> ExpertOutput:
        """Score a batch of images."""
        ...

    def unscorable(self, fields: Mapping[str, Sequence[Any]] | None) -> list[str | None]:
        """Per image (one value per image in each of ``fields``): why it cannot be scored, or None.

        The default scores every image.
        """
        return [None] * len(next(iter(fields.values()))) if fields else []
