"""Browser-test helpers: the app in a subprocess on a free port, and Debian's headless Chromium.

    >>> with running_app(tmp_path / "server.log") as url, app_page(url, viewport=(390, 844)) as page:
    ...     page.locator("#msg textarea").fill("Hi")
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PHONE = (390, 844)
DESKTOP = (1440, 900)
TOKENS = 24  # the greedy app's answer length (greedy_config)


def greedy_config(tmp_path: Path, max_new_tokens: int = TOKENS, auto: bool = False) -> Path:
    """demo.yaml with greedy decoding and short answers (its vectors file by absolute path), auto off
    unless `auto`."""
    text = (ROOT / "demo.yaml").read_text()
    text = text.replace("vectors_file: steering_vectors.pt", f"vectors_file: {ROOT / 'steering_vectors.pt'}", 1)
    text = text.replace("temperature: 0.5 ", "temperature: 0.0 ", 1)
    text = text.replace("max_new_tokens: 256 ", f"max_new_tokens: {max_new_tokens} ", 1)
    if not auto:  # the answers at the features' fixed strengths (auto compares candidates first)
        text = text.replace("auto: true ", "auto: false ", 1)
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(log_path: Path, **env: str):
    """`python app.py` on a free localhost port; yields its URL once it answers."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 150
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer on {url} within 150 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def chromium():
    """Debian's headless Chromium, driven by Playwright (never a downloaded browser)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium); "
                    "tests/run.sh does this. Never download a browser through playwright.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str, viewport: tuple[int, int] = DESKTOP, mobile: bool | None = None):
    """A page in a fresh browser context (its own cookies and session), once the chat box is there."""
    is_phone = viewport[0] < 700 if mobile is None else mobile
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                  is_mobile=is_phone, has_touch=is_phone)
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#msg textarea", timeout=60_000)
    return page


@contextlib.contextmanager
def app_page(url: str, viewport: tuple[int, int] = DESKTOP):
    """A page of the app (1440x900 unless told) in headless Chromium, once the chat box is there."""
    with chromium() as browser:
        yield open_page(browser, url, viewport)


def bot_texts(page, chat_id: str) -> list[str]:
    return page.locator(f"#{chat_id} [data-testid='bot']").all_inner_texts()


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05, state=None):
    """Poll `predicate` until it is true (its value returned) or `timeout` seconds pass; then fail, saying
    what was awaited and, with `state` (a callable), what was there instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    seen = ""
    if state is not None:
        try:
            seen = f"; found instead: {state()!r}"
        except Exception as exc:  # the page itself may be what broke
            seen = f"; and its state could not be read: {exc}"
    pytest.fail(f"timed out after {timeout} s waiting for {what}{seen}")




def download_export(page, button: str) -> tuple[str, bytes]:
    """Open the Share panel, click an export button, and fetch the file it offers: (its name, its bytes)."""
    if not page.locator("#exported").is_visible():
        page.locator("#share-acc").get_by_text("Share", exact=True).click()
    link = page.locator("#exported [data-testid='download-link']")
    before = link.get_attribute("href") if link.count() else None
    page.get_by_role("button", name=button).click()
    link.wait_for(timeout=15_000)
    # an earlier export's link stays until the new file replaces it: wait for another one (the same one after
    # 20 s is the same file)
    deadline = time.monotonic() + 20
    while link.get_attribute("href") == before and time.monotonic() < deadline:
        time.sleep(0.2)
    with urllib.request.urlopen(link.get_attribute("href"), timeout=10) as resp:
        return link.get_attribute("download"), resp.read()
