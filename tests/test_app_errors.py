"""Run-level failures reach the user: in the App (headless Chromium) as an error notification with the message
the Python call raises, the progress dialog ending on that message; delegated operations end failed with it;
``foo.execute_operator`` raises it. A run that fails its checks writes nothing.

FiftyOne 1.22 streams a generator operator's messages and has no error path for them: before the fix the
dialog stayed at 0 % (or closed) and nothing was shown.
"""

from __future__ import annotations

import pytest
import torch

import fiftyone.operators as foo
from fiftyone import ViewField as F
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionRunState

import fiftyone_anomaly_vlm as fav
from conftest import IMAGE_SIZE
from fiftyone_anomaly_vlm.operators.judge import backend_from_params
from test_panel_browser import (_click, _dismiss_notifications, _notification, _text, _wait,  # noqa: F401
                                browser, run_operator, save_png, served_app, set_view)

PLUGIN = "@anomaly-vlm/anomaly-vlm"
EVALUATE = dict(run="padim", gt_field="ground_truth", positive="anomalous", eval_key="padim_eval")


def _state(ds):
    """What a failed run must leave unchanged: the runs and the fields."""
    return sorted(ds.list_runs()), sorted(ds.get_field_schema())


def _python_error(fn, *args, **kwargs) -> str:
    with pytest.raises(Exception) as e:
        fn(*args, **kwargs)
    return str(e.value)


@pytest.fixture
def scored(fitted):
    fav.score(fitted, expert="padim", device="cpu", batch_size=16)
    return fitted


def test_run_errors_show_in_the_app(scored, browser):
    ds, driver = scored, browser
    normals = ds.match(F("ground_truth.label") == "normal")
    before = _state(ds)
    with served_app(driver, normals) as session:
        _wait("the one-class view", lambda: f"{len(normals)} samples" in _text(driver), 30)

        # evaluate a view holding one class: the core's ValueError, shown; nothing recorded
        expected = _python_error(fav.evaluate, normals, "padim", "ground_truth")
        run_operator(driver, "evaluate against", "Anomaly: evaluate against ground truth")
        assert expected in _notification(driver, expected)
        _wait("the dialog ending on the message", lambda: "Anomaly: evaluate against ground truth failed"
              in _text(driver), 20)
        save_png(driver, "app-run-error")
        assert _state(ds) == before
        _dismiss_notifications(driver)
        _click_done(driver)

        # fit with a hub backbone while offline: the RuntimeError of the worker thread, shown; no expert
        set_view(session, ds.match_tags("train"), "the training view",
                 lambda: f"{len(ds.match_tags('train'))} samples" in _text(driver))
        expected = _python_error(fav.fit_expert, ds.match_tags("train"), model="padim", key="hub",
                                 pretrained=True, backbone="wide_resnet50_2", image_size=IMAGE_SIZE, device="cpu")
        run_operator(driver, "fit vision", "Anomaly: fit vision expert",
                     texts={"Expert key": "hub", "Backbone (timm name)": "wide_resnet50_2",
                            "Image size": str(IMAGE_SIZE)})
        assert expected in _notification(driver, expected)
        assert _state(ds) == before and "hub" not in fav.list_experts(ds)
        _dismiss_notifications(driver)
        _click_done(driver)

        # the judge with a local model that cannot be loaded: raised before any progress, shown
        expected = _python_error(backend_from_params, {"model": "/nonexistent/judge-model"})
        run_operator(driver, "judge and explain", "Anomaly: VLM judge and explain",
                     texts={"Model": "/nonexistent/judge-model"})
        assert expected in _notification(driver, expected)
        assert _state(ds) == before
        _dismiss_notifications(driver)
        _click_done(driver)

        # the CLIP expert with its default weights tag while offline (the form's defaults)
        expected = _python_error(fav.create_clip_expert, ds, key="winclip", model="ViT-B-16-plus-240",
                                 pretrained="laion400m_e31", device="cpu")
        run_operator(driver, "CLIP zero", "Anomaly: CLIP zero/few-shot expert")
        assert expected in _notification(driver, expected)
        assert _state(ds) == before and "winclip" not in fav.list_experts(ds)
        _dismiss_notifications(driver)
        _click_done(driver)

        # scoring on a GPU this machine does not have: the core's ValueError, not torch's driver error
        if not torch.cuda.is_available():
            expected = _python_error(fav.score, ds, expert="padim", device="cuda")
            assert expected.startswith("device 'cuda' requested but no CUDA GPU is available")
            run_operator(driver, "score samples", "Anomaly: score samples", texts={"Device": "cuda"})
            assert expected in _notification(driver, expected)
            assert _state(ds) == before
            _dismiss_notifications(driver)
            _click_done(driver)

        # a review into one of the run's own fields (an operator without progress: its own error path)
        expected = _python_error(fav.review, ds, "accept", key="padim", field="padim_score")
        run_operator(driver, "review samples", "Anomaly: review samples", texts={"Review field": "padim_score"})
        assert expected in _notification(driver, expected)
        assert _state(ds) == before


def _click_done(driver) -> None:
    _click(driver, "button", "Done")


def test_delegated_run_fails_with_the_message_and_python_raises_it(scored):
    ds = scored
    normals = ds.match(F("ground_truth.label") == "normal")
    expected = _python_error(fav.evaluate, normals, "padim", "ground_truth")
    before = _state(ds)

    # from Python, immediately: the exception itself
    with pytest.raises(Exception, match="evaluated samples are normal"):
        foo.execute_operator(f"{PLUGIN}/evaluate_anomalies", ctx=dict(view=normals, params=EVALUATE))

    # delegated: the operation ends FAILED with the message as its error
    queued = foo.execute_operator(f"{PLUGIN}/evaluate_anomalies", ctx=dict(view=normals, params=EVALUATE),
                                  request_delegation=True)
    service = DelegatedOperationService()
    doc = service.get(queued.result["id"])
    service.execute_operation(doc)
    doc = service.get(doc.id)
    assert doc.run_state == ExecutionRunState.FAILED
    assert expected in doc.result.error
    assert _state(ds) == before
