"""Operator: score the target view with a fitted expert."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm import list_experts, score
from fiftyone_anomaly_vlm.engine import field_key
from fiftyone_anomaly_vlm.regions import check_min_area
from fiftyone_anomaly_vlm.runs import EXPERT_METHODS, runs_of

from ._choices import EXPERT, check_choice, unknown_choice
from ._forms import (check_key, device_and_batch, dropdown, nothing_to_choose, output_dir_input, shard_params,
                     shards_input)
from ._progress import long_running_config, report_queued, reports_errors, run_with_progress

_FIT_FIRST = "run 'Anomaly: fit vision expert' first"


class ScoreSamples(foo.Operator):
    @property
    def config(self):
        return long_running_config("score_anomalies", "Anomaly: score samples",
                                   "Image score, heatmap and mask from a fitted vision expert",
                                   "troubleshoot")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        experts = list_experts(ctx.dataset) if ctx.dataset else []
        asked = ctx.params.get("expert")
        if not experts:
            message = f"No fitted expert on this dataset: {_FIT_FIRST}"
            if asked and ctx.dataset:  # from Python: say which name was asked for
                message = unknown_choice(asked, experts, what=EXPERT, dataset_name=ctx.dataset.name, hint=_FIT_FIRST)
            return nothing_to_choose(inputs, "no_expert", "No fitted expert", message, "Score samples")
        prop = dropdown(inputs, "expert", experts, experts[0], "Expert", required=True)
        check_choice(prop, asked, experts, what=EXPERT, dataset=ctx.dataset)
        expert = ctx.params.get("expert") or experts[0]
        key_prop = inputs.str("key", default=field_key(expert), required=True, label="Run key",
                              description="Fields: <key>, <key>_score, <key>_map, <key>_mask, <key>_regions, "
                                          "<key>_num_regions, <key>_explanation, <key>_error")
        inputs.bool("overwrite", default=False, label="Score again samples already scored under this key")
        key = ctx.params.get("key", field_key(expert))
        taken = runs_of(ctx.dataset, *EXPERT_METHODS)
        check_key(key_prop, key, taken, "Run")
        area_prop = inputs.float("min_region_area", default=0.0, label="Smallest defect region (share of the image)",
                                 description="Connected regions of the mask smaller than this share of the image "
                                             "are left out of <key>_regions (0.001 = 0.1 %; 0 keeps every region)")
        try:
            check_min_area(ctx.params.get("min_region_area") or 0.0)
        except ValueError as exc:
            area_prop.invalid, area_prop.error_message = True, str(exc)
        device_and_batch(inputs, batch_size=16)
        output_dir_input(inputs, ctx.params, "the heatmap and mask PNGs")
        shards_input(inputs)
        return types.Property(inputs, view=types.View(label="Score samples"))

    @reports_errors
    def execute(self, ctx):
        p = ctx.params
        shard, shards = shard_params(p)
        key = p.get("key") or field_key(p["expert"])
        if shard is None and shards > 1:  # queue one delegated operation per shard
            yield from report_queued(ctx, score(
                ctx.target_view(), expert=p["expert"], key=key, device=p.get("device", "auto"),
                batch_size=int(p.get("batch_size", 16)), overwrite=bool(p.get("overwrite", False)),
                min_region_area=p.get("min_region_area") or 0.0, shards=shards,
                output_dir=p.get("output_dir") or None))
            return
        results = yield from run_with_progress(
            ctx, "scoring", score, ctx.target_view(), expert=p["expert"], key=key,
            device=p.get("device", "auto"), batch_size=int(p.get("batch_size", 16)),
            num_workers=None if ctx.delegated else 0, overwrite=bool(p.get("overwrite", False)),
            min_region_area=p.get("min_region_area") or 0.0, shard=shard, output_dir=p.get("output_dir") or None,
        )
        if not ctx.delegated:
            yield ctx.trigger("reload_dataset")
        msg = (f"Scored {results.num_scored} samples ({results.num_errors} errors, {results.num_skipped} already "
               f"scored); {results.num_flagged} flagged anomalous in '{results.key}'")
        yield ctx.trigger("notify", dict(message=msg, variant="warning" if results.num_errors else "success"))
