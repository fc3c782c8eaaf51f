"""The web viewer in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by selenium against a ``flow serve`` process.

Upload a study, draw a box, search, see the matching regions with their boxes and
the statistics panel, open a result beside the query; the screenshot is kept (under
the test's tmp folder, and ``$FLOW_ARTIFACTS`` when set).  Where the browser is not
installed the test skips saying so -- unless ``FLOW_REQUIRE_BROWSER=1`` (set by
``.ci/run`` where ``.ci/browser.sh`` succeeded), where it fails.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.app.serving import Server, built_project

pytestmark = pytest.mark.slow

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


def _missing(why: str) -> None:
    if os.environ.get("FLOW_REQUIRE_BROWSER") == "1":
        pytest.fail(f"FLOW_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(why)


@pytest.fixture
def browser(tmp_path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        _missing("no chromium / chromedriver here (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    try:
        d = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    except Exception as e:  # the browser is installed but does not start
        _missing(f"headless chromium does not start here: {e}")
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _wait(cond, timeout=60, what="the page"):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_upload_draw_a_box_search_and_compare(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    project = built_project(tmp_path / "project")
    token = "viewer-token"
    server = Server(project, env={"FLOW_SERVE_TOKEN": token}).wait()
    try:
        b = browser
        b.get(f"{server.url}/#token={token}")
        opts = _wait(lambda: b.find_elements(By.CSS_SELECTOR, "#target option"), what="targets")
        assert {o.get_attribute("value") for o in opts} == {"cnn", "regions"}
        # the regions target is chosen by default when there is one
        assert b.find_element(By.ID, "target").get_attribute("value") == "regions"
        study = sorted((project / "images").rglob("*.dcm"))[7]
        b.find_element(By.ID, "file").send_keys(str(study))
        img = b.find_element(By.ID, "query-image")
        _wait(lambda: b.execute_script("return arguments[0].naturalWidth", img), what="preview")
        status = b.find_element(By.ID, "status").text
        assert "96 × 96 px" in status, status
        # draw a box from 20 % to 60 % of the image
        overlay = b.find_element(By.ID, "overlay")
        w, h = overlay.size["width"], overlay.size["height"]
        ActionChains(b).move_to_element_with_offset(
            overlay, int(-0.3 * w), int(-0.3 * h)
        ).click_and_hold().move_by_offset(int(0.4 * w), int(0.4 * h)).release().perform()
        roi = b.find_element(By.ID, "roi").text
        x, y, rw, rh = (int(v) for v in roi.split(","))
        assert abs(x - 19) <= 3 and abs(y - 19) <= 3 and abs(rw - 38) <= 3 and abs(rh - 38) <= 3, (
            roi
        )
        b.find_element(By.ID, "k").clear()
        b.find_element(By.ID, "k").send_keys("6")
        b.find_element(By.ID, "search").click()
        results = _wait(
            lambda: b.find_elements(By.CSS_SELECTOR, "#results .result"), what="results"
        )
        assert 1 <= len(results) <= 6
        # each result: a thumbnail loaded (with the token), its matched box drawn, labels
        _wait(
            lambda: all(
                b.execute_script(
                    "return arguments[0].naturalWidth", r.find_element(By.TAG_NAME, "img")
                )
                for r in b.find_elements(By.CSS_SELECTOR, "#results .result")
            ),
            what="thumbnails",
        )
        for r in results:
            assert r.find_elements(By.CSS_SELECTOR, ".box")
            assert r.find_element(By.CSS_SELECTOR, ".labels").text
        # the statistics panel: one row per finding among the results, counts add up
        rows = b.find_elements(By.CSS_SELECTOR, "#stats tbody tr")
        assert rows
        labels = [
            lab
            for r in results
            for lab in r.find_element(By.CSS_SELECTOR, ".labels").text.split(", ")
        ]
        for row in rows:
            label = row.get_attribute("data-label")
            count = int(row.find_elements(By.TAG_NAME, "td")[1].text.split("/")[0])
            assert count == labels.count(label), (label, count, labels)
        assert "region" in b.find_element(By.ID, "summary").text
        # a result opens beside the query, with both boxes
        results[0].click()
        _wait(lambda: b.find_element(By.ID, "compare").is_displayed(), what="comparison")
        _wait(
            lambda: (
                b.find_elements(By.CSS_SELECTOR, "#compare-result img")
                and b.execute_script(
                    "return arguments[0].naturalWidth",
                    b.find_element(By.CSS_SELECTOR, "#compare-result img"),
                )
            ),
            what="the large result",
        )
        assert b.find_elements(By.CSS_SELECTOR, "#compare-query .box")
        assert b.find_elements(By.CSS_SELECTOR, "#compare-result .box")
        errors = (
            [e for e in b.get_log("browser") if e["level"] == "SEVERE"]
            if hasattr(b, "get_log")
            else []
        )
        assert not errors, errors
        shot = tmp_path / "viewer.png"
        b.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("FLOW_ARTIFACTS"):
            out = Path(os.environ["FLOW_ARTIFACTS"])
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, out / "viewer.png")
    finally:
        server.stop()
