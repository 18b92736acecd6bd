"""The page (`GET /`) in a real browser: headless Chromium driven by selenium.

Skipped where chromium / chromedriver are missing (Debian: `apt-get install chromium chromium-driver`),
except in CI (`CI=true`), where a missing browser fails: CI installs it, so a skip would hide a broken
install. `DLMOE_SCREENSHOT=/path.png` keeps a screenshot of the finished page there as well.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dlmoe.serve import Engine
from dlmoe.serve.background import ServerThread
from tests.serve.conftest import serve, train_tiny

pytestmark = pytest.mark.browser

CHROME_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)  # fmt: skip
WAIT_S = 60
# the request the page is filled with (temperature 0: the streamed text must equal a plain request's)
FORM = {"max_tokens": 32, "block_length": 8, "steps": 16, "temperature": 0, "top_p": 0.6, "guard": 3}
INPUT_IDS = {"max_tokens": "max-tokens", "block_length": "block-length", "steps": "steps", "temperature": "temperature",
             "top_p": "top-p", "guard": "guard"}  # fmt: skip
PROMPT = "ROMEO:\nBut soft, what light"
BOXES = """const boxes = [...arguments[0].querySelectorAll('td.hm')].map((td) => td.getBoundingClientRect())
  .filter((r) => r.width > 4 && r.height > 4);
return [boxes.map((r) => Math.round(r.top)), boxes.map((r) => Math.round(r.left))];"""


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI (where the browser is installed on purpose)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser must be installed, see .ci/run)")
    pytest.skip(reason)


def _find(name: str) -> str | None:
    path = Path("/usr/bin") / name
    return str(path) if path.exists() else shutil.which(name)


@pytest.fixture(scope="session")
def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver); session-scoped so that a missing browser skips before any model is trained."""
    chromium, chromedriver = _find("chromium"), _find("chromedriver")
    if chromium is None or chromedriver is None:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", chromedriver)) if p is None)
        _unavailable(f"{missing} not found: install the Debian packages chromium and chromium-driver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[dev]')")
    return chromium, chromedriver


@pytest.fixture
def browser(browser_paths: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Headless Chromium with a fresh profile; selenium never downloads a driver (SE_OFFLINE, explicit paths)."""
    from selenium import webdriver

    chromium, chromedriver = browser_paths
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, read by _script_errors
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """8 experts, trained a little longer than `tc_run`: text that is not only spaces, fuller heatmaps."""
    settings = {"train.steps": 80, "model.moe.router.num_experts": 8}
    return Engine.from_run(train_tiny(tmp_path_factory.mktemp("serve_page"), "page", **settings))


@pytest.fixture
def page_server(page_engine: Engine) -> Iterator[ServerThread]:
    with serve(page_engine, max_batch_rows=16, max_wait_ms=20) as running:
        yield running


def _open(driver, server: ServerThread) -> dict:
    """Load the page; wait until it has read `/v1/models`; the model card."""
    from selenium.webdriver.support.ui import WebDriverWait

    card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    driver.get(f"{server.url}/")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    return card


def _fill(driver, values: dict[str, object], block_routing: bool) -> None:
    from selenium.webdriver.common.by import By

    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    checkbox = driver.find_element(By.ID, "block-routing")
    if checkbox.is_selected() != block_routing:
        driver.find_element(By.CSS_SELECTOR, "label[for=block-routing]").click()  # the label toggles its input
    for key, value in values.items():
        field = driver.find_element(By.ID, INPUT_IDS[key])
        field.clear()
        field.send_keys(str(value))


def _text(driver, element_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def _wait_finished(driver) -> None:
    """Until the final text or an error is shown (an error fails with the page's message)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(lambda d: _text(d, "final-text") or _text(d, "error"))
    assert not _text(driver, "error"), f"the page shows an error: {_text(driver, 'error')}"


def _script_errors(driver) -> list[str]:
    """The page's uncaught exceptions and console.error lines so far (network errors left out)."""
    logs = driver.get_log("browser")
    return [e["message"] for e in logs if e["level"] == "SEVERE" and e.get("source") != "network"]


def _check_screenshot(driver, path: Path) -> None:
    from PIL import Image, ImageStat

    assert driver.save_screenshot(str(path)), f"no screenshot saved to {path}"
    if os.environ.get("DLMOE_SCREENSHOT"):
        shutil.copyfile(path, os.environ["DLMOE_SCREENSHOT"])
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200, "the screenshot has too few colours: a blank page?"
        assert max(ImageStat.Stat(rgb).stddev) > 20, "the screenshot is nearly uniform: a blank page?"


def test_page_streams_the_canvas_and_the_routing(browser, page_server: ServerThread, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    card = _open(browser, page_server)
    moe = card["dlmoe"]["moe"]
    assert _text(browser, "model-id") == card["id"]
    assert card["id"] in browser.find_element(By.TAG_NAME, "header").text
    assert moe["router"] in browser.find_element(By.ID, "model").text

    _fill(browser, FORM, block_routing=True)
    browser.find_element(By.ID, "generate").click()
    _wait_finished(browser)

    cells = browser.find_elements(By.CSS_SELECTOR, "#canvas .cell")
    assert len(cells) == FORM["max_tokens"]
    assert browser.find_elements(By.CSS_SELECTOR, "#canvas .cell.masked") == []
    blocks = browser.find_elements(By.CSS_SELECTOR, "#canvas .block")
    assert len(blocks) == FORM["max_tokens"] // FORM["block_length"]
    colours = {cell.value_of_css_property("background-color") for cell in cells}
    assert len(colours) > 1, "cells are coloured by the step that committed them"

    layers, experts = moe["moe_layers"], moe["num_experts"]
    for kind, title in (("votes", "token routing (votes)"), ("coreset", "coreset (used)")):
        figure = browser.find_element(By.CSS_SELECTOR, f"#heatmaps figure[data-kind={kind}]")
        assert title in figure.find_element(By.TAG_NAME, "figcaption").text
        assert len(figure.find_elements(By.CSS_SELECTOR, "td.hm")) == layers * experts
        assert len(figure.find_elements(By.CSS_SELECTOR, "tbody th")) == layers
        tops, lefts = browser.execute_script(BOXES, figure)
        assert (len(set(tops)), len(set(lefts))) == (layers, experts), "the cells form a layers × experts grid"
    inside = browser.find_elements(By.CSS_SELECTOR, "#heatmaps figure[data-kind=coreset] td.hm.core")
    assert layers <= len(inside) <= layers * experts  # every layer's coreset holds at least its top-1 expert
    assert "done" in _text(browser, "status")

    plain = {k: v for k, v in FORM.items() if k not in ("top_p", "guard")}
    body = {"prompt": PROMPT, **plain, "block_routing": {"top_p": FORM["top_p"], "guard": FORM["guard"]}}
    direct = httpx.post(f"{page_server.url}/v1/completions", json=body, timeout=WAIT_S)
    assert direct.status_code == 200, direct.text
    assert _text(browser, "final-text") == direct.json()["choices"][0]["text"]

    stats = browser.find_element(By.ID, "stats").text
    for label in ("forwards", "unique experts / layer / forward", "active FLOPs / token", "tokens / s", "batch rows"):
        assert label in stats
    assert str(direct.json()["dlmoe"]["stats"]["num_forwards"]) in stats

    _check_screenshot(browser, tmp_path / "serve_page.png")
    assert _script_errors(browser) == []


def test_page_shows_the_servers_error(browser, server: ServerThread) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, server)
    values = {"max_tokens": 16, "block_length": 8, "steps": 3}  # 2 blocks: 3 steps do not divide between them
    _fill(browser, values, block_routing=False)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: _text(d, "error"))

    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, **values})
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert "multiple of the number of blocks" in message
    assert message in _text(browser, "error")
    assert _text(browser, "final-text") == ""
    assert browser.find_elements(By.CSS_SELECTOR, "#canvas .cell") == []
    assert _script_errors(browser) == []
