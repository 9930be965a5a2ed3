"""The page at GET / (serving/web/) in a real headless Chromium against a real gateway + Triton: its first button
(Generate) shows a generated grid with no other input, Denoise shows original / noisy / denoised, an API error is
shown as the API words it, and the browser logs no console error. Writes out/web/page.png (`make screenshot` copies
it to docs/screenshot.png)."""
from __future__ import annotations

import base64
import shutil

import pytest

from mnistgen.files import REPO_ROOT
from serving.gateway.openapi import sample_png
from serving.process import wait_until

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOT = REPO_ROOT / "out" / "web" / "page.png"
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium + chromedriver not installed "
                                "(Debian packages chromium, chromium-driver): run `make browser-install` as root")
WAIT_S = 120.0


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1250"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def loaded(driver, element_id: str) -> bool:
    return driver.execute_script(
        "const i = document.getElementById(arguments[0]); return i.complete && i.naturalWidth > 0", element_id)


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_generates_and_denoises_in_chromium(ready_gateway, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(ready_gateway.http_url + "/")
    first = browser.find_elements(By.TAG_NAME, "button")[0]
    assert first.text == "Generate"
    first.click()  # at once: no other input, not even the model list
    wait_until(lambda: loaded(browser, "grid"), WAIT_S, "the generated grid")
    info = browser.find_element(By.ID, "generate-info").text
    assert "server time" in info and " ms" in info, info
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"), WAIT_S, "the models from ListModels")

    browser.find_element(By.ID, "denoise").click()
    for image in ("original", "noisy", "denoised"):
        wait_until(lambda: loaded(browser, image), WAIT_S, f"the {image} digit")
    info = browser.find_element(By.ID, "denoise-info")
    assert "sigma 0.5" in info.text and "server time" in info.text, info.text
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    upload = tmp_path / "digit.png"
    upload.write_bytes(sample_png())
    Select(browser.find_element(By.ID, "source")).select_by_value("upload")
    browser.find_element(By.ID, "upload").send_keys(str(upload))
    before = info.text
    browser.find_element(By.ID, "denoise").click()
    failed = browser.find_element(By.ID, "denoise-error")
    wait_until(lambda: info.text != before or failed.is_displayed(), WAIT_S, "the uploaded digit denoised")
    assert not failed.is_displayed(), failed.text
    assert browser.find_element(By.ID, "original").get_attribute("src").endswith(
        base64.b64encode(upload.read_bytes()).decode())

    # the inputs follow ListModels: digit + guidance for ddpm-cond, sampler + steps for the DDPMs, none for a GAN
    models = {m["name"]: m for m in ready_gateway.http("GET", "/v1/models").json()["models"]}
    model = Select(browser.find_element(By.ID, "model"))
    for name, m in models.items():
        model.select_by_value(name)
        assert browser.find_element(By.ID, "digit").is_displayed() == m["accepts_digit"], name
        assert browser.find_element(By.ID, "steps").is_displayed() == bool(m["samplers"]), name
        if m["samplers"]:
            shown = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "sampler")).options]
            assert shown == ["", *m["samplers"]], name
    cond = next(name for name, m in models.items() if m["accepts_digit"])
    model.select_by_value(cond)
    Select(browser.find_element(By.ID, "digit")).select_by_value("3")
    browser.find_element(By.ID, "steps").send_keys("4")
    count = browser.find_element(By.ID, "num_samples")
    count.clear()
    count.send_keys("2")
    first.click()
    grid_info = browser.find_element(By.ID, "generate-info")
    wait_until(lambda: f"from {cond} " in grid_info.text and loaded(browser, "grid"), WAIT_S, f"a grid from {cond}")
    assert "4 steps" in grid_info.text, grid_info.text
    assert console_errors(browser) == []

    count.clear()
    count.send_keys("100000")
    first.click()
    error = browser.find_element(By.ID, "generate-error")
    wait_until(lambda: error.is_displayed(), WAIT_S, "the error box")
    reply = ready_gateway.http("POST", "/v1/generate", {"model": browser.find_element(By.ID, "model").get_attribute(
        "value"), "num_samples": 100000, "format": "PNG_GRID"}).json()["error"]
    assert error.text == f"{reply['code']}: {reply['message']}\n(field: {reply['field']})"
    assert "bad" in count.get_attribute("class")
    # the console log is really read: Chromium logs the 400 answer as an error (so [] above meant none)
    assert any("400" in e["message"] for e in console_errors(browser))


def test_page_asks_for_a_token_when_the_gateway_requires_one(make_gateway, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    token = "web-page-test-token"
    gw = make_gateway(env={"MNISTGEN_API_TOKENS": token})
    browser.get(gw.http_url + "/")
    field = browser.find_element(By.ID, "token")
    wait_until(field.is_displayed, WAIT_S, "the token field (ListModels answered 401)")
    assert "UNAUTHENTICATED" in browser.find_element(By.ID, "generate-error").text
    field.send_keys(token, Keys.TAB)
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#model option"), WAIT_S, "the models, with the token")
    browser.find_elements(By.TAG_NAME, "button")[0].click()
    wait_until(lambda: loaded(browser, "grid"), WAIT_S, "the generated grid")
    assert not browser.find_element(By.ID, "generate-error").is_displayed()
