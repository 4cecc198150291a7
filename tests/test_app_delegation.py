"""Delegation out of the box: "Schedule" in the App with a worker, the review panel's Runs view, the demo's ``--app``.

The browser test serves the App through :func:`fiftyone_anomaly_vlm.app_launch.launch_app` (scheduling enabled
in the App server's environment, one real ``fiftyone delegated launch`` worker process on the test database),
schedules a score run from the operator form in headless Chromium and reads its end in the panel's Runs view;
a scheduled run that fails shows as failed with its error. Before the fix the form had only "Execute" and
nothing in the App listed scheduled runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import fiftyone.operators as foo
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState

import fiftyone_anomaly_vlm as fav
from conftest import ROOT, subprocess_env
from fiftyone_anomaly_vlm.app_launch import app_environment, plugin_folder, start_workers, stop_workers
from fiftyone_anomaly_vlm.reviewing.overview import describe_result, run_overview

PLUGIN = "@anomaly-vlm/anomaly-vlm"
SCORE = f"{PLUGIN}/score_anomalies"


def _queue(ds, uri, params):
    return foo.execute_operator(uri, ctx=dict(view=ds.view(), params=params), request_delegation=True).result["id"]


def _break_checkpoint(ds, expert: str) -> str:
    """Delete the checkpoint file of ``expert`` (a scheduled score with it fails); returns the error that
    scoring with it raises from Python (``type: message``)."""
    os.remove(ds.get_run_info(f"{expert}_expert").config.checkpoint)
    with pytest.raises(Exception) as e:
        fav.score(ds, expert=expert, key="from_python", device="cpu")
    assert "from_python" not in ds.list_runs()
    return f"{type(e.value).__name__}: {e.value}"


def test_run_overview_lists_runs_and_delegated_operations(fitted):
    ds = fitted
    service = DelegatedOperationService()
    done_id = _queue(ds, SCORE, dict(expert="padim", key="padim", device="cpu", batch_size=16))
    service.execute_operation(service.get(done_id))
    ds.reload()
    queued_id = _queue(ds, SCORE, dict(expert="padim", key="later", device="cpu"))
    expected = _break_checkpoint(ds, "padim")
    failed_id = _queue(ds, SCORE, dict(expert="padim", key="again", device="cpu"))
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
    assert failed.state == "failed" and failed.error == expected
    assert "again" not in ds.list_runs()
    scoring = rows["padim"]
    assert scoring.source == "run" and scoring.kind == "scoring"
    assert scoring.detail == f"{len(ds)} scored, 0 errors"
    assert rows["padim_expert"].kind == "expert" and rows["padim_expert"].detail.startswith("trained on ")
    assert [r.source for r in run_overview(ds)][:3] == ["delegated"] * 3  # operations first, newest first
