"""Form pieces shared by the operators (validation messages shown under the inputs)."""

from __future__ import annotations

import fiftyone.operators.types as types

from fiftyone_anomaly_vlm.experts.targets import group_by_choices
from fiftyone_anomaly_vlm.storage import output_dir_problem, storage_root

#: the target choices of ``inputs.view_target``, in words ("Fits on 30 samples of the current view")
TARGET_WORDS = {"DATASET": "the dataset", "DATASET_VIEW": "the dataset", "CURRENT_VIEW": "the current view",
                "SELECTED_SAMPLES": "the current selection", "BASE_VIEW": "the base view"}


def device_and_batch(inputs: types.Object, batch_size: int) -> None:
    """Device and batch-size inputs."""
    inputs.str("device", default="auto", label="Device",
               description="'auto' uses CUDA when present, else CPU; or 'cpu', 'cuda:0', ...")
    inputs.int("batch_size", default=batch_size, label="Batch size", min=1)


def shards_input(inputs: types.Object) -> None:
    """The "Shards" input of the score, judge and video forms: how many delegated operations split the run."""
    inputs.int("shards", default=1, min=1, label="Shards (delegated operations)",
               description="Split the run into this many delegated operations, each on a part of the view "
                           "(by a hash of the sample id), for several `fiftyone delegated launch` workers")


def shard_params(params: dict) -> tuple[tuple[int, int] | None, int]:
    """``(shard, shards)`` of an operator's parameters: the shard ``(i, n)`` this operation runs when it is one
    queued by ``shards=N`` (``shard_index``/``shard_count``, set by ``queue_shards``), else None; and how many
    shards the form asks for (1: not split)."""
    shard = (int(params["shard_index"]), int(params["shard_count"])) if params.get("shard_count") else None
    return shard, int(params.get("shards") or 1)


def output_dir_input(inputs: types.Object, params: dict, what: str) -> None:
    """The optional "Output folder" input of the operators that write files, marked invalid with the reason when
    the folder cannot be written (checked where the form runs, creating nothing; the verb checks again, on the
    machine that runs it, before any work)."""
    prop = inputs.str("output_dir", required=False, label="Output folder",
                      description=f"Where {what} go. Empty: the plugin's folder for this dataset under the storage "
                                  f"root ({storage_root()}, $FAV_STORAGE_ROOT); a relative path is taken under "
                                  "that root, so it means the same folder on every worker")
    problem = output_dir_problem(params.get("output_dir"))
    if problem:
        prop.invalid, prop.error_message = True, problem


def queued_shard_form(ctx, inputs: types.Object, label: str):
    """The form of one shard queued by a verb's ``shards=N`` from Python (its ``args`` are the verb's own
    keyword arguments, not the form's inputs), or None for every other call: what the delegated operation's
    parameters are checked against."""
    if ctx.params.get("args") is None:
        return None
    inputs.str("key", required=True, label="Run key")
    return types.Property(inputs, view=types.View(label=label))


def check_key(prop, value: str | None, taken: list[str], what: str) -> bool:
    """Mark ``prop`` invalid with a message; returns whether the key is usable."""
    if not value or not value.isidentifier():
        prop.invalid = True
        prop.error_message = "Use letters, digits and underscores (not starting with a digit)"
        return False
    if value in taken:
        prop.invalid = True
        prop.error_message = f"{what} '{value}' already exists: choose another key or tick overwrite"
        return False
    return True


def dropdown(inputs: types.Object, name: str, values: list[str], default: str | None, label: str,
             description: str | None = None, required: bool = False):
    """An enum input shown as a dropdown whose labels are the values themselves."""
    choices = types.Dropdown()
    for v in values:
        choices.add_choice(v, label=v)
    return inputs.enum(name, choices.values(), default=default, required=required, label=label,
                       description=description, view=choices)


def group_by_input(ctx, inputs: types.Object, labels_field: str | None, label: str, fitted: str) -> None:
    """The optional ``group_by`` dropdown (fields that can pick a sample's group, ground truth left out), shown
    when the dataset has such a field; ``fitted``: what is fitted one per group, in words."""
    groups = group_by_choices(ctx.dataset, labels_field) if ctx.dataset else []
    if groups:
        dropdown(inputs, "group_by", groups, None, label,
                 description=f"e.g. product variant, camera, cell type: {fitted} learns only its own group's normals; "
                             "samples are scored by their group's expert")


def nothing_to_choose(inputs: types.Object, name: str, title: str, message: str, form_label: str):
    """A form that only says what is missing (e.g. no fitted expert) and cannot be submitted."""
    prop = inputs.view(name, types.Warning(label=title, description=message))
    prop.invalid = True
    prop.error_message = message
    return types.Property(inputs, view=types.View(label=form_label))


def vlm_backend_inputs(inputs: types.Object, params: dict, api_key_secret: str, device: bool = True) -> None:
    """Inputs that describe a VLM backend: a local transformers model or an OpenAI-compatible server.

    Read back by ``operators.judge.backend_from_params`` (the API key is named, never entered or stored).
    """
    backend = types.RadioGroup()
    backend.add_choice("transformers", label="Local model (transformers)")
    backend.add_choice("openai", label="OpenAI-compatible server (vLLM, SGLang, Ollama, hosted)")
    inputs.enum("backend", backend.values(), default="transformers", label="Backend", view=backend)
    if params.get("backend", "transformers") == "openai":
        inputs.str("base_url", required=True, label="Server base URL", description="e.g. http://gpu-box:8000/v1; "
                   "several servers of the same model: separate their URLs with commas")
        inputs.str("server_model", required=True, label="Model name on the server")
        inputs.str("api_key_secret", default=api_key_secret, label="API key secret",
                   description="Name of the FiftyOne secret or environment variable holding the key "
                               "(the key itself is never stored)")
        inputs.int("max_concurrency", default=8, min=1, label="Requests in flight (per server)")
    else:
        inputs.str("model", required=True, label="Model", description="Hub id or local folder of an "
                   "image-text-to-text model, e.g. Qwen/Qwen2-VL-2B-Instruct")
        inputs.str("revision", label="Revision", description="Hub branch, tag or commit to pin")
        if device:
            inputs.str("device", default="auto", label="Device")
        inputs.int("max_pixels", default=448 * 448, min=0, label="Image budget (pixels per image)")


def target_input(ctx, inputs: types.Object, action: str, prefer: tuple[str, ...] = ()):
    """The target-view input (``inputs.view_target``); returns (the samples the run will use, their name in words).

    ``prefer``: target choices to default to, the first one available wins (``("CURRENT_VIEW", "DATASET")``:
    never a selection left over in the grid); without one, FiftyOne's default (the most selective choice).
    The choice shown is the one counted: before the App has sent a choice, the form's default is resolved.
    """
    prop = inputs.view_target(ctx, action_description=action)
    available = list(getattr(prop.type, "values", None) or [])
    preferred = next((t for t in prefer if t in available), None)
    if preferred is not None:
        prop.default = preferred
    choice = ctx.params.get("view_target") or ctx.request_params.get("view_target")
    if choice is None and prop.default is not None:
        choice = ctx.request_params["view_target"] = prop.default  # what the App will submit
    return ctx.target_view(), TARGET_WORDS.get(choice, "the target")


def notices(inputs: types.Object, name: str, summary: str, warnings: list[str]) -> None:
    """A notice saying what the run will use, then one warning per problem (the form can still be submitted)."""
    inputs.view(name, types.Notice(label=summary))
    for i, text in enumerate(warnings):
        inputs.view(f"{name}_warning_{i}", types.Warning(label=text))
