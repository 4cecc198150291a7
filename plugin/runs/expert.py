"""The record of a fitted expert (:func:`fiftyone_anomaly_vlm.fit_expert`, per-group and ensemble experts,
the CLIP expert), recorded under ``<name>_expert``."""

from __future__ import annotations

import os
from typing import Any

import fiftyone.core.runs as fors

from ..engine import record_run
from ..storage import RootRelativePaths
from .base import EXPERT_METHOD, AnomalyRunConfig, remove_owned_dir

#: suffix of the run key under which a fitted expert is recorded (``fit_expert(key="padim")`` -> ``padim_expert``)
EXPERT_RUN_SUFFIX = "_expert"


def expert_run_key(key: str) -> str:
    """Run key of the expert fitted under ``key``."""
    return key if key.endswith(EXPERT_RUN_SUFFIX) else f"{key}{EXPERT_RUN_SUFFIX}"


#: an expert's fitted state: kept in its run results (``dataset.load_run_results("<name>_expert")``), not its
#: config; runs recorded by 0.1 held it in the config
EXPERT_STATE = ("calibration", "train_ids", "holdout_ids", "errors")


class ExpertRunConfig(RootRelativePaths, AnomalyRunConfig):
    """Config of a fitted vision expert; it writes no fields.

    ``method`` tells the expert's kind: ``"anomalib_expert"`` (one anomalib model), ``"composite_expert"``
    (one expert per group, or an ensemble: ``members``, ``group_field``, ``member_experts``,
    ``owned_members``, ``combine``), ``"winclip"`` (CLIP zero/few-shot: ``object_name``, ``object_field``,
    ``description``, ``scales``, ``k_shot``, ``reference_ids``...). Kind-specific parameters are kept as
    attributes of the same names.

    ``checkpoint`` and ``output_dir`` are recorded relative to the storage root (:mod:`~fiftyone_anomaly_vlm.storage`)
    and are absolute paths on this machine once loaded; ``storage_root`` is the root of the process that wrote the
    record (for information).

    Args:
        expert: the expert's name.
        model: the model name (``"padim"``...) or the expert's kind.
        model_class: the model's class path.
        checkpoint: the checkpoint (or member spec / reference memory) file.
        fit_id: this fit's id (each fit writes its files to its own folder ``<output_dir>/<fit_id>``).
        output_dir: the expert's folder.
        owns_output_dir: the plugin chose ``output_dir`` (deleted with the run).
        image_size: model input ``[height, width]``.
        calibration: the calibration on held-out normals (score distribution, thresholds): fitted state,
            stored in the run's results when registered (:class:`ExpertRunResults`).
        train_ids: the training samples' ids (fitted state, as ``calibration``).
        holdout_ids: the held-out normals' sample ids (fitted state, as ``calibration``).
        errors: the first decoding errors, ``{"id", "error"}`` (fitted state, as ``calibration``).
        num_holdout: the number of held-out normals.
        num_train: the number of training samples.
        device: where it was fitted.
        pretrained: the backbone weights asked for (True/False or a file).
        backbone: the timm backbone; ``layers``: its feature layers; ``weights``: where the weights came from;
            ``normalization``: the input mean/std.
        model_kwargs: other arguments of the anomalib model class.
        holdout: the held-out share; ``seed``: the split and training seed.
        group_field: a per-group composite's field (None for an ensemble or a single model).
        members: a composite's groups -> member expert names; ``owned_members``: the members it fitted itself
            (deleted with it).
        tile_size: tiled experts (:class:`~fiftyone_anomaly_vlm.models.TiledExpert`): the tile side in pixels, cut
            from each image at its own resolution when fitting and scoring; None (runs recorded before tiling
            too): the whole image is resized to ``image_size``.
        tile_stride: pixels between tile starts (None when not tiled).
        tile_image_score: how a tiled expert's image score is made: ``"map_max"`` or ``"tile_max"``.
        selection: an expert chosen by :func:`~fiftyone_anomaly_vlm.select_experts`: how it was validated
            (labelled or synthetic anomalies), the table of candidates with their scores, fit times and
            errors, the candidates skipped by the budget, the ensembles tried and the supervised head's result.
        head: a composite combined by a supervised head instead of the mean: ``{"members", "coef",
            "intercept"}`` of the logistic regression on its members' calibrated scores (None: the mean).
        combine: how a composite combines its members (a text starting with ``"mean"``, ``"max"`` or
            ``"weighted"``; runs recorded before the max and the weights say "mean ..."); ``weights``: a weighted
            ensemble's weights, one per member (:class:`~fiftyone_anomaly_vlm.experts.combined.CompositeExpert`).
        method: the kind (see above).
        **kwargs: the kind's own parameters (backbone, layers, weights, train ids, members...).
    """

    METHOD = EXPERT_METHOD
    PATH_ATTRS = ("checkpoint", "output_dir")

    def __init__(self, expert: str | None = None, model: str | None = None, model_class: str | None = None,
                 checkpoint: str | None = None, fit_id: str | None = None, output_dir: str | None = None,
                 owns_output_dir: bool = False, image_size: list[int] | None = None,
                 calibration: dict[str, Any] | None = None, train_ids: list[str] | None = None,
                 holdout_ids: list[str] | None = None, errors: list[dict] | None = None,
                 num_holdout: int | None = None, num_train: int | None = None, device: str | None = None,
                 pretrained: bool | str | None = None, backbone: str | None = None, layers: list[str] | None = None,
                 weights: dict[str, Any] | None = None, normalization: dict[str, Any] | None = None,
                 model_kwargs: dict[str, Any] | None = None, holdout: float = 0.2, seed: int = 51,
                 group_field: str | None = None, members: dict[str, list[str]] | None = None,
                 owned_members: list[str] | None = None, tile_size: int | None = None,
                 tile_stride: int | None = None, tile_image_score: str | None = None,
                 selection: dict[str, Any] | None = None, head: dict[str, Any] | None = None,
                 method: str | None = None,
                 **kwargs: Any) -> None:
        self.expert, self.model, self.model_class = expert, model, model_class
        self.checkpoint, self.fit_id = checkpoint, fit_id
        self.output_dir, self.owns_output_dir, self.image_size = output_dir, owns_output_dir, image_size
        self.num_holdout, self.num_train, self.device = num_holdout, num_train, device
        self.pretrained, self.backbone, self.layers, self.weights = pretrained, backbone, layers, weights
        self.normalization, self.model_kwargs = normalization, dict(model_kwargs or {})
        self.holdout, self.seed = holdout, seed
        self.group_field, self.members, self.owned_members = group_field, members, list(owned_members or [])
        self.tile_size, self.tile_stride, self.tile_image_score = tile_size, tile_stride, tile_image_score
        self.selection, self.head = selection, head
        state = dict(calibration=calibration, train_ids=train_ids, holdout_ids=holdout_ids, errors=errors)
        self._state = {name: value for name, value in state.items() if value is not None}
        super().__init__(method=method, **kwargs)
        self.resolve_root_paths()

    def fitted_state(self) -> dict[str, Any]:
        """The fitted state given to the constructor (or recorded in the config by 0.1), not serialised with
        the config: :func:`register_expert_run` stores it as the run's results."""
        return dict(self._state)


class ExpertRunResults(fors.RunResults):
    """An expert's fitted state (what ``dataset.load_run_results("<name>_expert")`` returns).

    Attributes:
        calibration: the calibration dict (held-out normals' score distribution, rule, thresholds).
        train_ids: the training samples' ids.
        holdout_ids: the held-out normals' ids.
        errors: the first decoding errors, ``{"id", "error"}``.
    """

    def __init__(self, samples, config, key, backend=None, calibration=None, train_ids=None, holdout_ids=None,
                 errors=None, **kwargs: Any) -> None:
        super().__init__(samples, config, key, backend=backend, calibration=calibration,
                         train_ids=list(train_ids or []), holdout_ids=list(holdout_ids or []),
                         errors=list(errors or []), **kwargs)

    def get_meta(self) -> dict[str, Any]:
        """Counts stored beside the results."""
        return {"num_train": len(self.train_ids), "num_holdout": len(self.holdout_ids),
                "num_errors": len(self.errors)}


def expert_state(samples, run_key: str) -> dict[str, Any]:
    """The fitted state of expert run ``run_key`` (:data:`EXPERT_STATE`): from its results, or, for runs recorded
    by 0.1, from its config. Missing parts are None."""
    dataset = samples._root_dataset
    results = dataset.load_run_results(run_key, cache=False, load_view=False)
    if isinstance(results, ExpertRunResults):
        state = {name: getattr(results, name) for name in EXPERT_STATE}
    else:
        state = dataset.get_run_info(run_key).config.fitted_state()
    return {name: state.get(name) for name in EXPERT_STATE}


def delete_expert_runs(dataset, keys: list[str]) -> None:
    """Delete the expert runs of ``keys`` (expert names) that still exist (their cleanup removes their files)."""
    runs = set(dataset.list_runs())
    for key in keys:
        if expert_run_key(key) in runs:
            dataset.delete_run(expert_run_key(key))


def register_expert_run(dataset, run_key: str, config: ExpertRunConfig) -> None:
    """Record an expert run under ``run_key``, replacing one that is there.

    The per-group experts the replaced run owned and the new one does not own (a re-fit with other groups,
    or an ungrouped expert under the same key) are deleted, after the new record is in place: a crash
    before that leaves the old expert whole.
    """
    old = list(dataset.get_run_info(run_key).config.owned_members) if run_key in dataset.list_runs() else []
    results = ExpertRunResults(dataset, config, run_key, **config.fitted_state())
    record_run(dataset, run_key, config, results)
    keep = set(config.owned_members)
    delete_expert_runs(dataset, [m for m in old if m not in keep])


class ExpertRun(fors.Run):
    """A fitted expert. Deleting the run deletes the folder the plugin created for it (in a folder the user chose:
    its fit's own folder, ``<output_dir>/<fit_id>``), and the per-group experts a composite expert fitted for
    itself (``owned_members``)."""

    def cleanup(self, samples, key):  # noqa: D102 - FiftyOne's docstring applies
        config = self.config
        if config.owns_output_dir:
            remove_owned_dir(config.output_dir)
        elif config.fit_id and config.output_dir:  # a fit id names one fit: no other expert uses its folder
            remove_owned_dir(os.path.join(config.output_dir, config.fit_id))
        delete_expert_runs(samples._root_dataset, list(self.config.owned_members))
