"""Reading a VLM's answer: the yes/no first word, the defect type, the location on the 3x3 grid, the why.

Example:
    >>> a = parse_answer("Yes. Defect: scratch. Location: upper-left. Explanation: a line crosses the part.")
    >>> a.answer, a.defect, a.location
    ('yes', 'scratch', 'top left')
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class ParsedAnswer:
    """The parts of an answer text.

    Attributes:
        answer: ``"yes"``, ``"no"`` or None when the first word is neither.
        defect: the defect type (lower case, ``"none"`` when none), or None if absent.
        location: a grid word (:data:`~fiftyone_anomaly_vlm.judging.prompt.GRID`) or ``"none"``, or None if
            absent / not on the grid.
        location_text: the location as written.
        explanation: the explanation sentence, or None if absent.
    """

    answer: str | None = None
    defect: str | None = None
    location: str | None = None
    location_text: str | None = None
    explanation: str | None = None


_PART = r"(?:defect(?:\s*type)?|location|explanation)"
_NONE_WORDS = {"none", "no defect", "n/a", "na", "nothing", "no", "not applicable", "null", "-"}


def _part(text: str, name: str) -> str | None:
    m = re.search(rf"\b{name}\s*:\s*(.*?)(?=(?:\s|[.;,])*\b{_PART}\s*:|$)", text, flags=re.I | re.S)
    if not m:
        return None
    value = m.group(1).strip().strip("*").strip()
    value = re.sub(r"[\s.;,*]+$", "", value)
    return value or None


def normalize_location(text: str | None) -> str | None:
    """A free-text location -> one of the 3x3 grid words, ``"none"``, or None when it is not on the grid.

    Accepts ``"upper-left"``, ``"at the bottom right corner"``, ``"centre"``, ``"top middle"``...
    """
    if not text:
        return None
    t = " ".join(re.sub(r"[^a-z/ ]+", " ", text.lower().replace("-", " ")).split())
    if t in _NONE_WORDS:
        return "none"
    t = t.replace("upper", "top").replace("lower", "bottom").replace("centre", "center").replace("central", "center")
    words = t.split()
    row = next((w for w in words if w in ("top", "bottom")), None)
    col = next((w for w in words if w in ("left", "right")), None)
    if row and col:
        return f"{row} {col}"
    if row:
        return f"{row} center"
    if col:
        return f"middle {col}"
    if "center" in words or "middle" in words:
        return "center"
    return None


def parse_answer(text: str) -> ParsedAnswer:
    """Read the verdict word, defect, location and explanation from an answer.

    Args:
        text: e.g. ``"Yes. Defect: scratch. Location: top left. Explanation: a line crosses the part."``
            (one line or several; Markdown emphasis is ignored).

    Returns:
        A :class:`ParsedAnswer`; ``answer`` is None when the first word is not yes/no.
    """
    text = text or ""
    first = re.match(r"[\W_]*([A-Za-z]+)", text)
    word = first.group(1).lower() if first else None
    out = ParsedAnswer(answer=word if word in ("yes", "no") else None)
    defect = _part(text, r"defect(?:\s*type)?")
    if defect is not None:
        d = defect.lower()
        out.defect = "none" if d in _NONE_WORDS else d
    loc = _part(text, "location")
    out.location_text = loc
    out.location = normalize_location(loc)
    out.explanation = _part(text, "explanation")
    return out
