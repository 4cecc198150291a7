"""Defect regions as labels (issue #18, part 2): ``<key>_regions`` / ``<key>_num_regions`` / ``<key>_explanation``.

Exact regions of a hand-made map; the fields a real PaDiM scoring run writes, checked against its own mask PNGs;
``set_threshold`` recomputing them; the judge's crops taken from the regions; the score form's minimum area in
the served App (headless Chromium).
"""

from __future__ import annotations

import re
import time
import uuid

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import fiftyone as fo
from fiftyone import ViewField as F

try:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # the browser test skips, saying why (test_panel_browser.browser)
    pass

import fiftyone_anomaly_vlm as fav
from fiftyone_anomaly_vlm.judging.regions import MIN_REGION_CROP, REGION_MARGIN, expert_crops, region_crops
from fiftyone_anomaly_vlm.models.judge import make_backend
from fiftyone_anomaly_vlm.regions import RegionRule, check_min_area, explain, find_regions, region_detections
from fiftyone_anomaly_vlm.runs import AnomalyScoreRunConfig
from conftest import fitted_clone
from tiny_vlms import BUILDERS
from test_panel_browser import (_click, _input_after_label, _notification, _text, _wait, browser,  # noqa: F401
                                open_operator_form, save_png, served_app)


def _two_blobs():
    """A 40x80 map: a 4x6 blob (peak 0.9) top left, a diagonal 3-pixel hairline (8-connected) bottom right, and a
    single pixel (0.7) in the centre."""
    heat = np.zeros((40, 80))
    heat[2:6, 4:10] = 0.6
    heat[3, 5] = 0.9
    for i in range(3):
        heat[30 + i, 70 + i] = 0.8
    heat[20, 40] = 0.7
    return heat


def test_regions_of_a_known_map_exact_boxes_and_areas():
    heat = _two_blobs()
    regions = find_regions(heat, heat > 0.5, image_size=(800, 400))  # 10x the map each way: 100 image px each
    assert [(r.box, r.area_px, r.location) for r in regions] == [
        ((4 / 80, 2 / 40, 6 / 80, 4 / 40), 2400, "top left"),
        ((70 / 80, 30 / 40, 3 / 80, 3 / 40), 300, "bottom right"),  # the diagonal is one region
        ((40 / 80, 20 / 40, 1 / 80, 1 / 40), 100, "center"),
    ]
    top = regions[0]
    assert top.area_share == pytest.approx(24 / 3200) and top.peak == 0.9
    assert top.mean == pytest.approx((23 * 0.6 + 0.9) / 24)
    # the minimum area (a share of the image) drops the single pixel and keeps the hairline (3 px = 0.094 %)
    kept = find_regions(heat, heat > 0.5, image_size=(800, 400), min_area=2 / 3200)
    assert [r.location for r in kept] == ["top left", "bottom right"]
    assert find_regions(heat, heat > 0.95) == []
    det = region_detections(kept).detections[0]
    assert (det.label, det.bounding_box, det.confidence, det["area_share"], det["area_px"]) == (
        "anomaly", [0.05, 0.05, 0.075, 0.1], 0.9, pytest.approx(0.0075), 2400)

    for bad in (-0.1, 1.0, "big", None, True):
        with pytest.raises(ValueError, match="min_region_area"):
            check_min_area(bad)


def test_explanation_says_how_many_where_how_large_how_far():
    heat = _two_blobs()
    regions = find_regions(heat, heat > 0.5, image_size=(800, 400))
    assert explain(0.997, regions, heat, normal=0.5, pixel_threshold=0.4) == (
        "Anomalous: score 0.997 (above 99.7 % of known-good samples); 3 regions: top left (0.75 % of the image, "
        "peak 1.8x the known-good maximum), bottom right (0.094 %, peak 1.6x), center (0.031 %, peak 1.4x)")
    assert explain(0.95, regions[:1], heat, normal=None, pixel_threshold=0.4) == (
        "Anomalous: score 0.950 (above 95.0 % of known-good samples); 1 region: top left (0.75 % of the image, "
        "peak 0.90, pixel threshold 0.40)")
    assert explain(0.95, [], heat, normal=0.5, pixel_threshold=0.95) == (
        "Anomalous: score 0.950 (above 95.0 % of known-good samples); no region above the pixel threshold, the map's "
        "highest point is at top left (peak 1.8x the known-good maximum)")
    # a sample labelled normal gets no explanation; its regions are still written
    dets, n, text = RegionRule(0.0, 0.5, 0.4).values(heat, heat > 0.5, None, anomalous=False, score=0.2)
    assert (len(dets.detections), n, text) == (3, 3, None)
    assert "above 99.99 %" in explain(0.99994, [], None, normal=0.5, pixel_threshold=0.4)
    assert "peak at least 2.0x the known-good maximum" in explain(0.99, [], np.ones((4, 4)), normal=0.5,
                                                                  pixel_threshold=0.4)


def test_judge_crops_come_from_the_regions():
    heat = _two_blobs()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 800, 3), dtype=np.uint8))
    dets = region_detections(find_regions(heat, heat > 0.5, image_size=image.size))
    crops, boxes = region_crops(image, dets, 2)
    assert [where for _, where in crops] == ["top left", "bottom right"] and len(boxes) == 2
    (bx, peak, where) = boxes[0]
    # the 60x40 px blob at (40, 20), grown by the margin on each side: 90x60 px centred on it
    grown = (60 * (1 + 2 * REGION_MARGIN), 40 * (1 + 2 * REGION_MARGIN))
    assert (peak, where) == (0.9, "top left")
    assert bx == pytest.approx(((70 - grown[0] / 2) / 800, (40 - grown[1] / 2) / 400, grown[0] / 800, grown[1] / 400))
    assert crops[0][0].size == (round(grown[0]), round(grown[1]))
    # the 30x30 px hairline is smaller than the floor (1/8 of 400 px = 50 px): a 50x50 crop, kept inside the image
    (bx2, _, _) = boxes[1]
    side = MIN_REGION_CROP * 400
    assert bx2 == pytest.approx(((715 - side / 2) / 800, (315 - side / 2) / 400, side / 800, side / 400))
    assert region_crops(image, None, 3) == ([], []) and region_crops(image, fo.Detections(), 3) == ([], [])


@pytest.fixture(scope="module")
def scored(parts_template):
    """A parts clone with 'padim' fitted and the held-out samples scored with every region kept."""
    with fitted_clone(parts_template, f"regions-{uuid.uuid4().hex[:6]}") as ds:
        fav.score(ds.match_tags("train", bool=False), expert="padim", key="pd", num_workers=0)
        yield ds


def _mask_components(mask_path: str) -> int:
    return ndimage.label(np.asarray(Image.open(mask_path)) > 0, structure=np.ones((3, 3)))[1]


def _total_area(view, f) -> float:
    return sum(d["area_share"] for dets in view.values(f.regions) for d in dets.detections)


def _check_regions_follow_masks(view, f) -> None:
    for s in view.select_fields([f.label, f.mask, f.regions, f.num_regions, f.explanation, f.score]):
        dets = s[f.regions].detections
        assert s[f.num_regions] == len(dets) == _mask_components(s[f.mask].mask_path)
        for d in dets:
            x, y, w, h = d.bounding_box
            assert 0 <= x < x + w <= 1 and 0 <= y < y + h <= 1 and d.label == "anomaly"
            assert 0 < d["area_share"] <= w * h + 1e-9 and d["peak"] >= d["mean"]
        assert [d["peak"] for d in dets] == sorted((d["peak"] for d in dets), reverse=True)
        if s[f.label].label == "anomalous":
            assert s[f.explanation].startswith(f"Anomalous: score {s[f.score]:.3f}")
            assert (f"{len(dets)} region" in s[f.explanation]) if dets else "no region" in s[f.explanation]
        else:
            assert s[f.explanation] is None


def test_score_writes_regions_that_follow_set_threshold_and_go_with_the_run(scored):
    ds, f = scored, fav.FieldNames("pd")
    view = ds.exists(f.score)
    assert ds.get_run_info("pd").config.min_region_area == 0.0
    assert ds.get_field(f"{f.regions}.detections.area_share") is not None  # filterable in the App's sidebar
    _check_regions_follow_masks(view, f)
    before = view.values(f.num_regions)
    assert sum(before) > 0 and ds.count(f.explanation) == ds.count_values(f"{f.label}.label").get("anomalous", 0)

    # a lower pixel threshold (half way down to the median normal pixel): larger masks, other regions
    cal = ds.get_run_info("pd").config.calibration
    area_before = _total_area(view, f)
    lower = (cal["map_low"] + cal["pixel_threshold"]) / 2
    fav.set_threshold(ds, "pd", rule="far", param=0.5, pixel_threshold=lower)
    after = view.values(f.num_regions)
    assert after != before and _total_area(view, f) > area_before
    _check_regions_follow_masks(view, f)

    # the review queries of the README: samples with a region over 0.5 % of the image; most regions first
    big = ds.filter_labels(f.regions, F("area_share") > 0.005)
    assert big.count() == sum(any(d["area_share"] > 0.005 for d in dets.detections)
                              for dets in view.values(f.regions))
    ranked = ds.sort_by(F(f"{f.regions}.detections").length(), reverse=True).limit(3).values(f.num_regions)
    assert ranked == sorted(after, reverse=True)[:3]

    # a run of an earlier release (no regions, no min_region_area): loads, and set_threshold gives it regions
    legacy = AnomalyScoreRunConfig(**{k: v for k, v in ds.get_run_info("pd").config.serialize().items()
                                      if k not in ("min_region_area", "cls", "type")})
    assert legacy.min_region_area == 0.0
    ds.delete_sample_fields([f.regions, f.num_regions, f.explanation])
    fav.set_threshold(ds, "pd", rule="far", param=0.5, pixel_threshold=lower)
    assert view.values(f.num_regions) == after

    assert {f.regions, f.explanation} <= set(fav.run_fields(ds, "pd"))  # shown when reviewing the run
    ds.delete_run("pd")
    assert not {f.regions, f.num_regions, f.explanation} & set(ds.get_field_schema())


def test_min_region_area_is_recorded_and_checked(scored):
    ds, f = scored, fav.FieldNames("pd2")
    test = ds.match_tags("train", bool=False)
    with pytest.raises(ValueError, match="min_region_area"):
        fav.score(test, expert="padim", key="pd2", min_region_area=5)
    assert "pd2" not in ds.list_runs() and f.regions not in ds.get_field_schema()
    fav.score(test.limit(6), expert="padim", key="pd2", num_workers=0, min_region_area=0.01)
    assert ds.get_run_info("pd2").config.min_region_area == 0.01
    shares = [d["area_share"] for dets in ds.exists(f.score).values(f.regions) for d in dets.detections]
    assert all(s >= 0.01 for s in shares)
    # resuming with another minimum area would leave the first samples' regions at 0.01: refused, nothing written
    before = ds.exists(f.score).count()
    with pytest.raises(ValueError, match=r"min_region_area=0.01.*same value.*overwrite=True"):
        fav.score(test, expert="padim", key="pd2", num_workers=0)
    assert ds.exists(f.score).count() == before and ds.get_run_info("pd2").config.min_region_area == 0.01
    result = fav.score(test, expert="padim", key="pd2", num_workers=0, min_region_area=0.01)  # same value: resumes
    assert result.num_skipped == before and ds.exists(f.score).count() == len(test)


def test_judge_takes_its_crops_from_the_regions(scored, tmp_path):
    """A real judge run (a tiny random Qwen2-VL built here) with ``crop_source="regions"``: the boxes it records
    are the expert's regions cut with their margin; a sample without regions falls back to the map's maxima."""
    ds, f = scored, fav.FieldNames("pd3")
    test = ds.match_tags("train", bool=False)
    fav.score(test, expert="padim", key="pd3", num_workers=0)
    with_regions = test.match(F(f.num_regions) > 0).limit(2).values("id")
    without = test.match(F(f.num_regions) == 0).limit(1).values("id")
    if not without:  # every test sample has a region here (the held-out split follows the files' paths): clear one
        spare = test.match(F(f.num_regions) > 0).skip(2).first()
        spare[f.regions], spare[f.num_regions] = fo.Detections(), 0
        spare.save()
        without = [spare.id]
    view = ds.select(with_regions + without)
    with pytest.raises(ValueError, match="crop_source"):
        fav.judge(view, "vj", backend=None, expert="pd3", crop_source="boxes")
    backend = make_backend("transformers", model=BUILDERS["qwen2_vl"](str(tmp_path / "qwen")), device="cpu",
                           max_pixels=56 * 56, batch_size=8)
    fav.judge(view, "vj", backend=backend, expert="pd3", crops=2, crop_source="regions", max_new_tokens=4)
    assert ds.get_run_info("vj").config.prompt["crop_source"] == "regions"
    kinds = set()
    for s in view.select_fields([f.regions, f.map, "vj_regions"]):
        image = Image.open(s.filepath).convert("RGB")
        if s[f.regions].detections:
            expected = region_crops(image, s[f.regions], 2)[1]
            kinds.add("regions")
        else:
            expected = expert_crops(image, s[f.map].map_path, 2)[1]
            kinds.add("maxima")
        got = [(tuple(d.bounding_box), d.confidence, d["location"]) for d in s["vj_regions"].detections]
        assert got == [(pytest.approx(bx), pytest.approx(peak), where) for bx, peak, where in expected]
    assert kinds == {"regions", "maxima"}


def _samples_shown(driver) -> int | None:
    """The sample count above the grid ("21 of 27 samples", or "21 samples" in the App's lightning mode)."""
    found = re.search(r"\b(\d+)(?: of \d+)? samples\b", _text(driver))
    return int(found.group(1)) if found else None


def _expand_filter(driver, field: str, attribute: str):
    """Expand ``field`` in the App's sidebar (clicking its arrow again while the App redraws) and return the
    numeric filter of its detections' ``attribute``."""
    css = f"[data-cy='numeric-slider-container-{field}-detections-{attribute}']"

    def expanded():
        if not driver.find_elements(By.CSS_SELECTOR, css):
            arrows = driver.find_elements(By.CSS_SELECTOR, f"[data-cy=sidebar-field-arrow-enabled-{field}]")
            if arrows:
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", arrows[0])
                ActionChains(driver).move_to_element(arrows[0]).click().perform()
            time.sleep(2)
        return driver.find_elements(By.CSS_SELECTOR, css)
    return _wait(f"the {attribute} filter of {field} in the sidebar", expanded, 90)[0]


def test_score_form_min_area_and_regions_in_the_app(scored, browser):
    ds, driver, f = scored, browser, fav.FieldNames("app")
    test = ds.match_tags("train", bool=False)
    with served_app(driver, test) as session:
        # a minimum area the form refuses, then one it takes
        open_operator_form(driver, "score samples", "Anomaly: score samples")
        field = _input_after_label(driver, "Smallest defect region (share of the image)")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys("2")
        _wait("the form's error", lambda: "min_region_area must be a share of the image in [0, 1)" in _text(driver), 30)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys("0.001")
        key = _input_after_label(driver, "Run key")
        key.send_keys(Keys.CONTROL, "a")
        key.send_keys("app")
        _wait("the form to accept the values", lambda: "must be a share" not in _text(driver) and driver.find_element(
            By.XPATH, "//button[normalize-space(.)='Execute']").is_enabled(), 30)
        _click(driver, "button", "Execute")
        _notification(driver, "flagged anomalous in 'app'", timeout=240)
        _click(driver, "button", "Done")

        ds.reload()
        assert ds.get_run_info("app").config.min_region_area == 0.001
        regions = test.values(f.regions)
        assert len(regions) == len(test) and all(r is not None for r in regions)
        shares = [d["area_share"] for r in regions for d in r.detections]
        assert shares and min(shares) >= 0.001
        assert test.values(f.num_regions) == [len(r.detections) for r in regions]

        # the sidebar: expand the regions, type a minimum area_share: the grid shows the samples with a region at
        # least that large (a README filter: "over 0.5 % of the image") and the sidebar counts the regions kept
        session.refresh()
        container = _expand_filter(driver, f.regions, "area_share")
        low = _wait("the filter's min input", lambda: container.find_elements(By.CSS_SELECTOR, "input[placeholder=min]"),
                    60)[0]
        # a bound between the regions' sizes (the median one), so that some regions are filtered out
        bound = float(f"{float(np.median(shares)):.3g}")
        low.click()
        low.send_keys(str(bound), Keys.ENTER)
        big = test.filter_labels(f.regions, F("area_share") >= bound)
        n = big.count()
        assert 0 < n < len(test), n
        _wait(f"{n} samples above the grid (bound {bound})", lambda: _samples_shown(driver) == n, 60)
        shown, total = big.count(f"{f.regions}.detections"), test.count(f"{f.regions}.detections")
        assert 0 < shown < total, (shown, total)
        _wait(f"'{shown} of {total}' regions in the sidebar", lambda: f"{shown} of {total}" in _text(driver), 30)
        save_png(driver, "app-regions-filter")
