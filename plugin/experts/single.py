"""Fit an anomalib vision expert on known-good samples and record it as a FiftyOne run.

Example:
    >>> import fiftyone as fo
    >>> import fiftyone_anomaly_vlm as fav
    >>> ds = fo.load_dataset("parts")
    >>> expert = fav.fit_expert(ds.match_tags("train"), model="padim", key="padim", pretrained=False)
    >>> ds.list_runs()
    ['padim_expert']
    >>> fav.load_expert(ds, "padim").checkpoint
    '/.../anomaly_vlm/parts/experts/padim/fit-20250101T120000-1a2b3c4d/model.ckpt'

Every fit writes into a folder of its own, ``<output dir>/<fit_id>`` (recorded as the run's ``fit_id``), and
the run record is switched to it only once the fit has fully succeeded; the replaced fit's folder is then
removed. A fit that is killed part way leaves the expert it was replacing exactly as it was, and its own
folder is removed by the next fit into the same output folder (:mod:`.fits`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._common import check_image_collection, check_key, default_output_dir
from ..storage import output_folder
from ..calibration import Calibration, threshold_from_normals
from ..images import DecodedImages, ImageLoadError, check_image
from ..models import AnomalibExpert, TiledExpert, check_tile_settings
from ..models.tiling import TILE_IMAGE_SCORES
from ..native import MAP_MAX_SIDE, NativeImages
from ..models.anomalib_build import min_training_images
from ..models.progress import phase_bar
from ..runs import ExpertRunConfig, expert_run_key
from .fits import FitFolder
from .record import Expert, jsonable, load_expert

logger = logging.getLogger(__name__)

# At most this many per-sample decoding errors are copied into the run config (the count is always kept).
_MAX_ERRORS_RECORDED = 100


def decodable_images(samples, image_size: tuple[int, int] | None, progress) -> tuple[list, list, DecodedImages, list]:
    """Check that every image of ``samples`` decodes; returns (ids, paths, images, errors), errors as (id, msg).

    ``image_size`` None checks each image at its own resolution and returns :class:`~..native.NativeImages`
    (a tiled expert's images).

    ``images`` decode again when read (:class:`DecodedImages`): nothing is kept in memory, and training sees
    the full-precision tensors anomalib's own datamodules would give it (a rounded copy, float16 say, moves
    PatchCore's greedy coreset and with it the scores).
    """
    ids, paths = samples.values(["id", "filepath"])
    good_ids, good_paths, sizes, errors = [], [], [], []
    with phase_bar(progress, "decoding images", len(ids), "images") as pb:
        for sid, path in pb(zip(ids, paths)):
            try:
                sizes.append(check_image(path, image_size))
            except ImageLoadError as exc:
                errors.append((sid, str(exc)))
                continue
            good_ids.append(sid)
            good_paths.append(path)
    images = NativeImages(good_paths, sizes) if image_size is None else DecodedImages(good_paths, image_size)
    return good_ids, good_paths, images, errors


def fit_single_expert(
    samples,
    model: str = "padim",
    key: str | None = None,
    *,
    pretrained: bool | str = True,
    backbone: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    tile_size: int | None = None,
    tile_stride: int | None = None,
    tile_image_score: str = "map_max",
    holdout: float = 0.2,
    device: str | None = "auto",
    batch_size: int = 8,
    max_epochs: int | None = None,
    output_dir: str | None = None,
    seed: int = 51,
    threshold: str = "far",
    threshold_param: float | None = None,
    overwrite: bool = False,
    progress: bool | Any = None,
) -> Expert:
    """One anomalib expert on all of ``samples`` (what :func:`~fiftyone_anomaly_vlm.fit_expert` does without
    ``group_by``; see there for the arguments)."""
    key = check_key(key or model.replace("-", "_"))
    run_key = expert_run_key(key)
    check_image_collection(samples, "fit_expert")
    dataset = samples._root_dataset
    if run_key in dataset.list_runs() and not overwrite:
        msg = f"an expert named {key!r} already exists; pass overwrite=True or another key"
        raise ValueError(msg)
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    threshold_from_normals(np.zeros(1), threshold, threshold_param)  # a bad rule fails before any work
    # an output folder that cannot be written fails before any work (relative: under the storage root)
    out_dir, owns_dir = output_folder(output_dir, default_output_dir(samples, "experts", key))
    tiling = check_tile_settings(tile_size, tile_stride)  # bad tile settings fail before any work
    if tile_image_score not in TILE_IMAGE_SCORES:
        raise ValueError(f"tile_image_score must be one of {TILE_IMAGE_SCORES}, got {tile_image_score!r}")
    if image_size is None:  # a tiled expert reads each tile as it is cut (no resize)
        image_size = tiling[0] if tiling else 256
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)

    torch.manual_seed(seed)
    expert = AnomalibExpert.build(model, image_size=size, pretrained=pretrained, backbone=backbone,
                                  model_kwargs=model_kwargs, device=device)  # bad names fail here, before work

    ids, paths, images, errors = decodable_images(samples, None if tiling else size, progress)
    if len(images) < 2:
        msg = f"fit_expert: only {len(images)} of {len(ids) + len(errors)} images could be decoded; need 2+"
        raise ValueError(msg)
    for sid, err in errors[:5]:
        logger.warning("fit_expert: skipping sample %s: %s", sid, err)
    val_idx, train_idx = holdout_split(paths, holdout, seed)
    need = min_training_images(expert.model)
    if len(train_idx) < need:
        msg = (f"fit_expert: {model} needs {need}+ training images and {len(train_idx)} remain after holding out "
               f"{len(val_idx)} for calibration; give it more good samples"
               + (" or a smaller n_pca_components in model_kwargs" if need > 2 else ""))
        raise ValueError(msg)

    train_paths, val_paths = [paths[i] for i in train_idx], [paths[i] for i in val_idx]
    train, val, calibrated = images.take(train_idx), images.take(val_idx), expert
    if tiling:  # the model learns tiles cut at the images' own resolution; calibration sees whole stitched maps
        train, val = train.tiles(*tiling), val.tiles(*tiling)
        train_paths, val_paths = train.tile_paths, val.tile_paths
        calibrated = TiledExpert(expert, *tiling, image_score=tile_image_score, batch_size=batch_size,
                                 max_map_side=MAP_MAX_SIDE)
    with FitFolder(samples, out_dir, key) as fit:  # the old expert stays as it is until fit.commit
        expert.fit(train, val, train_paths=train_paths, val_paths=val_paths,
                   batch_size=batch_size, max_epochs=max_epochs, seed=seed, work_dir=fit.path,
                   progress=progress if callable(progress) else False)  # a callable gets the fit's phases
        checkpoint = expert.save(fit.file("model.ckpt"))
        post = expert.model.post_processor
        anomalib_post = {
            name: float(getattr(post, name)) for name in
            ("image_threshold", "pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max")
            if post is not None and hasattr(post, name)
        }
        calibration = calibrate_expert(calibrated, images.take(val_idx), rule=threshold, param=threshold_param,
                                       batch_size=1 if tiling else batch_size, seed=seed, progress=progress)
        config = ExpertRunConfig(
            expert=key,
            model=model,
            model_class=expert.model_class,
            checkpoint=checkpoint,
            output_dir=out_dir,
            owns_output_dir=owns_dir,
            image_size=list(size),
            pretrained=pretrained if isinstance(pretrained, bool) else os.path.abspath(str(pretrained)),
            backbone=expert.weights_info.get("backbone"),
            layers=jsonable(expert.weights_info.get("layers")),
            weights=jsonable(expert.weights_info),
            normalization=expert.weights_info.get("normalization"),
            model_kwargs=jsonable(model_kwargs or {}),
            holdout=holdout,
            seed=seed,
            num_train=len(train_idx),
            num_holdout=len(val_idx),
            train_ids=[ids[i] for i in train_idx],
            holdout_ids=[ids[i] for i in val_idx],
            num_errors=len(errors),
            errors=[{"id": sid, "error": err} for sid, err in errors[:_MAX_ERRORS_RECORDED]],
            calibration=calibration.to_dict(),
            anomalib_postprocessor=anomalib_post,
            device=str(expert.device),
            fit_id=fit.fit_id,
            tile_size=tiling[0] if tiling else None,
            tile_stride=tiling[1] if tiling else None,
            tile_image_score=tile_image_score if tiling else None,
        )
        fit.commit(config, run_key)
    return load_expert(dataset, key)  # as recorded: with its calibration and the rest of its options


def holdout_split(paths: list[str], holdout: float, seed: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Indices (held out, training) of the samples with these image ``paths``: a sample is held out when
    a hash of its file path and ``seed`` falls below ``holdout``. ``exact=True`` holds out exactly
    ``round(holdout * len(paths))`` samples instead (those with the smallest hashes): the count no longer
    varies with where the files live, but the choice then depends on the whole list, not on each image.

    The choice is per image, not per view, so experts fitted with the same seed on overlapping views (one
    on all normals, one per product group) hold out the same samples: an ensemble of them is calibrated
    on samples none of them trained on. It is the same after a re-import or a clone of the dataset (ids
    change, paths do not), and two samples of the same file never straddle training and calibration.
    At least one sample lands on each side.
    """
    u = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{path}".encode(), digest_size=8).digest(), "big")
                  / 2.0**64 for path in paths])
    if exact:
        held = np.zeros(len(paths), dtype=bool)
        held[np.argsort(u, kind="stable")[:int(round(holdout * len(paths)))]] = True
    else:
        held = u < holdout
    if not held.any():
        held[int(np.argmin(u))] = True
    if held.all():
        held[int(np.argmax(u))] = False
    return np.flatnonzero(held), np.flatnonzero(~held)


def calibrate_expert(expert, images: Sequence[torch.Tensor], *, rule: str = "far", param: float | None = None,
                     batch_size: int = 8, seed: int = 51, max_pixels: int = 200_000,
                     fields: dict[str, list] | None = None, progress: Any = False) -> Calibration:
    """Score held-out normal images with ``expert`` and build its :class:`Calibration`.

    ``fields`` holds one value per image for each field the expert reads (its ``needs_fields``); ``progress``
    (FiftyOne's convention, default quiet) counts the batches of the ``"calibrating"`` phase.
    """
    scores, maxima, pixels = [], [], []
    rng = np.random.default_rng(seed)
    starts = range(0, len(images), batch_size)
    bar = phase_bar(progress, f"calibrating on {len(images)} held-out normals", len(starts), "batch")
    for start in bar(starts):
        batch = torch.stack([t.float() for t in images[start:start + batch_size]])
        if fields:
            out = expert.predict(batch, fields={k: list(v[start:start + batch_size]) for k, v in fields.items()})
        else:
            out = expert.predict(batch)
        scores.append(out.raw_score.numpy())
        raw_map = out.raw_map.flatten(1).numpy()
        maxima.append(raw_map.max(axis=1))
        per_image = max(1, max_pixels // max(1, len(images)))
        for row in raw_map:
            pixels.append(rng.choice(row, size=min(per_image, row.size), replace=False))
    return Calibration.from_normals(np.concatenate(scores), np.concatenate(maxima), np.concatenate(pixels),
                                    rule=rule, param=param)


