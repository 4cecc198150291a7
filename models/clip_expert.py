"""Zero-shot and few-shot CLIP anomaly expert (WinCLIP / WinCLIP+), written on open_clip.

The expert compares an image with text prompts describing the *normal* and *anomalous* states of the
object (zero-shot) and, given a few normal reference images, with a memory of their patch features
(few-shot, WinCLIP+). It returns the same :class:`~.base.ExpertOutput` as a fitted anomalib expert, so
:func:`fiftyone_anomaly_vlm.score` writes the same fields for both.

Method (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", CVPR 2023):

- **Compositional prompt ensemble**: state words x templates for each state ("a photo of a flawless
  bottle.", "a close-up photo of a bottle with defect."...), L2-normalised text embeddings averaged per
  state. An optional AnomalyGPT-style description of the normal object ("...which should be round and
  without any damage...") is averaged into the normal state. Text embeddings are computed once per object
  name and cached.
- **Image score**: softmax over the ``[normal, anomalous]`` similarities of the global image embedding,
  scaled by CLIP's logit scale.
- **Pixel map**: every ``k x k`` window of the ViT patch grid (``scales``, stride 1) is embedded by running
  the visual transformer on the class token plus *only that window's patch tokens* (with their positional
  embeddings), so each window gets its own embedding. Each window's anomalous probability is spread to the
  patches it covers by a harmonic mean; scales (and the global score) are combined by a harmonic mean, then
  the grid map is upsampled to the image and Gaussian-smoothed. The image score is the mean of the global
  score and the map's maximum.
- **Few-shot (WinCLIP+)**: :meth:`ClipExpert.set_references` stores the patch tokens and window embeddings
  of ``k`` normal images. A query patch/window scores ``(1 - max cosine similarity to the memory) / 2``;
  window scores are aggregated harmonically per patch and the scales averaged into a visual map. The final
  map is the mean of the text map and the visual map; the final image score is the mean of the zero-shot
  image score and the visual map's maximum.

anomalib's ``WinClip`` implements the same method but, with open_clip >= 2.26, feeds sequence-first
tensors to a batch-first transformer, so all its window embeddings come out identical (anomalib issue
#2571); it also downloads its weights at construction. This module does not use it.

Example:
    >>> expert = ClipExpert.from_pretrained("ViT-B-16-plus-240", "/models/vit_b_16_plus_240-laion400m_e31.pt",
    ...                                     object_name="bottle")
    >>> out = expert.predict(images)              # (N, 3, 240, 240) floats in [0, 1]
    >>> expert.set_references(normal_images)      # few-shot: k normal images, same format
    >>> out = expert.predict(images)

See Also:
    https://arxiv.org/abs/2303.14814 (WinCLIP), https://arxiv.org/abs/2308.15366 (AnomalyGPT),
    https://github.com/mlfoundations/open_clip
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import ExpertOutput, VisionExpert, resolve_device
from .clip_loading import DEFAULT_MODEL, DEFAULT_PRETRAINED, load_open_clip
from .clip_prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, prompt_ensemble
from .clip_windows import class_scores, harmonic_aggregation, memory_distance, sliding_windows, smooth_maps

__all__ = ["ANOMALOUS_STATES", "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "NORMAL_STATES", "TEMPLATES", "ClipExpert",
           "harmonic_aggregation", "load_open_clip", "prompt_ensemble", "sliding_windows"]


class ClipExpert(VisionExpert):
    """WinCLIP-style zero-/few-shot anomaly expert on an open_clip vision transformer.

    Args:
        clip_model: an open_clip ``CLIP`` model whose ``visual`` is a ``VisionTransformer``.
        tokenizer: its open_clip tokenizer.
        preprocess_cfg: open_clip preprocessing config (``size``, ``mean``, ``std``).
        image_size: ``(height, width)`` of the images :meth:`predict` receives (default: the model's input
            size; other sizes are resized to it for the encoder and the map comes back at ``image_size``).
        object_name: the object's name in the prompts ("bottle", "solar cell"...).
        object_field: a sample field naming each sample's object (a string or a label with ``.label``);
            :func:`fiftyone_anomaly_vlm.score` then passes its values to :meth:`predict`.
        description: AnomalyGPT-style description of the normal object, a string (``{}`` is replaced by the
            object name) or a dict ``{object name: description}``.
        scales: window sizes, in patches, of the sliding windows (WinCLIP: small 2, mid 3).
        threshold: score above which an image (or pixel) is anomalous.
        sigma: standard deviation, in pixels of ``image_size``, of the Gaussian smoothing of the map.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:0"``...
        window_batch: how many window sequences go through the transformer at once.

    Raises:
        ValueError: the model is not a ViT, or a window size does not fit its patch grid.
    """

    def __init__(
        self,
        clip_model: Any,
        tokenizer: Any,
        preprocess_cfg: Mapping[str, Any] | None = None,
        *,
        image_size: Sequence[int] | int | None = None,
        object_name: str = "object",
        object_field: str | None = None,
        description: str | Mapping[str, str] | None = None,
        scales: Sequence[int] = (2, 3),
        threshold: float = 0.5,
        sigma: float = 4.0,
        device: str | torch.device | None = "auto",
        window_batch: int = 4096,
    ) -> None:
        visual = getattr(clip_model, "visual", None)
        if visual is None or not all(hasattr(visual, a) for a in ("_embeds", "transformer", "_pool", "grid_size")):
            msg = (f"the CLIP expert needs an open_clip vision transformer (ViT-*); {type(visual).__name__} has no "
                   "patch tokens to slide windows over")
            raise ValueError(msg)
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("open_clip models with attentional pooling (CoCa) are not supported by the CLIP expert")
        cfg = dict(preprocess_cfg or {})
        self.model = clip_model
        self.tokenizer = tokenizer
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        native = getattr(visual, "image_size", None) or cfg.get("size") or (224, 224)
        native = (native, native) if isinstance(native, int) else native
        self.input_size = (int(native[0]), int(native[1]))
        if image_size is None:
            image_size = self.input_size
        elif isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        mean = cfg.get("mean") or (0.48145466, 0.4578275, 0.40821073)
        std = cfg.get("std") or (0.26862954, 0.26130258, 0.27577711)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.grid_size = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.scales = tuple(int(s) for s in scales)
        n_patches = self.grid_size[0] * self.grid_size[1]
        self._windows: dict[int, torch.Tensor] = {}
        self._coverage: dict[int, torch.Tensor] = {}
        for s in self.scales:
            idx = sliding_windows(self.grid_size, s)
            cov = torch.zeros(idx.shape[0], n_patches)
            cov.scatter_(1, idx, 1.0)
            self._windows[s], self._coverage[s] = idx.to(self.device), cov.to(self.device)
        self.object_name = object_name
        self.object_field = object_field
        self.needs_fields = [object_field] if object_field else []
        self.description = description
        self.threshold = float(threshold)
        self.sigma = float(sigma)
        self.window_batch = int(window_batch)
        self.logit_scale = float(clip_model.logit_scale.exp().item()) if hasattr(clip_model, "logit_scale") else 100.0
        #: text embeddings ``(2, D)`` (normal, anomalous) per object name, computed once
        self.text_cache: dict[str, torch.Tensor] = {}
        self.num_text_encodings = 0
        #: few-shot memory: ``{"patch": (M, D), "window_<s>": (M_s, D)}`` of normal features, or None
        self.memory: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls, model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, **kwargs: Any
    ) -> "ClipExpert":
        """Load an open_clip model (see :func:`load_open_clip`) and wrap it.

        Args:
            model: open_clip model name, ``.json`` config, ``"local-dir:/path"`` folder or ``"hf-hub:..."``.
            pretrained: pretrained tag, local checkpoint file, or None (random weights, tests only).
            **kwargs: :class:`ClipExpert` arguments (``object_name``, ``image_size``, ``device``...).

        Raises:
            RuntimeError: no weights available offline (the message says what to pass).
        """
        clip_model, tokenizer, preprocess_cfg = load_open_clip(model, pretrained)
        return cls(clip_model, tokenizer, preprocess_cfg, **kwargs)

    # ------------------------------------------------------------------ text
    def _description_for(self, name: str) -> str | None:
        desc = self.description
        if isinstance(desc, Mapping):
            desc = desc.get(name)
        if not desc:
            return None
        return desc.replace("{}", name) if "{}" in desc else desc

    @torch.inference_mode()
    def text_embeddings(self, object_name: str) -> torch.Tensor:
        """L2-normalised ``(2, D)`` text embeddings (normal, anomalous) of ``object_name``; cached.

        Each row is the normalised mean of the normalised embeddings of the prompt ensemble; a
        description of the normal object counts as much as the whole normal ensemble.
        """
        name = str(object_name)
        if name in self.text_cache:
            return self.text_cache[name]
        normal, anomalous = prompt_ensemble(name)
        description = self._description_for(name)
        prompts = normal + anomalous + ([description] if description else [])
        tokens = self.tokenizer(prompts).to(self.device)
        emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        normal_emb = F.normalize(emb[: len(normal)].mean(0), dim=-1)
        anomalous_emb = F.normalize(emb[len(normal): len(normal) + len(anomalous)].mean(0), dim=-1)
        if description:
            normal_emb = F.normalize(normal_emb + emb[-1], dim=-1)
        out = torch.stack([normal_emb, anomalous_emb])
        self.text_cache[name] = out
        self.num_text_encodings += 1
        return out

    # ------------------------------------------------------------------ vision
    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, dtype=torch.float32, non_blocking=True)
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False,
                                   antialias=True)
        return (images - self.mean) / self.std

    def _head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer output ``(B, 1 + T, D)`` -> pooled ``(B, E)`` and token ``(B, T, E)`` embeddings."""
        visual = self.model.visual
        pooled, tokens = visual._pool(x)
        if visual.proj is not None:
            pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
        return pooled, tokens

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Global, patch and sliding-window embeddings of a batch (all L2-normalised).

        Each window's embedding comes from the visual transformer run on the class token and the window's
        own patch tokens (positional embeddings included): a token subset, equivalent to an attention mask
        that lets the window attend only to itself.

        Args:
            images: ``(N, 3, H, W)`` floats in ``[0, 1]``.

        Returns:
            ``(global (N, E), patches (N, L, E), {scale: windows (N, W_s, E)})``.
        """
        visual = self.model.visual
        x = visual._embeds(self._preprocess(images))  # (N, 1 + L, D): class token first, ln_pre applied
        n, _, d = x.shape
        pooled, tokens = self._head(visual.transformer(x))
        windows: dict[int, torch.Tensor] = {}
        cls_tok = x[:, :1]
        patches = x[:, 1:]
        for s, idx in self._windows.items():
            n_win, per = idx.shape
            seq = patches[:, idx.reshape(-1)].reshape(n * n_win, per, d)
            seq = torch.cat([cls_tok.repeat_interleave(n_win, dim=0), seq], dim=1)
            outs = [self._head(visual.transformer(chunk))[0] for chunk in seq.split(self.window_batch)]
            windows[s] = F.normalize(torch.cat(outs).float().reshape(n, n_win, -1), dim=-1)
        return F.normalize(pooled.float(), dim=-1), F.normalize(tokens.float(), dim=-1), windows

    # ------------------------------------------------------------------ few-shot memory
    @torch.inference_mode()
    def set_references(self, images: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 8) -> dict:
        """Build the few-shot memory from ``k`` normal reference images (WinCLIP+).

        Args:
            images: ``(k, 3, H, W)`` floats in ``[0, 1]`` (or a list of ``(3, H, W)``).
            batch_size: images per forward pass.

        Returns:
            The memory ``{"patch": (k * L, E), "window_<s>": (k * W_s, E)}`` (also kept on the expert).
        """
        if not isinstance(images, torch.Tensor):
            images = torch.stack(list(images))
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError("set_references needs a non-empty (k, 3, H, W) batch of normal images")
        parts: dict[str, list[torch.Tensor]] = {"patch": [], **{f"window_{s}": [] for s in self.scales}}
        for batch in images.split(batch_size):
            _, tokens, windows = self.encode_image(batch)
            parts["patch"].append(tokens.reshape(-1, tokens.shape[-1]))
            for s, w in windows.items():
                parts[f"window_{s}"].append(w.reshape(-1, w.shape[-1]))
        self.memory = {k: torch.cat(v) for k, v in parts.items()}
        return self.memory

    def save_memory(self, path: str | os.PathLike) -> str:
        """Save the few-shot memory with ``torch.save`` (CPU tensors plus the grid and scales)."""
        if self.memory is None:
            raise ValueError("no few-shot memory: call set_references first")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"memory": {k: v.cpu() for k, v in self.memory.items()}, "grid_size": list(self.grid_size),
                    "scales": list(self.scales), "input_size": list(self.input_size)}, path)
        return str(path)

    def load_memory(self, path: str | os.PathLike) -> None:
        """Load a memory written by :meth:`save_memory`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the memory was built with another grid, scale set or feature size.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"few-shot memory not found: {path}")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if tuple(data["grid_size"]) != self.grid_size or tuple(data["scales"]) != self.scales:
            raise ValueError(f"{path} was built for grid {data['grid_size']} / scales {data['scales']}, not "
                             f"{list(self.grid_size)} / {list(self.scales)}")
        self.memory = {k: v.to(self.device) for k, v in data["memory"].items()}

    # ------------------------------------------------------------------ scoring
    def _object_names(self, n: int, fields: Mapping[str, Sequence[Any]] | None) -> list[str]:
        values: Sequence[Any] = [None] * n
        if self.object_field and fields and self.object_field in fields:
            values = fields[self.object_field]
        names = []
        for v in values:
            v = getattr(v, "label", v)
            names.append(str(v) if v not in (None, "") else self.object_name)
        return names

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, fields: Mapping[str, Sequence[Any]] | None = None) -> ExpertOutput:
        """Score a batch of images.

        Args:
            images: ``(N, 3, H, W)`` floats in ``[0, 1]`` at :attr:`image_size`.
            fields: per-image sample values, ``{object_field: [one per image]}``, when :attr:`object_field`
                is set; a missing or empty value falls back to :attr:`object_name`.

        Returns:
            :class:`ExpertOutput`: scores and maps in ``[0, 1]``; ``label = score > threshold``,
            ``mask = map > threshold``; ``raw_score`` is the fused image score (the same value, as this
            expert needs no normalisation).
        """
        n = images.shape[0]
        names = self._object_names(n, fields)
        text = torch.stack([self.text_embeddings(name) for name in names])  # (N, 2, E)
        global_emb, patch_emb, windows = self.encode_image(images)
        gh, gw = self.grid_size
        global_score = class_scores(global_emb[:, None], text, self.logit_scale)[:, 0]  # (N,)

        # zero-shot map: harmonic mean over the global score and each scale's harmonically aggregated windows
        per_scale = [global_score[:, None].expand(n, gh * gw)]
        for s, w in windows.items():
            per_scale.append(harmonic_aggregation(class_scores(w, text, self.logit_scale), self._coverage[s]))
        stacked = torch.stack(per_scale)
        text_map = stacked.shape[0] / (1.0 / stacked.clamp_min(1e-6)).sum(dim=0)
        image_score = (global_score + text_map.amax(dim=-1)) / 2.0
        grid_map = text_map

        if self.memory is not None:  # WinCLIP+: distance to the nearest normal patch/window, per scale
            visual = [memory_distance(patch_emb, self.memory["patch"])]
            for s, w in windows.items():
                dist = memory_distance(w, self.memory[f"window_{s}"])
                visual.append(harmonic_aggregation(dist.clamp_min(1e-6), self._coverage[s]))
            visual_map = torch.stack(visual).mean(dim=0)
            grid_map = (text_map + visual_map) / 2.0
            image_score = (image_score + visual_map.amax(dim=-1)) / 2.0

        anomaly_map = smooth_maps(grid_map.reshape(n, gh, gw), self.image_size, self.sigma)
        score = image_score.clamp(0.0, 1.0)
        return ExpertOutput(
            raw_score=score.float().cpu(),
            score=score.float().cpu(),
            label=(score > self.threshold).cpu(),
            anomaly_map=anomaly_map.float().cpu(),
            mask=(anomaly_map > self.threshold).cpu(),
        )
