"""A real OpenAI-compatible chat server on 127.0.0.1, answering with a tiny Qwen2-VL built locally.

Test helper (not a test file). :func:`build_tiny_qwen2vl` builds a real Qwen2-VL (byte-level BPE tokenizer
trained on a few sentences, small image processor, 2-layer text and vision towers) in a folder in a few
seconds. :class:`OpenAITestServer` serves it at ``/v1/chat/completions`` the way vLLM does: data-URL images
are decoded, the chat is rendered with the model's chat template, generation is greedy with
``output_logits=True``, and the answer carries ``choices[0].message.content`` and
``choices[0].logprobs.content[i].top_logprobs`` (token text + log-probability, up to 20).

The model's weights are shaped so that the yes/no spellings are always among the 20 most likely first
tokens (see :func:`build_tiny_qwen2vl`): then P(yes) from the server's ``top_logprobs`` must equal P(yes)
over the whole vocabulary computed in-process, which the tests check.

Fault injection (attributes of the server, reset with :meth:`OpenAITestServer.reset`): ``fail_first``
(answer the first N requests with ``fail_status``, 429 with ``Retry-After: 0``), ``marker_status`` (a
request whose user text contains a marker always gets that status; ``200`` there means malformed JSON),
``delay`` (sleep before answering), ``logprobs_enabled`` (False: answer without logprobs, like servers
that ignore the field). The server records the requests, the decoded images, the ``Authorization``
headers and the largest number of requests in flight at once.

Example:
    >>> model_dir = build_tiny_qwen2vl(tmp_path)
    >>> with OpenAITestServer(model_dir) as server:
    ...     httpx.post(server.base_url + "/chat/completions", json={...})
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from PIL import Image

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Yes. Defect: scratch. Location: top left. The surface shows a thin bright line.",
    "No. The part looks normal and matches the reference image.",
    "Is there a defect? Answer Yes or No, then explain. yes no Yes No",
    "You inspect manufactured parts for anomalies: cracks, dents, stains, missing pieces.",
    "Location: top left, top, top right, left, center, right, bottom left, bottom, bottom right.",
    "The first image is a normal reference. The second image is the sample to inspect.",
] * 4

#: embedding scale of the last prompt token, and size of the input-dependent part of the yes/no logits
NEWLINE_SCALE = 8.0
INPUT_WEIGHT = 3.0
#: first-token logits aimed at for the yes/no spellings (others near 0): P(yes) about 0.4, mass about 0.4
YES_NO_LOGITS = {"Yes": 4.0, " Yes": 3.0, "yes": 1.0, "No": 3.5, " No": 2.5, "no": 1.0}


def build_tiny_qwen2vl(folder: str | Path, seed: int = 0) -> Path:
    """Build, shape and save a tiny real Qwen2-VL (model + processor) in ``folder``.

    The last prompt token (the newline after ``assistant``) gets a large embedding, so the final hidden
    state at that position points in an (almost) fixed direction; the LM-head rows of the yes/no
    spellings are then set along it so their first-token logits are about :data:`YES_NO_LOGITS`, far
    above the other tokens, plus a random part so P(yes) still varies with the images and text; other
    spellings that normalise to yes/no (" yes", "NO"...) are pushed far down, out of any top 20. Everything
    else is the model's random initialisation.

    Args:
        folder: where to save (``AutoProcessor`` / ``AutoModelForImageTextToText`` load it offline).
        seed: torch seed for the random weights.

    Returns:
        The folder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    for word in YES_NO_LOGITS:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16),
        video_processor=Qwen2VLVideoProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    with torch.no_grad():
        model.get_input_embeddings().weight[newline[0]] *= NEWLINE_SCALE
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                             add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], return_tensors="pt")
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        head = model.get_output_embeddings().weight
        wanted = {tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w))[0]: v for w, v in YES_NO_LOGITS.items()}
        for i in range(len(tokenizer)):  # other spellings (" yes", "NO"...) far below, out of any top 20
            if i not in wanted and re.sub(r"[\W_]+", "", tokenizer.decode([i])).lower() in ("yes", "no"):
                wanted[i] = -30.0
        for i, logit in wanted.items():  # the six main spellings get a random part: answers depend on the input
            noise = torch.randn_like(hidden) * (INPUT_WEIGHT / hidden.norm()) if logit > -30 else 0.0
            head[i] = hidden * (logit / hidden.dot(hidden)) + noise
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def decode_data_url(url: str) -> Image.Image:
    """``data:image/...;base64,...`` -> RGB PIL image (http URLs are refused, as Ollama does)."""
    if not url.startswith("data:image/") or ";base64," not in url:
        raise ValueError("only base64 image data URLs are accepted")
    return Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1]))).convert("RGB")


class OpenAITestServer:
    """An OpenAI-compatible ``/v1/chat/completions`` server on 127.0.0.1 (free port) in a thread.

    Args:
        model_dir: a folder from :func:`build_tiny_qwen2vl` (or any Qwen2-VL-style model + processor).

    Attributes:
        base_url: ``http://127.0.0.1:<port>/v1``.
        model / processor: the loaded model, usable in-process for direct comparisons.
    """

    def __init__(self, model_dir: str | Path):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
        self._model_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self.reset()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda request, address: None  # clients that time out close early
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> OpenAITestServer:
        """Start serving in a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def reset(self) -> None:
        """Clear the recordings and the fault injection (after the requests in flight have finished)."""
        deadline = time.monotonic() + 10.0
        while getattr(self, "in_flight", 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._state_lock:
            self.fail_first = 0
            self.fail_status = 429
            self.marker_status: dict[str, int] = {}
            self.delay = 0.0
            self.logprobs_enabled = True
            self.n_requests = 0
            self.in_flight = 0
            self.max_in_flight = 0
            self.auth_headers: list[str | None] = []
            self.bodies: list[dict[str, Any]] = []
            self.images: list[list[Image.Image]] = []

    # -- request handling ------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._state_lock:
            self.n_requests += 1
            n = self.n_requests
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.auth_headers.append(h.headers.get("Authorization"))
        try:
            raw = h.rfile.read(int(h.headers.get("Content-Length", 0)))
            if h.path.rstrip("/") != "/v1/chat/completions":
                return self._send(h, 404, {"error": {"message": "not found"}})
            if self.delay:
                time.sleep(self.delay)
            if n <= self.fail_first:
                headers = {"Retry-After": "0"} if self.fail_status == 429 else {}
                return self._send(h, self.fail_status, {"error": {"message": "injected failure"}}, headers)
            body = json.loads(raw)
            with self._state_lock:
                self.bodies.append(body)
            user_text = " ".join(c.get("text", "") for m in body["messages"] if m["role"] == "user"
                                 for c in (m["content"] if isinstance(m["content"], list) else [
                                     {"text": m["content"]}]))
            for marker, status in self.marker_status.items():
                if marker in user_text:
                    if status == 200:
                        return self._send_raw(h, 200, b'{"choices": [{"message": ')
                    return self._send(h, status, {"error": {"message": f"injected {status}"}})
            top = body.get("top_logprobs") or 0
            if top > 20:  # vLLM's default --max-logprobs
                return self._send(h, 400, {"error": {"message": "top_logprobs must be <= 20"}})
            try:
                messages, images = self._to_chat(body["messages"])
            except (ValueError, OSError) as e:
                return self._send(h, 400, {"error": {"message": str(e)}})
            with self._state_lock:
                self.images.append(images)
            text, steps = self.generate(messages, images, int(body.get("max_tokens") or 16), top)
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "length"}
            if body.get("logprobs") and self.logprobs_enabled:
                choice["logprobs"] = {"content": steps}
            self._send(h, 200, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                                "created": int(time.time()), "model": body.get("model"), "choices": [choice]})
        finally:
            with self._state_lock:
                self.in_flight -= 1

    @staticmethod
    def _to_chat(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """OpenAI messages -> chat-template messages with ``{"type": "image"}`` parts, and the images."""
        out, images = [], []
        for m in messages:
            content = m["content"]
            if isinstance(content, str):
                out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
                continue
            parts = []
            for c in content:
                if c["type"] == "image_url":
                    images.append(decode_data_url(c["image_url"]["url"]))
                    parts.append({"type": "image"})
                elif c["type"] == "text":
                    parts.append({"type": "text", "text": c["text"]})
            out.append({"role": m["role"], "content": parts})
        return out, images

    def generate(self, messages: list[dict[str, Any]], images: list[Image.Image], max_tokens: int,
                 top_logprobs: int) -> tuple[str, list[dict[str, Any]]]:
        """Greedy generation; returns the text and vLLM-style per-token logprob entries."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt")
        tok = self.processor.tokenizer
        with self._model_lock, torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max(1, min(max_tokens, 64)), do_sample=False,
                                      output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, inputs["input_ids"].shape[1]:]
        steps = []
        for token_id, logits in zip(new.tolist(), out.logits):
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            entry = {"token": tok.decode([token_id]), "logprob": float(logp[token_id]),
                     "bytes": list(tok.decode([token_id]).encode())}
            if top_logprobs:
                vals, idx = logp.topk(top_logprobs)
                entry["top_logprobs"] = [{"token": tok.decode([i]), "logprob": float(v),
                                          "bytes": list(tok.decode([i]).encode())}
                                         for v, i in zip(vals.tolist(), idx.tolist())]
            steps.append(entry)
        return tok.decode(new, skip_special_tokens=True), steps

    # -- responses -------------------------------------------------------------------------------------
    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        OpenAITestServer._send_raw(h, status, json.dumps(payload).encode(), headers)

    @staticmethod
    def _send_raw(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)
