"""Browser tests of the chat page: Debian's chromium driven by Playwright.

Nothing is downloaded: Playwright drives /usr/bin/chromium (installed by
scripts/install-browser.sh), each test gets a fresh user-data-dir, and every
server is on loopback. Two servers are used:

- `fake_server`: tests/browser/fake_server.py, a small OpenAI-compatible fake
  that serves the package's static files; for tests whose completion is canned
  with `page.route` (Markdown/XSS rendering, 429, mid-stream error, network).
- `rillet_server`: a real `rillet serve` subprocess (default model,
  `--api-key secret`), started once per session; for growing text, Stop and
  the abort metric, 401, the user's HTML and the screenshot.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from . import fake_server as fake_openai_server

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("RILLET_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "secret"
SERVER_START_TIMEOUT_S = 180.0


@dataclass
class Server:
    url: str
    process: subprocess.Popen | None = None
    log: Path | None = None

    def metrics(self) -> str:
        res = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        res.raise_for_status()
        return res.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll_until(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)  # polling interval, not synchronization


@pytest.fixture(scope="module")  # not session: the sync API keeps an event loop running until it stops,
def playwright_driver():  # which would break asyncio.run() in the test modules collected after these
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-browser.sh (as root)")
    with sync_playwright() as p:
        yield p


@pytest.fixture
def context(playwright_driver, tmp_path):
    ctx = playwright_driver.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"),  # a fresh user-data-dir per test
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1000, "height": 760},
        service_workers="block",
    )
    ctx.set_default_timeout(15_000)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context) -> Page:
    page = context.pages[0] if context.pages else context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    if errors:
        pytest.fail(f"JavaScript errors on the page: {errors}")


@pytest.fixture(scope="session")
def fake_server():
    server, url = fake_openai_server.start()
    yield Server(url)
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def rillet_server():
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    log_path = ARTIFACTS / "rillet-serve.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rillet.cli", "serve", "--port", str(port), "--api-key", API_KEY],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"

    def tail() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"rillet serve exited with {proc.returncode}:\n{tail()}")
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        poll_until(ready, SERVER_START_TIMEOUT_S, "rillet serve /health")
    except AssertionError as exc:
        proc.kill()
        proc.wait()
        log.close()
        pytest.fail(f"{exc}\n--- server log ---\n{tail()}")
    yield Server(url, proc, log_path)
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


# ------------------------------------------------------------------ page helpers

def open_chat(page: Page, server: Server, api_key: str | None = None) -> None:
    """Load the chat page; with `api_key`, store it first as the page would."""
    if api_key is not None:
        page.context.add_init_script(
            f"try {{ if (!localStorage.getItem('rillet.apiKey')) localStorage.setItem('rillet.apiKey', {api_key!r}); }}"
            " catch (e) {}"
        )
    page.goto(server.url + "/")
    expect(page.locator("#prompt")).to_be_focused()


def set_max_tokens(page: Page, n: int) -> None:
    page.locator("#settings summary").click()
    page.locator("#max-tokens").fill(str(n))


def send(page: Page, text: str) -> None:
    page.locator("#prompt").fill(text)
    page.locator("#prompt").press("Enter")


def last_answer(page: Page):
    return page.locator("#messages .msg.assistant").last


def wait_finished(page: Page, timeout_ms: float = 60_000) -> None:
    """Wait until the newest turn has ended (answered, stopped or failed)."""
    page.wait_for_function(
        "() => { const a = document.querySelectorAll('#messages .msg.assistant');"
        " const last = a[a.length - 1];"
        " return document.querySelector('#send:not([disabled])') &&"
        " (!last || ['done', 'stopped', 'error'].includes(last.dataset.state)); }",
        timeout=timeout_ms,
    )
