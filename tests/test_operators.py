"""The operators, run for real through FiftyOne's operator machinery, and plugin discovery."""

from __future__ import annotations

import pytest
import yaml

import fiftyone.operators as foo
import fiftyone.plugins as fop

from conftest import IMAGE_SIZE, ROOT

PLUGIN = "@anomaly-vlm/anomaly-vlm"


def test_plugin_is_discovered_and_manifest_lists_every_operator():
    names = [p.name for p in fop.list_plugins()]
    assert PLUGIN in names
    manifest = yaml.safe_load((ROOT / "fiftyone.yml").read_text())
    listed = set(manifest["operators"])
    registered = {op.config.name for op in foo.list_operators(type="operator") if op.plugin_name == PLUGIN}
    assert registered == listed, (registered, listed)
    panels = {op.config.name for op in foo.list_operators(type="panel") if op.plugin_name == PLUGIN}
    assert panels == set(manifest["panels"]), (panels, manifest["panels"])


def test_fit_and_score_operators_execute(parts):
    ds = parts
    result = foo.execute_operator(
        f"{PLUGIN}/fit_expert",
        ctx=dict(view=ds.match_tags("train"), params=dict(
            model="padim", key="op_padim", weights="none", image_size=IMAGE_SIZE, device="cpu", batch_size=8)),
    )
    result.raise_exceptions()
    assert "op_padim_expert" in ds.list_runs()
    cfg = ds.get_run_info("op_padim_expert").config
    assert cfg.pretrained is False and cfg.num_train + cfg.num_holdout == len(ds.match_tags("train"))

    result = foo.execute_operator(
        f"{PLUGIN}/score_anomalies",
        ctx=dict(dataset=ds, params=dict(expert="op_padim", key="op_scores", device="cpu", batch_size=8)),
    )
    result.raise_exceptions()
    assert ds.count("op_scores_score") == len(ds)
    assert ds.get_run_info("op_scores").config.expert == "op_padim"


def _run(uri, **ctx):
    foo.execute_operator(f"{PLUGIN}/{uri}", ctx=ctx).raise_exceptions()


def test_operator_reports_bad_input_clearly(parts):
    # form validation rejects the request before execution
    with pytest.raises(Exception, match="no fitted expert named .missing. on dataset .*; fitted experts: none"):
        _run("score_anomalies", dataset=parts, params=dict(expert="missing", key="x", device="cpu"))
    # the core's whole-run checks surface as the execution error
    with pytest.raises(Exception, match="empty"):
        _run("fit_expert", view=parts.match_tags("nothing"), params=dict(model="padim", key="e", weights="none"))
    with pytest.raises(Exception, match="weights file not found"):
        _run("fit_expert", view=parts.match_tags("train"),
             params=dict(model="padim", key="e", weights="file", weights_path="/nonexistent.pth"))


def test_forms_validate_keys(parts):
    from fiftyone_anomaly_vlm.operators import FitExpert, ScoreSamples
    from fiftyone.operators.executor import ExecutionContext

    ctx = ExecutionContext(request_params=dict(dataset_name=parts.name, params={"key": "bad key"}))
    form = FitExpert().resolve_input(ctx)
    key_prop = form.type.properties["key"]
    assert key_prop.invalid and "letters" in key_prop.error_message
    # no expert yet: the score form says so and is invalid
    form = ScoreSamples().resolve_input(ctx)
    assert form.type.properties["no_expert"].invalid


def test_grouped_fit_and_ensemble_operators_execute(parts):
    from fiftyone.operators.executor import ExecutionContext

    import fiftyone as fo

    from fiftyone_anomaly_vlm.operators import EnsembleExperts, FitExpert

    ids = parts.values("id")
    parts.set_values("variant", {sid: fo.Classification(label="ab"[i % 2]) for i, sid in enumerate(ids)},
                     key_field="id")
    ctx = ExecutionContext(request_params=dict(dataset_name=parts.name, params={}))
    assert "variant.label" in FitExpert().resolve_input(ctx).type.properties["group_by"].type.values
    assert EnsembleExperts().resolve_input(ctx).type.properties["too_few_experts"].invalid
    common = dict(weights="none", image_size=IMAGE_SIZE, device="cpu", batch_size=8)
    _run("fit_expert", view=parts.match_tags("train"), params=dict(model="padim", key="pv", group_by="variant.label",
                                                                   **common))
    assert parts.get_run_info("pv_expert").config.members == {"a": ["pv__a"], "b": ["pv__b"]}
    _run("fit_expert", view=parts.match_tags("train"), params=dict(model="padim", key="plain", **common))
    ctx = ExecutionContext(request_params=dict(dataset_name=parts.name, params={"experts": ["pv"]}))
    assert EnsembleExperts().resolve_input(ctx).type.properties["experts"].invalid
    _run("ensemble_experts", dataset=parts, params=dict(experts=["pv", "plain"], key="ens", device="cpu"))
    assert parts.get_run_info("ens_expert").config.members == {"*": ["pv", "plain"]}
    _run("score_anomalies", dataset=parts, params=dict(expert="ens", key="ens", device="cpu", batch_size=8))
    assert parts.count("ens_score") == len(parts)
