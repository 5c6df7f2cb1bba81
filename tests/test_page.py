"""The web page in real headless Chromium (Debian's chromium and chromedriver, driven by Selenium) against
the real server of conftest.py: upload, overlay, counts table, score slider, downloads, classify, find in
3D, models. Screenshots are kept in test-artifacts/page/ (or $TEST_ARTIFACTS/page/).

Skipped, with a message, only where Chromium or its driver is not installed (`.ci/run` installs them)."""

import copy
import csv
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tests.helpers import REPO, SHARED_DATA
from tests.serving import ADRENAL, OPERATING_POINT, RAW, SHELL

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)",
)
IMAGE = sorted((SHARED_DATA / "dsb2018" / "stage1_train").glob("*/images/*.png"))[0]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts")) / "page"
WAIT = 120  # seconds for a model answer on a busy 2-core machine


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless, as root in a container, with no network: Chromium's background services would try (and
    # fail) to reach Google many times a second without these.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        "--window-size=1400,1100",
    ):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=f"waiting for {what}")


def text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def downloaded(driver, name: str) -> Path:
    path = driver.downloads / name
    wait_for(driver, lambda d: path.exists() and path.stat().st_size > 0, f"the download {name}", 30)
    return path


def test_segment_count_filter_and_download(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    expected = requests.post(
        f"{server.url}/v1/segment?score_threshold=0", data=IMAGE.read_bytes(), headers=RAW, timeout=WAIT
    ).json()
    scores = [inst["score"] for inst in expected["instances"]]
    assert scores, "the test detector found nothing: the slider could not be checked"

    browser.get(server.url)
    browser.find_element(By.ID, "seg-file").send_keys(str(IMAGE))
    overlay = browser.find_element(By.ID, "seg-overlay")
    wait_for(browser, lambda d: overlay.get_attribute("data-drawn"), "the overlay")
    screenshot(browser, "segment")

    def shown_counts() -> tuple[int, int]:
        row = browser.find_element(By.CSS_SELECTOR, '#seg-counts tr[data-class="nucleus"] td.count')
        return int(row.text), int(text(browser, "seg-total"))

    def at_least(t: float) -> int:
        return sum(s >= t for s in scores)

    # the slider starts at the model's operating point, below some of the scores and above others
    assert expected["operating_point"] == OPERATING_POINT and 0 < at_least(OPERATING_POINT) < len(scores)
    assert shown_counts() == (at_least(OPERATING_POINT), at_least(OPERATING_POINT))
    assert text(browser, "seg-threshold-value") == f"{OPERATING_POINT:.2f}"
    assert int(overlay.get_attribute("data-drawn")) == at_least(OPERATING_POINT)
    # the overlay really has mask pixels where the instances are
    painted = browser.execute_script(
        "const c = document.getElementById('seg-overlay');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return [c.width, c.height, n];"
    )
    assert painted[:2] == [expected["width"], expected["height"]] and painted[2] > 0

    # Moving the slider with the keyboard filters in the page: every position agrees with the scores.
    slider = browser.find_element(By.ID, "seg-threshold")
    slider.send_keys(Keys.HOME)
    assert shown_counts() == (len(scores), len(scores))
    slider.send_keys(Keys.END)
    assert shown_counts()[1] == at_least(1.0)
    # a slider position (0.01 steps) that keeps some instances and drops others, near half of them
    between = [t for t in np.arange(0.01, 1.0, 0.01).round(2) if 0 < at_least(t) < len(scores)]
    assert between, f"all scores within 0.01 of each other: {scores[:5]} ..."
    middle = float(min(between, key=lambda t: abs(at_least(t) - len(scores) / 2)))
    browser.execute_script(
        "const s = document.getElementById('seg-threshold'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input'));",
        str(middle),
    )
    assert shown_counts() == (at_least(middle), at_least(middle))
    assert text(browser, "seg-threshold-value") == f"{middle:.2f}"
    screenshot(browser, "segment_filtered")

    # Downloads: the instances above the slider, as COCO results pycocotools reads, and as CSV.
    browser.find_element(By.ID, "seg-coco").click()
    coco = json.loads(downloaded(browser, f"{IMAGE.stem}_instances.json").read_text())
    assert len(coco["annotations"]) == at_least(middle)
    assert coco["images"][0]["width"] == expected["width"]
    gt = COCO()
    gt.dataset = {"images": coco["images"], "categories": coco["categories"], "annotations": []}
    gt.createIndex()
    # what COCOeval takes (loadRes rewrites the dicts it is given: a copy)
    assert len(gt.loadRes(copy.deepcopy(coco["annotations"])).getAnnIds()) == len(coco["annotations"])
    for ann, inst in zip(coco["annotations"], expected["instances"], strict=False):  # both best first
        assert ann["segmentation"] == inst["mask"] and ann["score"] == inst["score"]
        assert ann["area"] == int(mask_utils.area(ann["segmentation"]))
        x0, y0, x1, y1 = inst["box"]
        assert ann["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    browser.find_element(By.ID, "seg-csv").click()
    rows = list(csv.DictReader(io.StringIO(downloaded(browser, f"{IMAGE.stem}_instances.csv").read_text())))
    assert len(rows) == at_least(middle)
    assert [float(r["score"]) for r in rows] == pytest.approx(scores[: len(rows)], abs=1e-4)


def test_the_page_decodes_masks_as_pycocotools_does(server, browser):
    """The page's COCO RLE decoder (JavaScript) against pycocotools on the server's masks."""
    result = requests.post(
        f"{server.url}/v1/segment", data=IMAGE.read_bytes(), headers=RAW, timeout=WAIT
    ).json()
    browser.get(server.url)
    for inst in result["instances"][:20]:
        decoded = browser.execute_script("return Array.from(foram.decodeRle(arguments[0]))", inst["mask"])
        reference = mask_utils.decode(inst["mask"])
        assert np.array_equal(np.array(decoded, np.uint8).reshape(reference.shape), reference)


def test_classify_with_crop_preview(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{server.url}/#classify")
    browser.find_element(By.ID, "cls-file").send_keys(str(IMAGE))
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#cls-top li"), "the top classes")
    wait_for(
        browser,
        lambda d: d.execute_script("return document.getElementById('cls-preview').naturalWidth > 0"),
        "the crop preview",
    )
    screenshot(browser, "classify")
    bars = browser.find_elements(By.CSS_SELECTOR, "#cls-top li")
    params = {"crop": "true", "top_k": 5}
    url = f"{server.url}/v1/classify"
    expected = requests.post(url, data=IMAGE.read_bytes(), headers=RAW, params=params, timeout=WAIT).json()[
        "top"
    ]
    assert [b.find_element(By.CLASS_NAME, "label").text for b in bars] == [t["class"] for t in expected]
    shown = [float(b.find_element(By.CLASS_NAME, "value").text.rstrip(" %")) for b in bars]
    assert shown == pytest.approx([100 * t["probability"] for t in expected], abs=0.06)

    # a volume: the volume's classes, no crop preview
    browser.find_element(By.ID, "cls-file").send_keys(str(SHELL))
    wait_for(browser, lambda d: "volume 225 x 128 x 128" in text(d, "cls-status"), "the volume's classes")
    assert not browser.find_element(By.ID, "cls-preview").is_displayed()


def test_find_in_3d(server, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    from datasets.volumes import load_volume

    query = tmp_path / "query.png"
    Image.fromarray(np.rot90(load_volume(SHELL)[120])).save(query)  # axis 0, index 120, turned 90 CCW
    browser.get(f"{server.url}/#match")
    wait_for(browser, lambda d: "volumes" in text(d, "match-library"), "the library")
    browser.find_element(By.ID, "match-file").send_keys(str(query))
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#match-results article"), "the matches")
    titles = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#match-results h3")]
    assert len(titles) == 5 and titles[0].startswith(f"1. {SHELL.name}, axis 0, slice ")
    assert abs(int(titles[0].split("slice ")[1].split(" ")[0]) - 120) <= 2
    # the matched slice and its position are drawn
    time.sleep(0.5)
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('#match-results img')].map(i => i.naturalWidth > 0)"
    )
    assert loaded and all(loaded)
    screenshot(browser, "find_in_3d")

    # restricted to one adrenal volume: every match comes from it
    browser.find_element(By.CSS_SELECTOR, "#match-restrict summary").click()
    browser.find_element(By.CSS_SELECTOR, f'#match-volumes input[value="{ADRENAL[0].name}"]').click()
    assert text(browser, "match-chosen") == "1 chosen"
    again = tmp_path / "again.png"  # another file: choosing the same one again is no change for the page
    again.write_bytes(query.read_bytes())
    browser.find_element(By.ID, "match-file").send_keys(str(again))

    def only_chosen(d) -> bool:
        titles = [h.text for h in d.find_elements(By.CSS_SELECTOR, "#match-results h3")]
        return bool(titles) and all(ADRENAL[0].name in t for t in titles)

    wait_for(browser, only_chosen, "matches in the chosen volume")


def test_models_panel(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{server.url}/#models")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#models-table tbody tr"), "the models")
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#models-table tbody tr")]
    assert rows[0].startswith("detector nuclei") and rows[1].startswith("classifier slices")
    assert all("champion" in r for r in rows)
    assert "segm_AP 0.5000 (baseline 0.2500)" in rows[0] and "data (validation): 1 images" in rows[0]
    assert "volume_auc 0.5000" in rows[1]
    screenshot(browser, "models")
