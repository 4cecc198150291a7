"""WinCLIP's sliding windows and how their scores become a pixel map.

Windows of ``k x k`` patches slide (stride 1) over the ViT patch grid (:func:`sliding_windows`); each
window's score is spread to the patches it covers by a harmonic mean (:func:`harmonic_aggregation`).
Window and patch embeddings are scored against the text embeddings (:func:`class_scores`, zero-shot) or
against a memory of normal features (:func:`memory_distance`, few-shot), and the patch-grid map is
upsampled to the image and smoothed (:func:`smooth_maps`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def harmonic_aggregation(window_scores: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Spread window scores to patches with a harmonic mean over the windows covering each patch.

    Args:
        window_scores: ``(N, W)`` scores in ``(0, 1]`` of ``W`` windows.
        coverage: ``(W, L)`` float, 1 where window ``w`` covers patch ``l``.

    Returns:
        ``(N, L)`` patch scores.
    """
    inverse = 1.0 / window_scores.clamp_min(1e-6)
    count = coverage.sum(dim=0).clamp_min(1.0)
    return count / (inverse @ coverage).clamp_min(1e-12)


def sliding_windows(grid: tuple[int, int], size: int) -> torch.Tensor:
    """Patch indices of every ``size x size`` window (stride 1) on a ``grid`` of patch tokens.

    Returns:
        ``(W, size * size)`` long tensor of row-major patch indices.
    """
    gh, gw = grid
    if size > min(gh, gw):
        raise ValueError(f"window size {size} does not fit the {gh}x{gw} patch grid")
    base = (torch.arange(size)[:, None] * gw + torch.arange(size)[None, :]).reshape(-1)
    starts = (torch.arange(gh - size + 1)[:, None] * gw + torch.arange(gw - size + 1)[None, :]).reshape(-1)
    return starts[:, None] + base[None, :]



def class_scores(emb: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """P(anomalous) of embeddings ``(N, ..., E)`` against per-image text ``(N, 2, E)`` (normal, anomalous)."""
    shape = emb.shape
    logits = logit_scale * torch.einsum("nte,nke->ntk", emb.reshape(shape[0], -1, shape[-1]), text)
    return logits.softmax(dim=-1)[..., 1].reshape(shape[:-1])


def memory_distance(emb: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``(1 - max cosine similarity to the memory) / 2`` for embeddings ``(N, T, E)``."""
    sims = torch.stack([(e @ memory.T).amax(dim=-1) for e in emb])
    return ((1.0 - sims) / 2.0).clamp(0.0, 1.0)


def smooth_maps(maps: torch.Tensor, image_size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Upsample grid maps ``(N, gh, gw)`` to ``image_size`` and Gaussian-smooth them (``sigma`` in pixels)."""
    from torchvision.transforms.v2 import functional as TF

    up = F.interpolate(maps[:, None], size=image_size, mode="bilinear", align_corners=False)
    if sigma > 0:
        ks = 2 * int(4.0 * sigma + 0.5) + 1
        limit = min(image_size)
        ks = min(ks, limit - 1 if limit % 2 == 0 else limit)  # reflect padding needs padding < size
        if ks >= 3:
            up = TF.gaussian_blur(up, kernel_size=[ks, ks], sigma=[sigma, sigma])
    return up[:, 0].clamp(0.0, 1.0)
