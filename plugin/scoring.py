"""Score a view with a fitted expert; write native FiftyOne label fields, batch by batch.

For each sample (fields named from the run key, see :class:`~fiftyone_anomaly_vlm.fields.FieldNames`):
``<key>_score`` (float in (0, 1): the share of known-good calibration samples scoring below it, see
:mod:`.calibration`), ``<key>_raw_score``, ``<key>``
(``fo.Classification`` normal/anomalous), ``<key>_map`` (``fo.Heatmap``, 16-bit PNG on disk with
``range=[0, 65535]`` for every sample, so colours compare across samples), ``<key>_mask``
(``fo.Segmentation``, 1 = anomalous), ``<key>_regions`` (``fo.Detections``, one box per connected region
of the mask), ``<key>_num_regions``, ``<key>_explanation`` (one line for flagged samples, see :mod:`.regions`)
and ``<key>_error`` (a message where the sample could not be scored, None otherwise).

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import fiftyone as fo
import fiftyone.utils.image as foui

from ._common import check_image_collection, check_key, default_output_dir, field_key
from .engine import BatchOutput, Job, check_positive_int, queue_run_shards, run_job
from .experts import Expert, load_expert
from .fields import FieldNames
from .calibration import Calibration, calibrated_arrays
from .images import ImageLoadError, load_image_sized
from .labels import ANOMALOUS, anomaly_label
from .native import at_map_sizes, map_size, native_loader
from .regions import RegionRule, check_min_area, declare_region_attributes, image_size_of
from .runs import EXPERT_METHODS, AnomalyScoreRunConfig
from .runs.score import record_output_dir, remove_orphaned_pngs
from .shards import QueuedShards
from .storage import app_root, label_path, output_folder

#: the score operator that ``score(..., shards=N)`` queues (``fiftyone.yml``'s plugin name / operator name)
SCORE_OPERATOR = "@anomaly-vlm/anomaly-vlm/score_anomalies"

logger = logging.getLogger(__name__)

#: heatmaps are stored as 16-bit PNGs of the normalised map; every sample uses this range
HEATMAP_RANGE = [0, 65535]


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

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str | None, tuple[int, int] | None]:
        """(id, tensor or None, error or None, the image's own ``(H, W)`` or None)."""
        try:
            tensor, size = load_image_sized(self.paths[i], self.image_size)
            return self.ids[i], tensor, None, size
        except ImageLoadError as exc:
            return self.ids[i], None, str(exc), None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this sample's error, not the run's
            return self.ids[i], None, f"{type(exc).__name__}: {exc}", None


def _collate(items):
    return items


def resolve_expert(samples, expert: str | Expert) -> Expert:
    """The :class:`Expert` named ``expert`` on ``samples``' dataset (or ``expert`` itself, checked).

    Raises:
        TypeError: neither a name nor an :class:`Expert`.
        ValueError: no such expert.
        FileNotFoundError: its checkpoint is missing.
    """
    if isinstance(expert, Expert):
        if expert.checkpoint and not os.path.isfile(expert.checkpoint):
            raise FileNotFoundError(f"expert checkpoint not found: {expert.checkpoint}")
        return expert
    if not isinstance(expert, str):
        raise TypeError(f"expert must be a name or an Expert, got {type(expert).__name__}")
    return load_expert(samples, expert)


class ScoreJob(Job):
    """What a scoring run is, for the :mod:`engine <fiftyone_anomaly_vlm.engine>`: decode each batch of
    images in loader workers, run the expert, write its calibrated score, label, heatmap and mask."""

    verb = "score"
    method = "anomaly_score"

    def __init__(self, samples, spec: Expert, key: str, model, calibration: Calibration | None, *,
                 out_dir: str, owns_dir: bool, batch_size: int, num_workers: int, history: list[dict],
                 previous_dirs: list[str] = (), min_region_area: float = 0.0, label_root: str | None = None) -> None:
        self.spec, self.model, self.calibration, self.key = spec, model, calibration, key
        self.names = FieldNames(key)
        self.fields = self.names.specs()
        self.error_field, self.done_field = self.names.error, self.names.score
        self.dataset = samples._root_dataset
        self.out_dir, self.owns_dir, self.previous_dirs = out_dir, owns_dir, list(previous_dirs)
        self.label_root = label_root  # the labels' paths point under it (the run's app_root)
        self.maps_dir, self.masks_dir = os.path.join(out_dir, "maps"), os.path.join(out_dir, "masks")
        self.batch_size, self.num_workers, self.history = batch_size, num_workers, history
        self.regions = RegionRule.of(calibration, min_region_area)
        # experts that read sample fields (e.g. a per-class object name) declare them in `needs_fields`
        self.needs = list(model.needs_fields)
        # a tiled expert reads each image at its own resolution (TiledExpert.predict_array), one at a time
        self.native = bool(model.native_resolution)

    def identity(self, config) -> tuple:
        """The expert and its fit: scores of another fit (a re-fit under the same name) are not added to."""
        return config.expert, config.expert_fit_id or config.checkpoint

    def describe_identity(self, config) -> str:
        expert, fit = self.identity(config)
        return f"expert {expert!r} (fit {fit})"

    def config(self) -> AnomalyScoreRunConfig:
        spec, cal = self.spec, self.calibration
        return AnomalyScoreRunConfig(
            expert=spec.key, expert_run=spec.run_key, expert_fit_id=spec.options.get("fit_id"), model=spec.model,
            model_class=spec.model_class, checkpoint=spec.checkpoint, image_size=list(spec.image_size),
            output_dir=self.out_dir, maps_dir=self.maps_dir, masks_dir=self.masks_dir, owns_output_dir=self.owns_dir,
            heatmap_range=HEATMAP_RANGE, fields=self.names.all(), device=str(self.model.device),
            batch_size=self.batch_size, calibration=cal.to_dict() if cal else None,
            normalized_image_threshold=cal.normalized_image_threshold if cal else 0.5,
            normalized_pixel_threshold=cal.normalized_pixel_threshold if cal else 0.5,
            threshold_history=self.history, output_dirs=[*self.previous_dirs, self.out_dir],
            min_region_area=self.regions.min_area, app_root=self.label_root,
        )

    def setup(self, dataset) -> None:
        os.makedirs(self.maps_dir, exist_ok=True)
        os.makedirs(self.masks_dir, exist_ok=True)
        record_output_dir(dataset, self.key, self.out_dir)  # a shard may keep the record another shard made
        if self.names.mask not in dataset.mask_targets:
            dataset.mask_targets[self.names.mask] = {1: ANOMALOUS}
            dataset.save()
        declare_region_attributes(dataset, self.names.regions)

    def columns(self) -> list[str]:
        return ["id", "filepath", *self.needs]

    def batches(self, rows: dict[str, list]):
        self.values = {name: dict(zip(rows["id"], rows[name])) for name in self.needs}
        self.filepaths = dict(zip(rows["id"], rows["filepath"]))
        if self.native:
            return native_loader(rows["id"], rows["filepath"], self.batch_size, self.num_workers, _collate,
                                 self.model.device.type == "cuda")
        return torch.utils.data.DataLoader(
            _ImageList(rows["id"], rows["filepath"], self.spec.image_size), batch_size=self.batch_size,
            num_workers=self.num_workers, collate_fn=_collate, pin_memory=self.model.device.type == "cuda",
            persistent_workers=False, prefetch_factor=2 if self.num_workers else None,
        )

    def compute(self, items) -> BatchOutput:
        ok = [(sid, img) for sid, img, err, _ in items if err is None]
        failed = {sid: err for sid, _, err, _ in items if err is not None}
        sizes = {sid: map_size(size) for sid, _, _, size in items if size is not None}
        needs = self.needs
        if needs:  # e.g. a sample of a group without an expert
            why = self.model.unscorable({n: [self.values[n][sid] for sid, _ in ok] for n in needs})
            failed.update({sid: err for (sid, _), err in zip(ok, why) if err})
            ok = [item for item, err in zip(ok, why) if not err]
        out = BatchOutput(errors=failed, size=len(items))
        for group, pred in self._predict(ok):
            _batch_values(out, self.names, [sid for sid, _ in group], pred, self.maps_dir, self.masks_dir,
                          self.calibration, regions=self.regions, label_root=self.label_root,
                          image_sizes=[image_size_of(self.filepaths[sid]) for sid, _ in group],
                          map_sizes=[sizes.get(sid) for sid, _ in group])
        return out

    def _predict(self, ok: list):
        """``(samples, prediction)``: the batch at once, or, for a tiled expert, one image at a time (at its own
        resolution, its maps stitched at the map size, :func:`~.native.map_size`)."""
        if not ok:
            return
        if self.native:
            for sid, img in ok:
                yield [(sid, img)], self.model.predict_array(img, map_size(img.shape[:2]))
            return
        batch = torch.stack([img for _, img in ok])
        if self.needs:
            yield ok, self.model.predict(batch, fields={n: [self.values[n][sid] for sid, _ in ok] for n in self.needs})
        else:
            yield ok, self.model.predict(batch)

    def finish(self, samples, stats) -> None:
        # PNGs of earlier calls that no sample uses any more (overwritten, or re-scored into another folder)
        stats.counts["orphans_removed"] = remove_orphaned_pngs(self.dataset, self.key)
        if self.names.label in self.dataset.get_field_schema():
            stats.counts["flagged"] = samples.match(fo.ViewField(self.names.label + ".label") == ANOMALOUS).count()


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
    min_region_area: float = 0.0,
    progress: bool | Any = None,
    shard: tuple[int, int] | None = None,
    shards: int | None = None,
) -> ScoreResults | QueuedShards:
    """Score every sample of ``samples`` with a fitted expert and record the run ``key``.

    Args:
        samples: a dataset or view of images.
        expert: the name given to :func:`fit_expert` (or the :class:`Expert` it returned).
        key: run key and field prefix (default: the expert's name, runs of underscores collapsed: expert
            ``auto__padim_128`` scores into ``auto_padim_128``; FiftyOne cannot reload fields named with ``__``).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:0"``...
        batch_size: images per forward pass (and per database write).
        num_workers: image-decoding worker processes (default: up to 4, 0 decodes in this process).
        output_dir: folder for heatmap/mask PNGs (default: ``<storage root>/<dataset>/scores/<key>``, see
            :mod:`~fiftyone_anomaly_vlm.storage`; a relative path is taken under the storage root). Checked
            writable before anything else.
        overwrite: score every sample again; by default samples already scored under ``key`` by the same
            expert fit are skipped, so an interrupted run resumes.
        min_region_area: the smallest connected region of a mask written to ``<key>_regions``, as a share of
            the image in ``[0, 1)`` (0.001 = 0.1 %; 0 keeps every region). Recorded on the run and used again
            by :func:`set_threshold`. Resuming a run takes its recorded value (another one is refused).
        progress: FiftyOne progress convention: None/True/False, or a callable taking a ``ProgressBar``.
        shard: ``(index, count)``: score only that shard of ``samples`` (a hash of the sample id, see
            :mod:`~fiftyone_anomaly_vlm.shards`), e.g. from your own job scheduler; every shard writes the one
            run ``key``, the one that completes the set counts the flagged samples of the whole view.
        shards: queue this many delegated operations, one per shard, and return at once
            (:class:`~fiftyone_anomaly_vlm.shards.QueuedShards`); ``fiftyone delegated launch`` workers run them.

    Returns:
        :class:`ScoreResults` with counts (of the shard, for ``shard``), or
        :class:`~fiftyone_anomaly_vlm.shards.QueuedShards` for ``shards``.

    Raises:
        ValueError: empty view, non-image media, bad key, batch size or ``min_region_area``, unknown expert, or ``key`` already
            used by another kind of run or holding scores of another expert or another fit of it (without
            ``overwrite``).
        FileNotFoundError: the expert's checkpoint is missing.
        RunBusyError: another process is writing the run ``key``.
    """
    n_total = check_image_collection(samples, "score")
    batch_size = check_positive_int("batch_size", batch_size)
    min_region_area = check_min_area(min_region_area)
    if num_workers is None:
        num_workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    spec = resolve_expert(samples, expert)
    key = check_key(key or field_key(spec.key))  # no "__" in field names (a selection candidate, a group member)
    dataset = samples._root_dataset
    out_dir, owns_dir = output_folder(output_dir, default_output_dir(samples, "scores", key))
    if shards is not None:
        return _queue_score_shards(samples, spec, key, shards, shard, overwrite, device=device,
                                   batch_size=batch_size, min_region_area=min_region_area, output_dir=output_dir)
    if shard is not None:
        dataset._doc.reload("runs")  # the run as the other shards' processes recorded it
    if key in dataset.list_runs() and dataset.get_run_info(key).config.method in EXPERT_METHODS:
        owner = getattr(dataset.get_run_info(key).config, "expert", key)
        raise ValueError(f"key {key!r} holds the record of expert {owner!r}; choose another key for the scores")
    recorded = dataset.get_run_info(key).config if key in dataset.list_runs() else None
    if recorded is not None and recorded.method != ScoreJob.method:
        recorded = None  # another kind of run: the engine refuses the key before anything is written
    if recorded is not None and not overwrite and recorded.min_region_area != min_region_area:
        raise ValueError(f"run {key!r} wrote its regions with min_region_area={recorded.min_region_area}; resume it "
                         f"with the same value, or pass overwrite=True to score every sample again with "
                         f"min_region_area={min_region_area} (a resume keeps the regions already written)")
    model = spec.load(device=device)  # a broken checkpoint fails here, before any write
    # thresholds/normalisation: a resumed run keeps its own (possibly re-thresholded) calibration
    cal_dict = recorded.calibration if recorded is not None and not overwrite else None
    cal_dict = cal_dict or spec.options.get("calibration")
    calibration = Calibration.from_dict(cal_dict) if cal_dict and "image_scores" in cal_dict else None
    label_root = recorded.app_root if recorded is not None and not overwrite else app_root()
    job = ScoreJob(samples, spec, key, model, calibration, out_dir=out_dir, owns_dir=owns_dir,
                   batch_size=batch_size, num_workers=num_workers,
                   history=_history(recorded, calibration, overwrite),
                   previous_dirs=recorded.output_dirs if isinstance(recorded, AnomalyScoreRunConfig) else [],
                   min_region_area=min_region_area, label_root=label_root)
    stats = run_job(samples, job, key, overwrite=overwrite, progress=progress, shard=shard)
    return ScoreResults(key=key, fields=job.names, num_samples=n_total, num_scored=stats.num_done,
                        num_skipped=stats.num_skipped, num_errors=stats.num_errors,
                        num_flagged=stats.counts["flagged"], output_dir=out_dir, errors=stats.errors)


def _queue_score_shards(samples, spec: Expert, key: str, shards: int, shard, overwrite: bool,
                        **params: Any) -> QueuedShards:
    """``score(..., shards=N)``: one delegated score operation per shard (:func:`~.engine.queue_run_shards`)."""
    names = FieldNames(key)
    return queue_run_shards(samples, ScoreJob.method, names.specs(), names.score, SCORE_OPERATOR,
                            dict(expert=spec.key, **params), key, shards, shard, overwrite)


def _history(recorded, calibration: Calibration | None, overwrite: bool) -> list[dict[str, Any]]:
    history = []
    if recorded is not None and not overwrite:
        history = json.loads(json.dumps(list(recorded.threshold_history)))
    if not history and calibration is not None:
        history = [threshold_record(calibration, source="fit")]
    return history


def threshold_record(calibration: Calibration, **extra: Any) -> dict[str, Any]:
    """One entry of a run's ``threshold_history``."""
    return {"rule": calibration.rule, "param": calibration.param, "image_threshold": calibration.image_threshold,
            "pixel_threshold": calibration.pixel_threshold,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), **extra}


def _batch_values(out: BatchOutput, fields: FieldNames, ids: list[str], pred, maps_dir: str, masks_dir: str,
                  calibration: Calibration | None = None, *, regions: RegionRule | None = None,
                  image_sizes: list | None = None, map_sizes: list | None = None,
                  label_root: str | None = None) -> None:
    """Fill ``out`` with one predicted batch: PNG files written now, field values for the writer.

    ``regions`` (default: every region, the calibration's thresholds) makes the region fields from each map
    and mask; ``image_sizes`` (``(width, height)`` per sample, None where unknown) gives their areas in pixels.
    The PNGs go to ``maps_dir`` / ``masks_dir`` on this machine; the labels store their paths under ``label_root``
    (:func:`~.storage.label_path`; None: as written).

    A sample whose score or map is not finite (NaN/inf from the model) gets an error, never a label.
    """
    scores, labels, maps, masks = calibrated_arrays(pred, calibration)
    if map_sizes is not None:  # maps at the image's resolution (up to MAP_MAX_SIDE), not the model's input size
        maps, masks = at_map_sizes(maps, masks, map_sizes,
                                   calibration.normalized_pixel_threshold if calibration is not None else None)
    raw = pred.raw_score.numpy()
    values: dict[str, dict[str, Any]] = {f: {} for f in fields.all()}
    for i, sid in enumerate(ids):
        if not (np.isfinite(raw[i]) and np.isfinite(scores[i]) and np.isfinite(maps[i]).all()):
            out.errors[sid] = "the expert's score or anomaly map is not finite (NaN/inf) for this image"
            continue
        map_path = os.path.join(maps_dir, f"{sid}.png")
        mask_path = os.path.join(masks_dir, f"{sid}.png")
        foui.write((maps[i] * HEATMAP_RANGE[1] + 0.5).astype(np.uint16), map_path)
        foui.write(masks[i].astype(np.uint8), mask_path)
        s = float(scores[i])
        values[fields.label][sid] = anomaly_label(bool(labels[i]), s, anomaly_score=s)
        values[fields.map][sid] = fo.Heatmap(map_path=label_path(map_path, label_root), range=HEATMAP_RANGE)
        values[fields.mask][sid] = fo.Segmentation(mask_path=label_path(mask_path, label_root))
        (values[fields.regions][sid], values[fields.num_regions][sid],
         values[fields.explanation][sid]) = (regions or RegionRule.of(calibration, 0.0)).values(
            maps[i], masks[i], image_sizes[i] if image_sizes else None, anomalous=bool(labels[i]), score=s)
        values[fields.raw_score][sid] = float(raw[i])
        values[fields.score][sid] = s
        values[fields.error][sid] = None
    for name, by_id in values.items():  # several calls may fill one batch (a tiled expert: one per image)
        out.values.setdefault(name, {}).update(by_id)
