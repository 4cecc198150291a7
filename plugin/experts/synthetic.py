"""Synthetic anomalies made from good images, to choose experts when no labelled anomaly is at hand.

Local kinds change a small region, global kinds the whole image a little; an expert that is good on one
family is often blind to the other (a patch model scores an image by its most unusual spot):

* ``"perlin"`` (local): anomalib's DRAEM-style generator
  (:class:`anomalib.data.utils.generators.PerlinAnomalyGenerator`): a Perlin-noise shaped region blended
  with an augmented texture;
* ``"cutpaste"`` (local): a small patch of the image pasted elsewhere in it (CutPaste, Li et al. 2021);
* ``"spot"`` (local, small): a darker or brighter Gaussian spot 3.5-7 % of the side wide (a speck, a pinhole,
  a drop of dirt), from faint to clear: 2.5-8 times the image's own grey-level spread;
* ``"scratch"`` (local, thin): a darker or brighter line about 1 % of the side wide and 10-30 % long, as
  contrasted as a spot;
* ``"colour"`` (global): a tint and brightness change of a few percent;
* ``"blur"`` (global): a Gaussian blur (softer focus, finer grain lost);
* ``"grain"`` (global): the texture's scale changed (the image zoomed by 10-20 %).

Example:
    >>> images, kinds = synthetic_anomalies(good_images, seed=0)   # one of each kind per good image
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as nnf

LOCAL_KINDS = ("perlin", "cutpaste", "spot", "scratch")
GLOBAL_KINDS = ("colour", "blur", "grain")
#: every kind, local first
KINDS = LOCAL_KINDS + GLOBAL_KINDS
#: what the selection records as the source of its synthetic anomalies
GENERATORS = {
    "perlin": "anomalib.data.utils.generators.PerlinAnomalyGenerator (blend 0.3-0.6)",
    "cutpaste": "CutPaste: a patch of 1/8-1/5 of the side pasted elsewhere in the image",
    "spot": "Gaussian spot, sigma 1.5-3 % of the side, peak +- 2.5-8 x the image's grey standard deviation (0.15-0.9)",
    "scratch": "line 10-30 % of the side long, Gaussian profile sigma 0.4-0.7 % of the side, peak as a spot's",
    "colour": "per-channel gain 1 +- 0.04-0.08 and brightness 1 +- 0.03-0.06",
    "blur": "Gaussian blur, sigma 0.6-1.2 % of the side",
    "grain": "texture scale changed: zoom 1.10-1.20 (centre crop, resized back)",
}


def resolve_kinds(kinds: str | Sequence[str] | None = "all") -> tuple[str, ...]:
    """The synthetic kinds named by ``kinds``: ``"all"`` (or None), ``"local"``, ``"global"``, or kind names and
    these words mixed (``["local", "colour"]``), in :data:`KINDS` order.

    Raises:
        ValueError: an unknown name, or nothing named.
    """
    if kinds is None:
        kinds = "all"
    names = [kinds] if isinstance(kinds, str) else list(kinds)
    groups = {"all": KINDS, "local": LOCAL_KINDS, "global": GLOBAL_KINDS}
    unknown = [n for n in names if n not in groups and n not in KINDS]
    if unknown or not names:
        raise ValueError((f"unknown synthetic anomaly kind {', '.join(map(repr, unknown))}" if unknown else
                          "synthetic_kinds names no kind") +
                         f"; name 'all', 'local', 'global' or kinds among {', '.join(KINDS)}")
    chosen = {k for n in names for k in groups.get(n, (n,))}
    return tuple(k for k in KINDS if k in chosen)


def family(kind: str) -> str:
    """``"local"`` or ``"global"``."""
    return "local" if kind in LOCAL_KINDS else "global"


def _perlin(img: torch.Tensor) -> torch.Tensor:
    from anomalib.data.utils.generators import PerlinAnomalyGenerator  # heavy: only when synthesising

    out, _mask = PerlinAnomalyGenerator(probability=1.0, blend_factor=(0.3, 0.6))(img)
    return out


def _cutpaste(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    _, h, w = img.shape
    side = int(min(h, w) * (0.125 + 0.075 * float(torch.rand(1, generator=g))))
    side = max(2, side)
    y0, x0, y1, x1 = (int(torch.randint(0, max(1, n - side), (1,), generator=g)) for n in (h, w, h, w))
    out = img.clone()
    out[:, y1:y1 + side, x1:x1 + side] = img[:, y0:y0 + side, x0:x0 + side]
    return out


def _uniform(g: torch.Generator, lo: float, hi: float, signed: bool = False) -> float:
    v = lo + (hi - lo) * float(torch.rand(1, generator=g))
    return -v if signed and float(torch.rand(1, generator=g)) < 0.5 else v


def _peak(img: torch.Tensor, g: torch.Generator) -> float:
    """A small defect's signed contrast: 2.5-8 x the image's grey-level standard deviation, kept in 0.15-0.9 (a
    flat image still gets a visible one). Only faint spots (3-5 x) were at chance for every candidate on 10
    validation images, so they could not rank the candidates; only clear ones (5-8 x: PaDiM 0.91, texture
    statistics 0.56 on the generated textures at 256 px) hid how much an ensemble dilutes a faint speck: the
    range holds both."""
    spread = float(img.mean(0).std())
    magnitude = _uniform(g, 2.5, 8.0) * spread
    return math.copysign(max(0.15, min(0.9, magnitude)), _uniform(g, -1.0, 1.0))


def _add_profile(img: torch.Tensor, profile: torch.Tensor, peak: float) -> torch.Tensor:
    return (img + peak * profile[None]).clamp(0, 1)


def _spot(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    _, h, w = img.shape
    sigma = max(1.0, _uniform(g, 0.015, 0.03) * min(h, w))  # a pixel at least, in small images
    cy, cx = (_uniform(g, 0.1, 0.9) * n for n in (h, w))
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    return _add_profile(img, torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2)), _peak(img, g))


def _scratch(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    _, h, w = img.shape
    side = min(h, w)
    length, sigma = _uniform(g, 0.10, 0.30) * side, max(0.7, _uniform(g, 0.004, 0.007) * side)
    cy, cx = (_uniform(g, 0.2, 0.8) * n for n in (h, w))
    angle = _uniform(g, 0.0, math.pi)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32) - cy, torch.arange(w, dtype=torch.float32) - cx,
                            indexing="ij")
    along = xx * math.cos(angle) + yy * math.sin(angle)  # distance along the line from its centre
    across = -xx * math.sin(angle) + yy * math.cos(angle)
    beyond = (along.abs() - length / 2).clamp(min=0)  # round ends
    return _add_profile(img, torch.exp(-(across ** 2 + beyond ** 2) / (2 * sigma ** 2)), _peak(img, g))


def _colour(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    gains = torch.tensor([1.0 + _uniform(g, 0.04, 0.08, True) for _ in range(3)]).view(3, 1, 1)
    return (img * gains * (1.0 + _uniform(g, 0.03, 0.06, True))).clamp(0, 1)


def _blur(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as tvf  # heavy: only when synthesising

    sigma = max(0.5, _uniform(g, 0.006, 0.012) * min(img.shape[-2:]))
    k = 2 * int(3 * sigma) + 1
    return tvf.gaussian_blur(img, kernel_size=[k, k], sigma=[sigma, sigma])


def _grain(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    _, h, w = img.shape
    zoom = _uniform(g, 1.10, 1.20)
    ch, cw = int(round(h / zoom)), int(round(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = img[None, :, top:top + ch, left:left + cw]
    return nnf.interpolate(crop, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def make_anomaly(img: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """One synthetic anomaly of ``kind`` (:data:`KINDS`) made from ``img`` ``(3, H, W)`` in ``[0, 1]``."""
    if kind == "perlin":
        return _perlin(img)
    if kind == "cutpaste":
        return _cutpaste(img, g)
    if kind == "spot":
        return _spot(img, g)
    if kind == "scratch":
        return _scratch(img, g)
    if kind == "colour":
        return _colour(img, g)
    if kind == "blur":
        return _blur(img, g)
    if kind == "grain":
        return _grain(img, g)
    raise ValueError(f"unknown synthetic anomaly kind {kind!r}; kinds: {', '.join(KINDS)}")


def synthetic_anomalies(images: Sequence[torch.Tensor], kinds: Sequence[str] = KINDS,
                        seed: int = 0) -> tuple[list[torch.Tensor], list[str]]:
    """One anomaly of each of ``kinds`` per good image; returns (images, their kinds), reproducible by ``seed``.

    anomalib's Perlin generator draws from torch's global generator: it is seeded here and restored after.
    """
    g = torch.Generator().manual_seed(seed)
    out, out_kinds = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for img in images:
            img = img.float()
            for kind in kinds:
                out.append(make_anomaly(img, kind, g))
                out_kinds.append(kind)
    return out, out_kinds
