"""The chat page in headless Chromium (Debian's `chromium` and `chromium-driver`, installed here when missing and
we are root): load it, send a message, read the answer as it streams in, start a new chat."""

import dataclasses
import os
import shutil
import subprocess

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
webdriver = pytest.importorskip("selenium.webdriver")

from _serve_model import trained_model  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from sparrow.serving.adapter import load  # noqa: E402
from sparrow.serving.engine import Engine  # noqa: E402
from sparrow.serving.server import BackgroundServer, create_app  # noqa: E402


def _chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver; installs Debian's packages when they are missing and apt can."""
    found = lambda: (shutil.which("chromium"), shutil.which("chromedriver"))
    if not all(found()) and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=900, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], env=env, timeout=1800,
                       check=False)
    browser, driver = found()
    if not (browser and driver):
        pytest.skip("chromium and chromedriver are missing and could not be installed with apt-get (needs root)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    options = Options()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-extensions", "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # No stop tokens: every answer runs to max tokens, so it arrives in many pieces.
    loaded = load(str(trained_model(tmp_path_factory)))
    with BackgroundServer(create_app(Engine(dataclasses.replace(loaded, stop_ids=())))) as running:
        yield running


def _set(browser, element_id, value):
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def test_chat_page_streams_an_answer_and_starts_over(browser, server):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: "chat" in b.find_element(By.ID, "model-name").text)
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    _set(browser, "temperature", "1")
    _set(browser, "top-p", "0.9")
    _set(browser, "max-tokens", "24")
    _set(browser, "seed", "7")
    # Record every text the answer shows while it grows (each delta replaces the message's text node).
    browser.execute_script("""
        window.seen = [];
        new MutationObserver((records) => {
          for (const r of records) for (const n of r.addedNodes)
            if (n.nodeType === Node.TEXT_NODE && n.parentElement.classList.contains('assistant')) window.seen.push(n.data);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true});
    """)
    browser.find_element(By.ID, "input").send_keys("What is 2 plus 3?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: b.find_element(By.ID, "status").text in ("done", "stopped at max tokens", "error"))
    assert browser.find_element(By.ID, "status").text == "stopped at max tokens"
    answer = browser.find_element(By.CSS_SELECTOR, ".message.assistant").text
    user = browser.find_element(By.CSS_SELECTOR, ".message.user").text
    assert user == "What is 2 plus 3?"

    # The same request through the API gives the same answer: the page sent its settings and read every delta.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    expected = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "What is 2 plus 3?"}],
                                              temperature=1.0, top_p=0.9, max_tokens=24, seed=7)
    assert answer == expected.choices[0].message.content.strip() and answer
    seen = [s for s in browser.execute_script("return window.seen;") if s]
    assert len(seen) >= 3 and seen[-1].strip() == answer  # it grew piece by piece
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:]))

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
