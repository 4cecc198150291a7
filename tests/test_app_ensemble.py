"""The ensemble form in the App served by this test (headless Chromium): two fitted experts are picked in the
form, combined by the max and then by a weighted sum (a bad weight is refused under its field first), and the
database holds what the form asked for.
"""

from __future__ import annotations

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # the browser test skips, saying why (test_panel_browser.browser)
    pass

import fiftyone_anomaly_vlm as fav
from conftest import FIT_KWARGS
from test_panel_browser import (_click, _dismiss_notifications, _input_after_label, _notification, _text,  # noqa: F401
                                _wait, browser, fill_and_execute, open_operator_form, served_app)


def _pick_experts(driver, names) -> None:
    """Type each name into the form's "Experts" field and click it in the list the field offers."""
    for name in names:
        field = _input_after_label(driver, "Experts")
        field.click()
        field.send_keys(name)
        option = _wait(f"the option {name!r}", lambda: next(
            (o for o in driver.find_elements(By.CSS_SELECTOR, "li[role=option]") if o.text == name), None), 20)
        option.click()


def _set_text(driver, label: str, value: str) -> None:
    field = _input_after_label(driver, label)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(value)


def test_ensemble_form_combines_by_max_and_by_weights(fitted, browser):
    ds, driver = fitted, browser
    fav.fit_expert(ds.match_tags("train"), key="padim_l3", **dict(FIT_KWARGS, model_kwargs={"layers": ["layer2",
                                                                                                       "layer3"]}))
    with served_app(driver, ds):
        open_operator_form(driver, "ensemble experts", "Anomaly: ensemble experts")
        _pick_experts(driver, ["padim", "padim_l3"])
        _click(driver, "label", "Max of calibrated scores (members that see different kinds of defect)")
        _set_text(driver, "Ensemble key", "ens_max")
        fill_and_execute(driver)
        _notification(driver, "Ensemble 'ens_max' of padim, padim_l3 is ready", timeout=180)
        _click(driver, "button", "Done")
        _dismiss_notifications(driver)
        ds.reload()
        config = ds.get_run_info("ens_max_expert").config
        assert config.members == {"*": ["padim", "padim_l3"]} and config.combine.startswith("max of")

        open_operator_form(driver, "ensemble experts", "Anomaly: ensemble experts")
        _pick_experts(driver, ["padim", "padim_l3"])
        _click(driver, "label", "Weighted sum of standardised scores")
        _wait("the weights field", lambda: driver.find_elements(By.XPATH, "//*[normalize-space(text())='Weights']"), 30)
        _set_text(driver, "Weights", "1, 0")  # a zero weight: refused under the field, Execute stays off
        _wait("the weights' error", lambda: "Give 2 positive numbers separated by commas" in _text(driver), 30)
        assert not driver.find_element(By.XPATH, "//button[normalize-space(.)='Execute']").is_enabled()
        _set_text(driver, "Weights", "1, 0.25")
        _set_text(driver, "Ensemble key", "ens_w")
        fill_and_execute(driver)
        _notification(driver, "Ensemble 'ens_w' of padim, padim_l3 is ready", timeout=180)
    ds.reload()
    config = ds.get_run_info("ens_w_expert").config
    assert config.combine.startswith("weighted sum") and config.weights == [1.0, 0.25]
    assert fav.load_expert(ds, "ens_w").model == "weighted ensemble of padim + padim_l3"
