"""The OpenAI-compatible judge backend over several real local servers (``tests/scripted_server.py``): a
sliding window over pooled keep-alive connections, a failing server taken out and back, malformed answers
kept as "unparsed" with their text, secrets redacted even when a server echoes them, and a fused score
that does not depend on how the run was split.
"""

from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest
from PIL import Image
from scripted_server import ScriptedServer

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.judging import JudgeFieldNames, fuse_scores
from fiftyone_anomaly_vlm.models.judge.base import BackendUnavailable, JudgeRequest
from fiftyone_anomaly_vlm.models.judge.openai_compat import OpenAICompatBackend
from fiftyone_anomaly_vlm.models.judge.server_pool import redact
from fiftyone_anomaly_vlm.operators.judge import backend_from_params
from fiftyone_anomaly_vlm.runs import JudgeRunConfig

SECRET = "sk-h21-very-secret-0123456789abcdef"
MARKERS = ("[[overflow]]", "[[nan]]", "[[nullyes]]")


def _request(i: int, user: str = "Is there a defect?") -> JudgeRequest:
    img = Image.fromarray(np.full((16, 16, 3), i % 256, dtype=np.uint8))
    return JudgeRequest(images=[img], user=f"{user} #{i}", meta={"i": i})


def _backend(urls, **kw) -> OpenAICompatBackend:
    kw = {"max_concurrency": 4, "timeout": 20.0, "max_retries": 3, "backoff": 0.01, **kw}
    return OpenAICompatBackend(base_url=urls, model="scripted", **kw)


def test_malformed_answers_keep_their_text_and_the_rest_of_the_batch():
    with ScriptedServer() as server, ScriptedServer(fail_status=503) as failing:  # one answers, one fails
        requests = [_request(0), *(_request(k + 1, m) for k, m in enumerate(MARKERS)), _request(4)]
        # before: OverflowError, the whole batch lost
        answers = _backend([failing.base_url, server.base_url], max_failures=2).judge(requests)
    assert {a.server for a in answers} == {server.base_url} and failing.n_requests >= 1
    good = [answers[0], answers[4]]
    assert all(a.error is None and 0.0 < a.p_yes < 1.0 for a in good)
    for a in answers[1:4]:
        assert a.p_yes is None and a.answered_mass is None  # never NaN, never P=0 against a "Yes"
        assert a.error.startswith("malformed answer") and a.text.startswith("Yes. Defect: crack")
    assert "1000" in answers[1].error and "nan" in answers[2].error and "no log-probability" in answers[3].error
    assert [a.meta["i"] for a in answers] == [0, 1, 2, 3, 4]


def test_judge_run_with_malformed_answers_finishes_and_resumes(parts):
    view = parts.limit(8)
    ids = view.values("id")
    notes = {sid: "Round metal part." for sid in ids}
    for sid, marker in zip(ids[1:4], MARKERS):
        notes[sid] = f"Round metal part. {marker}"
    parts.set_values("note", notes, key_field="id")
    f = JudgeFieldNames("vlm")
    with ScriptedServer() as server:
        res = fav.judge(view, key="vlm", backend=_backend(server.base_url), knowledge="note", batch_size=4,
                        progress=False)
        assert res.num_judged == 8 and res.num_errors == 0 and res.num_unparsed == 3
        again = fav.judge(view, key="vlm", backend=_backend(server.base_url), knowledge="note", batch_size=4,
                          progress=False)  # before: every resume crashed on the same answer
        assert again.num_skipped == 8 and again.num_judged == 0
    bad = parts.select(ids[1:4])
    assert bad.distinct(f"{f.label}.label") == ["unparsed"]
    assert all(t.startswith("Yes. Defect: crack") for t in bad.values(f.answer))
    assert all(e.startswith("malformed answer") for e in bad.values(f.error))
    assert bad.values(f.p_anomalous) == [None] * 3
    good = parts.select([ids[0], *ids[4:]])
    assert good.count(f.error) == 0 and all(0 < p < 1 for p in good.values(f.p_anomalous))
    assert set(good.values(f"{f.label}.server")) == {server.base_url}  # which server answered


def test_secrets_are_redacted_from_errors_and_logs_when_a_server_echoes_them(caplog, parts):
    caplog.set_level(logging.DEBUG)  # every logger, httpx/httpcore included
    with ScriptedServer() as echo, ScriptedServer(fail_status=503) as failing:
        backend = _backend([echo.base_url, failing.base_url], api_key=SECRET, max_failures=2, cooldown=60.0,
                           headers={"X-Api-Key": "hdr-secret-0123456789"})
        answers = backend.judge([_request(0, "[[echo400]]"), _request(1, "[[echo500]]"), _request(2)])
        ds = parts.limit(2)
        parts.set_values("note", {sid: "[[echo400]]" for sid in ds.values("id")}, key_field="id")
        fav.judge(ds, key="vlm", backend=backend, knowledge="note", progress=False)
    assert "Authorization" in answers[0].error and "HTTP 400" in answers[0].error  # the echo is there...
    assert "retry" in caplog.text and "taken out" in caplog.text
    stored = json.dumps(ds.values("vlm_error"))
    for text in (caplog.text, stored, *(a.error or "" for a in answers)):
        assert SECRET not in text and SECRET[:10] not in text and "hdr-secret" not in text  # ...the key is not
    assert answers[2].error is None and answers[2].server == echo.base_url


def test_two_servers_one_failing_is_taken_out_and_back_after_the_cooldown():
    with ScriptedServer(latency=(0.02, 0.04), max_concurrency=3) as good, \
            ScriptedServer(latency=(0.02, 0.04), fail_status=503, fail_first=3) as flaky:
        backend = _backend([good.base_url, flaky.base_url], max_concurrency=3, max_failures=2, cooldown=0.3)
        answers = backend.judge([_request(i) for i in range(60)])
        again = _backend(good.base_url).judge([_request(i) for i in range(5)])
        backend.close()  # connections closed; the next request opens them again
        assert backend.judge([_request(0)])[0].p_yes == pytest.approx(answers[0].p_yes)
    assert all(a.error is None for a in answers) and [a.meta["i"] for a in answers] == list(range(60))
    by_server = {s: sum(a.server == s for a in answers) for s in (good.base_url, flaky.base_url)}
    assert by_server[flaky.base_url] > 0 and sum(by_server.values()) == 60  # back after its cool-down
    assert good.max_in_flight <= 3 and flaky.max_in_flight <= 3  # the per-server bound
    # same request, same answer, whichever server gave it (replicas of one model)
    assert [a.p_yes for a in again] == pytest.approx([a.p_yes for a in answers[:5]])


def test_judge_keeps_the_window_full_across_batches_over_keep_alive_connections(parts):
    view = parts.limit(24)
    with ScriptedServer(latency=(0.1, 0.2), max_concurrency=6) as a, \
            ScriptedServer(latency=(0.1, 0.2), max_concurrency=6) as b:
        backend = _backend([a.base_url, b.base_url], max_concurrency=6)
        res = fav.judge(view, key="vlm", backend=backend, batch_size=2, progress=False)
    assert res.num_judged == 24 and a.answered + b.answered == 24
    # batch by batch (before): 2 in flight, one server; now the window spans batches and both servers
    assert a.max_in_flight >= 4 and b.max_in_flight >= 4, (a.max_in_flight, b.max_in_flight)
    # pooled keep-alive connections (at most 6 per server, +1 for the pre-check), not one per request
    assert a.connections <= 7 and b.connections <= 7, (a.connections, b.connections)
    cfg = parts.get_run_info("vlm").config
    assert cfg.backend["base_urls"] == [a.base_url, b.base_url] and cfg.backend["base_url"] == a.base_url
    # a judge run config recorded before several servers (a single base_url) still loads
    old = JudgeRunConfig(backend={"backend": "openai", "base_url": "http://gpu:8000/v1", "model": "m"})
    assert old.backend["base_url"] == "http://gpu:8000/v1"


def test_rank_fusion_does_not_depend_on_the_split(fitted):
    view = fitted.match_tags("train", bool=False).limit(10)
    fav.score(view, expert="padim", device="cpu", num_workers=0, progress=False)
    ids = view.values("id")
    with ScriptedServer() as server:
        fav.judge(view, key="whole", backend=_backend(server.base_url), expert="padim", crops=1, progress=False)
        for half in (ids[:5], ids[5:]):
            fav.judge(fitted.select(half), key="halves", backend=_backend(server.base_url), expert="padim",
                      crops=1, progress=False)
    whole = dict(zip(*view.values(["id", "whole_fused"])))
    halves = dict(zip(*view.values(["id", "halves_fused"])))
    assert None not in whole.values() and whole == halves  # before: 'rank' ranked within each half
    e, v = view.values(["padim_score", "whole_p_anomalous"])
    assert list(whole.values()) == pytest.approx(fuse_scores(np.array(e), np.array(v), "rank").tolist())
    assert fo.dataset_exists(fitted.name)


def test_pre_check_and_form_with_several_servers(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # nothing listens there any more
    with ScriptedServer() as server:
        _backend([server.base_url, closed]).check()  # one usable server: the run goes on, the other is named
        assert "cannot reach the VLM server at " + closed in caplog.text
    with pytest.raises(BackendUnavailable, match="cannot reach"):
        _backend([closed, closed]).check()
    backend = backend_from_params(dict(backend="openai", base_url=f"{server.base_url}, {closed}", server_model="m"))
    assert backend.base_urls == [server.base_url, closed] and backend.max_in_flight == 16
    assert backend_from_params(dict(backend="openai", base_url=closed, server_model="m")).base_urls == [closed]


@pytest.mark.parametrize("text,expected", [
    ('{"Authorization": "Bearer sk-abc123"}', '{"Authorization": "Bearer ***"}'),
    ("Basic dXNlcjpwYXNz", "Basic ***"),
    ("api-key=hunter2 ok", "api-key=*** ok"),
    ("{'password': 'abc'}", "{'password': '***'}"),
    ("http://user:pw@gpu:8000/v1", "http://***@gpu:8000/v1"),
    (f"echo: {SECRET[:14]}", "echo: ***"),  # an echo cut short still starts with the key
    ("basic validation failed; max_tokens=96 is too many tokens", "basic validation failed; max_tokens=96 is too "
                                                                   "many tokens"),  # plain words stay
])
def test_redact(text, expected):
    assert redact(text, [SECRET]) == expected
