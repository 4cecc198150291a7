"""Score a view with a fitted expert; write native FiftyOne label fields, batch by batch.

For each sample (fields named from the run key, see :class:`~fiftyone_anomaly_vlm.fields.FieldNames`):
``<key>_score`` (float in (0, 1): the share of known-good calibration samples scoring below it, see
:mod:`.calibration`), ``<key>_raw_score``, ``<key>``
(``fo.Classification`` normal/anomalous), ``<key>_map`` (``fo.Heatmap``, 16-bit PNG on disk with
``range=[0, 65535]`` for every sample, so colours compare across samples), ``<key>_mask``
(``fo.Segmentation``, 1 = anomalous) and ``<key>_error`` (a message where the sample could not be
scored, None otherwise).

Writes go out once per batch with ``set_values`` while the next batch is being computed; the score field
is written last, so a run that was killed restarts where it stopped (only samples without a score are
scored again).

Example:
    >>> results = fav.score(ds, expert="padim")          # fields padim, padim_score, padim_map, ...
    >>> results.num_scored, results.num_flagged, results.num_errors
    (120, 14, 1)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import fiftyone as fo
import fiftyone.core.utils as fou
import fiftyone.utils.image as foui

from ._common import check_image_collection, check_key, default_output_dir
from .experts import Expert, load_expert
from .fields import FieldNames
from .calibration import Calibration
from .images import ImageLoadError, load_image
from .runs import AnomalyScoreRunConfig

logger = logging.getLogger(__name__)

#: heatmaps are stored as 16-bit PNGs of the normalised map; every sample uses this range
HEATMAP_RANGE = [0, 65535]
ANOMALOUS, NORMAL = "anomalous", "normal"


@dataclass
class ScoreResults:
    """What a :func:`score` call did.

    Attributes:
        key: the run key (and field prefix).
        fields: the :class:`FieldNames` written.
        num_samples: samples in the view.
        num_scored: samples scored by this call.
        num_skipped: samples already scored by an earlier (interrupted) call with the same key.
        num_errors: samples that got ``<key>_error`` in this call.
        num_flagged: samples of the view labelled anomalous (after this call).
        output_dir: folder of the heatmap and mask PNGs.
    """

    key: str
    fields: FieldNames
    num_samples: int
    num_scored: int = 0
    num_skipped: int = 0
    num_errors: int = 0
    num_flagged: int = 0
    output_dir: str = ""
    errors: dict[str, str] = field(default_factory=dict)


class _ImageList(torch.utils.data.Dataset):
    """(id, path) pairs decoded to tensors; a bad image yields its error message instead."""

    def __init__(self, ids: list[str], paths: list[str], image_size: tuple[int, int]) -> None:
        self.ids, self.paths, self.image_size = ids, paths, image_size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str | None]:
        try:
            return self.ids[i], load_image(self.paths[i], self.image_size), None
        except ImageLoadError as exc:
            return self.ids[i], None, str(exc)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this sample's error, not the run's
            return self.ids[i], None, f"{type(exc).__name__}: {exc}"


def _collate(items):
    return items


def _resolve_expert(samples, expert: str | Expert) -> Expert:
    if isinstance(expert, Expert):
        if expert.checkpoint and not os.path.isfile(expert.checkpoint):
            raise FileNotFoundError(f"expert checkpoint not found: {expert.checkpoint}")
        return expert
    if not isinstance(expert, str):
        raise TypeError(f"expert must be a name or an Expert, got {type(expert).__name__}")
    return load_expert(samples, expert)


def score(
    samples,
    expert: str | Expert,
    key: str | None = None,
    *,
    device: str | None = "auto",
    batch_size: int = 16,
    num_workers: int | None = None,
    output_dir: str | None = None,
    overwrite: bool = False,
    progress: bool | Any = None,
) -> ScoreResults:
    """Score every sample of ``samples`` with a fitted expert and record the run ``key``.

    Args:
        samples: a dataset or view of images.
        expert: the name given to :func:`fit_expert` (or the :class:`Expert` it returned).
        key: run key and field prefix (default: the expert's name).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:0"``...
        batch_size: images per forward pass (and per database write).
        num_workers: image-decoding worker processes (default: up to 4, 0 decodes in this process).
        output_dir: folder for heatmap/mask PNGs (default: ``<fo default dataset dir>/anomaly_vlm/<dataset>/scores/<key>``).
        overwrite: score every sample again; by default samples already scored under ``key`` by the same
            expert are skipped, so an interrupted run resumes.
        progress: FiftyOne progress convention: None/True/False, or a callable taking a ``ProgressBar``.

    Returns:
        :class:`ScoreResults` with counts.

    Raises:
        ValueError: empty view, non-image media, bad key, unknown expert, or ``key`` already used by
            another kind of run or another expert (without ``overwrite``).
        FileNotFoundError: the expert's checkpoint is missing.
    """
    n_total = check_image_collection(samples, "score")
    spec = _resolve_expert(samples, expert)
    key = check_key(key or spec.key)
    fields = FieldNames(key)
    dataset = samples._root_dataset

    if key in dataset.list_runs():
        info = dataset.get_run_info(key)
        if not isinstance(info.config, AnomalyScoreRunConfig):
            raise ValueError(f"key {key!r} is already used by a run of another kind; choose another key")
        if info.config.checkpoint != spec.checkpoint and not overwrite:
            msg = (f"run {key!r} was scored by expert {info.config.expert!r}; pass overwrite=True to replace "
                   "its scores or choose another key")
            raise ValueError(msg)
    else:
        clash = [f for f in fields.all() if f in dataset.get_field_schema()]
        if clash:
            raise ValueError(f"fields {clash} exist but belong to no scoring run {key!r}; choose another key")

    model = spec.load(device=device)  # a broken checkpoint fails here, before any write
    # thresholds/normalisation: a resumed run keeps its own (possibly re-thresholded) calibration
    cal_dict = None
    if key in dataset.list_runs() and not overwrite:
        cal_dict = getattr(dataset.get_run_info(key).config, "calibration", None)
    cal_dict = cal_dict or spec.options.get("calibration")
    calibration = Calibration.from_dict(cal_dict) if cal_dict and "image_scores" in cal_dict else None
    owns_dir = output_dir is None
    out_dir = output_dir or default_output_dir(samples, "scores", key)
    maps_dir, masks_dir = os.path.join(out_dir, "maps"), os.path.join(out_dir, "masks")
    os.makedirs(maps_dir, exist_ok=True)
    os.makedirs(masks_dir, exist_ok=True)

    config = AnomalyScoreRunConfig(
        expert=spec.key,
        expert_run=spec.run_key,
        model=spec.model,
        model_class=spec.model_class,
        checkpoint=spec.checkpoint,
        image_size=list(spec.image_size),
        output_dir=out_dir,
        maps_dir=maps_dir,
        masks_dir=masks_dir,
        owns_output_dir=owns_dir,
        heatmap_range=HEATMAP_RANGE,
        fields=fields.all(),
        device=str(model.device),
        batch_size=batch_size,
        calibration=calibration.to_dict() if calibration else None,
        normalized_image_threshold=calibration.normalized_image_threshold if calibration else 0.5,
        normalized_pixel_threshold=calibration.normalized_pixel_threshold if calibration else 0.5,
        threshold_history=_history(dataset, key, calibration, overwrite),
    )
    # Registered before any work: the fields belong to a run from the first batch on (delete_run cleans up
    # after a crash too). Re-registering keeps existing fields (cleanup=False) so a resumed run keeps them.
    dataset.register_run(key, config, overwrite=True, cleanup=False)
    _declare_fields(dataset, fields)
    if fields.mask not in dataset.mask_targets:
        dataset.mask_targets[fields.mask] = {1: ANOMALOUS}
        dataset.save()

    todo = samples
    if not overwrite and fields.score in dataset.get_field_schema():
        todo = samples.exists(fields.score, False)
    # experts that read sample fields (e.g. a per-class object name) declare them in `needs_fields`
    needs = list(getattr(model, "needs_fields", ()) or ())
    ids, paths, *needed = todo.values(["id", "filepath", *needs])
    field_values = {name: dict(zip(ids, vals)) for name, vals in zip(needs, needed)}
    results = ScoreResults(key=key, fields=fields, num_samples=n_total, num_skipped=n_total - len(ids),
                           output_dir=out_dir)

    if ids:
        if num_workers is None:
            num_workers = min(4, max(0, (os.cpu_count() or 1) - 1))
        loader = torch.utils.data.DataLoader(
            _ImageList(ids, paths, spec.image_size), batch_size=batch_size, num_workers=num_workers,
            collate_fn=_collate, pin_memory=model.device.type == "cuda",
            persistent_workers=False, prefetch_factor=2 if num_workers else None,
        )
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fav-writer")
        pending: Future | None = None
        try:
            with fou.ProgressBar(total=len(ids), progress=progress) as pb:
                for items in loader:
                    ok = [(sid, img) for sid, img, err in items if err is None]
                    failed = {sid: err for sid, _, err in items if err is not None}
                    if needs and hasattr(model, "unscorable"):  # e.g. a sample of a group without an expert
                        why = model.unscorable({n: [field_values[n][sid] for sid, _ in ok] for n in needs})
                        failed.update({sid: err for (sid, _), err in zip(ok, why) if err})
                        ok = [item for item, err in zip(ok, why) if not err]
                    out = None
                    if ok:
                        batch = torch.stack([img for _, img in ok])
                        if needs:
                            out = model.predict(batch, fields={n: [field_values[n][sid] for sid, _ in ok]
                                                               for n in needs})
                        else:
                            out = model.predict(batch)
                    if pending is not None:
                        pending.result()  # one batch in flight: bounded memory, errors surface promptly
                    pending = writer.submit(_write_batch, dataset, fields, [sid for sid, _ in ok], out, failed,
                                            maps_dir, masks_dir, calibration)
                    results.num_scored += len(ok)
                    results.num_errors += len(failed)
                    results.errors.update(failed)
                    pb.update(len(items))
                if pending is not None:
                    pending.result()
        finally:
            writer.shutdown(wait=True)

    results.num_flagged = samples.match(fo.ViewField(fields.label + ".label") == ANOMALOUS).count() \
        if fields.label in dataset.get_field_schema() else 0
    return results


def _declare_fields(dataset, fields: FieldNames) -> None:
    """Create the run's fields with their label types (so an all-error batch can be written too)."""
    schema = dataset.get_field_schema()
    kinds = {
        fields.label: (fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Classification}),
        fields.score: (fo.FloatField, {}),
        fields.raw_score: (fo.FloatField, {}),
        fields.map: (fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Heatmap}),
        fields.mask: (fo.EmbeddedDocumentField, {"embedded_doc_type": fo.Segmentation}),
        fields.error: (fo.StringField, {}),
    }
    for name, (ftype, kwargs) in kinds.items():
        if name not in schema:
            dataset.add_sample_field(name, ftype, **kwargs)


def _history(dataset, key: str, calibration: Calibration | None, overwrite: bool) -> list[dict[str, Any]]:
    history = []
    if key in dataset.list_runs() and not overwrite:
        history = json.loads(json.dumps(list(getattr(dataset.get_run_info(key).config, "threshold_history", None)
                                             or [])))
    if not history and calibration is not None:
        history = [threshold_record(calibration, source="fit")]
    return history


def threshold_record(calibration: Calibration, **extra: Any) -> dict[str, Any]:
    """One entry of a run's ``threshold_history``."""
    return {"rule": calibration.rule, "param": calibration.param, "image_threshold": calibration.image_threshold,
            "pixel_threshold": calibration.pixel_threshold,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), **extra}


def calibrated_arrays(out, calibration: Calibration | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scores, labels, maps, masks) of an expert's batch output on the plugin's calibrated scales.

    With a calibration: scores are the share of calibration normals below (:meth:`Calibration.normalize_scores`),
    maps use the run's two anchors, labels and masks follow its thresholds. Without one (an expert that
    calibrates itself) the expert's own normalised outputs are returned. Maps are float in ``[0, 1]``.
    """
    if calibration is None or out.raw_score is None:
        scores = out.score.numpy().astype(np.float64)
        labels = out.label.numpy().astype(bool)
    else:
        raw = out.raw_score.numpy()
        scores = calibration.normalize_scores(raw)
        labels = raw > calibration.image_threshold
    if calibration is None or out.raw_map is None:
        maps = out.anomaly_map.clamp(0, 1).numpy().astype(np.float64)
        masks = out.mask.numpy().astype(bool)
    else:
        raw_map = out.raw_map.numpy()
        maps = calibration.normalize_map(raw_map)
        masks = raw_map > calibration.pixel_threshold
    return scores, labels, maps, masks


def _outputs(out, calibration: Calibration | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(normalised scores, labels, 16-bit maps, uint8 masks) of a batch, as written to disk and fields."""
    scores, labels, maps, masks = calibrated_arrays(out, calibration)
    return scores, labels, (maps * HEATMAP_RANGE[1] + 0.5).astype(np.uint16), masks.astype(np.uint8)


def _write_batch(dataset, fields: FieldNames, ids: list[str], out, failed: dict[str, str],
                 maps_dir: str, masks_dir: str, calibration: Calibration | None = None) -> None:
    """Write one batch: PNG files first, then the label fields, the score field last."""
    values: dict[str, dict[str, Any]] = {f: {} for f in fields.all()}
    if out is not None:
        scores, labels, maps, masks = _outputs(out, calibration)
        for i, sid in enumerate(ids):
            map_path = os.path.join(maps_dir, f"{sid}.png")
            mask_path = os.path.join(masks_dir, f"{sid}.png")
            foui.write(maps[i], map_path)
            foui.write(masks[i], mask_path)
            s = float(scores[i])
            anomalous = bool(labels[i])
            values[fields.label][sid] = fo.Classification(
                label=ANOMALOUS if anomalous else NORMAL,
                confidence=s if anomalous else 1.0 - s,
                anomaly_score=s,
            )
            values[fields.map][sid] = fo.Heatmap(map_path=map_path, range=HEATMAP_RANGE)
            values[fields.mask][sid] = fo.Segmentation(mask_path=mask_path)
            values[fields.raw_score][sid] = float(out.raw_score[i])
            values[fields.score][sid] = s
            values[fields.error][sid] = None
    for sid, err in failed.items():
        # a sample that fails now must not keep fields from an earlier run
        for f in (fields.label, fields.map, fields.mask, fields.raw_score, fields.score):
            values[f][sid] = None
        values[fields.error][sid] = err
    order = [fields.error, fields.label, fields.map, fields.mask, fields.raw_score, fields.score]
    for f in order:
        if values[f]:
            dataset.set_values(f, values[f], key_field="id")
