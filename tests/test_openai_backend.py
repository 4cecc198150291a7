"""OpenAI-compatible judge backend, through real HTTP against a local server running a tiny real Qwen2-VL.

The server (``tests/openai_server.py``) answers like vLLM: greedy generation, ``logprobs.content[i].
top_logprobs``. P(yes) read from those logprobs is checked against the same model's first-token P(yes)
over the whole vocabulary, computed in-process. Retries, errors, timeouts, concurrency, the API key and the
image encoding are checked through the server's fault injection and recordings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import numpy as np
import pytest
import torch
from openai_server import OpenAITestServer, build_tiny_qwen2vl, decode_data_url
from PIL import Image

from fiftyone_anomaly_vlm.models.judge.base import JudgeRequest, normalize_token
from fiftyone_anomaly_vlm.models.judge.openai_compat import OpenAICompatBackend

SYSTEM = "You inspect manufactured parts for anomalies."
USER = "Is there a defect? Answer Yes or No, then explain."
SECRET = "sk-test-very-secret-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl"))
    with OpenAITestServer(model_dir) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean(server, monkeypatch):
    monkeypatch.delenv("FAV_VLM_API_KEY", raising=False)
    server.reset()
    yield
    server.reset()


def _image(seed: int, size=(48, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _request(seed: int, user: str = USER, n_images: int = 2, **meta) -> JudgeRequest:
    return JudgeRequest(images=[_image(seed + k) for k in range(n_images)], system=SYSTEM, user=user,
                        max_new_tokens=6, meta={"seed": seed, **meta})


def _backend(server, **kw) -> OpenAICompatBackend:
    kw = {"max_concurrency": 4, "timeout": 30.0, "max_retries": 3, "backoff": 0.01, **kw}
    return OpenAICompatBackend(base_url=server.base_url, model="tiny-qwen2vl", **kw)


def _direct_p_yes(server, request: JudgeRequest) -> tuple[float, float]:
    """The model's own first-token P(yes) and yes/no mass over the whole vocabulary, in-process."""
    proc, model = server.processor, server.model
    messages = [{"role": "system", "content": [{"type": "text", "text": request.system}]},
                {"role": "user", "content": [*({"type": "image"} for _ in request.images),
                                             {"type": "text", "text": request.user}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], images=request.images, return_tensors="pt")
    with torch.no_grad():
        logp = torch.log_softmax(model(**inputs, logits_to_keep=1).logits[0, -1].double(), dim=-1)
    words = [normalize_token(proc.tokenizer.decode([i])) for i in range(logp.shape[0])]
    ly = torch.logsumexp(logp[[i for i, w in enumerate(words) if w == "yes"]], 0)
    ln = torch.logsumexp(logp[[i for i, w in enumerate(words) if w == "no"]], 0)
    return float(torch.sigmoid(ly - ln)), float(ly.exp() + ln.exp())


def test_p_yes_from_server_logprobs_matches_the_model(server):
    requests = [_request(0), _request(10, n_images=1), _request(20, n_images=3)]
    answers = _backend(server).judge(requests)
    assert [a.meta["seed"] for a in answers] == [0, 10, 20]
    for request, answer in zip(requests, answers):
        assert answer.error is None, answer.error
        p_yes, mass = _direct_p_yes(server, request)
        assert answer.p_yes == pytest.approx(p_yes, abs=1e-4)
        assert answer.answered_mass == pytest.approx(mass, abs=1e-4)
        assert 0.0 < answer.answered_mass <= 1.0
        assert answer.text.strip()
    assert len({round(a.p_yes, 4) for a in answers}) == 3  # each request's own value, not a constant
    body = server.bodies[0]
    assert body["messages"][0] == {"role": "system", "content": SYSTEM}  # shared prefix first
    assert body["temperature"] == 0 and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["max_tokens"] == 6 and body["model"] == "tiny-qwen2vl"
    assert body["messages"][1]["content"][-1] == {"type": "text", "text": USER}


def test_images_arrive_as_base64_data_urls_with_the_same_pixels(server):
    request = _request(3, n_images=3)
    request.images[1] = request.images[1].convert("L")  # converted to RGB on the way
    answer, = _backend(server).judge([request])
    assert answer.error is None
    urls = [c["image_url"]["url"] for c in server.bodies[0]["messages"][1]["content"] if c["type"] == "image_url"]
    assert len(urls) == 3 and all(u.startswith("data:image/png;base64,") for u in urls)
    for sent, seen in zip(request.images, server.images[0]):
        assert np.array_equal(np.asarray(sent.convert("RGB")), np.asarray(seen))
        assert np.array_equal(np.asarray(decode_data_url(urls[0])), np.asarray(server.images[0][0]))

    server.reset()
    answer, = _backend(server, image_format="JPEG").judge([_request(4, n_images=1)])
    assert answer.error is None
    assert server.bodies[0]["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert server.images[0][0].size == (48, 36)


@pytest.mark.parametrize("status", [429, 500])
def test_retries_on_429_and_5xx_then_succeeds(server, status):
    server.fail_first, server.fail_status = 2, status
    # 429 carries Retry-After: 0, which must win over the (long) exponential backoff
    backoff = 30.0 if status == 429 else 0.01
    start = time.perf_counter()
    answer, = _backend(server, backoff=backoff, max_retries=3).judge([_request(5)])
    assert time.perf_counter() - start < 10
    assert answer.error is None and answer.p_yes is not None
    assert server.n_requests == 3


def test_failing_requests_become_errors_and_the_batch_goes_on(server):
    server.marker_status = {"FAIL500": 500, "BAD400": 400, "MALFORMED": 200}
    requests = [_request(0), _request(1, user="FAIL500 " + USER), _request(2, user="BAD400 " + USER),
                _request(3, user="MALFORMED " + USER), JudgeRequest(images=["not an image"], user=USER),
                _request(4)]
    answers = _backend(server, max_retries=2).judge(requests)
    assert [a.error is None for a in answers] == [True, False, False, False, False, True]
    assert answers[0].p_yes is not None and answers[5].p_yes is not None
    assert "HTTP 500" in answers[1].error and "3 tries" in answers[1].error
    assert "HTTP 400" in answers[2].error
    assert "malformed" in answers[3].error
    assert "bad request input" in answers[4].error
    assert [a.meta.get("seed") for a in answers] == [0, 1, 2, 3, None, 4]
    # 500 tried 3 times; 400 and malformed JSON not retried; the bad image never sent
    assert server.n_requests == 2 + 3 + 1 + 1


def test_timeouts_become_errors(server):
    server.delay = 2.0
    start = time.perf_counter()
    answers = _backend(server, timeout=0.2, max_retries=1).judge([_request(0), _request(1)])
    assert time.perf_counter() - start < 1.8  # did not wait for the slow server
    assert all(a.error and "timeout" in a.error for a in answers)
    assert all(a.p_yes is None for a in answers)


def test_unreachable_server_is_an_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    backend = OpenAICompatBackend(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff=0.01)
    answer, = backend.judge([_request(0, n_images=1)])
    assert "connection error" in answer.error


@pytest.mark.parametrize("max_concurrency", [1, 3])
def test_requests_run_concurrently_up_to_the_bound(server, max_concurrency):
    server.delay = 0.25
    answers = _backend(server, max_concurrency=max_concurrency).judge([_request(i, n_images=1) for i in range(7)])
    assert all(a.error is None for a in answers)
    assert [a.meta["seed"] for a in answers] == list(range(7))
    assert server.max_in_flight == max_concurrency  # >1 really in flight, never more than the bound


def test_api_key_sent_but_never_described_or_logged(server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, httpx/httpcore included
    server.fail_first, server.fail_status = 1, 500
    server.marker_status = {"BAD400": 400}
    backend = _backend(server, api_key=SECRET)
    answers = backend.judge([_request(0), _request(1, user="BAD400 " + USER)])
    assert answers[0].error is None and "HTTP 400" in answers[1].error
    assert set(server.auth_headers) == {f"Bearer {SECRET}"}
    assert "retry" in caplog.text  # the retry was logged...
    assert SECRET not in caplog.text  # ...without the key
    assert SECRET not in json.dumps(backend.describe()) and SECRET not in repr(backend)
    assert all(SECRET not in (a.error or "") for a in answers)
    assert backend.describe()["base_url"] == server.base_url and backend.describe()["model"] == "tiny-qwen2vl"

    server.reset()
    monkeypatch.setenv("FAV_VLM_API_KEY", "from-env")
    _backend(server).judge([_request(0, n_images=1)])
    monkeypatch.delenv("FAV_VLM_API_KEY")
    _backend(server).judge([_request(0, n_images=1)])
    assert server.auth_headers == ["Bearer from-env", None]


def test_server_without_logprobs_keeps_the_text(server):
    request = _request(7)
    with_lp, = _backend(server).judge([request])
    server.logprobs_enabled = False
    without, = _backend(server).judge([request])
    assert without.error is None and without.p_yes is None and without.answered_mass is None
    assert without.text == with_lp.text and without.text.strip()


def test_works_inside_a_running_event_loop(server):
    backend = _backend(server, extra_body={"mm_processor_kwargs": {"max_pixels": 448 * 448}})

    async def main():
        sync = backend.judge([_request(0, n_images=1)])  # a loop is running: judged on a worker thread
        awaited = await backend.ajudge([_request(0, n_images=1)])
        return sync, awaited

    sync, awaited = asyncio.run(main())
    assert sync[0].error is None and sync[0].p_yes == pytest.approx(awaited[0].p_yes, abs=1e-9)
    assert server.bodies[0]["mm_processor_kwargs"] == {"max_pixels": 448 * 448}
    assert backend.judge([]) == []
