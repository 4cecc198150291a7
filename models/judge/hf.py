"""Local VLM judge backend: any ``transformers`` image-text-to-text model, batched with left padding.

The model is loaded by hub id or local path with ``AutoModelForImageTextToText`` and ``AutoProcessor``.
Tested (tiny random models of each family through this exact path, ``tests/test_judge.py``): Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL and Idefics3/SmolVLM. A batch of
:class:`~.base.JudgeRequest` objects becomes ONE ``generate()`` call: prompts are built with the
processor's chat template (system text first, then the images, then the user text; templates that move
the images before the text are fine because the prompt names images by position, "the first image"),
left-padded so every prompt ends at the same position, and only the generated tokens are decoded.
:meth:`TransformersBackend.prepare` (images, template, processor: CPU) and
:meth:`TransformersBackend.judge_prepared` (``generate()``) split that work so a caller can prepare the
next batch in another thread while the model answers this one.

P(yes) comes from the first generated position (``output_logits=True``): ``log_softmax`` of its logits,
``logsumexp`` over every token whose decoded text normalises to "yes" (resp. "no"; the id sets are
computed once per tokenizer), ``p_yes = sigmoid(ly - ln)`` and ``answered_mass = exp(ly) + exp(ln)``.

Example:
    >>> from fiftyone_anomaly_vlm.models.judge.hf import TransformersBackend
    >>> backend = TransformersBackend("Qwen/Qwen2-VL-2B-Instruct", revision="895c3a4", max_pixels=448 * 448)
    >>> backend.judge([JudgeRequest(images=[img], system="You inspect parts.", user="Defective? Yes or No.")])
    [JudgeAnswer(text='No. Defect: none. ...', p_yes=0.08, answered_mass=0.97, ...)]

See Also:
    :mod:`.openai_compat` for OpenAI-compatible servers (vLLM, SGLang, Ollama).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..base import resolve_device
from .base import JudgeAnswer, JudgeBackend, JudgeRequest
from .hf_inputs import MAX_ASPECT, answer_token_ids, option_token_ids, prepare_image, set_pixel_budget

__all__ = ["MAX_ASPECT", "PreparedBatch", "TransformersBackend", "answer_token_ids", "prepare_image"]

logger = logging.getLogger(__name__)


@dataclass
class PreparedBatch:
    """Requests made ready for :meth:`TransformersBackend.judge_prepared` by :meth:`TransformersBackend.prepare`.

    Attributes:
        requests: the requests, in order.
        answers: per request, its error answer when it could not be prepared, else None.
        chunks: ``[(items, encoding), ...]``, at most ``batch_size`` items ``(index, text, images)`` each;
            the encoding is the processor's output, or the exception its call raised.
    """

    requests: list[JudgeRequest]
    answers: list[JudgeAnswer | None]
    chunks: list[tuple[list[tuple[int, str, list[Image.Image]]], Any]] = field(default_factory=list)


def _dtype(dtype: Any, device: str):
    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        return getattr(torch, dtype)
    return dtype


def looks_like_path(model: str) -> bool:
    """Whether ``model`` names a folder rather than a hub id: ``/...``, ``./...``, ``~/...``, or more path
    separators than a hub id's one ``namespace/name`` slash."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model)


def check_model_source(model: str) -> str:
    """``model`` as ``from_pretrained`` takes it (``~`` expanded), or one clear error for a missing folder.

    Raises:
        OSError: ``model`` looks like a local folder (see :func:`looks_like_path`) that does not exist.
    """
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return expanded
    if looks_like_path(model):
        msg = (f"local model folder '{model}' does not exist"
               + (f" ({os.path.abspath(expanded)})" if os.path.abspath(expanded) != model else "")
               + ": pass the folder of a saved image-text-to-text model (config.json, weights, processor files) "
               "or a Hugging Face hub id such as 'Qwen/Qwen2-VL-2B-Instruct'")
        raise OSError(msg)
    return model


def _hub_error(model: str, exc: OSError) -> OSError:
    """A hub id that could not be loaded: say so plainly when the hub was out of reach (offline)."""
    text = str(exc)
    offline = any(w in text.lower() for w in ("couldn't connect", "offline", "cannot find the requested files",
                                              "connection", "local cache", "cached files"))
    if not offline or os.path.isdir(model):
        return exc
    mode = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else ""
    return OSError(f"model '{model}' is not in the local Hugging Face cache and the hub cannot be reached{mode}: "
                   f"pass a local model folder (model='/path/to/folder', e.g. made on a connected machine with "
                   f"`hf download {model} --local-dir /path/to/folder`), or fill the cache once with network")


class TransformersBackend(JudgeBackend):
    """A local ``transformers`` VLM answering batches of requests in one ``generate()`` call each.

    Args:
        model: hub id (``"Qwen/Qwen2-VL-2B-Instruct"``) or local folder.
        revision: hub revision (branch, tag or commit) to pin; recorded in :meth:`describe`.
        dtype: ``"auto"`` (bfloat16/float16 on CUDA, float32 on CPU), a torch dtype or its name.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:0"``...
        max_pixels: image budget: every image is shrunk to at most this many pixels, and processors that
            resize or tile images themselves get it too (Qwen-VL ``longest_edge``, Idefics3/SmolVLM resize side,
            InternVL ``max_patches``), so the number of image tokens stays bounded.
        processor_kwargs: extra keyword arguments for ``AutoProcessor.from_pretrained``.
        model_kwargs: extra keyword arguments for ``AutoModelForImageTextToText.from_pretrained``
            (e.g. ``{"attn_implementation": "sdpa"}``).
        batch_size: largest number of requests in one ``generate()`` call (longer lists are split).
        trust_remote_code: passed to both ``from_pretrained`` calls.

    Raises:
        ImportError: ``transformers`` is not installed.
        OSError: the model cannot be found: a local folder that does not exist, or a hub id that is not cached
            while the hub cannot be reached (the message says which, and what to pass).
        ValueError: a device this machine does not have.
    """

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        dtype: Any = "auto",
        device: str | None = "auto",
        max_pixels: int | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        batch_size: int = 8,
        trust_remote_code: bool = False,
    ) -> None:
        try:
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as exc:  # pragma: no cover - transformers is a declared dependency
            raise ImportError("the transformers judge backend needs `pip install transformers torch`") from exc

        self.model_name = check_model_source(str(model))
        self._args = dict(model=self.model_name, revision=revision, dtype=dtype if isinstance(dtype, str) else None,
                          device=device, max_pixels=max_pixels, processor_kwargs=processor_kwargs,
                          model_kwargs=model_kwargs, batch_size=batch_size, trust_remote_code=trust_remote_code)
        self.revision = revision
        self.device = str(resolve_device(device))
        self.torch_dtype = _dtype(dtype, self.device)
        self.max_pixels = int(max_pixels) if max_pixels else None
        self.batch_size = max(1, int(batch_size))
        self.processor_kwargs = dict(processor_kwargs or {})
        self.model_kwargs = dict(model_kwargs or {})
        common = dict(revision=revision, trust_remote_code=trust_remote_code)
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_name, **common, **self.processor_kwargs)
        except OSError as exc:
            raise _hub_error(self.model_name, exc) from exc
        self.pixel_budget = set_pixel_budget(self.processor, self.max_pixels) if self.max_pixels else None
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.model_name, **common, dtype=self.torch_dtype, **self.model_kwargs).to(self.device).eval()
        except OSError as exc:
            raise _hub_error(self.model_name, exc) from exc
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        # a fast tokenizer must not encode in one thread while it decodes in another ("Already borrowed")
        self._tokenizer_lock = threading.Lock()
        self.yes_ids, self.no_ids = answer_token_ids(self.tokenizer)
        if not self.yes_ids or not self.no_ids:
            logger.warning("%s: no single token decodes to yes/no; P(yes) will be None", self.model_name)

    def describe(self) -> dict[str, Any]:
        """Model, pinned revision, resolved commit (when loaded from the hub), dtype, device, image budget."""
        return {
            "backend": self.name,
            "model": self.model_name,
            "revision": self.revision,
            "commit": getattr(self.model.config, "_commit_hash", None),
            "model_class": type(self.model).__name__,
            "dtype": str(self.torch_dtype).replace("torch.", ""),
            "device": self.device,
            "max_pixels": self.max_pixels,
            "pixel_budget": self.pixel_budget,
            "processor_kwargs": {k: v for k, v in self.processor_kwargs.items() if _jsonable(v)},
        }

    def spec(self) -> dict[str, Any]:
        """The constructor's arguments as given (``device="auto"`` stays "auto": each worker picks its own)."""
        args = dict(self._args)
        if args["dtype"] is None:
            args["dtype"] = str(self.torch_dtype).replace("torch.", "")
        bad = [k for k in ("processor_kwargs", "model_kwargs") if args[k] and not _jsonable(args[k])]
        if bad:
            raise ValueError(f"the backend's {bad} cannot be sent to a worker (not JSON): pass make_backend's "
                             "arguments as a dict instead")
        return {"name": self.name, **args}

    # --- prompt -------------------------------------------------------------------------------------------
    def prompt_text(self, request: JudgeRequest) -> str:
        """The request as the model's chat-template text: system first, then the images, then the user text.

        Templates without a system role get the system text in front of the user text instead.
        """
        user = [{"type": "image"} for _ in request.images] + [{"type": "text", "text": request.user}]
        messages = [{"role": "user", "content": user}]
        if request.system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": request.system}]})
        try:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # noqa: BLE001 - templates that refuse a system turn (Gemma-style)
            if not request.system:
                raise
            user[-1] = {"type": "text", "text": f"{request.system}\n\n{request.user}"}
            return self.processor.apply_chat_template([{"role": "user", "content": user}],
                                                      add_generation_prompt=True, tokenize=False)

    def _prepare(self, request: JudgeRequest) -> tuple[str, list[Image.Image]]:
        if not request.images:
            raise ValueError("request has no image")
        images = [prepare_image(im, self.max_pixels) for im in request.images]
        return self.prompt_text(request), images

    # --- generation ---------------------------------------------------------------------------------------
    def judge(self, requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        """Answer every request, in order; a failed request gets ``error`` instead of raising.

        Requests are prepared one by one (a bad image fails only its own request), generated in batches of
        :attr:`batch_size`; if a whole batch fails (e.g. out of memory) its requests are retried alone.
        Same as ``judge_prepared(prepare(requests))``.
        """
        return self.judge_prepared(self.prepare(requests))

    def prepare(self, requests: list[JudgeRequest]) -> PreparedBatch:
        """The CPU half of :meth:`judge`: images shrunk to the budget, chat-template texts, processor tensors.

        Safe to call from another thread while :meth:`judge_prepared` runs the previous batch (the
        tokenizer, which is not, is shared under a lock), so preparation overlaps generation.

        Args:
            requests: the requests, in order.

        Returns:
            A :class:`PreparedBatch`: per-request errors already answered, the rest encoded in chunks of
            :attr:`batch_size` (a chunk whose processor call failed keeps the error and is retried alone).
        """
        batch = PreparedBatch(requests=list(requests), answers=[None] * len(requests))
        ready: list[tuple[int, str, list[Image.Image]]] = []
        for i, req in enumerate(batch.requests):
            try:
                text, images = self._prepare(req)
                ready.append((i, text, images))
            except Exception as exc:  # noqa: BLE001 - this request's error, not the run's
                batch.answers[i] = JudgeAnswer(error=f"{type(exc).__name__}: {exc}", meta=dict(req.meta))
        for start in range(0, len(ready), self.batch_size):
            chunk = ready[start:start + self.batch_size]
            try:
                enc: Any = self.encode([t for _, t, _ in chunk], [ims for _, _, ims in chunk])
            except Exception as exc:  # noqa: BLE001 - retried one by one in judge_prepared
                enc = exc
            batch.chunks.append((chunk, enc))
        return batch

    def judge_prepared(self, batch: PreparedBatch) -> list[JudgeAnswer]:
        """The generation half of :meth:`judge`: one ``generate()`` per chunk of a :meth:`prepare` result.

        Args:
            batch: what :meth:`prepare` returned.

        Returns:
            One :class:`~.base.JudgeAnswer` per request, in order (``error`` set where it failed).
        """
        requests, answers = batch.requests, list(batch.answers)
        for chunk, enc in batch.chunks:
            try:
                if isinstance(enc, Exception):
                    raise enc
                outs = self._generate(enc, max(requests[i].max_new_tokens for i, _, _ in chunk),
                                      [requests[i].options for i, _, _ in chunk])
            except Exception as exc:  # noqa: BLE001
                if len(chunk) == 1:
                    i = chunk[0][0]
                    answers[i] = JudgeAnswer(error=f"{type(exc).__name__}: {exc}", meta=dict(requests[i].meta))
                    continue
                logger.warning("batch of %d failed (%s); answering one at a time", len(chunk), exc)
                outs = []
                for i, text, images in chunk:
                    try:
                        outs.extend(self._generate(self.encode([text], [images]), requests[i].max_new_tokens,
                                                   [requests[i].options]))
                    except Exception as exc1:  # noqa: BLE001
                        outs.append(JudgeAnswer(error=f"{type(exc1).__name__}: {exc1}"))
            for (i, _, _), ans in zip(chunk, outs):
                ans.meta = dict(requests[i].meta)
                answers[i] = ans
        return answers  # type: ignore[return-value]

    def encode(self, texts: list[str], images: list[list[Image.Image]]) -> dict[str, Any]:
        """The processor's tensors for prompts and their (prepared) images, left-padded, on the CPU.

        Args:
            texts: chat-template texts (:meth:`prompt_text`).
            images: per text, its images (already through :func:`prepare_image`).

        Returns:
            The processor's output as a dict (``input_ids``, ``attention_mask``, ``pixel_values``...).
        """
        with self._tokenizer_lock:
            enc = self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        return dict(enc)

    def _generate(self, enc: dict[str, Any], max_new_tokens: int,
                  options: list[tuple[str, ...]] | None = None) -> list[JudgeAnswer]:
        enc = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in enc.items()}
        if "pixel_values" in enc and enc["pixel_values"].is_floating_point():
            enc["pixel_values"] = enc["pixel_values"].to(self.torch_dtype)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max(1, int(max_new_tokens)), do_sample=False,
                                      output_logits=True, return_dict_in_generate=True, pad_token_id=pad_id)
        prompt_len = enc["input_ids"].shape[1]
        generated = out.sequences[:, prompt_len:].cpu()
        with self._tokenizer_lock:
            texts_out = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)
        answers = []
        for row, text in enumerate(texts_out):
            p_yes, mass = self._p_yes(logp[row])
            answers.append(JudgeAnswer(text=text.strip(), p_yes=p_yes, answered_mass=mass))
            if options and options[row]:
                answers[-1].option_probs, answers[-1].option_mass = self.option_probs(logp[row], options[row])
        return answers

    def option_probs(self, logp, letters) -> tuple[dict[str, float] | None, float | None]:
        """Option letter -> probability at one position (``logp``: its log-softmax over the vocabulary),
        normalised over the letters, and their summed mass; ``(None, None)`` when a letter has no token
        (see :func:`~.hf_inputs.option_token_ids`)."""
        with self._tokenizer_lock:
            ids = option_token_ids(self.tokenizer, letters)
        if any(not v for v in ids.values()):
            return None, None
        lse = torch.stack([torch.logsumexp(logp[ids[letter]], dim=0) for letter in letters])
        probs = torch.softmax(lse, dim=0).tolist()
        return dict(zip(letters, probs)), min(1.0, float(lse.exp().sum()))

    def _p_yes(self, logp) -> tuple[float | None, float | None]:
        if not self.yes_ids or not self.no_ids:
            return None, None
        ly = torch.logsumexp(logp[self.yes_ids], dim=0).item()
        ln = torch.logsumexp(logp[self.no_ids], dim=0).item()
        mass = math.exp(ly) + math.exp(ln)
        d = ly - ln
        p = 1.0 / (1.0 + math.exp(-d)) if d > -700 else 0.0
        return p, min(1.0, mass)


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))
