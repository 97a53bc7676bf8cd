"""The inspection page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
upload, read scores, move the threshold slider, mark a false alarm good, apply the update, see it pass."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not CHROMIUM.exists():
    pytest.skip("needs Debian's chromium (/usr/bin/chromium): apt-get install chromium chromium-driver",
                allow_module_level=True)
if not CHROMEDRIVER.exists():
    pytest.skip("needs /usr/bin/chromedriver: apt-get install chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_server import TOKEN, live_server, make_settings  # noqa: E402

from patchcore.evaluation.synthetic import fabric_texture  # noqa: E402

SCREENSHOT = os.environ.get("PATCHCORE_PAGE_SCREENSHOT")  # e.g. docs/page.png


@pytest.fixture()
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def cards(driver) -> dict[str, dict]:
    out = {}
    for card in driver.find_elements(By.CSS_SELECTOR, "#gallery .card"):
        out[card.find_element(By.CLASS_NAME, "name").text] = {
            "card": card, "score": float(card.find_element(By.CLASS_NAME, "score").text),
            "label": card.find_element(By.CLASS_NAME, "label").text}
    return out


def test_page_scores_relabels_takes_feedback_and_applies_the_update(browser, fitted, category, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    fitted.save(models / "fabric.model")
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    rng = np.random.default_rng(5)
    for i in range(2):  # a new colour the model has not seen: false alarms
        Image.fromarray(np.ascontiguousarray(fabric_texture(rng, 128)[..., [2, 0, 1]])).save(uploads / f"new_{i}.png")
    shutil.copy(sorted((category / "test" / "good").glob("*.png"))[0], uploads / "good.png")
    shutil.copy(sorted((category / "test" / "hole").glob("*.png"))[0], uploads / "hole.png")
    files = sorted(uploads.glob("*.png"))
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    with live_server(make_settings(models)) as url:
        browser.get(url + "/page/")
        wait.until(lambda d: "bank" in d.find_element(By.ID, "model-info").text)
        token = browser.find_element(By.ID, "token")
        token.send_keys(TOKEN)
        token.send_keys(Keys.TAB)  # change event: kept in sessionStorage
        browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
        wait.until(lambda d: len(cards(d)) == len(files))
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("scored"))
        seen = cards(browser)
        threshold = fitted.image_threshold_
        expected = fitted.predict(files).scores
        for f, score in zip(files, expected.tolist()):
            assert seen[f.name]["score"] == pytest.approx(score, abs=0.01)  # shown to 2 decimals
        assert seen["hole.png"]["label"] == "defect" and seen["good.png"]["label"] == "good"
        assert seen["new_0.png"]["label"] == "defect"  # the false alarm

        slider = browser.find_element(By.ID, "threshold")
        slider.send_keys(Keys.END)  # the slider to its top: everything passes
        wait.until(lambda d: all(c["label"] == "good" for c in cards(d).values()))
        slider.send_keys(Keys.HOME)  # to zero: everything fails
        wait.until(lambda d: all(c["label"] == "defect" for c in cards(d).values()))
        browser.find_element(By.ID, "threshold-reset").click()
        wait.until(lambda d: cards(d)["good.png"]["label"] == "good")
        browser.find_element(By.ID, "opacity").send_keys(Keys.HOME)
        heat = cards(browser)["hole.png"]["card"].find_element(By.CLASS_NAME, "heat")
        assert float(heat.value_of_css_property("opacity")) == 0.0
        browser.find_element(By.ID, "opacity").send_keys(*[Keys.RIGHT] * 10)

        sort = browser.find_element(By.ID, "sort")
        sort.find_element(By.CSS_SELECTOR, "option[value=score-desc]").click()
        shown = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "#gallery .card .score")]
        assert shown == sorted(shown, reverse=True)

        cards(browser)["new_0.png"]["card"].find_element(By.CLASS_NAME, "mark-good").click()
        wait.until(lambda d: "marked good" in cards(d)["new_0.png"]["card"].text)
        assert browser.find_element(By.ID, "pending").text == "1"
        # a mark given by mistake is withdrawn from the feedback list (issue 16)
        cards(browser)["new_1.png"]["card"].find_element(By.CLASS_NAME, "mark-good").click()
        wait.until(lambda d: d.find_element(By.ID, "pending").text == "2")
        browser.find_element(By.CSS_SELECTOR, "#review summary").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#review-rows tr")) == 2)
        browser.find_elements(By.CSS_SELECTOR, "#review-rows tr")[0].find_element(By.CLASS_NAME, "withdraw").click()
        wait.until(lambda d: "withdrawn" in d.find_element(By.ID, "status").text)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#review-rows tr")) == 1)
        assert browser.find_element(By.ID, "pending").text == "1"
        assert "withdrawn" in cards(browser)["new_1.png"]["card"].text
        browser.find_element(By.ID, "apply-update").click()
        wait.until(lambda d: "model v2" in d.find_element(By.ID, "status").text)
        after = cards(browser)
        assert after["new_0.png"]["label"] == "good" and after["new_0.png"]["score"] < threshold
        assert "was" in after["new_0.png"]["card"].find_element(By.CLASS_NAME, "was").text
        assert after["hole.png"]["label"] == "defect"
        assert "v2" in browser.find_element(By.ID, "model-info").text
        wait.until(lambda d: "applied in v2" in d.find_element(By.ID, "review-rows").text)
        assert not browser.find_elements(By.CSS_SELECTOR, "#review-rows .withdraw")  # applied: no withdrawing
        time.sleep(0.2)  # let the last paint settle
        target = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "page.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(target))


def test_page_shows_the_roc_of_marked_results_and_applies_the_proposed_threshold(browser, fitted, category, tmp_path):
    """Issue 19 (point 4): the panel draws the ROC the API computes, proposes, and applies with the token."""
    import httpx

    models = tmp_path / "models"
    models.mkdir()
    fitted.save(models / "fabric.model")
    rng = np.random.default_rng(7)
    novel = [np.ascontiguousarray(fabric_texture(rng, 128)[..., [2, 0, 1]]) for _ in range(2)]
    goods = [Image.open(p) for p in sorted((category / "test" / "good").glob("*.png"))[:3]] + \
        [Image.fromarray(a) for a in novel]
    defects = [Image.open(sorted((category / "test" / k).glob("*.png"))[0]) for k in ("hole", "stain")]
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with live_server(make_settings(models)) as url, httpx.Client(base_url=url, timeout=60) as api:
        for picture, verdict in [(g, "good") for g in goods] + [(d, "defect") for d in defects]:
            path = tmp_path / "upload.png"
            picture.save(path)
            scored = api.post("/v1/models/fabric/predict", files={"file": ("a.png", path.read_bytes(), "image/png")})
            assert api.post("/v1/models/fabric/feedback", headers=auth,
                            json={"result_id": scored.json()["result_id"], "verdict": verdict}).status_code == 201
        expected = api.get("/v1/models/fabric/roc", params={"false_alarm_rate": 0}).json()
        browser.get(url + "/page/")
        wait.until(lambda d: "bank" in d.find_element(By.ID, "model-info").text)
        token = browser.find_element(By.ID, "token")
        token.send_keys(TOKEN)
        token.send_keys(Keys.TAB)
        browser.find_element(By.CSS_SELECTOR, "#threshold-panel summary").click()
        wait.until(lambda d: "5 marked good, 2 marked defect" in d.find_element(By.ID, "roc-current").text)
        curve = browser.find_element(By.CSS_SELECTOR, "#roc polyline")
        assert len(curve.get_attribute("points").split()) == len(expected["roc"])
        assert f"{expected['current']['false_alarms']} of 5 good flagged" in \
            browser.find_element(By.ID, "roc-current").text
        target = browser.find_element(By.ID, "roc-target")
        target.clear()
        target.send_keys("0")
        browser.find_element(By.ID, "roc-propose").click()
        proposed = f"proposed threshold {expected['proposal']['threshold']:.2f}: 0 of 5 good flagged"
        wait.until(lambda d: d.find_element(By.ID, "roc-proposal").text.startswith(proposed))
        assert browser.find_elements(By.CSS_SELECTOR, "#roc circle.proposal")
        browser.find_element(By.ID, "roc-apply").click()
        wait.until(lambda d: "model v2" in d.find_element(By.ID, "status").text)
        assert "previous file kept" in browser.find_element(By.ID, "status").text
        info = api.get("/v1/models/fabric").json()
        assert info["threshold"] == pytest.approx(expected["proposal"]["threshold"])
        assert f"threshold {info['threshold']:.2f}" in browser.find_element(By.ID, "model-info").text
        assert info["threshold_history"][0]["rule"] == "false_alarm_rate"
