"""A tiny MMAD-format benchmark written locally: generated images and an ``mmad.json`` in MMAD's own schema.

MMAD (jam-cc/MMAD, ICLR'25) ships ``mmad.json``: a dict from an image path relative to the data folder
(``"<dataset>/<class>/test/<defect or good>/<name>.png"``) to an entry with ``"conversation"`` (a list of
``{"Question", "Options": {"A": ..., "B": ...}, "Answer": "B", "type": "Anomaly Detection" | "Defect
Classification" | "Defect Localization" | "Defect Description" | "Defect Analysis" | "Object Classification" |
"Object Structure" | "Object Details"}``), ``"similar_templates"`` and ``"random_templates"`` (paths of normal
training images used as the 1-shot reference), and ``"mask_path"``. :func:`write_mmad_fixture` writes a few
such entries over generated images, so ``benchmarks/mmad.py`` runs end to end without MMAD's data.

Used by ``tests/test_judge_qa.py`` and ``benchmarks/mmad.py --demo``.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

_ENTRIES = [  # (dataset, class, defect or "good")
    ("MVTec-AD", "bottle", "good"), ("MVTec-AD", "bottle", "broken_large"),
    ("VisA", "candle", "good"), ("VisA", "candle", "wax"),
]


def _image(path: str, seed: int, defect: bool, size: int = 48) -> None:
    rng = np.random.default_rng(seed)
    arr = np.full((size, size, 3), 128, np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
    if defect:
        arr[5:15, 30:40] = 20
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def _conversation(cls: str, defect: str) -> list[dict]:
    anomalous = defect != "good"
    conv = [{"Question": "Is there any defect in the object?", "Answer": "A" if anomalous else "B",
             "Options": {"A": "Yes.", "B": "No."}, "type": "Anomaly Detection"}]
    if anomalous:
        conv += [
            {"Question": "There is a defect in the object. What is the type of the defect?", "Answer": "C",
             "Options": {"A": "Scratch.", "B": "Contamination.", "C": f"{defect.replace('_', ' ').title()}.",
                         "D": "Hole."}, "type": "Defect Classification"},
            {"Question": "There is a defect in the object. Where is the defect?", "Answer": "B",
             "Options": {"A": "Bottom left.", "B": "Top right.", "C": "Center.", "D": "Bottom right."},
             "type": "Defect Localization"},
        ]
    conv += [
        {"Question": "What kind of product is in the image?", "Answer": "A",
         "Options": {"A": f"{cls.title()}.", "B": "Cable.", "C": "Screw.", "D": "Pill."},
         "type": "Object Classification"},
        {"Question": "What is the overall shape of the object?", "Answer": "D",
         "Options": {"A": "Square.", "B": "Triangular.", "C": "Star-shaped.", "D": "Round."},
         "type": "Object Structure"},
    ]
    return conv


def write_mmad_fixture(root: str, copies: int = 1) -> str:
    """Write images and ``mmad.json`` (MMAD's schema) under ``root``; return the json's path.

    Args:
        root: the data folder (MMAD's ``--images``: paths in the json are relative to it).
        copies: test images per (dataset, class, defect) entry.
    """
    data = {}
    seed = 0
    for dataset, cls, defect in _ENTRIES:
        templates = []
        for t in range(2):
            rel = f"{dataset}/{cls}/train/good/{t:03d}.png"
            _image(os.path.join(root, rel), 1000 + seed + t, False)
            templates.append(rel)
        for c in range(copies):
            seed += 1
            rel = f"{dataset}/{cls}/test/{defect}/{c:03d}.png"
            _image(os.path.join(root, rel), seed, defect != "good")
            mask = None if defect == "good" else f"{dataset}/{cls}/ground_truth/{defect}/{c:03d}.png"
            data[rel] = {"image_path": rel, "conversation": _conversation(cls, defect),
                         "similar_templates": templates[::-1], "random_templates": templates, "mask_path": mask}
    path = os.path.join(root, "mmad.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path
