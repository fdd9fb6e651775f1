"""The web chat page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
load the page, set the sliders, send a message, watch the reply stream in; it must be the greedy
`glm_jax.chat` answer. A screenshot is saved next to the failure message if anything goes wrong."""

from __future__ import annotations

import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from decoding_helpers import chat_model, chat_model_dir, chat_tok  # noqa: F401 (fixtures)
from serve_helpers import MODEL_NAME, greedy_chat, running_server

MAX_TOKENS = 40
QUERY = "晚上睡不着应该怎么办？可以试试听音乐、看书或者散步。"


def chromium() -> webdriver.Chrome:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        raise RuntimeError("headless Chromium is missing: `make test` installs it "
                           "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,900"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def set_slider(driver, element_id: str, value: float) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input'));", element_id, str(value))


def test_page_streams_a_reply(browser, chat_model, chat_tok, tmp_path):  # noqa: F811
    expected, _ = greedy_chat(chat_model, chat_tok, QUERY, [], MAX_TOKENS)
    with running_server(chat_model, chat_tok, decode_chunk=1) as (url, _):
        try:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 120)
            wait.until(lambda d: d.find_element(By.ID, "model").text == MODEL_NAME)
            set_slider(browser, "temperature", 0)
            set_slider(browser, "max_tokens", MAX_TOKENS)
            assert browser.find_element(By.ID, "temperature_value").text == "0"
            box = browser.find_element(By.ID, "input")
            box.send_keys(QUERY)
            box.send_keys(Keys.ENTER)
            reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant"))
            wait.until(lambda d: reply.get_attribute("data-state") != "streaming")
            assert reply.get_attribute("data-state") == "done", reply.get_attribute("textContent")
            assert browser.find_element(By.CSS_SELECTOR, ".message.user").get_attribute("textContent") == QUERY
            assert reply.get_attribute("textContent") == expected
            assert int(reply.get_attribute("data-chunks")) > 1  # it arrived in pieces
            assert browser.find_element(By.ID, "send").is_enabled()
        except Exception as e:
            shot = tmp_path / "web_chat_failure.png"
            browser.save_screenshot(str(shot))
            raise AssertionError(f"web chat test failed ({e!r}); screenshot: {shot}") from e
