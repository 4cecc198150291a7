"""What a local ``transformers`` judge feeds its model: images within budget, and the yes/no token ids.

- :func:`prepare_image`: RGB, shrunk to a pixel budget, thin images padded (processors reject them).
- :func:`set_pixel_budget`: make a processor that resizes or tiles images itself respect the budget too.
- :func:`answer_token_ids`: every token id that decodes to a spelling of yes / of no, cached per tokenizer.
- :func:`option_token_ids`: per option letter of a multiple-choice question, the token ids that spell it.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .base import NO_WORDS, YES_WORDS, normalize_token, option_letter

#: longest side / shortest side allowed before padding (Qwen processors raise above 200)
MAX_ASPECT = 100.0

# (tokenizer class, name_or_path, vocab size) -> (yes ids, no ids); computing them decodes the whole vocab
_ID_CACHE: dict[tuple[str, str, int], tuple[list[int], list[int]]] = {}


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Ids of every token that decodes to a spelling of yes / of no (``" Yes"``, ``"yes"``, ``"NO"``...).

    Args:
        tokenizer: a ``transformers`` tokenizer (or a processor's ``.tokenizer``).

    Returns:
        ``(yes_ids, no_ids)``; cached per tokenizer (name, class and size).
    """
    key = (type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), len(tokenizer))
    if key not in _ID_CACHE:
        n = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
        yes, no = [], []
        for i, text in enumerate(texts):
            word = normalize_token(text)
            if word in YES_WORDS:
                yes.append(i)
            elif word in NO_WORDS:
                no.append(i)
        _ID_CACHE[key] = (yes, no)
    return _ID_CACHE[key]


_LETTER_CACHE: dict[tuple[str, str, int], dict[str, list[int]]] = {}


def option_token_ids(tokenizer, letters) -> dict[str, list[int]]:
    """Per option letter, the ids of every token that spells it (``"A"``, ``" A"``, ``"A."``, ``"(A"``...: see
    :func:`~.base.option_letter`).

    A letter no single token decodes to (a tokenizer that splits letters oddly) gets the first token of
    encoding ``"A"`` / ``" A"`` / ``"(A"`` instead, when that token belongs to this letter alone (a bare space
    or bracket shared by every letter says nothing). A letter with no id at all maps to ``[]``.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        letters: the option letters.

    Returns:
        ``{letter: [ids]}``; the vocabulary scan is cached per tokenizer (name, class and size).
    """
    key = (type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), len(tokenizer))
    if key not in _LETTER_CACHE:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
        found: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            letter = option_letter(text)
            if letter is not None:
                found.setdefault(letter, []).append(i)
        _LETTER_CACHE[key] = found
    found = _LETTER_CACHE[key]
    letters = list(letters)
    out = {letter: list(found.get(letter, [])) for letter in letters}
    missing = [letter for letter in letters if not out[letter]]
    if missing:
        firsts = {letter: {ids[0] for ids in (tokenizer.encode(v, add_special_tokens=False)
                                              for v in (letter, f" {letter}", f"({letter}")) if ids}
                  for letter in letters}
        for letter in missing:
            others = set().union(*(firsts[o] for o in letters if o != letter))
            out[letter] = sorted(firsts[letter] - others)
    return out


def prepare_image(image: Image.Image, max_pixels: int | None = None, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """RGB, at most ``max_pixels`` pixels, and thin images padded to ``max_aspect`` (processors reject them).

    Args:
        image: any PIL image (grey, RGBA, 16-bit...).
        max_pixels: pixel budget; larger images are shrunk keeping their aspect ratio.
        max_aspect: longest/shortest side above which the short side is padded (black).

    Returns:
        A new RGB image.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        image = Image.fromarray(arr.astype(np.uint8))
    image = image.convert("RGB")
    w, h = image.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image ({w}x{h})")
    if max_pixels and w * h > max_pixels:
        s = math.sqrt(max_pixels / (w * h))
        image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        w, h = image.size
    if max(w, h) / min(w, h) > max_aspect:
        side = math.ceil(max(w, h) / max_aspect)
        canvas = Image.new("RGB", (w, side) if w > h else (side, h))
        canvas.paste(image, (0, (side - h) // 2) if w > h else ((side - w) // 2, 0))
        image = canvas
    return image


def set_pixel_budget(processor, max_pixels: int) -> str | None:
    """Make the processor itself respect ``max_pixels`` per image, where its family sizes images on its own.

    Shrinking images first is not enough everywhere: some processors enlarge or tile them.

    - Qwen-VL family (``merge_size``, ``size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}``):
      the budget becomes ``longest_edge`` (and caps ``shortest_edge``).
    - Idefics3 / SmolVLM (``max_image_size`` tiles): images are resized so their longest side is
      ``size["longest_edge"]`` (up or down) and cut into tiles; that side becomes the largest multiple of the
      tile side that fits the budget (at least one tile).
    - InternVL (``crop_to_patches``, ``max_patches``): at most ``max_pixels // tile area`` tiles (at least 1).

    Others (LLaVA-OneVision picks its grid from the image size, so shrinking first bounds it) are left alone.

    Returns:
        The family the budget was applied for (``"qwen"``, ``"idefics3"``, ``"internvl"``), or None.
    """
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        return None
    size = getattr(ip, "size", None)
    if hasattr(ip, "merge_size") and size is not None:
        try:
            lo, hi = size["shortest_edge"], size["longest_edge"]
        except (KeyError, TypeError):
            return None
        if lo is None or hi is None:
            return None
        ip.size = {"shortest_edge": min(int(lo), max_pixels), "longest_edge": int(max_pixels)}
        return "qwen"
    tile = getattr(ip, "max_image_size", None)
    if isinstance(tile, dict) and tile.get("longest_edge") and getattr(ip, "do_image_splitting", False):
        side = int(tile["longest_edge"])
        ip.size = {"longest_edge": side * max(1, math.isqrt(max_pixels) // side)}
        return "idefics3"
    if getattr(ip, "crop_to_patches", None) is not None and getattr(ip, "max_patches", None) and size is not None:
        try:
            area = int(size["height"]) * int(size["width"])
        except (KeyError, TypeError):
            return None
        ip.max_patches = max(1, min(int(ip.max_patches), max_pixels // area))
        ip.min_patches = min(int(getattr(ip, "min_patches", 1) or 1), ip.max_patches)
        return "internvl"
    return None
