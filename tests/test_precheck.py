"""A VLM server that cannot answer fails the verbs at once (one request, no retries), before any run is recorded."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.datasets import ffmpeg_available, make_video_dataset
from fiftyone_anomaly_vlm.models.judge.base import BackendUnavailable, JudgeAnswer, JudgeBackend
from fiftyone_anomaly_vlm.models.judge.openai_compat import OpenAICompatBackend

from openai_server import OpenAITestServer, build_tiny_qwen2vl

SECRET = "sk-test-precheck-0123456789"


def closed_port_url() -> str:
    """A local URL nothing listens on (a port just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


class StatusServer:
    """A real local HTTP server answering every request with one status (and the request's key in the body)."""

    def __init__(self, status: int):
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                outer.requests.append(f"{self.command} {self.path}")
                body = json.dumps({"error": {"message": f"bad key {self.headers.get('Authorization')}"}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


def backend(url: str) -> OpenAICompatBackend:
    return OpenAICompatBackend(base_url=url, model="tiny", api_key=SECRET, max_retries=4, backoff=1.0)


def test_unreachable_server_fails_judge_at_once_and_records_nothing(parts):
    url = closed_port_url()
    with pytest.raises(BackendUnavailable, match=r"cannot reach the VLM server at http://127\.0\.0\.1:\d+/v1") as e:
        fav.judge(parts, key="vlm", backend=backend(url), progress=False)
    assert url in str(e.value) and SECRET not in str(e.value)
    assert parts.list_runs() == [] and "vlm_label" not in parts.get_field_schema()


def test_credentials_in_the_url_are_not_named():
    url = closed_port_url().replace("http://", "http://user:pw@")
    with pytest.raises(BackendUnavailable) as e:
        backend(url).check()
    assert "pw" not in str(e.value) and "127.0.0.1" in str(e.value)


@pytest.mark.parametrize("status,message", [(401, "refused the API key"), (503, "answered HTTP 503")])
def test_refused_key_or_server_error_fails_after_one_request_without_the_key(parts, status, message):
    with StatusServer(status) as server:
        with pytest.raises(BackendUnavailable, match=message) as e:
            fav.judge(parts, key="vlm", backend=backend(server.base_url), progress=False)
    assert server.requests == ["GET /v1/models"]  # one request, no retries
    assert SECRET not in str(e.value) and "***" in str(e.value)  # the server echoed it; it is blanked out
    assert parts.list_runs() == []


def test_a_working_server_passes_the_check(tmp_path, parts):
    with OpenAITestServer(build_tiny_qwen2vl(tmp_path / "m")) as server:
        b = OpenAICompatBackend(base_url=server.base_url, model="tiny", max_concurrency=4, timeout=60.0)
        b.check()  # no GET /models on this server (501): reachable all the same
        assert server.n_requests == 0
        res = fav.judge(parts.limit(2), key="vlm", backend=b, max_new_tokens=4, progress=False)
    assert res.num_judged == 2 and "vlm" in parts.list_runs()


class LocalBackend(JudgeBackend):
    """A backend with nothing to reach: the base class's check passes."""

    name = "local-test"

    def judge(self, requests):
        return [JudgeAnswer(text="No", p_yes=0.0, answered_mass=1.0, meta=r.meta) for r in requests]


def test_default_check_is_a_no_op():
    assert LocalBackend().check() is None


@pytest.mark.skipif(not ffmpeg_available(), reason="ffmpeg/ffprobe not installed")
def test_video_verbs_check_the_server_before_any_run():
    ds = make_video_dataset("fav-precheck-videos", num_normal=1, num_anomalous=1, num_frames=8, size=32, fps=4,
                            anomaly=(2, 6), seed=4)
    try:
        url = closed_port_url()
        with pytest.raises(BackendUnavailable, match="cannot reach"):
            fav.score_video(ds, key="vid", backend=backend(url), progress=False)
        with pytest.raises(BackendUnavailable, match="cannot reach"):
            fav.learn_questions(ds, key="q", backend=backend(url), iterations=1)
        with pytest.raises(BackendUnavailable, match="cannot reach"):  # a server proposer is checked too
            fav.learn_questions(ds, key="q", backend=LocalBackend(), proposer=backend(url), iterations=1)
        assert ds.list_runs() == []
    finally:
        fo.delete_dataset(ds.name)
