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

import fiftyone as fo
from fiftyone import ViewField as F

from .._common import check_image_collection
from ..images import DecodedImages
from ..metrics import auroc, binary_image_metrics
from .grouped import group_values
from .single import decodable_images, holdout_split
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
    kinds: list[str]  # "normal", the positive label or the anomaly's kind_field value (labelled), a synthetic kind
    normal_ids: list[str]
    #: of the normals (synthetic mode), how many are the candidates' calibration hold-out (the last ones)
    num_calibration_normals: int = 0
    #: with ``group_by``: each image's group value (a synthetic anomaly's: its good image's), which picks the
    #: member of a per-group candidate that scores it
    groups: list | None = None

    def _per_kind(self, scores: np.ndarray, kinds: list[str]) -> dict[str, float]:
        """AUROC of each kind of anomaly against the normals."""
        normal = self.labels == 0
        out = {}
        for kind in kinds:
            keep = normal | np.array([k == kind for k in self.kinds])
            out[kind] = auroc(scores[keep], ~normal[keep])
        return out

    def metrics(self, scores: np.ndarray) -> dict[str, Any]:
        """The metrics of ``scores`` and the objective they are ranked by."""
        if self.mode == "labelled":
            m = binary_image_metrics(scores, self.labels)
            out = {"auroc": m["auroc"], "ap": m["ap"], "objective": m["auroc"] + 1e-3 * m["ap"]}
            kinds = list(dict.fromkeys(k for k, y in zip(self.kinds, self.labels) if y))
            if len(kinds) > 1:  # defect kinds named (kind_field): each kind against the normals
                out["per_kind"] = self._per_kind(scores, kinds)
            return out
        normal = self.labels == 0
        per_kind = self._per_kind(scores, list(dict.fromkeys(k for k in self.kinds if k != "normal")))
        # each family's mean AUROC, of the families synthesised (synthetic_kinds may leave one out)
        families = {f"{fam}_auroc": float(np.mean([v for k, v in per_kind.items() if family(k) == fam]))
                    for fam in ("local", "global") if any(family(k) == fam for k in per_kind)}
        return {"auroc": auroc(scores, ~normal), **families, "per_kind": per_kind,
                "objective": float(np.mean(list(families.values())))}


def labels_of(view, gt_field: str, positive: str,
              kind_field: str | None = None) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """(ids, paths, labels, kinds) of the samples of ``view`` with a ``gt_field`` label (1 = ``positive``); kinds:
    ``"normal"`` or, for an anomaly, its ``kind_field`` value (``positive`` without a kind field or value)."""
    for field in (gt_field, kind_field):
        if field and view._root_dataset.get_field(field) is None:
            what = "gt_field" if field == gt_field else "kind_field"
            raise ValueError(f"the validation view has no field {field!r} (pass {what}=)")
    labelled = view.exists(gt_field)
    ids, paths, labels = labelled.values(["id", "filepath", f"{gt_field}.label"])
    y = np.array([lab == positive for lab in labels], dtype=int)
    if not kind_field:
        return ids, paths, y, [positive if v else "normal" for v in y]
    field = labelled.get_field(kind_field)
    values = labelled.values(kind_field + (".label" if isinstance(field, fo.EmbeddedDocumentField) else ""))
    return ids, paths, y, [str(k if k is not None else positive) if v else "normal" for v, k in zip(y, values)]


def calibration_normals(fit_view, holdout: float, seed: int,
                        group_by: str | None = None) -> tuple[list[str], list[str], list]:
    """(ids, paths, group values) of the good images every candidate fitted on ``fit_view`` holds out for its
    calibration: of the images that decode, those :func:`.single.holdout_split` holds out with the same
    ``holdout`` and ``seed`` (per image, so the same for every candidate), as ``fit_expert`` chooses them; with
    ``group_by``, group by group, as ``fit_expert(group_by=...)`` fits each group's expert (group values None
    without)."""
    ids, paths, groups = [], [], []
    for value in group_values(fit_view, group_by) if group_by else [None]:
        view = fit_view if group_by is None else fit_view.match(F(group_by) == value)
        g_ids, g_paths, _images, _errors = decodable_images(view, None, False)
        held = holdout_split(g_paths, holdout, seed)[0]
        ids += [g_ids[i] for i in held]
        paths += [g_paths[i] for i in held]
        groups += [value] * len(held)
    return ids, paths, groups


def _groups_of(view, ids: list[str], group_by: str | None) -> list | None:
    """The ``group_by`` value of each sample of ``ids`` (None without ``group_by``)."""
    if not group_by:
        return None
    value_of = dict(zip(*view.select(ids).values(["id", group_by])))
    return [value_of.get(i) for i in ids]


def validation_set(train_view, val_view, gt_field: str, positive: str, synthetic: bool, selection_share: float,
                    seed: int, size: int, kind_field: str | None = None, holdout: float | None = None,
                    group_by: str | None = None, synthetic_kinds: Sequence[str] = KINDS) -> tuple[ValidationSet, Any]:
    """The validation set and the view the candidates are fitted on (checks the bad inputs first).

    On synthetic anomalies, ``holdout`` (the candidates' calibration share) adds the good images the candidates
    hold out for calibration to the validation normals, each with its synthetic anomalies: none of the
    candidates trained on them either, and with ten validation normals the choice between near-equal options is
    mostly chance (benchmarks/selection_noise.py). A candidate's own AUROC is unchanged by its calibration having
    seen them (the calibration is monotone in its raw score).

    With ``group_by`` (candidates fitted one expert per group) each image carries its group value: a labelled
    sample whose group no training sample has fails here, before any fit; good images without a group value (no
    expert can score them) are left out of the validation normals. ``synthetic_kinds``: the kinds made (one
    anomaly of each per good image)."""
    train_ids, train_paths = train_view.values(["id", "filepath"])
    fitted = {str(v) for v in group_values(train_view, group_by)} if group_by else None
    if val_view is not None:
        check_image_collection(val_view, "select_experts")
        ids, paths, labels, kinds = labels_of(val_view, gt_field, positive, kind_field)
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
            groups = _groups_of(val_view, ids, group_by)
            unfitted = sorted({str(g) for g in groups if g is None or str(g) not in fitted}) if groups else []
            if unfitted:
                raise ValueError(f"validation samples of {group_by} = {', '.join(unfitted)} have no training sample "
                                 f"of their group (groups fitted: {', '.join(sorted(fitted))}): no candidate can "
                                 "score them")
            images = decode_square(paths, size)
            return ValidationSet("labelled", images, labels, kinds, [i for i, y in zip(ids, labels) if not y],
                                 groups=groups), fit_view
        if not synthetic:
            raise ValueError(f"the validation view has no sample labelled {positive!r} in {gt_field!r} and "
                             "synthetic=False: nothing to rank the candidates on (label a few anomalies or "
                             "pass synthetic=True)")
        normal_ids = [i for i, y in zip(ids, labels) if not y] if len(ids) else val_view.values("id")
        normal_paths = [p for p, y in zip(paths, labels) if not y] if len(ids) else val_view.values("filepath")
        normal_groups = _groups_of(val_view, normal_ids, group_by)
    else:
        if not synthetic:
            raise ValueError("without a validation view the candidates are ranked on synthetic anomalies; "
                             "synthetic=False leaves nothing to rank them on (pass val_view= with labelled "
                             "anomalies, or synthetic=True)")
        held, rest = holdout_split(train_paths, selection_share, seed + 1, exact=True)  # a count users can plan for
        normal_ids = [train_ids[i] for i in held]
        normal_paths = [train_paths[i] for i in held]
        normal_groups = _groups_of(train_view, normal_ids, group_by)
        fit_view = train_view.select([train_ids[i] for i in rest], ordered=False)
    if normal_groups is not None:  # no group value: no per-group candidate can score the image
        keep = [j for j, g in enumerate(normal_groups) if g is not None and str(g) in fitted]
        normal_ids, normal_paths, normal_groups = ([seq[j] for j in keep]
                                                   for seq in (normal_ids, normal_paths, normal_groups))
    if len(normal_paths) < 3:
        raise ValueError(f"synthetic anomalies need 3+ good validation images, got {len(normal_paths)}")
    extra_ids, extra_paths, extra_groups = (calibration_normals(fit_view, holdout, seed, group_by) if holdout
                                            else ([], [], []))
    normals = decode_square(list(normal_paths) + extra_paths, size)
    # one anomaly of each kind per good image, in its order
    anomalies, kinds = synthetic_anomalies(normals, synthetic_kinds, seed=seed)
    labels = np.array([0] * len(normals) + [1] * len(anomalies))
    groups = None if normal_groups is None else list(normal_groups) + extra_groups
    return ValidationSet("synthetic", normals + anomalies, labels, ["normal"] * len(normals) + kinds,
                         list(normal_ids) + extra_ids, len(extra_ids),
                         groups=None if groups is None else groups + [g for g in groups for _ in synthetic_kinds]), fit_view


