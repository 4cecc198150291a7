"""Operator: score the frames of the target videos, smooth over time, mark anomalous stretches on the timeline."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm import list_experts, score_video
from fiftyone_anomaly_vlm.runs import QUESTIONS_METHOD, VIDEO_METHOD, runs_of
from fiftyone_anomaly_vlm.video import SMOOTHING

from ._choices import EXPERT, check_choice
from ._forms import (check_key, dropdown, nothing_to_choose, output_dir_input, queued_shard_form, shard_params,
                     shards_input, vlm_backend_inputs)
from ._progress import long_running_config, report_queued, reports_errors, run_with_progress
from .judge import API_KEY_SECRET, backend_from_spec, backend_spec_from_params

_NONE = "(none)"
_DEFAULT_Q, _TYPED_Q = "(one generic question)", "(type them)"


class ScoreVideo(foo.Operator):
    """Form over :func:`fiftyone_anomaly_vlm.score_video`: expert and/or VLM, questions, rate, window."""

    @property
    def config(self):
        return long_running_config("score_video", "Anomaly: score videos",
                                   "Frame scores from an expert and/or VLM questions, smoothed over time; "
                                   "anomalous stretches on the timeline", "movie")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        if ctx.dataset is None or ctx.dataset.media_type != "video":
            return nothing_to_choose(inputs, "not_video", "Not a video dataset",
                                     "This operator scores video datasets", "Score videos")
        queued = queued_shard_form(ctx, inputs, "Score videos")
        if queued is not None:
            return queued
        p = ctx.params
        runs = ctx.dataset.list_runs()
        key = p.get("key", "video")
        key_prop = inputs.str("key", default="video", required=True, label="Run key",
                              description="Fields: <key>, <key>_score, <key>_segments, <key>_error on videos; "
                                          "frames.<key>, frames.<key>_score, frames.<key>_error... on frames")
        inputs.bool("overwrite", default=False, label="Score again videos already scored under this key")
        videos = set(runs_of(ctx.dataset, VIDEO_METHOD))
        taken = [k for k in runs if k not in videos]
        check_key(key_prop, key, taken, "Run")

        experts = list_experts(ctx.dataset)
        prop = dropdown(inputs, "expert", [_NONE, *experts], experts[0] if experts else _NONE, "Image expert",
                        "e.g. fitted on the frames of normal videos (fav.video_frames)")
        check_choice(prop, p.get("expert"), experts, what=EXPERT, dataset=ctx.dataset, none=_NONE)
        inputs.bool("use_vlm", default=not experts, label="Ask a VLM guiding questions (VERA)")
        if p.get("use_vlm", not experts):
            vlm_backend_inputs(inputs, p, API_KEY_SECRET, device=False)
            learned = runs_of(ctx.dataset, QUESTIONS_METHOD)
            dropdown(inputs, "question_set", [_DEFAULT_Q, _TYPED_Q, *learned],
                     learned[0] if learned else _DEFAULT_Q, "Questions", "A learned set (run key) or your own")
            if p.get("question_set") == _TYPED_Q:
                inputs.str("questions", required=True, label="Questions, one per line",
                           view=types.TextFieldView(multiline=True))
            dropdown(inputs, "combine", ["max", "mean", "joint"], "max", "Frame score from the questions")
            inputs.int("frames_per_prompt", default=1, min=1, max=16, label="Frames per prompt",
                       description="1 for image-only models; more for video-capable ones")
            inputs.bool("explain", default=True, label="Ask the VLM to explain each anomalous stretch")
        inputs.float("fps", default=2.0, min=0.0, label="Frames per second to sample (0: every frame)")
        inputs.int("window", default=5, min=1, label="Smoothing window (sampled frames)")
        dropdown(inputs, "smoothing", list(SMOOTHING), "uniform", "Smoothing")
        inputs.float("threshold", default=0.0, min=0.0, max=1.0, label="Threshold (0: the default)",
                     description="Default: the expert's calibrated threshold, 0.5 for the VLM, their mean with both")
        inputs.int("min_length", default=1, min=1, label="Shortest stretch (sampled frames)")
        inputs.str("device", default="auto", label="Device")
        inputs.int("batch_size", default=16, min=1, label="Batch size")
        output_dir_input(inputs, p, "the sampled frame images")
        shards_input(inputs)
        return types.Property(inputs, view=types.View(label="Score videos"))

    @reports_errors
    def execute(self, ctx):
        p = ctx.params
        shard, shards = shard_params(p)
        key = p.get("key") or "video"
        if p.get("args") is not None:  # one shard queued by score_video(..., shards=N): its own arguments
            spec = p.get("backend_spec")
            results = yield from run_with_progress(
                ctx, "scoring videos", score_video, ctx.target_view(), key=key, shard=shard,
                backend=backend_from_spec(spec, ctx.secrets) if spec else None, **p["args"])
        else:
            expert = p.get("expert")
            spec = questions = None
            if p.get("use_vlm"):
                spec = backend_spec_from_params(dict(p, device=p.get("device", "auto")))
                choice = p.get("question_set") or _DEFAULT_Q
                if choice == _TYPED_Q:
                    questions = [q for q in (p.get("questions") or "").splitlines() if q.strip()]
                elif choice != _DEFAULT_Q:
                    questions = choice
            args = dict(expert=None if expert in (None, _NONE) else expert, questions=questions,
                        combine=p.get("combine", "max"), frames_per_prompt=int(p.get("frames_per_prompt", 1)),
                        fps=float(p.get("fps") or 0) or None, window=int(p.get("window", 5)),
                        smoothing=p.get("smoothing", "uniform"), threshold=float(p.get("threshold") or 0) or None,
                        min_length=int(p.get("min_length", 1)), explain=bool(p.get("explain", True)),
                        device=p.get("device", "auto"), batch_size=int(p.get("batch_size", 16)),
                        overwrite=bool(p.get("overwrite", False)), frames_dir=p.get("output_dir") or None)
            if shards > 1:  # queue one delegated operation per shard; the workers build the backend
                yield from report_queued(ctx, score_video(ctx.target_view(), key=key, backend=spec, shards=shards,
                                                          **args))
                return
            results = yield from run_with_progress(
                ctx, "scoring videos", score_video, ctx.target_view(), key=key,
                backend=backend_from_spec(spec, ctx.secrets) if spec else None, **args)
        if not ctx.delegated:
            yield ctx.trigger("reload_dataset")
        msg = (f"Scored {results.num_scored} videos ({results.num_frames} frames, {results.num_frame_errors} frame "
               f"errors, {results.num_errors} video errors, {results.num_skipped} already scored); "
               f"{results.num_flagged} flagged, {results.num_segments} anomalous stretches in '{results.key}'")
        yield ctx.trigger("notify", dict(message=msg,
                                         variant="warning" if results.num_errors or results.num_frame_errors
                                         else "success"))
