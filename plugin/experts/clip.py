"""Record a zero-shot / few-shot CLIP expert (WinCLIP / WinCLIP+) so :func:`score` can use it like a fitted one.

Nothing is trained: the record holds the open_clip model, the prompts' object name(s) and, for few-shot,
the path of a memory of normal patch features built from ``k`` reference images. Scoring then writes the
same fields as a fitted expert (``<key>``, ``<key>_score``, ``<key>_map``, ``<key>_mask``...).

Example:
    >>> import fiftyone as fo
    >>> import fiftyone_anomaly_vlm as fav
    >>> ds = fo.load_dataset("bottles")
    >>> fav.create_clip_expert(ds, key="winclip", pretrained="/models/vit_b_16_plus_240-laion400m_e31.pt",
    ...                        object_name="bottle", references="good", k_shot=4)
    >>> fav.score(ds, expert="winclip")          # fields winclip, winclip_score, winclip_map, ...
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import fiftyone as fo

from .._common import check_image_collection, check_key, default_output_dir
from ..storage import output_folder
from ..images import ImageLoadError, load_image
from ..models.clip_expert import DEFAULT_MODEL, DEFAULT_PRETRAINED, ClipExpert
from ..models.progress import phase_bar
from ..runs import CLIP_METHOD, ExpertRunConfig, expert_run_key
from .fits import FitFolder
from .record import Expert

logger = logging.getLogger(__name__)

_MODEL_CLASS = f"{ClipExpert.__module__}.{ClipExpert.__qualname__}"


def _reference_view(samples, references):
    """A view of the reference samples: a view, a tag of the dataset, or a list of sample ids."""
    dataset = samples._root_dataset
    if isinstance(references, fo.core.collections.SampleCollection):
        check_image_collection(references, "create_clip_expert(references=...)")
        return references
    if isinstance(references, str):
        view = dataset.match_tags(references)
        what = f"tag {references!r}"
    elif isinstance(references, Sequence):
        ids = [str(i) for i in references]
        view = dataset.select(ids)
        what = f"{len(ids)} sample ids"
    else:
        raise TypeError(f"references must be a view, a tag or a list of sample ids, not {type(references).__name__}")
    if view.count() == 0:
        raise ValueError(f"create_clip_expert: no reference samples for {what} in dataset '{dataset.name}'")
    return view


def _jsonable_description(description: str | Mapping[str, str] | None) -> str | dict[str, str] | None:
    if description is None or isinstance(description, str):
        return description or None
    if isinstance(description, Mapping):
        return {str(k): str(v) for k, v in description.items()}
    raise TypeError(f"description must be a string or a dict of strings, got {type(description).__name__}")


def create_clip_expert(
    samples,
    key: str = "winclip",
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    object_name: str = "object",
    object_field: str | None = None,
    description: str | Mapping[str, str] | None = None,
    references=None,
    k_shot: int = 4,
    image_size: int | Sequence[int] | None = None,
    scales: Sequence[int] = (2, 3),
    threshold: float = 0.5,
    sigma: float = 4.0,
    device: str | None = "auto",
    batch_size: int = 8,
    output_dir: str | None = None,
    seed: int = 51,
    overwrite: bool = False,
    progress: bool | Any = None,
) -> Expert:
    """Record a WinCLIP-style CLIP expert as the run ``<key>_expert``; score with ``fav.score(view, expert=key)``.

    Zero-shot without ``references``; few-shot (WinCLIP+) with them: up to ``k_shot`` normal reference
    images are encoded once and their patch/window features saved (``torch.save``) as the expert's
    ``checkpoint``.

    Args:
        samples: a dataset or view; the expert is recorded on its dataset.
        key: the expert's name; scoring runs and their fields default to it.
        model: open_clip model name (default WinCLIP's ``"ViT-B-16-plus-240"``), the path of an open_clip
            ``.json`` model config, a ``"local-dir:/path"`` folder (``open_clip_config.json`` + weights) or
            ``"hf-hub:org/repo"``.
        pretrained: pretrained tag (default ``"laion400m_e31"``; downloaded through the Hugging Face cache),
            a local checkpoint file (offline), or None for random weights (tests only).
        object_name: the object's name in the prompts ("bottle", "solar cell").
        object_field: a sample field naming each sample's object (string field or a label field, whose
            ``label`` is used); text embeddings are computed once per distinct name.
        description: AnomalyGPT-style description of the normal object ("...which should be round and
            without any damage..."), one string (``{}`` becomes the object name) or ``{object name: text}``.
        references: normal reference images for few-shot: a view, a tag of the dataset, or sample ids.
        k_shot: how many references are used (a seeded random choice when there are more).
        image_size: the size images are decoded at (default: the model's input size).
        scales: sliding-window sizes in ViT patches (default 2 and 3, WinCLIP's small and mid scales).
        threshold: image/pixel score above which a sample is labelled anomalous.
        sigma: Gaussian smoothing of the map, in pixels of ``image_size``.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:0"``...
        batch_size: images per forward pass when encoding references.
        output_dir: where the few-shot memory goes (default:
            ``<fo default dataset dir>/anomaly_vlm/<dataset>/experts/<key>``).
        seed: seed of the choice of references.
        overwrite: replace an existing expert of the same key.
        progress: FiftyOne progress convention for encoding the references (few-shot only; a zero-shot expert
            encodes no image).

    Returns:
        The :class:`Expert` record (``method="winclip"``).

    Raises:
        ValueError: bad key, empty view, an existing expert (without ``overwrite``), unknown model or tag,
            no reference samples, or no decodable reference image.
        RuntimeError: the weights cannot be had offline (the message says which local path to pass).
    """
    key = check_key(key)
    run_key = expert_run_key(key)
    check_image_collection(samples, "create_clip_expert")
    dataset = samples._root_dataset
    if run_key in dataset.list_runs() and not overwrite:
        msg = f"an expert named {key!r} already exists; pass overwrite=True or another key"
        raise ValueError(msg)
    out_dir, owns_dir = output_folder(output_dir, default_output_dir(samples, "experts", key))  # unwritable: here
    if k_shot < 1:
        raise ValueError(f"k_shot must be at least 1, got {k_shot}")
    if object_field is not None and object_field.split(".")[0] not in dataset.get_field_schema():
        raise ValueError(f"create_clip_expert: dataset '{dataset.name}' has no field {object_field!r}")
    description = _jsonable_description(description)
    size = None if image_size is None else (
        (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size))
    ref_view = _reference_view(samples, references) if references is not None else None

    expert = ClipExpert.from_pretrained(
        model, pretrained, image_size=size, object_name=object_name, object_field=object_field,
        description=description, scales=scales, threshold=threshold, sigma=sigma, device=device,
    )  # bad names, missing weights and bad scales fail here, before any work
    size = expert.image_size

    with FitFolder(samples, out_dir, key) as fit:  # the memory goes to the fit's own folder
        checkpoint, reference_ids, errors = _encode_references(expert, fit, ref_view, k_shot=k_shot, size=size,
                                                               batch_size=batch_size, seed=seed, progress=progress)

        if isinstance(pretrained, (str, os.PathLike)) and os.path.isfile(str(pretrained)):
            pretrained = os.path.abspath(str(pretrained))
        if isinstance(model, str) and (model.endswith(".json") or os.path.isdir(model)) and os.path.exists(model):
            model = os.path.abspath(model)
        options = dict(
            pretrained=pretrained or None,
            object_name=object_name,
            object_field=object_field,
            description=description,
            scales=list(expert.scales),
            threshold=float(threshold),
            sigma=float(sigma),
            grid_size=list(expert.grid_size),
            input_size=list(expert.input_size),
            k_shot=int(k_shot),
            num_references=len(reference_ids),
            reference_ids=reference_ids,
            reference_errors=errors,
            output_dir=out_dir,
            owns_output_dir=owns_dir,
            device=str(expert.device),
            fit_id=fit.fit_id,
        )
        config = ExpertRunConfig(method=CLIP_METHOD, expert=key, model=str(model), model_class=_MODEL_CLASS,
                                 checkpoint=checkpoint, image_size=list(size), **options)
        fit.commit(config, run_key)
    return Expert(key=key, run_key=run_key, model=str(model), model_class=_MODEL_CLASS, checkpoint=checkpoint,
                  image_size=tuple(size), method=CLIP_METHOD,
                  options={"expert": key, "model": str(model), "model_class": _MODEL_CLASS,
                           "checkpoint": checkpoint, "image_size": list(size), **options})


def _encode_references(expert: ClipExpert, fit: FitFolder, ref_view, *, k_shot: int, size, batch_size: int,
                       seed: int, progress) -> tuple[str, list[str], list[dict]]:
    """Few-shot: encode up to ``k_shot`` references of ``ref_view`` into the expert's memory, saved in the fit's
    folder; returns (memory path, reference ids, decoding errors). Zero-shot (no view): ("", [], [])."""
    checkpoint, reference_ids, errors = "", [], []
    if ref_view is not None:
        if ref_view.count() > k_shot:
            ref_view = ref_view.take(k_shot, seed=seed)
        ids, paths = ref_view.values(["id", "filepath"])
        images = []
        with phase_bar(progress, "encoding reference images", len(ids), "images") as pb:
            for sid, path in pb(zip(ids, paths)):
                try:
                    images.append(load_image(path, size))
                    reference_ids.append(sid)
                except ImageLoadError as exc:
                    errors.append({"id": sid, "error": str(exc)})
                    logger.warning("create_clip_expert: skipping reference %s: %s", sid, exc)
        if not images:
            raise ValueError(f"create_clip_expert: none of the {len(ids)} reference images could be decoded")
        expert.set_references(torch.stack(images), batch_size=batch_size)
        checkpoint = expert.save_memory(fit.file("memory.pt"))
    return checkpoint, reference_ids, errors
