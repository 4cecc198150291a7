"""The review panel in the App (headless Chromium): switching runs changes the chart's title and the counts in
the same redraw (issue #17 defect 5: the title lagged one run behind), and "Recalibrate from reviews" on a few
reviews shows its caution, with the interval of the false-alarm rate, as a notification and in the panel.
"""

from __future__ import annotations

import re

import pytest

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.panels.review import BINS
from fiftyone_anomaly_vlm.reviewing import default_threshold, recalibration_caution, threshold_caution
from test_panel_browser import (IN_PANEL, PANEL, _choose, _click, _dismiss_notifications, _select_tiles,  # noqa: F401
                                _text, _thumbnails_drawn, _wait, browser, served_app)

_TITLE_AND_COUNTS = """
const title = document.querySelector('.js-plotly-plot .gtitle');
const counts = Array.from(document.querySelectorAll('p')).find(p => (p.innerText || '').includes('below threshold'));
return [title ? title.textContent : '', counts ? counts.innerText : ''];
"""

_NOTIFICATIONS = f"""
return Array.from(document.querySelectorAll('.MuiSnackbar-root, [role=alert]'))
    .filter(e => !e.closest("{IN_PANEL}")).map(e => e.innerText);
"""


@pytest.fixture
def two_runs(fitted):
    """Scoring runs 'padim' (every sample) and 'padim_sub' (12 of them): different titles and counts."""
    fav.score(fitted, expert="padim", device="cpu", batch_size=16)
    fav.score(fitted.skip(30), expert="padim", key="padim_sub", device="cpu")
    return fitted


def _shown(ds, run: str) -> tuple[str, str]:
    """The histogram title and the start of the counts line the panel must show for ``run``."""
    hist = fav.score_histogram(ds, run, bins=BINS)
    counts = fav.threshold_counts(ds, run, default_threshold(ds, run))
    return (f"{run}: {hist['field']} ({hist['count']} samples)",
            f"{counts['above']} above / {counts['below']} below threshold {counts['threshold']:.3f} "
            f"({counts['total']} scored)")


def _shown_notification(driver, contains: str) -> str:
    """The text of the App notification holding ``contains``, read in one script each time (a warning stays up
    for about two seconds while the panel redraws: element by element, it could be missed)."""
    return _wait(f"a notification with {contains!r}", lambda: next(
        (t for t in driver.execute_script(_NOTIFICATIONS) if contains in t), None), 60)


def _switch_and_expect(driver, ds, old: str, new: str) -> None:
    """Pick ``new`` in the run dropdown; every redraw seen shows the title and counts of one and the same run."""
    before, after = _shown(ds, old), _shown(ds, new)
    assert before[0] != after[0] and before[1] != after[1]
    seen = []

    def settled():
        title, counts = driver.execute_script(_TITLE_AND_COUNTS)
        seen.append((title, counts))
        return title == after[0] and after[1] in counts

    _choose(driver, old, new)
    _wait(f"title {after[0]!r} and counts {after[1]!r}", settled, 30)
    for title, counts in seen:  # never the new title with the old counts, nor the reverse
        assert (title == after[0]) == (after[1] in counts), (title, counts)


def test_switching_runs_and_the_recalibration_caution(two_runs, browser):
    ds, driver = two_runs, browser
    assert fav.scoring_runs(ds) == ["padim", "padim_sub"]
    with served_app(driver, ds, spaces=PANEL):
        _wait("the review panel", lambda: driver.execute_script(_TITLE_AND_COUNTS)[0] == _shown(ds, "padim")[0], 60)
        # the fit's threshold rests on 3 held-out normals for a 1 % false-alarm rate: the panel says so
        title, text = threshold_caution(ds, "padim")
        assert title == "Threshold from few held-out normals" and re.search(r"0 of \d held-out normals above it", text)
        _wait("the held-out caution in the panel", lambda: text in driver.execute_script(
            f"return document.querySelector('{IN_PANEL}').innerText;"), 30)
        _switch_and_expect(driver, ds, "padim", "padim_sub")
        _switch_and_expect(driver, ds, "padim_sub", "padim")

        # accept three flagged samples (all anomalous, no normal reviewed), then recalibrate from them
        flagged = fav.flagged_view(ds, "padim", threshold=default_threshold(ds, "padim"))
        assert len(flagged) >= 3
        _click(driver, "button", "Show flagged")
        _wait(f"{len(flagged)} flagged samples in the grid", lambda: f"{len(flagged)} samples" in _text(driver), 30)
        _wait("the thumbnails drawn", lambda: _thumbnails_drawn(driver), 30)
        _select_tiles(driver, [0, 1, 2])
        _click(driver, "button", "Accept")
        _shown_notification(driver, "accept: 3 sample(s) reviewed")
        _dismiss_notifications(driver)
        _click(driver, "button", "Recalibrate from reviews")
        message = _shown_notification(driver, "recalibrated from reviews")
        ds.reload()
        caution = recalibration_caution(ds, "padim")
        assert "from 3 anomalous and 0 normal reviews: false-alarm rate 0%-100%" in caution
        assert f"Caution: {caution}" in message  # the notification
        _wait("the notification gone", lambda: not any("recalibrated" in t for t in driver.execute_script(
            _NOTIFICATIONS)), 30)
        panel = driver.execute_script(f"return document.querySelector('{IN_PANEL}').innerText;")
        assert "Threshold from few reviews" in panel and caution in panel  # the panel keeps it (it once vanished)
        entry = ds.get_run_info("padim").config.threshold_history[-1]
        assert entry["source"] == "review" and entry["far_interval"] == [0.0, 1.0]

        # the counts shown are the labels the recalibration wrote
        title, counts = _shown(ds, "padim")
        _wait("the recalibrated counts", lambda: counts in driver.execute_script(_TITLE_AND_COUNTS)[1], 20)
        assert counts.startswith(f"{ds.count_values('padim.label').get('anomalous', 0)} above")
