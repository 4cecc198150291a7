"""End to end in the App served by this test, driven in headless Chromium: the review panel, clicked through.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/setup.sh`` installs them where apt exists) and
``selenium`` (the ``test`` extra). Browser tests skip, with the reason, when any of them is missing or Chromium
cannot start. The walk-through takes the README's screenshots (``docs/review-*.png``, written there when FAV_UPDATE_SCREENSHOTS=1).

The helpers here (``browser``, ``served_app``, ``run_operator``...) are shared with ``test_app_*.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

import fiftyone as fo

import fiftyone_anomaly_vlm as fav
from conftest import IMAGE_SIZE, ROOT
from fiftyone_anomaly_vlm.panels.review import BINS
from fiftyone_anomaly_vlm.reviewing import default_threshold

CHROMIUM = os.environ.get("FAV_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FAV_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")
DOCS = ROOT / "docs"
IN_PANEL = "[data-cy=panel-content-anomaly_review]"
PANEL = fo.Space(children=[fo.Panel(type="Samples", pinned=True), fo.Panel(type="anomaly_review")],
                 orientation="horizontal")

try:
    from selenium import webdriver
    from selenium.common.exceptions import (ElementNotInteractableException, NoSuchElementException,
                                            StaleElementReferenceException, WebDriverException)
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    MISSING = None if os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER) else (
        f"no Chromium/driver at {CHROMIUM} / {CHROMEDRIVER} (apt-get install chromium chromium-driver, "
        "or scripts/setup.sh)")
except ImportError:
    MISSING = "selenium not installed (pip install -e '.[test]')"


# ---- helpers shared with test_app_*.py ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    """Headless Chromium (skips the test, with the reason, where it is missing or cannot start)."""
    if MISSING:
        pytest.skip(MISSING)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="fav-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1700,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    except WebDriverException as e:
        pytest.skip(f"Chromium could not start: {e.msg}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@contextlib.contextmanager
def served_app(driver, samples, spaces=None):
    """Serve the App on ``samples`` (a dataset or view), open it in ``driver``; yields the session."""
    port = _free_port()
    session = fo.launch_app(samples, spaces=spaces, address="127.0.0.1", port=port, remote=True, auto=False)
    try:
        driver.get(f"http://127.0.0.1:{port}/datasets/{samples._root_dataset.name}")
        _wait("the grid", lambda: driver.find_elements(By.CSS_SELECTOR, "[data-cy=looker]"), 90)
        _click_text(driver, "button", "Dismiss")  # the App's promotional pop-up, if shown
        yield session
    finally:
        if os.environ.get("FAV_BROWSER_DEBUG"):  # a folder: the page as the test left it
            driver.save_screenshot(os.path.join(os.environ["FAV_BROWSER_DEBUG"], "last.png"))
        session.close()


def set_view(session, view, what=None, until=None, timeout=60) -> None:
    """``session.view = view``, sent once the session's event client is connected, and sent again until
    ``until()`` holds (``what`` names it in the failure). Under load the client's stream to the App server can
    drop: FiftyOne's client then waits 10 s ("Client is not connected") and re-subscribes with the session's
    *initial* state, which can undo a view sent just before; re-sending the view makes it stick."""
    end = time.time() + timeout
    while True:
        _wait("the session's connection to the App server", lambda: session._client._connected, 60)
        session.view = view
        if until is None:
            return
        try:
            _wait(what or "the view in the App", until, min(20, max(1, end - time.time())))
            return
        except AssertionError:
            if time.time() >= end:
                raise


def _wait(what, predicate, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            value = predicate()
        except (StaleElementReferenceException, NoSuchElementException):  # the App is redrawing: look again
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


_CLICK_JS = """
const [tag, text] = arguments;
const visible = e => e.offsetParent !== null || e.getClientRects().length > 0;
const lines = e => (e.innerText || '').split('\\n').map(l => l.trim());
const all = Array.from(document.querySelectorAll(tag)).filter(visible);
const hit = all.find(e => lines(e).includes(text)) || all.find(e => (e.innerText || '').includes(text));
if (!hit) return false;
hit.scrollIntoView({block: 'center'});
hit.click();
return true;
"""


def _click_text(driver, tag, text):
    """Click the visible <tag> whose text has a line ``text`` (else that contains it); found and clicked in one
    script, so a redraw in between cannot leave a stale element. Returns whether one was found."""
    return bool(driver.execute_script(_CLICK_JS, tag, text))


def _click(driver, tag, text):
    assert _click_text(driver, tag, text), f"no <{tag}> '{text}' on the page"


def _text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def _notification(driver, contains: str, timeout=60) -> str:
    """Wait for an App notification (snackbar) holding ``contains``; returns its text."""
    def find():
        alerts = driver.find_elements(By.CSS_SELECTOR, ".MuiSnackbar-root, [role=alert]")
        return next((a.text for a in alerts if contains in a.text), None)
    return _wait(f"a notification with {contains!r} (page: {_text(driver)[-600:]!r})", find, timeout)


def _dismiss_notifications(driver) -> None:
    for close in driver.find_elements(By.CSS_SELECTOR, ".MuiSnackbar-root button"):
        driver.execute_script("arguments[0].click();", close)
    _wait("notifications closed", lambda: not driver.find_elements(By.CSS_SELECTOR, ".MuiSnackbar-root"), 20)


def _input_after_label(driver, label: str):
    """The text input of the form field labelled ``label`` (the first one after that text)."""
    return driver.find_element(By.XPATH, f"//*[normalize-space(text())='{label}']/following::input[1]")


def open_operator_form(driver, search: str, title: str) -> None:
    """Open the operator browser (backtick) and the form of the operator found by ``search`` (not executed)."""
    def browser_open():
        return driver.find_elements(By.CSS_SELECTOR, "input[placeholder*='earch']")

    ActionChains(driver).send_keys("`").perform()
    try:
        _wait("the operator browser", browser_open, 10)
    except AssertionError:  # the key went to a dialog or input still holding the focus (e.g. after a finished run)
        ActionChains(driver).send_keys(Keys.ESCAPE).perform()
        driver.execute_script("document.activeElement && document.activeElement.blur()")
        ActionChains(driver).send_keys("`").perform()
        _wait("the operator browser", browser_open, 20)
    ActionChains(driver).send_keys(search).perform()
    _wait(f"'{title}' in the operator browser", lambda: title in _text(driver), 20)
    ActionChains(driver).send_keys(Keys.ENTER).perform()
    _wait(f"the form of '{title}'", lambda: driver.find_elements(By.XPATH, "//button[normalize-space(.)='Execute']"),
          30)


def run_operator(driver, search: str, title: str, texts: dict[str, str] | None = None,
                 choices: list[str] | None = None, dropdowns: dict[str, str] | None = None) -> None:
    """Open the operator browser (backtick), pick the operator found by ``search``, fill the form (``dropdowns``:
    shown value -> value to choose; ``choices``: radio labels; ``texts``: input label -> text) and click
    Execute (immediate execution, also where the operator offers delegation)."""
    open_operator_form(driver, search, title)
    fill_and_execute(driver, texts, choices, dropdowns)


def fill_and_execute(driver, texts: dict[str, str] | None = None, choices: list[str] | None = None,
                     dropdowns: dict[str, str] | None = None) -> None:
    """Fill the open operator form (as :func:`run_operator` describes) and click Execute once it is enabled."""
    for current, value in (dropdowns or {}).items():
        _choose(driver, current, value)
    for label in choices or []:
        _click(driver, "label", label)
    for label, value in (texts or {}).items():
        # a dynamic form re-renders after a choice: the field found may go stale, or be there but not yet
        # interactable (both seen on a loaded machine), or lose what was typed: type again until it holds it
        for attempt in range(6):
            try:
                field = _input_after_label(driver, label)
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", field)
                field.send_keys(Keys.CONTROL, "a")
                field.send_keys(value)
                if field.get_attribute("value") == value or attempt >= 2:  # a field may show its value reformatted
                    break
            except (StaleElementReferenceException, ElementNotInteractableException):
                if attempt == 5:
                    raise
            time.sleep(1)
    _wait("the form to accept the values", lambda: driver.find_element(
        By.XPATH, "//button[normalize-space(.)='Execute']").is_enabled(), 30)
    _click(driver, "button", "Execute")


def save_png(driver, name: str, width: int = 1280) -> None:
    """A small screenshot for the README, ``width`` pixels wide, a 256-colour palette PNG: docs/<name>.png when
    ``FAV_UPDATE_SCREENSHOTS=1`` (refreshing the README's pictures), else the test run's data folder (a test run
    leaves the checkout unchanged)."""
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    folder = DOCS if os.environ.get("FAV_UPDATE_SCREENSHOTS") == "1" else Path(fo.config.default_dataset_dir) / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256).save(folder / f"{name}.png", optimize=True)


def _thumbnails_drawn(driver) -> bool:
    canvases = driver.find_elements(By.CSS_SELECTOR, "[data-cy=looker] canvas")
    return bool(canvases) and all(c.get_attribute("canvas-loaded") == "true" for c in canvases)


def _scroll_panel_to(driver, element, block="start") -> None:
    driver.execute_script(f"arguments[0].scrollIntoView({{block: '{block}'}});", element)


# ---- the review panel, clicked through ----------------------------------------------------------------------
def _combobox(driver, value: str):
    return _wait(f"the dropdown showing {value!r}", lambda: next(
        (c for c in driver.find_elements(By.CSS_SELECTOR, "[role=combobox]") if c.text == value), None), 20)


def _choose(driver, current: str, value: str) -> None:
    def listed():
        return next((o for o in driver.find_elements(By.CSS_SELECTOR, "li[role=option]") if o.text == value), None)

    for attempt in range(3):  # on 2 loaded cores a click during a re-render can land before the menu listens
        try:
            box = _combobox(driver, current)
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
            ActionChains(driver).move_to_element(box).click().perform()
            _wait(f"option {value!r}", listed, 10)
            break
        except (AssertionError, StaleElementReferenceException):  # no menu, or the box redrawn under the click
            if attempt == 2:
                raise
            if driver.find_elements(By.CSS_SELECTOR, "li[role=option]"):  # a menu without it: close, reopen
                ActionChains(driver).move_to_element(_combobox(driver, current)).click().perform()
    def click_listed() -> bool:  # the option may be redrawn between finding and clicking it: _wait finds it again
        option = listed()
        if option is None:
            return False
        option.click()
        return True

    _wait(f"option {value!r} clicked", click_listed, 10)
    _combobox(driver, value)


def _histogram_title(driver) -> str:
    titles = [t.text for t in driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .gtitle")]
    return titles[0] if titles else ""


def _counts_line(driver) -> str:
    found = driver.find_elements(By.XPATH, "//p[contains(., 'below threshold')]")
    return found[0].text if found else ""


def _expect_run_shown(driver, ds, run: str) -> None:
    """The histogram title and the counts line describe ``run`` (as the core computes them)."""
    hist = fav.score_histogram(ds, run, bins=BINS, gt_field="ground_truth")
    counts = fav.threshold_counts(ds, run, default_threshold(ds, run), gt_field="ground_truth")
    title = f"{run}: {hist['field']} ({hist['count']} samples)"
    line = f"{counts['above']} above / {counts['below']} below threshold {counts['threshold']:.3f}"
    _wait(f"title {title!r} and counts {line!r}",
          lambda: _histogram_title(driver) == title and line in _counts_line(driver), 30)


def _grid_tiles(driver) -> list:
    """The grid's thumbnails in grid order (DOM order is not grid order); call inside :func:`_wait`, which looks
    again when one goes stale while the grid redraws."""
    return sorted(driver.find_elements(By.CSS_SELECTOR, "[data-cy=looker]"),
                  key=lambda t: (round(t.rect["y"]), t.rect["x"]))


def _select_tiles(driver, indices) -> None:
    """Tick exactly the grid's thumbnails at ``indices`` (their order is the view's order), one click at a time
    until the ticks shown are those (the grid redraws its thumbnails after each review)."""
    wanted = set(indices)

    def step():
        boxes = [t.find_element(By.CSS_SELECTOR, "input[data-cy^=looker-checkbox-input]") for t in _grid_tiles(driver)]
        wrong = [b for i, b in enumerate(boxes) if b.is_selected() != (i in wanted)]
        if boxes and not wrong:
            return True
        if wrong:
            driver.execute_script("arguments[0].parentElement.click();", wrong[0])
        return False
    _wait(f"thumbnails {sorted(wanted)} ticked", step, 30)


def _click_panel_button(driver, label: str) -> None:
    _click(driver, "button", label)


def _add_broken_run(ds) -> None:
    """A scoring run 'broken' whose 4 samples all errored (files that do not exist)."""
    missing = [fo.Sample(filepath=f"/nonexistent/fav/part_{i}.png", tags=["broken"]) for i in range(4)]
    ds.add_samples(missing)
    fav.score(ds.match_tags("broken"), expert="padim", key="broken", device="cpu")


@pytest.fixture
def review_dataset(fitted):
    """Two scoring runs, made from Python: 'padim' and 'broken' (whose samples all errored)."""
    fav.score(fitted, expert="padim", device="cpu", batch_size=16)
    _add_broken_run(fitted)
    return fitted


def _colourful_pixels(element) -> int:
    """Pixels of an element's screenshot that are clearly not grey (the parts images are grey: colour = overlay)."""
    image = Image.open(io.BytesIO(element.screenshot_as_png)).convert("HSV")
    return sum(1 for h, s, v in image.getdata() if s > 80 and v > 60)


def _fit_and_score_from_forms(driver, session, ds) -> None:
    """The main path as a user walks it: fit from the form on a filtered view (the train-tagged normals), score
    the dataset from the form, open the top sample and see the heatmap and mask drawn over it."""
    train = ds.match_tags("train")
    set_view(session, train, "the filtered view",
             lambda: f"{len(train)} samples" in _text(driver))
    run_operator(driver, "fit vision", "Anomaly: fit vision expert", choices=["None: random backbone (smoke tests)"],
                 texts={"Backbone (timm name)": "resnet18", "Image size": str(IMAGE_SIZE)})
    _notification(driver, "Expert 'padim' fitted", timeout=240)
    _click(driver, "button", "Done")
    _dismiss_notifications(driver)
    ds.reload()
    config = ds.get_run_info("padim_expert").config
    assert fav.list_experts(ds) == ["padim"] and config.num_train + config.num_holdout == len(train)

    set_view(session, None, "the whole dataset",
             lambda: f"{len(ds)} samples" in _text(driver))
    run_operator(driver, "score samples", "Anomaly: score samples")
    flagged = _notification(driver, "flagged anomalous in 'padim'", timeout=240)
    _click(driver, "button", "Done")
    _dismiss_notifications(driver)
    ds.reload()
    assert ds.count("padim_score") == len(ds) and ds.count("padim_map") == len(ds)
    assert f"{ds.count_values('padim.label').get('anomalous', 0)} flagged" in flagged

    # the top-scored sample in the modal: ticking the heatmap, then the mask, draws colour over the grey part
    set_view(session, ds.sort_by("padim_score", reverse=True), "the sorted grid",
             lambda: _thumbnails_drawn(driver))
    # the grid may still redraw its thumbnails (a stale one, seen on CI): find and click again until it takes
    _wait("the top thumbnail clicked", lambda: ActionChains(driver).move_to_element(
        _grid_tiles(driver)[0]).click().perform() or True, 30)
    canvas = _wait("the sample's modal", lambda: driver.find_elements(
        By.CSS_SELECTOR, "[data-cy=modal-looker-container] canvas"), 30)[0]
    time.sleep(1)
    plain = _colourful_pixels(canvas)
    for field in ("padim_map", "padim_mask"):
        box = driver.find_element(By.CSS_SELECTOR, f"[data-cy=modal] [data-cy=checkbox-{field}]")
        ActionChains(driver).move_to_element(box).click().perform()
        shown = _wait(f"{field} drawn over the sample", lambda: (lambda n: n if n > plain + 500 else None)(
            _colourful_pixels(canvas)), 20)
        assert shown > plain + 500, (field, plain, shown)
        ActionChains(driver).move_to_element(box).click().perform()  # hidden again: the next overlay on its own
        _wait(f"{field} hidden", lambda: _colourful_pixels(canvas) < plain + 500, 20)
    set_view(session, None, "the modal closed",  # back to the grid of the whole dataset (the App closes the modal)
             lambda: not driver.find_elements(By.CSS_SELECTOR, "[data-cy=modal-looker-container]"))


def test_review_panel_walkthrough(parts, browser):
    ds, driver = parts, browser
    with served_app(driver, ds, spaces=PANEL) as session:
        _fit_and_score_from_forms(driver, session, ds)
        _add_broken_run(ds)
        _click_panel_button(driver, "Refresh")
        _wait("the review panel's histogram", lambda: driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"), 60)
        assert "Panel \"anomaly_review\" no longer exists" not in _text(driver)
        assert sorted(fav.scoring_runs(ds)) == ["broken", "padim"]
        _expect_run_shown(driver, ds, "broken")  # the first run: why it has no scores
        _wait("the errors of 'broken'", lambda: "all 4 samples it processed errored" in _text(driver), 20)
        assert "file not found: /nonexistent/fav/part_0.png" in _text(driver)
        _choose(driver, "broken", "padim")
        _expect_run_shown(driver, ds, "padim")
        assert "samples it processed errored" not in _text(driver)
        _wait("no evaluation yet", lambda: "No evaluation of padim yet" in _text(driver), 20)

        # evaluate from the operator browser; the progress dialog ends; Refresh shows the recorded evaluation
        run_operator(driver, "evaluate against", "Anomaly: evaluate against ground truth",
                     dropdowns={"broken": "padim"}, texts={"Evaluation key": "padim_eval"})
        _notification(driver, "'padim_eval': image AUROC")
        _wait("the progress dialog at its end", lambda: "evaluating: done" in _text(driver), 20)
        _click(driver, "button", "Done")
        _dismiss_notifications(driver)
        ds.reload()
        metrics = ds.load_run_results("padim_eval", cache=False).metrics
        assert ds.get_run_info("padim_eval").config.run_key == "padim"
        _click_panel_button(driver, "Refresh")
        _wait("the evaluation's metrics", lambda: f"{metrics['auroc']:.4f}" in _text(driver), 20)
        assert f"{metrics['ap']:.4f}" in _text(driver)
        subplots = [t.text for t in driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .annotation-text")]
        assert {"ROC", "Precision-recall"} <= set(subplots), subplots
        assert f"ROC, AUROC {metrics['auroc']:.3f}" in _text(driver)  # the legend of the recorded curve
        _scroll_panel_to(driver, driver.find_elements(By.CSS_SELECTOR, f"{IN_PANEL} .js-plotly-plot")[-1], "end")
        save_png(driver, "review-evaluation")

        # switching runs: title, counts and errors always describe the selected run
        _choose(driver, "padim", "broken")
        _expect_run_shown(driver, ds, "broken")
        _choose(driver, "broken", "padim")
        _expect_run_shown(driver, ds, "padim")
        _wait("the evaluation of padim again", lambda: f"{metrics['auroc']:.4f}" in _text(driver), 20)

        # a histogram bar: the grid shows that bin's samples
        hist = fav.score_histogram(ds, "padim", bins=BINS)
        histogram = driver.find_elements(By.CSS_SELECTOR, f"{IN_PANEL} .js-plotly-plot")[0]
        bars = [b for b in histogram.find_elements(By.CSS_SELECTOR, "g.point path") if b.size["height"] > 3]
        bar = max(bars, key=lambda b: b.rect["x"])  # the highest-score bin with samples
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", bar)
        ActionChains(driver).move_to_element(bar).click().perform()
        n_bin = next(c for c in reversed(hist["counts"]) if c)
        _wait(f"the {n_bin} samples of the bin in the grid", lambda: f"{n_bin} samples" in _text(driver)
              or (n_bin == 1 and "1 sample" in _text(driver)), 30)
        edges = hist["edges"]
        top = max(i for i, c in enumerate(hist["counts"]) if c)
        shown = _wait("the App's view in the Python session", lambda: session.view, 30).values("padim_score")
        assert len(shown) == n_bin and all(edges[top] <= s <= edges[top + 1] for s in shown), shown

        # Show flagged: the samples above the threshold, highest first
        threshold = default_threshold(ds, "padim")
        flagged = fav.flagged_view(ds, "padim", threshold=threshold)
        assert len(flagged) >= 4
        _click_panel_button(driver, "Show flagged")
        _wait(f"{len(flagged)} flagged samples in the grid", lambda: f"{len(flagged)} samples" in _text(driver), 30)
        ids = flagged.values("id")
        _wait("the thumbnails drawn", lambda: _thumbnails_drawn(driver), 30)
        _scroll_panel_to(driver, _combobox(driver, "padim"))
        save_png(driver, "review-panel")

        # Accept two, Reject one, Relabel one: the review field and the tags in the database
        _select_tiles(driver, [0, 1])
        _click_panel_button(driver, "Accept")
        _notification(driver, "accept: 2 sample(s) reviewed")
        ds.reload()  # the App's server wrote the review field
        assert ds.select(ids[:2]).values("review.verdict") == ["accept", "accept"]
        assert all({"reviewed", "review:accept"} <= set(t) for t in ds.select(ids[:2]).values("tags"))
        assert ds.count("review") == 2
        _dismiss_notifications(driver)

        _select_tiles(driver, [2])
        _click_panel_button(driver, "Reject")
        _notification(driver, "reject: 1 sample(s) reviewed")
        ds.reload()
        sample = ds[ids[2]]
        assert sample.review.verdict == "reject" and sample.review.label == "normal"
        assert "review:reject" in sample.tags and ds.count("review") == 3
        _dismiss_notifications(driver)

        _select_tiles(driver, [3])
        field = driver.find_element(By.XPATH, "//input[@placeholder='normal, scratch, ...']")
        assert field.size["width"] >= 120, field.size  # 'scratch' fits (it was 59 px: 'scrat')
        field.send_keys("scratch")
        field.send_keys(Keys.TAB)
        _click_panel_button(driver, "Relabel")
        _notification(driver, "relabel: 1 sample(s) reviewed")
        ds.reload()
        sample = ds[ids[3]]
        assert sample.review.label == "scratch" and sample.review.verdict == "relabel"
        assert {"reviewed", "review:relabel"} <= set(sample.tags) and ds.count("review") == 4
        _dismiss_notifications(driver)
        _select_tiles(driver, [])

        # Apply threshold: the slider's value (calibrated scale) becomes the run's threshold, after confirming
        slider = driver.find_element(By.CSS_SELECTOR, f"{IN_PANEL} .MuiSlider-root")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", slider)
        # a click at 30 % of the track (offsets count from the element's centre)
        ActionChains(driver).move_to_element_with_offset(slider, -int(slider.size["width"] * 0.2), 0).click().perform()
        def slider_value():  # the slider is drawn again after each change: find it each time
            found = driver.find_elements(By.CSS_SELECTOR, f"{IN_PANEL} .MuiSlider-root input[type=range]")
            return float(found[0].get_attribute("value")) if found else None
        value = _wait("the slider's new value", lambda: (
            lambda v: v if v is not None and abs(v - threshold) > 0.05 else None)(slider_value()), 20)
        counts = fav.threshold_counts(ds, "padim", value)
        _wait("the counts at the new threshold", lambda: f"{counts['above']} above / {counts['below']} below "
              f"threshold {value:.3f}" in _counts_line(driver), 20)
        _click_panel_button(driver, "Apply threshold")
        _wait("the confirmation", lambda: f"Rewrite the labels and masks of padim at threshold {value:.3f}"
              in _text(driver), 20)
        assert ds.get_run_info("padim").config.normalized_image_threshold == pytest.approx(threshold)  # not yet
        save_png(driver, "review-apply-threshold")
        _click_panel_button(driver, "Confirm")
        _notification(driver, f"Threshold of 'padim' set to {value:.3f}")
        ds.reload()
        config = ds.get_run_info("padim").config
        assert config.threshold_history[-1]["rule"] == "value"
        assert config.normalized_image_threshold == pytest.approx(value, abs=1e-9)
        assert ds.count_values("padim.label").get("anomalous", 0) == counts["above"]
        _dismiss_notifications(driver)

        # Recalibrate from the reviews: F1-optimal threshold on the verdicts, recorded on the run
        n_history = len(config.threshold_history)
        _click_panel_button(driver, "Recalibrate from reviews")
        _notification(driver, "recalibrated from reviews")
        ds.reload()
        config = ds.get_run_info("padim").config
        assert len(config.threshold_history) == n_history + 1
        assert config.threshold_history[-1]["source"] == "review"
        new = config.normalized_image_threshold
        _wait("the recalibrated threshold in the panel", lambda: f"threshold {new:.3f}" in _counts_line(driver), 20)
        counts = fav.threshold_counts(ds, "padim", new)
        assert f"{counts['above']} above / {counts['below']} below threshold {new:.3f}" in _counts_line(driver)
