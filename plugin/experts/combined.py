"""Composite experts: one expert per group of samples, and ensembles of experts.

Inspection data often mixes products that look different when good: mono- and poly-crystalline solar
cells, two camera stations, several part numbers. One expert per group learns a tighter picture of
"normal" than one expert for all, and an ensemble of experts that err differently beats each of them
(on ELPV: see the README's quality table). Both are composite experts here, recorded like any expert
(run ``<key>_expert``), scored with :func:`fiftyone_anomaly_vlm.score`, reviewed and evaluated as usual.

How scores combine: each member's outputs are first put on its own calibrated scale (its image score is
the share of its held-out normals scoring below, its heatmap uses its own two anchors; see
:mod:`.calibration`), so members of different kinds (PaDiM distances, PatchCore distances, CLIP
probabilities) and of different groups become comparable. The composite's image score is the mean of its
members' calibrated scores, its heatmap the mean of their normalised maps; with ``combine="max"`` (an ensemble
of experts that see different kinds of defect: a patch expert for specks, a global one for a changed texture)
the highest calibrated score and the per-pixel highest map, so one member's alarm is not halved by another
member that cannot see that kind of defect; with ``combine="weighted"`` the weighted sum of the members'
*standardised* scores (``(raw - median) / std`` of each member's calibration normals: unlike the calibrated
share it keeps how far beyond normal a score lies, so a texture member 30 standard deviations out on a changed
grain still stands out at weight 0.25, while its noise on a speck image shrinks below a patch member's alarm)
and the weighted mean of the maps. The composite is then
calibrated itself on held-out normals that no member trained on, so its threshold rule (default: 1 %
false alarms) means what it means for a single expert.

Example:
    >>> fav.fit_expert(train, model="padim", key="padim_ct", group_by="cell_type.label")  # one per cell type
    >>> fav.fit_expert(train, model="patchcore", key="patchcore_ct", group_by="cell_type.label")
    >>> fav.ensemble_experts(ds, ["padim_ct", "patchcore_ct"], key="ensemble")
    >>> fav.score(ds.match_tags("test"), expert="ensemble")   # fields ensemble, ensemble_score, ...
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf

from ..calibration import Calibration, calibrated_arrays
from ..models.base import ExpertOutput, VisionExpert
from ..models.line_inference import MemberCombiner
from .head import project

#: group name of members that score every sample (ensembles)
ALL = "*"
#: how a composite combines its members' outputs
COMBINE_RULES = ("mean", "max", "weighted")


def combine_rule(recorded: str | None) -> str:
    """The rule of a recorded composite: its ``combine`` text starts with the rule's name (records written before
    the rules existed say "mean of calibrated member scores..." or nothing: both mean)."""
    text = str(recorded or "")
    return next((rule for rule in COMBINE_RULES if text.startswith(rule)), "mean")


def combine_text(rule: str, weights: list[float] | None = None) -> str:
    """What a composite records as its ``combine`` (read back by :func:`combine_rule`)."""
    if rule == "weighted":
        return (f"weighted sum of standardised member scores (weights {', '.join(f'{w:g}' for w in weights)}) "
                "and weighted mean of normalised maps")
    return f"{rule} of calibrated member scores and normalised maps"


def check_combine(rule: str, weights, num_members: int) -> list[float] | None:
    """``weights`` as floats for ``rule`` ``"weighted"`` (one positive weight per member; None elsewhere)."""
    if rule not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {rule!r}")
    if rule != "weighted":
        if weights is not None:
            raise ValueError(f"weights apply to combine='weighted' only, not {rule!r}")
        return None
    if weights is None or len(weights) != num_members or not all(float(w) > 0 for w in weights):
        raise ValueError(f"combine='weighted' needs one positive weight per member ({num_members}), got {weights}")
    return [float(w) for w in weights]


class CompositeExpert(VisionExpert):
    """Routes each image to the members of its group and averages their calibrated outputs.

    Args:
        members: group value (``str`` of the sample's ``group_field`` value, or :data:`ALL`) -> list of
            ``(model, calibration or None, image_size)``; ``model`` is any vision expert.
        image_size: ``(height, width)`` of the images given to :meth:`predict` (members get theirs).
        group_field: the sample field whose value picks the group (None: every image goes to :data:`ALL`).
        head: a supervised head (:func:`~fiftyone_anomaly_vlm.select_experts`): the image score is
            ``sigmoid(coef . member calibrated scores + intercept)`` instead of their mean (members in the
            order given; ensembles only); with ``head["pooled"]``, plus ``pooled coef .`` the whitened PCA
            components of the member ``pooled["member"]``'s pooled backbone statistics
            (:mod:`.head`). Heatmaps stay the mean of the members' maps.
        combine: ``"mean"`` (default) or ``"max"`` of the members' calibrated scores and normalised maps, or
            ``"weighted"`` (:data:`COMBINE_RULES`, see the module documentation); ignored for the image score when
            ``head`` is given.
        weights: ``combine="weighted"``: one weight per member of an ensemble (members in the order given).
    """

    def __init__(self, members: dict[str, list[tuple[Any, Calibration | None, tuple[int, int]]]],
                 image_size: tuple[int, int], group_field: str | None = None,
                 head: dict[str, Any] | None = None, combine: str = "mean",
                 weights: list[float] | None = None) -> None:
        if combine == "weighted" and group_field is not None:
            raise ValueError("combine='weighted' combines an ensemble's members, not groups")
        self.weights = check_combine(combine, weights, len(members.get(ALL, [])))
        self.combine = combine
        if not members or not all(members.values()):
            raise ValueError("a composite expert needs at least one member per group")
        if head is not None and (group_field is not None or len(head["coef"]) != len(members.get(ALL, []))):
            raise ValueError("a supervised head combines an ensemble's members: one coefficient per member")
        self.head = head
        self.members = members
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.group_field = group_field
        inner = {f for group in members.values() for model, _, _ in group for f in model.needs_fields}
        self.needs_fields = sorted(inner | ({group_field} if group_field else set()))
        first = next(iter(members.values()))[0][0]
        self.device = first.device

    def group_of(self, value: Any) -> str:
        """The group of a sample whose ``group_field`` holds ``value`` (:data:`ALL` without a group field)."""
        return ALL if self.group_field is None else str(value)

    def unscorable(self, fields: dict[str, list] | None) -> list[str | None]:
        """Per image: why it cannot be scored (its group has no expert), or None."""
        if self.group_field is None:
            return [None] * len(next(iter(fields.values()))) if fields else []
        values = (fields or {}).get(self.group_field)
        if values is None:
            raise ValueError(f"this expert needs the values of field {self.group_field!r}")
        out = []
        for v in values:
            if v is None:
                out.append(f"no value in field {self.group_field!r}, which picks the expert")
            elif str(v) not in self.members:
                out.append(f"no expert for {self.group_field} = {v!r} (fitted groups: {sorted(self.members)})")
            else:
                out.append(None)
        return out

    def predict(self, images: torch.Tensor, fields: dict[str, list] | None = None) -> ExpertOutput:
        """Score ``(N, 3, H, W)`` images in ``[0, 1]``; raw outputs combine the members' by :attr:`combine`.

        Raises:
            ValueError: an image whose group has no expert (check :meth:`unscorable` first).
        """
        n = images.shape[0]
        bad = [e for e in self.unscorable(fields) if e] if self.group_field else []
        if bad:
            raise ValueError(bad[0])
        groups = [self.group_of(v) for v in (fields[self.group_field] if self.group_field else [None] * n)]
        comb = MemberCombiner(n, self.image_size, self.combine, self.weights, self.head)
        for group in dict.fromkeys(groups):
            idx = [i for i, g in enumerate(groups) if g == group]
            for j, (model, calibration, size) in enumerate(self.members[group]):
                x = images[idx]
                if tuple(x.shape[-2:]) != tuple(size):
                    x = nnf.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
                needs = list(model.needs_fields)
                if needs:
                    out = model.predict(x, fields={k: [fields[k][i] for i in idx] for k in needs})
                else:
                    out = model.predict(x)
                scores, _, maps, _ = calibrated_arrays(out, calibration)
                maps_t = torch.from_numpy(maps).float().unsqueeze(1)
                if tuple(maps_t.shape[-2:]) != self.image_size:
                    maps_t = nnf.interpolate(maps_t, size=self.image_size, mode="bilinear", align_corners=False)
                # standardised: how far beyond its normals (a self-calibrating member: its score)
                standard = (None if not self.weights else scores if calibration is None or out.raw_score is None
                            else calibration.standardize_scores(out.raw_score.numpy()))
                comb.add(idx, j, scores, standard, maps_t.squeeze(1).double().numpy())
                pooled = self.head.get("pooled") if self.head else None  # select_experts: pooled features
                if pooled is not None and pooled["member"] == j:
                    z = project(model.pooled_features(x).double().numpy(), pooled)
                    comb.logit[idx] += z @ np.asarray(pooled["coef"], dtype=float)
        score, maps = comb.result()
        raw_score = torch.from_numpy(score).float()
        raw_map = torch.from_numpy(maps).float()
        return ExpertOutput(raw_score=raw_score, score=raw_score, label=raw_score > 0.5,
                            anomaly_map=raw_map.clamp(0, 1), mask=raw_map > 0.5, raw_map=raw_map)
