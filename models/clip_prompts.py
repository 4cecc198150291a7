"""WinCLIP's compositional prompt ensemble: state words x templates, per object name."""

from __future__ import annotations

#: state words of the compositional prompt ensemble (WinCLIP, appendix)
NORMAL_STATES = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage"]
ANOMALOUS_STATES = ["damaged {}", "{} with flaw", "{} with defect", "{} with damage"]
#: templates of the compositional prompt ensemble (WinCLIP, appendix)
TEMPLATES = [
    "a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
    "a close-up photo of the {}.", "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.", "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.", "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
]


def prompt_ensemble(object_name: str) -> tuple[list[str], list[str]]:
    """The normal and anomalous prompts (state words x templates) for ``object_name``.

    Example:
        >>> normal, anomalous = prompt_ensemble("bottle")
        >>> normal[1], anomalous[0]
        ('a cropped photo of the flawless bottle.', 'a cropped photo of the damaged bottle.')
    """
    def build(states: list[str]) -> list[str]:
        return [t.format(s.format(object_name)) for s in states for t in TEMPLATES]

    return build(NORMAL_STATES), build(ANOMALOUS_STATES)
