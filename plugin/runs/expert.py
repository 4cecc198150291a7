"""The record of a fitted expert (:func:`fiftyone_anomaly_vlm.fit_expert`, per-group and ensemble experts,
the CLIP expert), recorded under ``<name>_expert``."""

from __future__ import annotations

from typing import Any

import fiftyone.core.runs as fors

from .base import EXPERT_METHOD, AnomalyRunConfig, remove_owned_dir

#: suffix of the run key under which a fitted expert is recorded (``fit_expert(key="padim")`` -> ``padim_expert``)
EXPERT_RUN_SUFFIX = "_expert"


def expert_run_key(key: str) -> str:
    """Run key of the expert fitted under ``key``."""
    return key if key.endswith(EXPERT_RUN_SUFFIX) else f"{key}{EXPERT_RUN_SUFFIX}"


class ExpertRunConfig(AnomalyRunConfig):
    """Config of a fitted vision expert; it writes no fields.

    ``method`` tells the expert's kind: ``"anomalib_expert"`` (one anomalib model), ``"composite_expert"``
    (one expert per group, or an ensemble: ``members``, ``group_field``, ``member_experts``,
    ``owned_members``, ``combine``), ``"winclip"`` (CLIP zero/few-shot: ``object_name``, ``object_field``,
    ``description``, ``scales``, ``k_shot``, ``reference_ids``...). Kind-specific parameters are kept as
    attributes of the same names.

    Args:
        expert: the expert's name.
        model: the model name (``"padim"``...) or the expert's kind.
        model_class: the model's class path.
        checkpoint: the checkpoint (or member spec / reference memory) file.
        fit_id: this fit's id (each fit writes its files to its own folder ``<output_dir>/<fit_id>``).
        output_dir: the expert's folder.
        owns_output_dir: the plugin chose ``output_dir`` (deleted with the run).
        image_size: model input ``[height, width]``.
        calibration: the calibration on held-out normals (score distribution, thresholds).
        holdout_ids: the held-out normals' sample ids.
        num_holdout: their number.
        device: where it was fitted.
        method: the kind (see above).
        **kwargs: the kind's own parameters (backbone, layers, weights, train ids, members...).
    """

    METHOD = EXPERT_METHOD

    def __init__(self, expert: str | None = None, model: str | None = None, model_class: str | None = None,
                 checkpoint: str | None = None, fit_id: str | None = None, output_dir: str | None = None,
                 owns_output_dir: bool = False, image_size: list[int] | None = None,
                 calibration: dict[str, Any] | None = None, holdout_ids: list[str] | None = None,
                 num_holdout: int | None = None, device: str | None = None, method: str | None = None,
                 **kwargs: Any) -> None:
        self.expert, self.model, self.model_class = expert, model, model_class
        self.checkpoint, self.fit_id = checkpoint, fit_id
        self.output_dir, self.owns_output_dir, self.image_size = output_dir, owns_output_dir, image_size
        self.calibration, self.holdout_ids, self.num_holdout = calibration, holdout_ids, num_holdout
        self.device = device
        kwargs.setdefault("owned_members", [])
        super().__init__(method=method, **kwargs)


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
    dataset.register_run(run_key, config, overwrite=True, cleanup=False)
    keep = set(config.owned_members)
    delete_expert_runs(dataset, [m for m in old if m not in keep])


class ExpertRun(fors.Run):
    """A fitted expert. Deleting the run deletes the folder the plugin created for it, and the per-group
    experts a composite expert fitted for itself (``owned_members``)."""

    def cleanup(self, samples, key):  # noqa: D102 - FiftyOne's docstring applies
        if self.config.owns_output_dir:
            remove_owned_dir(self.config.output_dir)
        delete_expert_runs(samples._root_dataset, list(self.config.owned_members))
