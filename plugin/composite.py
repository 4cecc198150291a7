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
members' calibrated scores, its heatmap the mean of their normalised maps. The composite is then
calibrated itself on held-out normals that no member trained on, so its threshold rule (default: 1 %
false alarms) means what it means for a single expert.

Example:
    >>> fav.fit_expert(train, model="padim", key="padim_ct", group_by="cell_type.label")  # one per cell type
    >>> fav.fit_expert(train, model="patchcore", key="patchcore_ct", group_by="cell_type.label")
    >>> fav.ensemble_experts(ds, ["padim_ct", "patchcore_ct"], key="ensemble")
    >>> fav.score(ds.match_tags("test"), expert="ensemble")   # fields ensemble, ensemble_score, ...
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf

from fiftyone import ViewField as F

from ._common import check_image_collection, check_key, default_output_dir
from .calibration import Calibration, threshold_from_normals
from .experts import EXPERT_LOADERS, Expert, _decodable_images, calibrate_expert, load_expert
from .fits import FitFolder
from .models.base import ExpertOutput
from .runs import ExpertRunConfig, expert_run_key

logger = logging.getLogger(__name__)

#: run method of composite experts (the key of their loader in :data:`EXPERT_LOADERS`)
COMPOSITE_METHOD = "composite_expert"
#: group name of members that score every sample (ensembles)
ALL = "*"


class CompositeExpert:
    """Routes each image to the members of its group and averages their calibrated outputs.

    Args:
        members: group value (``str`` of the sample's ``group_field`` value, or :data:`ALL`) -> list of
            ``(model, calibration or None, image_size)``; ``model`` is any vision expert.
        image_size: ``(height, width)`` of the images given to :meth:`predict` (members get theirs).
        group_field: the sample field whose value picks the group (None: every image goes to :data:`ALL`).
    """

    def __init__(self, members: dict[str, list[tuple[Any, Calibration | None, tuple[int, int]]]],
                 image_size: tuple[int, int], group_field: str | None = None) -> None:
        if not members or not all(members.values()):
            raise ValueError("a composite expert needs at least one member per group")
        self.members = members
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.group_field = group_field
        inner = {f for group in members.values() for model, _, _ in group
                 for f in (getattr(model, "needs_fields", ()) or ())}
        self.needs_fields = sorted(inner | ({group_field} if group_field else set()))
        first = next(iter(members.values()))[0][0]
        self.device = getattr(first, "device", torch.device("cpu"))

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
        """Score ``(N, 3, H, W)`` images in ``[0, 1]``; raw outputs are the mean calibrated member outputs.

        Raises:
            ValueError: an image whose group has no expert (check :meth:`unscorable` first).
        """
        from .scoring import calibrated_arrays

        n = images.shape[0]
        bad = [e for e in self.unscorable(fields) if e] if self.group_field else []
        if bad:
            raise ValueError(bad[0])
        groups = [self.group_of(v) for v in (fields[self.group_field] if self.group_field else [None] * n)]
        score_sum = np.zeros(n)
        map_sum = np.zeros((n, *self.image_size))
        count = np.zeros(n)
        for group in dict.fromkeys(groups):
            idx = [i for i, g in enumerate(groups) if g == group]
            for model, calibration, size in self.members[group]:
                x = images[idx]
                if tuple(x.shape[-2:]) != tuple(size):
                    x = nnf.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
                needs = list(getattr(model, "needs_fields", ()) or ())
                if needs:
                    out = model.predict(x, fields={k: [fields[k][i] for i in idx] for k in needs})
                else:
                    out = model.predict(x)
                scores, _, maps, _ = calibrated_arrays(out, calibration)
                maps_t = torch.from_numpy(maps).float().unsqueeze(1)
                if tuple(maps_t.shape[-2:]) != self.image_size:
                    maps_t = nnf.interpolate(maps_t, size=self.image_size, mode="bilinear", align_corners=False)
                score_sum[idx] += scores
                map_sum[idx] += maps_t.squeeze(1).double().numpy()
            count[idx] += len(self.members[group])
        raw_score = torch.from_numpy(score_sum / count).float()
        raw_map = torch.from_numpy(map_sum / count[:, None, None]).float()
        return ExpertOutput(raw_score=raw_score, score=raw_score, label=raw_score > 0.5,
                            anomaly_map=raw_map.clamp(0, 1), mask=raw_map > 0.5, raw_map=raw_map)


def _member_calibration(spec: Expert) -> Calibration | None:
    cal = spec.options.get("calibration")
    return Calibration.from_dict(cal) if cal and "image_scores" in cal else None


def _load_composite(expert: Expert, device) -> CompositeExpert:
    """Rebuild a :class:`CompositeExpert` from its run record (its members are loaded by key)."""
    import fiftyone as fo

    dataset = fo.load_dataset(expert.options["_dataset_name"])
    members: dict[str, list] = {}
    for group, keys in expert.options["members"].items():
        members[group] = []
        for key in keys:
            try:
                spec = load_expert(dataset, key)
            except ValueError:
                raise ValueError(f"expert {expert.key!r} combines expert {key!r}, which no longer exists; "
                                 "fit it again or make a new composite") from None
            members[group].append((spec.load(device=device), _member_calibration(spec), tuple(spec.image_size)))
    return CompositeExpert(members, image_size=tuple(expert.image_size), group_field=expert.options.get("group_field"))


EXPERT_LOADERS[COMPOSITE_METHOD] = _load_composite


def group_fields(samples) -> list[str]:
    """Fields that can pick a sample's group for ``fit_expert(group_by=...)``: string fields and the
    labels of ``fo.Classification`` fields (``"<field>.label"``), leaving out what the plugin's runs wrote."""
    import fiftyone as fo

    from .runs import run_owned_fields

    dataset = samples._root_dataset
    owned = run_owned_fields(dataset)
    out = []
    for name, f in dataset.get_field_schema().items():
        if name in owned or name in ("id", "filepath", "media_type") or name.startswith("_"):
            continue
        if isinstance(f, fo.StringField):
            out.append(name)
        elif isinstance(f, fo.EmbeddedDocumentField) and f.document_type is fo.Classification:
            out.append(f"{name}.label")
    return sorted(out)


def _slug(value: Any) -> str:
    slug = re.sub(r"\W+", "_", str(value)).strip("_").lower()
    return slug or "group"


def _holdout_ids(dataset, key: str) -> set[str]:
    return set(getattr(dataset.get_run_info(expert_run_key(key)).config, "holdout_ids", None) or [])


def _register(samples, key: str, members: dict[str, list[str]], *, group_field: str | None, image_size,
              calibration_ids: list[str], owned: list[str], kind: str, threshold: str,
              threshold_param: float | None, batch_size: int, seed: int, device, progress,
              output_dir: str | None = None) -> Expert:
    """Calibrate the composite on ``calibration_ids`` and record it as the run ``<key>_expert``.

    Its files go to a fit folder of their own (:class:`~fiftyone_anomaly_vlm.experts.FitFolder`): a composite
    being replaced stays whole until the new one is recorded.
    """
    dataset = samples._root_dataset
    run_key = expert_run_key(key)
    out_dir = output_dir or default_output_dir(samples, "experts", key)
    with FitFolder(samples, out_dir, key) as fit:
        spec_path = fit.file("composite.json")
        with open(spec_path, "w") as f:  # the composite's "checkpoint": what it combines, for identity and humans
            json.dump({"members": members, "group_field": group_field, "image_size": list(image_size)}, f,
                      indent=1)
        size = tuple(int(s) for s in image_size)
        expert = Expert(key=key, run_key=run_key, model=kind, model_class=f"{__name__}.CompositeExpert",
                        checkpoint=spec_path, image_size=size, method=COMPOSITE_METHOD,
                        options={"members": members, "group_field": group_field, "_dataset_name": dataset.name})
        model = expert.load(device=device)
        view = dataset.select(calibration_ids)
        ids, _paths, images, errors = _decodable_images(view, size, progress)
        if len(images) < 1:
            raise ValueError(f"none of the {len(calibration_ids)} calibration samples could be decoded")
        fields = None
        if model.needs_fields:
            by_id = {name: dict(zip(*view.values(["id", name]))) for name in model.needs_fields}
            fields = {name: [by_id[name][i] for i in ids] for name in model.needs_fields}
            keep = [i for i, err in enumerate(model.unscorable(fields)) if err is None]
            images = images.take(keep)
            fields = {k: [v[i] for i in keep] for k, v in fields.items()}
            ids = [ids[i] for i in keep]
            if not images:
                raise ValueError("no calibration sample belongs to a fitted group")
        calibration = calibrate_expert(model, images, rule=threshold, param=threshold_param, batch_size=batch_size,
                                       seed=seed, fields=fields)
        member_keys = sorted({k for keys in members.values() for k in keys})
        config = ExpertRunConfig(
            method=COMPOSITE_METHOD, expert=key, model=kind, model_class=expert.model_class, checkpoint=spec_path,
            image_size=list(size), members=members, group_field=group_field, member_experts=member_keys,
            owned_members=owned, combine="mean of calibrated member scores and normalised maps",
            holdout_ids=ids, num_holdout=len(ids), calibration=calibration.to_dict(), output_dir=out_dir,
            owns_output_dir=output_dir is None, device=str(model.device), fit_id=fit.fit_id,
        )
        fit.commit(config, run_key)
    return load_expert(dataset, key)


def _check_new_key(dataset, key: str, overwrite: bool) -> None:
    if expert_run_key(key) in dataset.list_runs() and not overwrite:
        raise ValueError(f"an expert named {key!r} already exists; pass overwrite=True or another key")


def fit_grouped_expert(samples, group_by: str, model: str = "padim", key: str | None = None, *,
                       overwrite: bool = False, progress: bool | Any = None, **fit_kwargs: Any) -> Expert:
    """Fit one anomalib expert per value of ``group_by`` and record them as one composite expert.

    Called by :func:`fiftyone_anomaly_vlm.fit_expert` when it gets ``group_by``; see there for the
    arguments. Each group's expert is an ordinary expert run named ``<key>__<group>`` (owned by the
    composite: deleting the composite deletes them), fitted and calibrated on that group's normals only.
    Samples are routed by their value of ``group_by`` when scored; a sample of a group that had no training
    samples gets an error message instead of a score.

    Raises:
        ValueError: ``group_by`` is not a field of the samples, holds no values, or a group has too few
            images to fit and calibrate an expert (the message names the group).
    """
    from .experts import fit_expert

    check_image_collection(samples, "fit_expert")
    key = check_key(key or model.replace("-", "_"))
    dataset = samples._root_dataset
    _check_new_key(dataset, key, overwrite)
    try:
        values = [v for v in samples.distinct(group_by) if v is not None]
    except Exception as exc:  # noqa: BLE001 - FiftyOne raises several kinds for a bad path
        raise ValueError(f"group_by {group_by!r} is not a field of the samples: {exc}") from None
    if not values:
        raise ValueError(f"group_by {group_by!r} holds no value on these samples")
    missing = samples.exists(group_by, False).count()
    if missing:
        logger.warning("fit_expert: %d samples have no %s value and are left out of training", missing, group_by)
    output_dir = fit_kwargs.pop("output_dir", None)
    members, owned, slugs = {}, [], set()
    size = None
    for value in values:
        slug = _slug(value)
        while slug in slugs:
            slug += "_"
        slugs.add(slug)
        member = f"{key}__{slug}"
        try:
            spec = fit_expert(samples.match(F(group_by) == value), model=model, key=member, overwrite=overwrite,
                              progress=progress, output_dir=output_dir and os.path.join(output_dir, slug),
                              **fit_kwargs)
        except ValueError as exc:
            raise ValueError(f"group {group_by} = {value!r}: {exc}") from None
        members[str(value)] = [member]
        owned.append(member)
        size = spec.image_size
    calibration_ids = sorted(set().union(*(_holdout_ids(dataset, m) for m in owned)))
    return _register(samples, key, members, group_field=group_by, image_size=size, calibration_ids=calibration_ids,
                     owned=owned, kind=f"{model} per {group_by}", threshold=fit_kwargs.get("threshold", "far"),
                     threshold_param=fit_kwargs.get("threshold_param"), batch_size=fit_kwargs.get("batch_size", 8),
                     seed=fit_kwargs.get("seed", 51), device=fit_kwargs.get("device", "auto"), progress=progress,
                     output_dir=output_dir)


def ensemble_experts(
    samples,
    experts: Sequence[str],
    key: str = "ensemble",
    *,
    calibration_samples=None,
    threshold: str = "far",
    threshold_param: float | None = None,
    image_size: int | tuple[int, int] | None = None,
    batch_size: int = 8,
    seed: int = 51,
    device: str | None = "auto",
    overwrite: bool = False,
    progress: bool | Any = None,
) -> Expert:
    """Combine fitted experts into one: the mean of their calibrated scores and normalised heatmaps.

    Members can be any experts of the dataset (anomalib, CLIP, per-group composites). The ensemble is
    calibrated like a fitted expert, on normal samples no member trained on: by default the samples every
    member held out (members fitted on the same view with the same seed hold out the same samples).

    Args:
        samples: the dataset (or a view of it) the experts were fitted on.
        experts: names of two or more fitted experts.
        key: the ensemble's name; score with ``fav.score(view, expert=key)``.
        calibration_samples: a view of known-good samples none of the members trained on (default: the
            members' common held-out samples).
        threshold: threshold rule on the calibration normals (see :func:`fiftyone_anomaly_vlm.fit_expert`).
        threshold_param: its parameter.
        image_size: the size images are decoded at (default: the largest member's); members that read
            another size get the image resized (antialiased) to theirs.
        batch_size: images per forward pass during calibration.
        seed: seed of the pixel sample for the heatmap anchors.
        device: ``"auto"``, ``"cpu"``, ``"cuda:0"``...
        overwrite: replace an existing expert of the same key.
        progress: FiftyOne progress convention.

    Returns:
        The ensemble's :class:`~fiftyone_anomaly_vlm.experts.Expert` record.

    Raises:
        ValueError: fewer than two distinct experts, an unknown expert, a key clash, or no calibration
            sample (members that share no held-out sample need ``calibration_samples``).
    """
    key = check_key(key)
    dataset = samples._root_dataset
    names = list(dict.fromkeys(experts))
    if len(names) < 2:
        raise ValueError(f"an ensemble needs two or more distinct experts, got {names}")
    if key in names:
        raise ValueError(f"the ensemble's key {key!r} is one of its members")
    _check_new_key(dataset, key, overwrite)
    threshold_from_normals(np.zeros(1), threshold, threshold_param)  # a bad rule fails before any work
    specs = [load_expert(dataset, name) for name in names]  # unknown names fail here
    if calibration_samples is not None:
        check_image_collection(calibration_samples, "ensemble_experts")
        calibration_ids = calibration_samples.values("id")
        trained = set().union(*(set(getattr(dataset.get_run_info(s.run_key).config, "train_ids", None) or [])
                                for s in specs))
        leaked = len(trained.intersection(calibration_ids))
        if leaked:
            logger.warning("ensemble_experts: %d calibration samples were training samples of a member; "
                           "its normal scores will look better than they are", leaked)
    else:
        common = None
        for s in specs:
            held = _holdout_ids(dataset, s.key)
            common = held if common is None else common & held
        calibration_ids = sorted(common or [])
        if not calibration_ids:
            raise ValueError("the experts share no held-out normal sample; pass calibration_samples= (known-good "
                             "samples none of them trained on)")
    if image_size is None:
        size = max((tuple(s.image_size) for s in specs), key=lambda hw: hw[0] * hw[1])
    else:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return _register(samples, key, {ALL: names}, group_field=None, image_size=size, calibration_ids=calibration_ids,
                     owned=[], kind="ensemble of " + " + ".join(names), threshold=threshold,
                     threshold_param=threshold_param, batch_size=batch_size, seed=seed, device=device,
                     progress=progress)
