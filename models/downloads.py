"""What a failed download was fetching, and where to put the file so that no download is needed.

anomalib models fetch pretrained weights in three ways: timm through the Hugging Face hub
(``hf_hub_download``), torchvision through ``torch.hub.load_state_dict_from_url``, and anomalib's own
``download_and_extract`` (EfficientAD's teacher, ImageNette). Offline, each raises a different error
(``LocalEntryNotFoundError``, ``URLError``...) that does not say what was being fetched. The failing call's
frame still holds its arguments, so :func:`download_target` reads them from the traceback and
:func:`offline_instructions` turns them into one sentence: which file, and where to place it.

Example:
    >>> try:
    ...     build_the_model()
    ... except Exception as exc:
    ...     print(offline_instructions(exc))
    the Hugging Face repo 'timm/vit_small_patch14_dinov2.lvd142m' in the local cache: on a connected machine
    run `hf download timm/vit_small_patch14_dinov2.lvd142m` (or load the model once there), then copy the
    folder models--timm--vit_small_patch14_dinov2.lvd142m of its Hugging Face cache into
    /home/me/.cache/huggingface/hub ($HF_HUB_CACHE)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DownloadTarget:
    """What a download was fetching.

    Attributes:
        kind: ``"hf"`` (Hugging Face hub), ``"url"`` (torch hub checkpoint) or ``"anomalib"``
            (anomalib's ``download_and_extract``).
        source: the repo id or URL.
        filename: the file in the repo, or the file name the URL is saved as.
        destination: the folder the file goes to (the cache or anomalib's target folder).
    """

    kind: str
    source: str
    filename: str
    destination: str


def download_target(exc: BaseException) -> DownloadTarget | None:
    """The first download found in the tracebacks of ``exc`` and its causes (None when there is none)."""
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb = err.__traceback__
        while tb is not None:
            found = _frame_target(tb.tb_frame.f_code.co_name, tb.tb_frame.f_locals)
            if found is not None:
                return found
            tb = tb.tb_next
        err = err.__cause__ or err.__context__
    return None


def _frame_target(function: str, local: dict) -> DownloadTarget | None:
    if function == "hf_hub_download" and isinstance(local.get("repo_id"), str):
        from huggingface_hub import constants

        cache = local.get("cache_dir") or constants.HF_HUB_CACHE
        return DownloadTarget("hf", local["repo_id"], str(local.get("filename") or ""), str(cache))
    if function == "load_state_dict_from_url" and isinstance(local.get("url"), str):
        folder = local.get("model_dir") or os.path.join(torch.hub.get_dir(), "checkpoints")
        name = local.get("filename") or local.get("file_name") or os.path.basename(local["url"].split("?")[0])
        return DownloadTarget("url", local["url"], str(name), str(folder))
    if function == "download_and_extract" and getattr(local.get("info"), "url", None):
        info = local["info"]
        return DownloadTarget("anomalib", info.url, str(info.name), str(local.get("root", "")))
    return None


def offline_instructions(exc: BaseException) -> str | None:
    """One sentence saying what ``exc``'s failed download fetched and where to place it (None: no download)."""
    target = download_target(exc)
    if target is None:
        return None
    if target.kind == "hf":
        folder = "models--" + target.source.replace("/", "--")
        return (f"the Hugging Face repo {target.source!r} in the local cache: on a connected machine run "
                f"`hf download {target.source}` (or load the model once there), then copy the folder {folder} "
                f"of its Hugging Face cache into {target.destination} ($HF_HUB_CACHE)")
    if target.kind == "url":
        return (f"{target.source}: download it on a connected machine and place it at "
                f"{os.path.join(target.destination, target.filename)} ($TORCH_HOME/hub/checkpoints)")
    return (f"{target.source} ({target.filename}): download it on a connected machine and extract it into "
            f"{target.destination}")
