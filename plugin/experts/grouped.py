"""Experts made of experts: one per product group (``fit_expert(group_by=...)``) and ensembles.

See :mod:`.combined` for how the members' outputs combine and why the composite is calibrated again.

Example:
    >>> fav.fit_expert(train, model="padim", key="padim_ct", group_by="cell_type.label")  # one per cell type
    >>> fav.ensemble_experts(ds, ["padim_ct", "patchcore_ct"], key="ensemble")
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

import fiftyone as fo
from fiftyone import ViewField as F

from .._common import check_image_collection, check_key, default_output_dir
from ..storage import output_folder
from ..calibration import threshold_from_normals
from ..runs import COMPOSITE_METHOD, ExpertRunConfig, expert_run_key, expert_state, run_owned_fields
from .combined import ALL, check_combine, combine_text
from .fits import FitFolder
from .record import Expert, load_expert
from .single import calibrate_expert, decodable_images, fit_single_expert

logger = logging.getLogger(__name__)


def group_fields(samples) -> list[str]:
    """Fields that can pick a sample's group for ``fit_expert(group_by=...)``: string fields and the
    labels of ``fo.Classification`` fields (``"<field>.label"``), leaving out what the plugin's runs wrote."""
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
    return set(expert_state(dataset, expert_run_key(key))["holdout_ids"] or [])


def group_values(view, group_by: str) -> list:
    """The values of ``group_by`` on ``view`` (None left out), as ``fit_expert(group_by=...)`` fits one expert per
    value.

    Raises:
        ValueError: ``group_by`` is not a field of the samples, or holds no value on them.
    """
    try:
        values = [v for v in view.distinct(group_by) if v is not None]
    except Exception as exc:  # noqa: BLE001 - FiftyOne raises several kinds for a bad path
        raise ValueError(f"group_by {group_by!r} is not a field of the samples: {exc}") from None
    if not values:
        raise ValueError(f"group_by {group_by!r} holds no value on these samples")
    return values


def register_composite(samples, key: str, members: dict[str, list[str]], *, group_field: str | None, image_size,
              calibration_ids: list[str], owned: list[str], kind: str, threshold: str,
              threshold_param: float | None, batch_size: int, seed: int, device, progress,
              output_dir: str | None = None, selection: dict[str, Any] | None = None,
              head: dict[str, Any] | None = None, combine: str = "mean",
              weights: list[float] | None = None) -> Expert:
    """Calibrate the composite on ``calibration_ids`` and record it as the run ``<key>_expert``.

    ``combine`` (``"mean"``, ``"max"``, ``"weighted"`` with ``weights``): how the members' outputs combine
    (:class:`.combined.CompositeExpert`).
    ``selection`` and ``head``: what :func:`~fiftyone_anomaly_vlm.select_experts` records (see
    :class:`~fiftyone_anomaly_vlm.runs.ExpertRunConfig`).

    Its files go to a fit folder of their own (:class:`~fiftyone_anomaly_vlm.experts.FitFolder`): a composite
    being replaced stays whole until the new one is recorded.
    """
    dataset = samples._root_dataset
    run_key = expert_run_key(key)
    out_dir = output_folder(output_dir, default_output_dir(samples, "experts", key))[0]
    with FitFolder(samples, out_dir, key) as fit:
        spec_path = fit.file("composite.json")
        with open(spec_path, "w") as f:  # the composite's "checkpoint": what it combines, for identity and humans
            json.dump({"members": members, "group_field": group_field, "image_size": list(image_size),
                       "combine": combine, "weights": weights}, f, indent=1)
        size = tuple(int(s) for s in image_size)
        expert = Expert(key=key, run_key=run_key, model=kind, model_class=f"{__name__}.CompositeExpert",
                        checkpoint=spec_path, image_size=size, method=COMPOSITE_METHOD,
                        options={"members": members, "group_field": group_field, "head": head,
                                 "combine": combine_text(combine, weights), "weights": weights,
                                 "_dataset_name": dataset.name})
        model = expert.load(device=device)
        view = dataset.select(calibration_ids)
        ids, _paths, images, errors = decodable_images(view, size, progress)
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
            owned_members=owned, combine=combine_text(combine, weights), weights=weights,
            holdout_ids=ids, num_holdout=len(ids), calibration=calibration.to_dict(), output_dir=out_dir,
            owns_output_dir=output_dir is None, device=str(model.device), fit_id=fit.fit_id, selection=selection,
            head=head,
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
    check_image_collection(samples, "fit_expert")
    key = check_key(key or model.replace("-", "_"))
    dataset = samples._root_dataset
    _check_new_key(dataset, key, overwrite)
    values = group_values(samples, group_by)
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
            spec = fit_single_expert(samples.match(F(group_by) == value), model=model, key=member, overwrite=overwrite,
                              progress=progress, output_dir=output_dir and os.path.join(output_dir, slug),
                              **fit_kwargs)
        except ValueError as exc:
            raise ValueError(f"group {group_by} = {value!r}: {exc}") from None
        members[str(value)] = [member]
        owned.append(member)
        size = spec.image_size
    calibration_ids = sorted(set().union(*(_holdout_ids(dataset, m) for m in owned)))
    return register_composite(samples, key, members, group_field=group_by, image_size=size,
                              calibration_ids=calibration_ids, owned=owned, kind=f"{model} per {group_by}",
                              threshold=fit_kwargs.get("threshold", "far"),
                              threshold_param=fit_kwargs.get("threshold_param"),
                              batch_size=fit_kwargs.get("batch_size", 8), seed=fit_kwargs.get("seed", 51),
                              device=fit_kwargs.get("device", "auto"), progress=progress, output_dir=output_dir)


def ensemble_experts(
    samples,
    experts: Sequence[str],
    key: str = "ensemble",
    *,
    calibration_samples=None,
    threshold: str = "far",
    threshold_param: float | None = None,
    image_size: int | tuple[int, int] | None = None,
    combine: str = "mean",
    weights: Sequence[float] | None = None,
    batch_size: int = 8,
    seed: int = 51,
    device: str | None = "auto",
    overwrite: bool = False,
    progress: bool | Any = None,
) -> Expert:
    """Combine fitted experts into one: the mean (or max) of their calibrated scores and normalised heatmaps.

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
        combine: ``"mean"`` (members that see the same defects: their errors average out) or ``"max"`` (members
            that see different kinds, e.g. a patch expert for specks and a texture expert for a changed grain:
            the highest calibrated score, so one member's alarm is not diluted by a member blind to it), or
            ``"weighted"``: the weighted sum of the members' standardised scores (``(raw - median) / std`` of
            their calibration normals, so how far beyond normal counts) with ``weights``; ``select_experts``
            picks rule and weights on validation anomalies.
        weights: ``combine="weighted"``: one positive weight per expert, in the order of ``experts``.
        batch_size: images per forward pass during calibration.
        seed: seed of the pixel sample for the heatmap anchors.
        device: ``"auto"``, ``"cpu"``, ``"cuda:0"``...
        overwrite: replace an existing expert of the same key.
        progress: FiftyOne progress convention.

    Returns:
        The ensemble's :class:`~fiftyone_anomaly_vlm.experts.Expert` record.

    Raises:
        ValueError: fewer than two distinct experts, an unknown ``combine`` rule or bad ``weights``, an unknown
            expert, a key clash, or no calibration sample (members that share no held-out sample need
            ``calibration_samples``).
    """
    key = check_key(key)
    dataset = samples._root_dataset
    names = list(dict.fromkeys(experts))
    if len(names) < 2:
        raise ValueError(f"an ensemble needs two or more distinct experts, got {names}")
    weights = check_combine(combine, weights, len(names))
    if key in names:
        raise ValueError(f"the ensemble's key {key!r} is one of its members")
    _check_new_key(dataset, key, overwrite)
    threshold_from_normals(np.zeros(1), threshold, threshold_param)  # a bad rule fails before any work
    specs = [load_expert(dataset, name) for name in names]  # unknown names fail here
    tiled = [s.key for s in specs if s.options.get("tile_size") is not None]
    if tiled:  # a composite feeds its members resized images; a tiled expert reads each at its own resolution
        raise ValueError(f"ensemble_experts cannot combine tiled experts yet ({', '.join(tiled)}); score them "
                         "separately")
    if calibration_samples is not None:
        check_image_collection(calibration_samples, "ensemble_experts")
        calibration_ids = calibration_samples.values("id")
        trained = set().union(*(set(expert_state(dataset, s.run_key)["train_ids"] or []) for s in specs))
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
    return register_composite(samples, key, {ALL: names}, group_field=None, image_size=size,
                              calibration_ids=calibration_ids, owned=[],
                              kind={"mean": "ensemble of ", "max": "max-ensemble of ",
                                    "weighted": "weighted ensemble of "}[combine] + " + ".join(names),
                              threshold=threshold, threshold_param=threshold_param, batch_size=batch_size, seed=seed,
                              device=device, progress=progress, combine=combine, weights=weights)
