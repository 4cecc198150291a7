"""Operator: ask a VLM to judge and explain the target samples (local model or OpenAI-compatible server)."""

from __future__ import annotations

import os

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_anomaly_vlm import judge
from fiftyone_anomaly_vlm.models.judge import make_backend
from fiftyone_anomaly_vlm.runs import AnomalyScoreRunConfig, JudgeRunConfig

from ._choices import SCORE_RUN, check_choice
from ._forms import check_key, dropdown, queued_shard_form, shard_params, shards_input, vlm_backend_inputs
from ._progress import long_running_config, report_queued, reports_errors, run_with_progress

#: default name of the secret / environment variable holding a server's API key
API_KEY_SECRET = "FAV_VLM_API_KEY"
_NONE = "(none)"


def backend_spec_from_params(params: dict) -> dict:
    """``make_backend``'s arguments (``name`` included) for the backend the form describes; the API key is only
    named (``api_key_env``: the FiftyOne secret or environment variable read where the backend is built)."""
    if params.get("backend", "transformers") == "openai":
        urls = [u for u in params["base_url"].replace(",", " ").split() if u]  # several servers: comma-separated
        return dict(name="openai", base_url=urls[0] if len(urls) == 1 else urls, model=params["server_model"],
                    api_key_env=params.get("api_key_secret") or API_KEY_SECRET,
                    max_concurrency=int(params.get("max_concurrency", 8)))
    return dict(name="transformers", model=params["model"], revision=params.get("revision") or None,
                device=params.get("device", "auto"), max_pixels=int(params.get("max_pixels") or 0) or None,
                batch_size=int(params.get("batch_size", 8)))


def backend_from_spec(spec: dict, secrets=None):
    """Build the backend of ``make_backend``'s arguments ``spec``; a server's API key is read here, from the
    secret named ``api_key_env`` (``ctx.secrets`` or any mapping; the environment is the fallback), never stored.

    Returns:
        A :class:`~fiftyone_anomaly_vlm.models.judge.JudgeBackend`.
    """
    spec = dict(spec)
    if spec.get("name") == "openai":
        secret = spec.get("api_key_env") or API_KEY_SECRET
        spec["api_key"] = (secrets.get(secret, None) if secrets is not None else None) or os.environ.get(secret)
    return make_backend(spec.pop("name"), **spec)


def backend_from_params(params: dict, secrets=None):
    """Build the judge backend the form describes; the API key is read here and never stored.

    Args:
        params: the operator's parameters.
        secrets: ``ctx.secrets`` (or any mapping); the environment is the fallback.

    Returns:
        A :class:`~fiftyone_anomaly_vlm.models.judge.JudgeBackend`.
    """
    return backend_from_spec(backend_spec_from_params(params), secrets)


class JudgeSamples(foo.Operator):
    """Form over :func:`fiftyone_anomaly_vlm.judge`: backend, expert run, prompt parts, key."""

    @property
    def config(self):
        return long_running_config("judge_anomalies", "Anomaly: VLM judge and explain",
                                   "A vision-language model's verdict, defect type, location and explanation per sample",
                                   "psychology")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        queued = queued_shard_form(ctx, inputs, "VLM judge and explain")
        if queued is not None:
            return queued
        p = ctx.params
        key = p.get("key", "vlm")
        key_prop = inputs.str("key", default="vlm", required=True, label="Run key",
                              description="Fields: <key>, <key>_p_anomalous, <key>_defect, <key>_location, "
                                          "<key>_explanation, <key>_answer, <key>_error, <key>_fused")
        inputs.bool("overwrite", default=False, label="Judge again samples already judged under this key")
        runs = ctx.dataset.list_runs() if ctx.dataset else []
        taken = [k for k in runs if not isinstance(ctx.dataset.get_run_info(k).config, JudgeRunConfig)]
        check_key(key_prop, key, taken, "Run")

        vlm_backend_inputs(inputs, p, API_KEY_SECRET)

        experts = [k for k in runs if isinstance(ctx.dataset.get_run_info(k).config, AnomalyScoreRunConfig)]
        prop = dropdown(inputs, "expert", [_NONE, *experts], experts[0] if experts else _NONE, "Expert run",
                        "Its heatmap gives the crops, its score the verdict in words and the fused score")
        check_choice(prop, p.get("expert"), experts, what=SCORE_RUN, dataset=ctx.dataset, none=_NONE,
                     hint="score the samples with 'Anomaly: score samples' first, or choose (none)")
        inputs.int("crops", default=3, min=0, max=8, label="Expert-guided crops (Triad)")
        inputs.bool("use_expert_verdict", default=True, label="Tell the model the expert's verdict in words")
        inputs.bool("only_flagged", default=False, label="Only samples the expert flagged")
        dropdown(inputs, "reference", [_NONE, "auto", "tag"], _NONE, "Reference normal image (MoXpert)",
                  "Helps 7B+ models, can hurt 2B models")
        if p.get("reference") == "tag":
            inputs.str("reference_tag", required=True, label="Tag of normal samples")
        inputs.str("knowledge", label="Product knowledge",
                   description="Text, or the name of a sample field holding it")
        inputs.str("class_field", label="Class field", description="Sample field with the product class")
        dropdown(inputs, "fuse", ["rank", "logistic"], "rank", "Fusion of expert score and VLM probability")
        inputs.int("batch_size", default=8, min=1, label="Batch size")
        inputs.int("max_new_tokens", default=96, min=1, label="Answer length (tokens)")
        shards_input(inputs)
        return types.Property(inputs, view=types.View(label="VLM judge and explain"))

    @reports_errors
    def execute(self, ctx):
        p = ctx.params
        shard, shards = shard_params(p)
        key = p.get("key") or "vlm"
        if p.get("args") is not None:  # one shard queued by judge(..., shards=N): judge's own arguments
            results = yield from run_with_progress(ctx, "judging", judge, ctx.target_view(), key=key,
                                                   backend=backend_from_spec(p["backend_spec"], ctx.secrets),
                                                   shard=shard, **p["args"])
        else:
            expert = p.get("expert")
            reference = p.get("reference")
            reference = (p.get("reference_tag") if reference == "tag"
                         else (None if reference in (None, _NONE) else reference))
            args = dict(expert=None if expert in (None, _NONE) else expert, reference=reference,
                        knowledge=p.get("knowledge") or None, class_field=p.get("class_field") or None,
                        crops=int(p.get("crops", 3)), use_expert_verdict=bool(p.get("use_expert_verdict", True)),
                        only_flagged=bool(p.get("only_flagged", False)), batch_size=int(p.get("batch_size", 8)),
                        fuse=p.get("fuse", "rank"), max_new_tokens=int(p.get("max_new_tokens", 96)),
                        overwrite=bool(p.get("overwrite", False)))
            if shards > 1:  # queue one delegated operation per shard; the workers build the backend
                yield from report_queued(ctx, judge(ctx.target_view(), key=key,
                                                    backend=backend_spec_from_params(p), shards=shards, **args))
                return
            results = yield from run_with_progress(ctx, "judging", judge, ctx.target_view(), key=key,
                                                   backend=backend_from_params(p, ctx.secrets), **args)
        if not ctx.delegated:
            yield ctx.trigger("reload_dataset")
        msg = (f"Judged {results.num_judged} samples ({results.num_errors} errors, {results.num_unparsed} unparsed, "
               f"{results.num_skipped} already judged); {results.num_anomalous} anomalous in '{results.key}'")
        yield ctx.trigger("notify", dict(message=msg, variant="warning" if results.num_errors else "success"))
