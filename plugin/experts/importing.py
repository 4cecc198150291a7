"""Bring an anomalib model trained elsewhere in as an expert (``import_expert``).

A Lightning ``.ckpt`` written by anomalib's ``Engine.fit`` (or by this plugin), or a model exported with
anomalib's ``to_torch`` (also what ``export_expert(format="torch")`` writes), becomes an expert like a fitted
one: the file is copied into the expert's own fit folder, the model is calibrated on the given known-good
samples exactly as :func:`~fiftyone_anomaly_vlm.fit_expert` calibrates on its held-out normals
(:func:`.single.calibrate_expert`, same threshold rules), and the run records where the file came from
(``weights``: ``{"source": "import", "path", "format", "size_bytes"}``). It then scores, reviews and evaluates
like any expert.

Example:
    >>> fav.import_expert(ds.match_tags("good"), checkpoint="/models/padim.ckpt", key="padim_ext")
    >>> fav.score(ds, expert="padim_ext")
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import numpy as np

from .._common import check_image_collection, check_key, default_output_dir
from ..storage import output_folder
from ..calibration import threshold_from_normals
from ..models import AnomalibExpert
from ..models.anomalib_build import network_size
from ..models.anomalib_export import read_model_file
from ..models.anomalib_expert import pre_processor_size
from ..runs import ExpertRunConfig, expert_run_key
from .fits import FitFolder
from .record import Expert
from .single import calibrate_expert, decodable_images

logger = logging.getLogger(__name__)


def import_expert(samples, checkpoint: str, key: str, *, model: str | None = None,
                  image_size: int | tuple[int, int] | None = None, device: str | None = "auto",
                  batch_size: int = 8, threshold: str = "far", threshold_param: float | None = None,
                  output_dir: str | None = None, overwrite: bool = False, progress: bool | Any = None) -> Expert:
    """Register an anomalib model file as the expert ``key``, calibrated on the known-good ``samples``.

    Args:
        samples: known-good samples the model did not train on (all of them calibrate it, as ``fit_expert``'s
            held-out normals do; at least one).
        checkpoint: a Lightning ``.ckpt`` (``Engine.fit``) or an anomalib ``to_torch`` ``.pt`` file.
        key: the expert's name.
        model: the anomalib model name, for a ``.ckpt`` whose class cannot be told from its hyper-parameters.
        image_size: the input size the model was trained at; default: its pre-processor's resize. A different
            value fails (the model would see other pixels than it was trained on).
        device: ``"auto"``, ``"cpu"``, ``"cuda:0"``...
        batch_size: images per forward pass while calibrating.
        threshold: the threshold rule on the known-good scores (see ``fit_expert``); threshold_param: its
            parameter.
        output_dir: the expert's folder (default: ``<fo default dataset dir>/anomaly_vlm/<dataset>/experts/<key>``).
        overwrite: replace an existing expert named ``key``.
        progress: FiftyOne progress convention.

    Returns:
        The :class:`Expert` record.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a corrupt file or one that is not an anomalib model, a model class anomalib does not know,
            an ``image_size`` that disagrees with the model's, no decodable image, a bad key or rule, or an
            existing expert under ``key`` (without ``overwrite``). Nothing is written then.
    """
    key = check_key(key)
    check_image_collection(samples, "import_expert")
    dataset = samples._root_dataset
    run_key = expert_run_key(key)
    if run_key in dataset.list_runs() and not overwrite:
        raise ValueError(f"an expert named {key!r} already exists; pass overwrite=True or another key")
    threshold_from_normals(np.zeros(1), threshold, threshold_param)  # a bad rule fails before any work
    out_dir = output_folder(output_dir, default_output_dir(samples, "experts", key))[0]  # unwritable: fails here
    module, model_class = read_model_file(checkpoint, model)
    own = pre_processor_size(module)
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if own is not None and network_size(module, size) != own:
            raise ValueError(f"{checkpoint} holds a model that reads {own[0]}x{own[1]} images (its pre-processor "
                             f"resizes to that); image_size={size} disagrees: drop image_size or pass {own}")
    elif own is None:
        raise ValueError(f"{checkpoint} does not say its input size (no resize in its pre-processor); pass image_size")
    else:
        size = own
    expert = AnomalibExpert(module, image_size=size, device=device)
    ids, paths, images, errors = decodable_images(samples, size, progress)
    if not len(images):
        raise ValueError(f"import_expert: none of the {len(ids) + len(errors)} images could be decoded")
    for sid, err in errors[:5]:
        logger.warning("import_expert: skipping sample %s: %s", sid, err)
    calibration = calibrate_expert(expert, images, rule=threshold, param=threshold_param, batch_size=batch_size,
                                   progress=progress)  # a model that cannot take the images fails here
    ext = ".pt" if checkpoint.endswith(".pt") else ".ckpt"
    with FitFolder(samples, out_dir, key) as fit:
        copied = fit.file("model" + ext)
        shutil.copyfile(checkpoint, copied)
        config = ExpertRunConfig(
            expert=key, model=model_class.rsplit(".", 1)[-1].lower(), model_class=model_class, checkpoint=copied,
            output_dir=out_dir, owns_output_dir=output_dir is None, image_size=list(size),
            weights={"source": "import", "path": os.path.abspath(checkpoint),
                     "format": "to_torch" if ext == ".pt" else "lightning", "size_bytes": os.path.getsize(checkpoint)},
            num_train=0, num_holdout=len(ids), train_ids=[], holdout_ids=list(ids), holdout=1.0,
            num_errors=len(errors), errors=[{"id": sid, "error": err} for sid, err in errors[:100]],
            calibration=calibration.to_dict(), device=str(expert.device), fit_id=fit.fit_id,
        )
        fit.commit(config, run_key)
    return Expert(key=key, run_key=run_key, model=config.model, model_class=model_class, checkpoint=copied,
                  image_size=size)
