"""The result page of `python -m insclr.evaluate --html` in headless Chromium (Debian's chromium
and chromium-driver, driven by selenium; skipped where they cannot be had): the page shows every
query with its AP and top 10 framed by label, its images load, a click on AP sorts the rows, and
a screenshot is saved (to $INSCLR_SCREENSHOT_DIR too when set, for the record)."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from insclr.evaluate import main as evaluate_main
from insclr.evaluate.datasets import load_eval_set
from insclr.webpage import average_precision_at_k


def _browser():
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed")
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1000"):
        options.add_argument(arg)
    try:
        return webdriver.Chrome(service=Service(driver), options=options)
    except WebDriverException as e:
        pytest.skip(f"headless chromium does not start here: {e.msg}")


@pytest.fixture(scope="module")
def page(shards_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("page")
    js = out / "r.json"
    assert evaluate_main(["--model", "random", "--arch", "resnet18", "--data", "roxford5k,instre",
                          "--shards-root", str(shards_dir), "--size", "64", "--scales", "1", "--device", "cpu",
                          "--html", str(out / "html"), "--json", str(js), "--pr", str(out / "pr.png")]) == 0
    assert Image.open(out / "pr.png").size == (640, 480) and (out / "html" / "pr.png").is_file()
    return out / "html" / "index.html", json.loads(js.read_text())["results"]


def test_page_in_headless_chromium(page, shards_dir, tmp_path):
    from selenium.webdriver.common.by import By

    path, results = page
    browser = _browser()
    try:
        browser.get(path.as_uri())
        tables = browser.find_elements(By.CSS_SELECTOR, "table.results")
        assert [t.get_attribute("data-title") for t in tables] == ["roxford5k", "instre"]
        ox = tables[0]
        es = load_eval_set("roxford5k", shards_dir)
        rows = ox.find_elements(By.CSS_SELECTOR, "tbody tr")
        assert len(rows) == es.num_queries
        shown = [r.find_element(By.CSS_SELECTOR, ".ap").text for r in rows]
        expected = ["–" if a is None else f"{a:.3f}" for a in results["roxford5k"]["apsM"]]
        assert shown == expected
        for r in rows:
            hits = r.find_elements(By.CSS_SELECTOR, "a.hit")
            assert len(hits) == 10
            assert all(h.get_attribute("class").split()[1] in ("pos", "neg", "junk") for h in hits)
        # every image file loaded (naturalWidth 0 means a broken image)
        assert browser.find_element(By.CSS_SELECTOR, "img.figure").get_attribute("src").endswith("pr.png")
        broken = browser.execute_script(
            "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length")
        assert broken == 0 and len(browser.find_elements(By.TAG_NAME, "img")) > 0
        # a click on AP sorts ascending (queries without AP last), a second click descending
        button = ox.find_element(By.CSS_SELECTOR, "th button[data-key=ap]")
        for descending in (False, True):
            button.click()
            values = [r.get_attribute("data-ap") for r in ox.find_elements(By.CSS_SELECTOR, "tbody tr")]
            known = [float(v) for v in values if v]
            assert known == sorted(known, reverse=descending) and all(v for v in values[:len(known)])
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    if os.environ.get("INSCLR_SCREENSHOT_DIR"):
        shutil.copy(shot, os.path.join(os.environ["INSCLR_SCREENSHOT_DIR"], "evaluate-page.png"))
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[0] >= 600 and image.shape[1] >= 1200  # the viewport of the 1500×1000 window
    # the green / red frames are on the screen
    assert ((image[..., 1] > 150) & (image[..., 0] < 80)).sum() > 100
    assert ((image[..., 0] > 180) & (image[..., 1] < 60)).sum() > 100


def test_page_files(page):
    path, results = page
    text = path.read_text()
    assert text.count('class="query"') == len(results["roxford5k"]["apsM"]) + len(results["instre"]["aps"])
    assert "http://" not in text and "https://" not in text  # self-contained


def test_average_precision_at_k():
    assert average_precision_at_k(["pos", "neg", "pos"], 2) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision_at_k(["neg", "neg"], 5) == 0
    assert average_precision_at_k(["pos"], 0) is None
