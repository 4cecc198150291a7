"""Take a fitted expert to the line: export its model with anomalib's exporter, with what the line needs to
give the plugin's decision (``export_expert``).

The exported folder holds the model (``model.onnx``; ``model.xml`` + ``model.bin``; or ``model.pt``),
``expert.json`` (:func:`metadata`: input size and normalisation, the calibration on held-out normals, the
current image and pixel thresholds, versions, where it came from) and ``infer.py``, a copy of
:mod:`fiftyone_anomaly_vlm.models.line_inference`, which scores an image with numpy, pillow and the format's
runtime only: ``python infer.py part.png --heatmap part_map.png``.

Composite experts (one expert per group, ensembles, nested) export as one folder per member under
``members/<member>``, each a complete export of its own, and a top-level ``expert.json`` of kind
``"composite"`` holding the routing (``group_field``, group -> members, an ensemble's supervised head,
``combine``: ``"mean"``, ``"max"`` or ``"weighted"`` with its ``weights``) and the composite's own calibration
and thresholds. CLIP experts and tiled experts are refused (their inference is not one network over the whole
image).

Every exported network is checked against the plugin's torch model on a few of the view's images before the
folder appears: a format that cannot reproduce a model fails with one message naming both, and nothing is
left in ``output_dir``.

Example:
    >>> path = fav.export_expert(ds, "padim", format="onnx", output_dir="/deploy/padim")
    >>> # on the line: python /deploy/padim/infer.py part.png --heatmap part_map.png
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import torch

from .._common import check_image_collection, default_output_dir, field_key
from ..calibration import Calibration
from ..images import ImageLoadError, load_image
from ..models import line_inference
from ..models.anomalib_export import FORMAT_PACKAGES, MODEL_FILES, check_format, export_model
from ..models.progress import phase_bar
from ..runs import CLIP_METHOD, COMPOSITE_METHOD, SCORE_METHOD
from .combined import combine_rule
from .record import Expert, load_expert

#: relative tolerance of the exported network's raw image scores against the plugin's torch model
PARITY_RTOL = 1e-4
#: images of the view the export is checked on
PROBE_IMAGES = 4


def export_expert(samples, expert: str | Expert, format: str = "onnx", output_dir: str | None = None, *,
                  score_key: str | None = None, overwrite: bool = False, progress: bool | Any = None) -> str:
    """Export a fitted expert for inference without FiftyOne (see the module docs for the folder).

    Args:
        samples: the dataset (or a view of it) holding the expert; its first images check the export.
        expert: the expert's name (or the :class:`Expert` record).
        format: ``"onnx"``, ``"openvino"`` or ``"torch"`` (anomalib's ``to_onnx`` / ``to_openvino`` /
            ``to_torch``; the torch file is a pickled anomalib model, so the line needs torch and anomalib).
        output_dir: the folder to create (default: ``<fo default dataset dir>/anomaly_vlm/<dataset>/exports/
            <expert>-<format>``).
        score_key: the scoring run whose current thresholds go with the export (after ``set_threshold``).
            Default: the scoring run named like the expert when it holds this fit's scores, else the
            thresholds the expert was fitted with.
        overwrite: replace an existing, non-empty ``output_dir``.
        progress: FiftyOne progress convention (phases: one per exported model, then the check).

    Returns:
        The exported folder.

    Raises:
        ValueError: unknown expert or format, an expert that cannot be exported (CLIP, tiled, uncalibrated),
            a non-empty ``output_dir`` without ``overwrite``, a ``score_key`` that is not a scoring run of this
            expert, or a format that cannot reproduce the model (nothing is written then).
        ModuleNotFoundError: the format's runtime is not installed (``pip install '.[export]'``).
    """
    check_image_collection(samples, "export_expert")
    spec = expert if isinstance(expert, Expert) else load_expert(samples, expert)
    check_format(format)
    dataset = samples._root_dataset
    plan = _plan(dataset, spec, format)  # refuses what cannot be exported before any work
    calibration, source = _current_calibration(dataset, spec, score_key)
    out = os.path.abspath(output_dir or default_output_dir(samples, "exports", f"{spec.key}-{format}"))
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; pass overwrite=True or another output_dir")
    paths = samples.limit(PROBE_IMAGES).values("filepath")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        _write(plan, staging, format, paths, calibration, source, dataset, progress)
        shutil.copyfile(inspect.getsourcefile(line_inference), os.path.join(staging, "infer.py"))
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _plan(dataset, spec: Expert, fmt: str) -> dict[str, Any]:
    """The tree of experts to export (members loaded by name), refusing what cannot be exported."""
    if spec.method == CLIP_METHOD:
        raise ValueError(f"expert {spec.key!r} is a CLIP (zero/few-shot) expert: it cannot be exported (anomalib's "
                         "export takes anomalib models); export an anomalib expert (fit_expert) instead")
    if spec.options.get("tile_size"):
        raise ValueError(f"expert {spec.key!r} is tiled (tile_size={spec.options['tile_size']}): the exported network "
                         "sees the whole image, so its scores would differ; export an untiled expert")
    if not spec.options.get("calibration"):
        raise ValueError(f"expert {spec.key!r} has no calibration on held-out normals to export with it")
    node = {"spec": spec}
    if spec.method == COMPOSITE_METHOD:
        node["members"] = {}
        for group, keys in spec.options["members"].items():
            for key in keys:
                member = load_expert(dataset, key)
                if tuple(member.image_size) != tuple(spec.image_size):
                    raise ValueError(f"composite expert {spec.key!r} reads {tuple(spec.image_size)} images and its "
                                     f"member {key!r} {tuple(member.image_size)}: the line would resize twice; "
                                     "export the members one by one")
                node["members"].setdefault(key, _plan(dataset, member, fmt))
    return node


def _current_calibration(dataset, spec: Expert, score_key: str | None) -> tuple[Calibration, str]:
    """The calibration whose thresholds go with the export, and where they come from."""
    runs = dataset.list_runs()
    # by default the expert's own scoring run: under its default key, or its name (runs recorded before field_key)
    key = score_key or next((k for k in (field_key(spec.key), spec.key) if k in runs), spec.key)
    config = dataset.get_run_info(key).config if key in runs else None
    is_own = (config is not None and config.method == SCORE_METHOD and config.expert == spec.key
              and config.expert_fit_id == spec.options.get("fit_id") and bool(config.calibration))
    if score_key is not None and not is_own:
        raise ValueError(f"{score_key!r} is not a calibrated scoring run of this fit of expert {spec.key!r}")
    if is_own:
        return Calibration.from_dict(config.calibration), f"scoring run {key!r}"
    return Calibration.from_dict(spec.options["calibration"]), "fit"


def _write(node: dict, folder: str, fmt: str, probe_paths: list[str], calibration: Calibration, source: str,
           dataset, progress) -> None:
    spec: Expert = node["spec"]
    os.makedirs(folder, exist_ok=True)
    meta = metadata(spec, fmt, calibration, source, dataset)
    if "members" in node:
        for key, member in node["members"].items():
            member_cal = Calibration.from_dict(member["spec"].options["calibration"])
            _write(member, os.path.join(folder, "members", key), fmt, probe_paths, member_cal, "fit", dataset,
                   progress)
        meta["kind"] = line_inference.ROUTING
        meta["routing"] = {"group_field": spec.options.get("group_field"), "groups": spec.options["members"],
                           "head": spec.options.get("head"), "combine": combine_rule(spec.options.get("combine")),
                           "weights": spec.options.get("weights")}
    else:
        model = spec.load("cpu")
        phase_bar(progress, f"exporting {spec.key} ({fmt})")
        meta["files"] = export_model(model.model, spec.image_size, folder, fmt)
        meta["model_file"] = MODEL_FILES[fmt]
        _write_json(folder, meta)
        phase_bar(progress, f"checking {spec.key} ({fmt}) against the plugin")
        meta["parity"] = check_parity(model, line_inference.LineExpert(folder), probe_paths, fmt)
    _write_json(folder, meta)


def _write_json(folder: str, meta: dict) -> None:
    with open(os.path.join(folder, line_inference.METADATA), "w") as f:
        json.dump(meta, f, indent=1)


def metadata(spec: Expert, fmt: str, calibration: Calibration, source: str, dataset) -> dict[str, Any]:
    """``expert.json`` of one exported expert (a composite's gets ``routing`` and no model file).

    Keys: ``format_version``, ``kind`` (``"anomalib"`` or ``"composite"``), ``expert``, ``model``,
    ``model_class``, ``format``, ``model_file``, ``files``; ``input`` (``size`` ``[h, w]``; float32 RGB
    ``(N, 3, h, w)`` in [0, 1], batch dynamic; ``normalization``: the mean/std anomalib's pre-processor
    applies inside the exported graph); ``outputs`` (raw ``pred_score`` and ``anomaly_map``); ``calibration``
    (the held-out normals' sorted ``image_scores``, ``map_maxima``, heatmap anchors ``map_low``/``map_high``,
    the rule); ``threshold`` (raw ``image``/``pixel`` thresholds, their calibrated values, rule, ``source``);
    ``source`` (dataset, expert run, fit id, checkpoint); ``versions``; ``exported_at``; ``parity`` (the check).
    """
    return {
        "format_version": line_inference.FORMAT_VERSION,
        "kind": "anomalib",
        "expert": spec.key,
        "model": spec.model,
        "model_class": spec.model_class,
        "format": fmt,
        "input": {"size": list(spec.image_size), "layout": "NCHW float32 RGB in [0, 1], batch dynamic",
                  "resize": "antialiased bilinear to size (infer.py decodes and resizes as the plugin does)",
                  "normalization": spec.options.get("normalization")},
        "outputs": {"pred_score": "raw image score", "anomaly_map": "raw anomaly map (N, 1, h, w)"},
        "calibration": calibration.to_dict(),
        "threshold": {"image": calibration.image_threshold, "pixel": calibration.pixel_threshold,
                      "normalized_image": calibration.normalized_image_threshold,
                      "normalized_pixel": calibration.normalized_pixel_threshold,
                      "rule": calibration.rule, "param": calibration.param, "source": source},
        "source": {"dataset": dataset.name, "expert_run": spec.run_key, "fit_id": spec.options.get("fit_id"),
                   "checkpoint": spec.checkpoint},
        "versions": _versions(fmt),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }


def _versions(fmt: str) -> dict[str, str]:
    out = {}
    for name in ("fiftyone-anomaly-vlm", "anomalib", "torch", *FORMAT_PACKAGES[fmt]):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def check_parity(model, line, paths: list[str], fmt: str) -> dict[str, Any]:
    """Run the plugin's model and the exported one on the same decoded images; fail when they disagree.

    Raises:
        ValueError: a raw image score off by more than :data:`PARITY_RTOL` (relative), or a map of another
            shape or off by more than 1e-3 of its range or magnitude (the message names the format and the model).
    """
    images = []
    for path in paths:
        try:
            images.append(load_image(path, tuple(line.image_size)))
        except ImageLoadError:
            continue
    x = torch.stack(images) if images else torch.rand(2, 3, *line.image_size, generator=torch.Generator().manual_seed(0))
    ref = model.predict(x)
    raw, raw_map = line.raw(x.numpy())
    want, want_map = ref.raw_score.numpy(), ref.raw_map.numpy()
    rel = float(np.max(np.abs(raw - want) / np.maximum(np.abs(want), 1e-12)))
    shape_ok = raw_map.shape == want_map.shape
    map_err = float(np.max(np.abs(raw_map - want_map))) if shape_ok else float("inf")
    # the map's scale: its range, or its magnitude where the map is nearly flat far from 0 (a small image's PaDiM
    # map spans 1e-3 around 30: float noise of 4e-4 there is 1e-5 of the values, not a disagreement)
    span = max(float(np.ptp(want_map)), float(np.max(np.abs(want_map))) if want_map.size else 0.0) or 1.0
    if rel > PARITY_RTOL or map_err > 1e-3 * span:
        what = (f"raw scores {raw.tolist()} vs {want.tolist()}" if rel > PARITY_RTOL else
                f"anomaly maps {raw_map.shape} vs {want_map.shape}" if not shape_ok else
                f"anomaly maps off by {map_err:.3g} (range {span:.3g})")
        raise ValueError(f"format {fmt!r} cannot reproduce model {model.model_class.rsplit('.', 1)[-1]} "
                         f"({line.meta['expert']}): {what}; try another format")
    return {"images": int(x.shape[0]), "max_rel_raw_score_diff": rel, "max_abs_map_diff": map_err}
