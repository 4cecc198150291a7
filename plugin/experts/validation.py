"""What :func:`~fiftyone_anomaly_vlm.select_experts` ranks candidates on: labelled anomalies of a validation
view, or synthetic anomalies made from good images none of the candidates trained on (:mod:`.synthetic`).

Example:
    >>> val, fit_view = validation_set(train, None, "ground_truth", "anomalous", True, 0.3, seed=51, size=128)
    >>> val.mode, val.metrics(scores)["objective"]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._common import check_image_collection
from ..images import DecodedImages
from ..metrics import auroc, binary_image_metrics
from .single import holdout_split
from .synthetic import KINDS, family, synthetic_anomalies


def decode_square(paths: Sequence[str], size: int) -> list[torch.Tensor]:
    """The images at ``paths`` decoded at ``size`` x ``size``."""
    images = DecodedImages(list(paths), (size, size))
    return [images[i] for i in range(len(images))]


@dataclass
class ValidationSet:
    """What the candidates are ranked on: images (at the largest candidate size), labels and kinds."""

    mode: str  # "labelled" or "synthetic"
    images: list[torch.Tensor]
    labels: np.ndarray  # 1 = anomalous
    kinds: list[str]  # "normal", "anomalous" (labelled) or a synthetic kind
    normal_ids: list[str]

    def metrics(self, scores: np.ndarray) -> dict[str, Any]:
        """The metrics of ``scores`` and the objective they are ranked by."""
        if self.mode == "labelled":
            m = binary_image_metrics(scores, self.labels)
            return {"auroc": m["auroc"], "ap": m["ap"], "objective": m["auroc"] + 1e-3 * m["ap"]}
        normal = np.array([k == "normal" for k in self.kinds])
        per_kind = {}
        for kind in dict.fromkeys(k for k in self.kinds if k != "normal"):
            keep = normal | np.array([k == kind for k in self.kinds])
            per_kind[kind] = auroc(scores[keep], ~normal[keep])
        local = float(np.mean([v for k, v in per_kind.items() if family(k) == "local"]))
        glob = float(np.mean([v for k, v in per_kind.items() if family(k) == "global"]))
        return {"auroc": auroc(scores, ~normal), "local_auroc": local, "global_auroc": glob,
                "per_kind": per_kind, "objective": (local + glob) / 2}


def labels_of(view, gt_field: str, positive: str) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, paths, labels) of the samples of ``view`` with a ``gt_field`` label (1 = ``positive``)."""
    if view._root_dataset.get_field(gt_field) is None:
        raise ValueError(f"the validation view has no field {gt_field!r} (pass gt_field=)")
    labelled = view.exists(gt_field)
    ids, paths, labels = labelled.values(["id", "filepath", f"{gt_field}.label"])
    return ids, paths, np.array([lab == positive for lab in labels], dtype=int)


def validation_set(train_view, val_view, gt_field: str, positive: str, synthetic: bool, selection_share: float,
                    seed: int, size: int) -> tuple[ValidationSet, Any]:
    """The validation set and the view the candidates are fitted on (checks the bad inputs first)."""
    train_ids, train_paths = train_view.values(["id", "filepath"])
    if val_view is not None:
        check_image_collection(val_view, "select_experts")
        ids, paths, labels = labels_of(val_view, gt_field, positive)
        n_pos = int(labels.sum())
        n_neg = len(labels) - n_pos
        if n_pos and not n_neg:
            raise ValueError(f"all {n_pos} labelled samples of the validation view are {positive!r}: ranking "
                             "needs known-good ones too (add normal samples to val_view)")
        fit_view = train_view.exclude(ids) if set(ids) & set(train_ids) else train_view
        if n_pos:
            if n_neg < 2 or n_pos < 2:
                raise ValueError(f"the validation view has {n_pos} anomalous and {n_neg} normal labelled samples; "
                                 "ranking needs 2+ of each")
            images = decode_square(paths, size)
            return ValidationSet("labelled", images, labels, [positive if y else "normal" for y in labels],
                                  [i for i, y in zip(ids, labels) if not y]), fit_view
        if not synthetic:
            raise ValueError(f"the validation view has no sample labelled {positive!r} in {gt_field!r} and "
                             "synthetic=False: nothing to rank the candidates on (label a few anomalies or "
                             "pass synthetic=True)")
        normal_ids = [i for i, y in zip(ids, labels) if not y] if len(ids) else val_view.values("id")
        normal_paths = [p for p, y in zip(paths, labels) if not y] if len(ids) else val_view.values("filepath")
    else:
        if not synthetic:
            raise ValueError("without a validation view the candidates are ranked on synthetic anomalies; "
                             "synthetic=False leaves nothing to rank them on (pass val_view= with labelled "
                             "anomalies, or synthetic=True)")
        held, rest = holdout_split(train_paths, selection_share, seed + 1, exact=True)  # a count users can plan for
        normal_ids = [train_ids[i] for i in held]
        normal_paths = [train_paths[i] for i in held]
        fit_view = train_view.select([train_ids[i] for i in rest], ordered=False)
    if len(normal_paths) < 3:
        raise ValueError(f"synthetic anomalies need 3+ good validation images, got {len(normal_paths)}")
    normals = decode_square(normal_paths, size)
    anomalies, kinds = synthetic_anomalies(normals, KINDS, seed=seed)
    labels = np.array([0] * len(normals) + [1] * len(anomalies))
    return ValidationSet("synthetic", normals + anomalies, labels, ["normal"] * len(normals) + kinds,
                          list(normal_ids)), fit_view


