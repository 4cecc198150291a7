"""The judge's prompt: system text, question, location grid, the expert's verdict in words, knowledge text.

A request puts the parts shared between samples first (system text, knowledge, reference image) so servers
can reuse the cached prefix, then the sample and its crops, then the question.

Example:
    >>> req = build_request(image, crops=[(crop, "top left")], verdict="highly suspicious")
    >>> len(req.images), req.user.splitlines()[-4]
    (2, 'Is there a defect in the sample? Answer Yes or No as the first word. ...')
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from PIL import Image

from ..labels import GRID  # noqa: F401 - the judge's location words, re-exported
from ..models.judge.base import JudgeRequest
from .references import class_value


SYSTEM = ("You are a visual inspection expert on a production line. You look at images of a product and decide "
          "whether it has a defect (an anomaly). Answer in short, plain words a line operator understands.")
QUESTION = (
    "Is there a defect in the sample? Answer Yes or No as the first word. Then write exactly three lines:\n"
    "Defect: <the type of defect, or none>\n"
    "Location: <one of top left, top center, top right, middle left, center, middle right, bottom left, "
    "bottom center, bottom right, or none>\n"
    "Explanation: <one sentence>"
)
#: calibrated expert score (share of normals scoring below) -> words; first match wins
VERDICT_WORDS = ((0.98, "highly suspicious"), (0.9, "moderately suspicious"), (0.7, "slightly suspicious"),
                 (0.0, "not suspicious"))
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def expert_verdict_words(score: float | None) -> str | None:
    """The expert's calibrated score in words (Anomaly-OV style), None without a score."""
    if score is None or not math.isfinite(score):
        return None
    for lo, words in VERDICT_WORDS:
        if score >= lo:
            return words
    return VERDICT_WORDS[-1][1]


def knowledge_for(knowledge: str | Mapping[str, str] | None, cls: Any) -> str | None:
    """The knowledge text for a sample of class ``cls``.

    Args:
        knowledge: one text for all samples, or a dict ``{class: text}`` with ``"default"`` as fallback.
        cls: the sample's class (None without a class field).
    """
    if knowledge is None:
        return None
    if isinstance(knowledge, Mapping):
        text = knowledge.get(class_value(cls)) if cls is not None else None
        return text if text is not None else knowledge.get("default")
    return str(knowledge)


def _nth(i: int) -> str:
    return _ORDINALS[i] if i < len(_ORDINALS) else f"{i + 1}th"


def build_request(
    image: Image.Image,
    *,
    reference: Image.Image | None = None,
    crops: list[tuple[Image.Image, str]] | None = None,
    knowledge: str | None = None,
    product: str | None = None,
    verdict: str | None = None,
    system: str = SYSTEM,
    question: str = QUESTION,
    max_new_tokens: int = 96,
    meta: dict[str, Any] | None = None,
) -> JudgeRequest:
    """One sample's request: shared parts first (knowledge, reference image), then the sample and its crops.

    Args:
        image: the sample.
        reference: a normal image of the same product (shown first).
        crops: ``[(crop image, grid word of its centre), ...]`` from the expert's map.
        knowledge: product/defect knowledge text.
        product: the product's name (e.g. the class).
        verdict: the expert's verdict in words (``"highly suspicious"``).
        system: the system text.
        question: the question and answer format.
        max_new_tokens: generation budget.
        meta: carried back with the answer.

    Returns:
        A :class:`JudgeRequest` whose images are ``[reference?, sample, *crops]``.
    """
    images: list[Image.Image] = []
    lines: list[str] = []
    if knowledge:
        lines.append(f"Product knowledge: {knowledge.strip()}")
    if product:
        lines.append(f"The product is: {product}.")
    if reference is not None:
        images.append(reference)
        lines.append(f"The {_nth(0)} image is a normal reference of the product, without defects.")
    images.append(image)
    lines.append(f"The {_nth(len(images) - 1)} image is the sample to inspect.")
    for crop, where in crops or []:
        images.append(crop)
        lines.append(f"The {_nth(len(images) - 1)} image is a close-up of the sample's {where} region, which an "
                     "inspection model finds suspicious.")
    if verdict:
        lines.append(f"The inspection model finds this sample {verdict}.")
    lines.append(question)
    return JudgeRequest(images=images, user="\n".join(lines), system=system, max_new_tokens=max_new_tokens,
                        meta=dict(meta or {}))
