"""The score form's "Shards" field in the App (issue #21): Shards = 2 typed in the served App (headless Chromium)
queues two delegated operations for the one run key and opens its shard ledger with 2 shards. The operator calls
``fav.score(..., shards=2)``; real workers running such shards to the end are tests/test_shards.py's.
"""

from __future__ import annotations

from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState

from fiftyone_anomaly_vlm.shards import sharded_run
from test_panel_browser import (_click_text, _dismiss_notifications, _notification, browser,  # noqa: F401
                                run_operator, served_app)

SCORE_URI = "@anomaly-vlm/anomaly-vlm/score_anomalies"


def _queue_from_form(driver, ds, search: str, title: str, texts: dict, key: str, uri: str) -> tuple[list, list]:
    """Run the form ``title`` in the served App with ``texts`` (Shards = 2 among them); check that two
    delegated operations of ``uri`` were queued for shards 0 and 1 of ``key``. Returns (operations, their
    parameters in shard order)."""
    service = DelegatedOperationService()
    before = {str(op.id) for op in service.list_operations(dataset_name=ds.name)}
    with served_app(driver, ds):
        run_operator(driver, search, title, texts=texts)
        _notification(driver, f"Queued 2 shards of '{key}'", timeout=120)
        _click_text(driver, "button", "Done")
        _dismiss_notifications(driver)
    ops = [op for op in service.list_operations(dataset_name=ds.name) if str(op.id) not in before]
    assert sorted(op.operator for op in ops) == [uri] * 2
    params = sorted((op.context.request_params["params"] for op in ops), key=lambda p: p["shard_index"])
    assert [(p["key"], p["shard_index"], p["shard_count"]) for p in params] == [(key, 0, 2), (key, 1, 2)]
    return ops, params



def test_score_form_shards_queue_delegated_operations(fitted, browser):
    ds, driver, key = fitted, browser, "sharded"
    ops, _ = _queue_from_form(driver, ds, "score samples", "Anomaly: score samples",
                              {"Run key": key, "Shards (delegated operations)": "2", "Device": "cpu"}, key, SCORE_URI)
    assert all(op.run_state == ExecutionRunState.QUEUED for op in ops)
    run = sharded_run(ds, key)
    assert run.count == 2 and [s.state for s in run.shards] == ["queued", "queued"]
    assert sorted(s.op_id for s in run.shards) == sorted(str(op.id) for op in ops)
    assert key not in ds.list_runs() and not ds.has_field(f"{key}_score")  # nothing scored by the App

    for op in ops:  # no worker here (tests/test_shards.py runs score shards to the end): none left for another's
        DelegatedOperationService().delete_operation(op.id)


JUDGE_URI = "@anomaly-vlm/anomaly-vlm/judge_anomalies"


def test_judge_form_shards_queue_delegated_operations_with_the_backend_spec(parts, browser):
    """Shards = 2 in the judge form: two queued judge operations carrying the form's backend as make_backend's
    arguments (the model is only named: nothing is loaded in the App), the ledger with 2 queued shards."""
    ds, driver, key = parts, browser, "vlm_sharded"
    ops, params = _queue_from_form(driver, ds, "judge and explain", "Anomaly: VLM judge and explain",
                                   {"Model": "/models/judge-not-loaded-here", "Shards (delegated operations)": "2",
                                    "Run key": key}, key, JUDGE_URI)
    assert all(p["backend_spec"]["model"] == "/models/judge-not-loaded-here" for p in params)
    run = sharded_run(ds, key)
    assert run.count == 2 and [s.state for s in run.shards] == ["queued", "queued"]
    assert key not in ds.list_runs()  # nothing judged by the App
    for op in ops:
        DelegatedOperationService().delete_operation(op.id)
