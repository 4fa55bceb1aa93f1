"""sample.py --serve's chat page (support/chat.html at /), in a real browser: headless Chromium driven by selenium.

It needs Debian's chromium and chromium-driver (.ci/run installs them); without them these tests are skipped, and
pytest's summary says why. Each test saves a screenshot in its tmp_path (never in the repository).
"""
import shutil
import time

import pytest
import torch

import sample
import test_sample as ts
from test_serve import SlowModel, client_for, raw, start_server, stop_server

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no headless browser: the chat page's tests "
                                "need Debian's chromium and chromium-driver (apt-get install chromium "
                                "chromium-driver; .ci/run installs them)")
HOSTILE = '<script>window.pwned = 1</script><b>bold</b><img src=x onerror="window.pwned = 2">'


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = ts.hf_to_checkpoint(ts.tiny_hf_llama(2), tmp_path_factory.mktemp("page"))
    ts.byte_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    return sample.decode_layout(sample.load_model(ckpt, "cpu", torch.float32)[0])


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,700", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.save_screenshot(str(tmp_path / "chat.png"))  # a picture of where the test left the page
    driver.quit()


def wait_for(predicate, seconds=60):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "the page did not get there in time"
        time.sleep(0.05)


def send(driver, text):
    """Type a message, press Enter, wait for the reply to start streaming and then to end."""
    box = driver.find_element("id", "prompt")
    box.send_keys(text)
    box.send_keys("\n")
    wait_for(lambda: driver.execute_script("return document.body.dataset.busy") == "0"
             and len(texts(driver, ".assistant")) >= 1)


def open_page(driver, server, temperature="0"):
    driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
    wait_for(lambda: driver.find_element("id", "model").text == "tiny")  # the page asked /v1/models
    box = driver.find_element("id", "temperature")
    box.clear()
    box.send_keys(temperature)


def texts(driver, selector):
    """The exact text of each element (textContent: nothing normalised away)."""
    return driver.execute_script(f"return [...document.querySelectorAll('{selector}')].map(e => e.textContent)")


@needs_browser
def test_two_turns_stream_the_apis_greedy_answers(ckpt, model, browser):
    """A system message, temperature 0, two turns: each reply equals the API's answer to the same messages."""
    server = start_server(ckpt, model=model, max_new_tokens=12)  # replies that leave room for a second turn
    try:
        open_page(browser, server)
        browser.find_element("id", "system").send_keys("Be brief.")
        history, client = [{"role": "system", "content": "Be brief."}], client_for(server)
        for turn in ("Hi there", "And then?"):
            history.append({"role": "user", "content": turn})
            want = client.chat.completions.create(model="tiny", messages=history, temperature=0)
            want = want.choices[0].message.content
            send(browser, turn)
            assert texts(browser, ".assistant")[-1] == want
            history.append({"role": "assistant", "content": want})
        assert texts(browser, ".user") == ["Hi there", "And then?"] and not texts(browser, ".error")
        browser.find_element("id", "new").click()  # start over: an empty conversation
        assert texts(browser, ".message") == []
        send(browser, "Hi there")
        assert texts(browser, ".assistant") == [history[2]["content"]]
    finally:
        stop_server(server)


@needs_browser
def test_stop_ends_a_long_reply_and_frees_its_row(ckpt, model, browser):
    server = start_server(ckpt, model=SlowModel(model, 0.05))  # ~100 tokens at 50 ms: 5 s unless stopped
    try:
        open_page(browser, server)
        box = browser.find_element("id", "prompt")
        box.send_keys("ab\n")
        wait_for(lambda: len(texts(browser, ".assistant")[0]) > 0)
        browser.find_element("id", "stop").click()
        wait_for(lambda: browser.execute_script("return document.body.dataset.busy") == "0", 5)
        stopped = texts(browser, ".assistant")[0]
        time.sleep(0.5)
        assert texts(browser, ".assistant")[0] == stopped and texts(browser, ".note") == ["(stopped)"]
        wait_for(lambda: not server.batcher.waiting and server.batcher.batches
                 and server.batcher.batches[-1][1] < 60, 10)
        time.sleep(0.5)
        assert server.batcher.batches[-1][1] < 60  # the server stopped decoding it too (of ~100 steps)
    finally:
        stop_server(server)


@needs_browser
def test_a_hostile_reply_shows_as_text(ckpt, browser):
    """A reply holding <script>, a tag and an onerror handler shows those characters; none of it runs or renders."""
    scripted = ts.ScriptedModel(ts.ids_of(HOSTILE, "</s>"))
    server = start_server(ckpt, model=scripted)
    try:
        open_page(browser, server)
        send(browser, "x")
        assert texts(browser, ".assistant") == [HOSTILE]
        assert browser.execute_script("return document.querySelectorAll('#messages script, #messages b, "
                                      "#messages img').length") == 0
        assert browser.execute_script("return window.pwned === undefined")
    finally:
        stop_server(server)


def test_the_page_is_one_file_that_fetches_nothing_from_elsewhere(ckpt, model):
    """No CDN and no build step: the page's only URLs are the server's own, and its policy forbids others."""
    server = start_server(ckpt, model=model)
    try:
        status, headers, page = raw(server, "GET", "/")
        assert raw(server, "HEAD", "/")[2] == ""
    finally:
        stop_server(server)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script src" not in page
