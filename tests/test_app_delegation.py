"""Delegation out of the box: the demo's ``--app`` (the App with "Schedule" and a worker), the review panel's Runs view.

The App test starts ``python -m fiftyone_anomaly_vlm.demo --app`` as a user would (on the test database, with an
empty plugins folder and scheduling not enabled beforehand), checks what it started (the App server with
``FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true``, one real ``fiftyone delegated launch`` worker, the plugin linked),
schedules a score run from the operator form in headless Chromium, lets the worker run it and reads its end
in the panel's Runs view, then a scheduled run that fails, shown failed with its error; Ctrl+C stops all of it.
Before the fix the form had only "Execute", the demo had no ``--app`` and nothing in the App listed scheduled
runs. Where Chromium is missing, the browser part is skipped (with the reason) and the rest still runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import urllib.request

import psutil
import pytest

import fiftyone as fo
import fiftyone.operators as foo
from fiftyone import ViewField as F
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionOptions, ExecutionRunState
from fiftyone.operators.registry import OperatorRegistry

import fiftyone_anomaly_vlm as fav
from conftest import FIT_KWARGS, ROOT, subprocess_env
from fiftyone_anomaly_vlm.reviewing.overview import describe_result, run_overview
from test_panel_browser import (MISSING, _click, _click_text, _free_port, _input_after_label, _text,  # noqa: F401
                                _wait, browser, save_png)

try:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # the browser part is skipped, with the reason
    pass

PLUGIN = "@anomaly-vlm/anomaly-vlm"
SCORE = f"{PLUGIN}/score_anomalies"
EVALUATE = dict(run="padim", gt_field="ground_truth", positive="anomalous", eval_key="padim_eval")


@pytest.fixture(scope="module")
def delegation_ds(parts_template):
    """One parts clone with a fitted 'padim' expert for this module's tests (each leaves the expert usable)."""
    ds = parts_template.clone("fav-delegation")
    fav.fit_expert(ds.match_tags("train"), key="padim", **FIT_KWARGS)
    yield ds
    ds.delete()


def _queue(view, uri, params):
    return foo.execute_operator(uri, ctx=dict(view=view, params=params), request_delegation=True).result["id"]


def _operations(ds):
    return sorted(DelegatedOperationService().list_operations(dataset_name=ds.name), key=lambda d: d.queued_at)


def test_run_overview_lists_runs_and_delegated_operations(delegation_ds):
    ds = delegation_ds
    service = DelegatedOperationService()
    done_id = _queue(ds.view(), SCORE, dict(expert="padim", key="padim", device="cpu", batch_size=16))
    service.execute_operation(service.get(done_id))
    ds.reload()
    queued_id = _queue(ds.view(), SCORE, dict(expert="padim", key="later", device="cpu"))
    normals = ds.match(F("ground_truth.label") == "normal")
    with pytest.raises(ValueError) as e:
        fav.evaluate(normals, "padim", "ground_truth")
    failed_id = _queue(normals, f"{PLUGIN}/evaluate_anomalies", EVALUATE)
    service.execute_operation(service.get(failed_id))

    rows = {r.op_id or r.name: r for r in run_overview(ds)}
    done = rows[str(done_id)]
    result = service.get(done_id).result.result  # what the operator returned: the run's counts
    assert result["num_scored"] == len(ds) and result["num_errors"] == 0 and result["key"] == "padim"
    assert done.state == "completed" and done.name == "score_anomalies (padim)" and done.progress == 1.0
    assert done.detail == describe_result(result)
    assert done.detail.startswith(f"{len(ds)} scored, 0 skipped, 0 errors, ")
    assert rows[str(queued_id)].state == "queued" and rows[str(queued_id)].error is None
    failed = rows[str(failed_id)]
    assert failed.state == "failed" and failed.error == f"ValueError: {e.value}"
    assert failed.name == "evaluate_anomalies (padim_eval)" and "padim_eval" not in ds.list_runs()
    scoring = rows["padim"]
    assert scoring.source == "run" and scoring.kind == "scoring"
    assert scoring.detail == f"{len(ds)} scored, 0 errors"
    assert rows["padim_expert"].kind == "expert" and rows["padim_expert"].detail.startswith("trained on ")
    assert [r.source for r in run_overview(ds)][:3] == ["delegated"] * 3  # operations first, newest first
    service.delete_operation(queued_id)  # never run: not left for the App test's worker


# ---- the demo's --app: Schedule in the App, a real worker, the Runs view, Ctrl+C -------------------------------
def _ended(ds, n: int):
    """The last ``n`` operations of ``ds`` (queue order) once all of them have ended, else None."""
    ops = _operations(ds)[-n:]
    ended = (ExecutionRunState.COMPLETED, ExecutionRunState.FAILED)
    return ops if len(ops) == n and all(d.run_state in ended for d in ops) else None


def _schedule(driver, search: str, title: str, texts: dict[str, str] | None = None) -> None:
    """Open the operator browser, pick the operator, fill ``texts`` (label -> text) and click "Schedule" (the
    default choice of the plugin's long operators where scheduling is enabled)."""
    ActionChains(driver).send_keys("`").perform()
    _wait("the operator browser", lambda: driver.find_elements(By.CSS_SELECTOR, "input[placeholder*='earch']"), 20)
    ActionChains(driver).send_keys(search).perform()
    _wait(f"'{title}' in the operator browser", lambda: title in _text(driver), 20)
    ActionChains(driver).send_keys(Keys.ENTER).perform()
    schedule = "//button[normalize-space(.)='Schedule']"
    _wait(f"the form of '{title}' with its Schedule button", lambda: driver.find_elements(By.XPATH, schedule), 30)
    for label, value in (texts or {}).items():
        field = _input_after_label(driver, label)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(value)
    _wait("the form to accept the values", lambda: driver.find_element(By.XPATH, schedule).is_enabled(), 30)
    _click(driver, "button", "Schedule")


def _schedule_and_check_in_the_app(driver, ds, url: str) -> None:
    driver.get(url)
    _wait("the grid", lambda: driver.find_elements(By.CSS_SELECTOR, "[data-cy=looker]"), 90)
    _click_text(driver, "button", "Dismiss")  # the App's promotional pop-up, if shown
    _wait("the review panel's Runs view", lambda: "padim_expert" in _text(driver), 60)
    n_before = len(_operations(ds))

    # a score run scheduled from the form: the worker runs it; the Runs view shows it completed with its counts
    _schedule(driver, "score samples", "Anomaly: score samples", texts={"Run key": "sched"})
    (op,) = _wait("the worker to end the scheduled run", lambda: _ended(ds, 1) if len(_operations(ds)) > n_before
                  else None, 180)
    assert op.run_state == ExecutionRunState.COMPLETED, op.result and op.result.error
    ds.reload()
    assert "sched" in ds.list_runs() and ds.count("sched_score") == len(ds)
    assert op.result.result["num_scored"] == len(ds) and op.status.progress == 1.0
    counts = describe_result(op.result.result)
    assert counts.startswith(f"{len(ds)} scored, 0 skipped, 0 errors")
    _click(driver, "button", "Refresh")
    _wait(f"the completed run with {counts!r}", lambda: counts in _text(driver), 30)

    # a scheduled run that fails (its expert's checkpoint is gone): failed, with the error; nothing written
    checkpoint = ds.get_run_info("padim_expert").config.checkpoint
    shutil.move(checkpoint, checkpoint + ".away")
    try:
        _schedule(driver, "score samples", "Anomaly: score samples", texts={"Run key": "again"})
        _, op = _wait("the worker to end the second run", lambda: _ended(ds, 2) if len(_operations(ds)) > n_before + 1
                      else None, 120)
    finally:
        shutil.move(checkpoint + ".away", checkpoint)
    assert op.run_state == ExecutionRunState.FAILED and checkpoint in op.result.error
    ds.reload()
    assert "again" not in ds.list_runs() and "again_score" not in ds.get_field_schema()
    _click(driver, "button", "Refresh")
    _wait("the failed run with its error", lambda: checkpoint in _text(driver), 30)
    table = driver.find_element(By.XPATH, "//table[contains(., 'score_anomalies (again)')]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", table)
    assert "failed" in table.text and "completed" in table.text
    save_png(driver, "app-runs-view")


def _as_a_background_job() -> None:
    """The demo started as a shell's background job starts: SIGINT ignored (inherited). Ctrl+C / SIGINT must still
    stop it (it once waited forever: Python installs no KeyboardInterrupt handler where SIGINT is ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_demo_app_schedules_runs_with_a_worker_and_shows_them(delegation_ds, request, tmp_path):
    ds = delegation_ds
    plugins = tmp_path / "plugins"  # empty: the demo links the plugin there
    env = dict(subprocess_env(), FIFTYONE_PLUGINS_DIR=str(plugins), BROWSER="true")  # BROWSER: open no browser
    env.pop("FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS", None)
    port = _free_port()
    # its output goes to a file: a pipe nobody reads after the URL fills up and blocks the demo (and its Ctrl+C)
    log_path = tmp_path / "demo.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed in finally
    demo = subprocess.Popen([sys.executable, "-m", "fiftyone_anomaly_vlm.demo", "--app", "--dataset", ds.name,
                             "--port", str(port)], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=_as_a_background_job)
    children = []
    try:
        url = f"http://localhost:{port}/datasets/{ds.name}"
        line = _wait("the App's URL", lambda: next(
            (t for t in log_path.read_text().splitlines() if url in t), None) or demo.poll() is not None, 180)
        assert demo.poll() is None, log_path.read_text()
        assert "scheduling enabled, 1 delegated worker" in line
        assert (plugins / "anomaly-vlm").resolve() == ROOT
        with urllib.request.urlopen(url, timeout=30) as page:
            assert page.status == 200
        children = psutil.Process(demo.pid).children(recursive=True)
        worker = next(c for c in children if c.cmdline()[-2:] == ["delegated", "launch"])
        server = next(c for c in children if ["--51-service", "server"] == c.cmdline()[2:4])
        for proc in (worker, server):  # the App server offers Schedule; the worker runs this database's queue
            environ = proc.environ()
            assert environ["FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS"] == "true"
            assert environ["FIFTYONE_PLUGINS_DIR"] == str(plugins)
            assert environ["FIFTYONE_DATABASE_NAME"] == os.environ["FIFTYONE_DATABASE_NAME"]
        assert worker.cmdline()[-3] == os.path.join(os.path.dirname(sys.executable), "fiftyone")  # this venv's

        if not MISSING:
            _schedule_and_check_in_the_app(request.getfixturevalue("browser"), ds, url)

        demo.send_signal(signal.SIGINT)  # Ctrl+C: the worker and the App stop, then the demo
        demo.wait(timeout=90)
        _wait("the worker and the App server to exit", lambda: not any(
            c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in (worker, server)), 30)
    finally:
        for proc in [*children, *([psutil.Process(demo.pid)] if demo.poll() is None else [])]:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        log.close()
    if MISSING:
        pytest.skip(f"the App part: {MISSING}")


def test_long_operators_offer_schedule_by_default(monkeypatch):
    """Where the App server allows scheduling, the long operators' form defaults to "Schedule"."""
    monkeypatch.setattr(fo.config, "allow_legacy_orchestrators", True)
    registry = OperatorRegistry()
    for name in ("fit_expert", "score_anomalies", "judge_anomalies", "score_video", "create_clip_expert",
                 "ensemble_experts"):
        config = registry.get_operator(f"{PLUGIN}/{name}").config
        assert config.allow_delegated_execution and config.default_choice_to_delegated, name
    # the App shows "Schedule" only without orchestrator registration (Enterprise), i.e. with the variable set
    assert not ExecutionOptions(allow_delegated_execution=True).to_dict()["orchestrator_registration_enabled"]
