"""End to end: the App served by this test, headless Chromium opens the review panel, its histogram renders.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/setup.sh`` installs them where apt exists) and
``selenium`` (the ``test`` extra). Skipped, with the reason, when any of them is missing or Chromium cannot
start. Saves ``docs/review-panel.png`` (the README's screenshot).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

import pytest

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from conftest import ROOT
from fiftyone_anomaly_vlm.reviewing import default_threshold

CHROMIUM = os.environ.get("FAV_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FAV_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")
SCREENSHOT = ROOT / "docs" / "review-panel.png"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
if not os.path.isfile(CHROMIUM) or not os.path.isfile(CHROMEDRIVER):
    pytest.skip(f"no Chromium/driver at {CHROMIUM} / {CHROMEDRIVER} (apt-get install chromium chromium-driver, "
                "or scripts/setup.sh)", allow_module_level=True)

from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="fav-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1600,1000"):
        opts.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    except WebDriverException as e:
        pytest.skip(f"Chromium could not start: {e.msg}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(what, predicate, timeout):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _click_text(driver, tag, text):
    found = driver.find_elements(By.XPATH, f"//{tag}[contains(normalize-space(.), '{text}')]")
    if found:
        driver.execute_script("arguments[0].click();", found[0])
    return bool(found)


def test_review_panel_renders_in_the_app(fitted, browser):
    ds = fitted
    fav.score(ds, expert="padim", device="cpu", batch_size=16)
    n_flagged = fav.flagged_view(ds, "padim", threshold=default_threshold(ds, "padim")).count()

    spaces = fo.Space(children=[fo.Panel(type="Samples", pinned=True), fo.Panel(type="anomaly_review")],
                      orientation="horizontal")
    port = _free_port()
    session = fo.launch_app(ds, spaces=spaces, address="127.0.0.1", port=port, remote=True, auto=False)
    try:
        browser.get(f"http://127.0.0.1:{port}/datasets/{ds.name}")
        # the panel loads the plugin's Python panel, which draws the histogram with plotly
        _wait("the review panel's plotly histogram", lambda: browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"),
              60)
        _wait("histogram bars", lambda: browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot g.point path"), 20)
        body = browser.find_element(By.TAG_NAME, "body")
        assert "Panel \"anomaly_review\" no longer exists" not in body.text
        _wait("the counts line", lambda: "above" in body.text and "precision" in body.text, 20)
        _click_text(browser, "button", "Dismiss")  # the App's promotional pop-up, if shown

        # "Show flagged" loads the flagged samples into the grid, highest score first
        buttons = [" ".join(b.get_attribute("textContent").split()) for b in browser.find_elements(By.TAG_NAME, "button")]
        assert _click_text(browser, "button", "Show flagged"), buttons
        _wait(f"{n_flagged} flagged samples in the grid", lambda: f"{n_flagged} samples" in body.text, 30)
        time.sleep(2)  # let the grid draw its thumbnails
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))
    finally:
        session.close()
