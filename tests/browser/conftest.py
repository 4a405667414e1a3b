"""Browser tests of the chat page: Debian's chromium driven by Playwright.

Nothing is downloaded: Playwright drives /usr/bin/chromium (installed by
scripts/install-browser.sh), each test gets a fresh user-data-dir, and every
server is on loopback. Two servers are used:

- `fake_server`: tests/support/fake_openai.py, the tests' OpenAI-compatible fake
  (it serves the package's static files too); for tests whose completion is canned
  with `page.route` (Markdown/XSS rendering, 429, mid-stream error, network).
- `rillet_server`: a real `rillet serve` subprocess (default model,
  `--api-key secret`), started once per session; for growing text, Stop and
  the abort metric, 401, the user's HTML and the screenshot.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from support import rillet_proc
from support.fake_openai import FakeServer, FakeState, markdown_answer

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


Server = rillet_proc.RilletServer
poll_until = rillet_proc.poll_until


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
    """The fake OpenAI server with the chat page; it answers Markdown, a piece every 20 ms."""
    fake = FakeServer(FakeState(markdown_answer, token_delay_s=0.02)).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def rillet_server():
    """A real `rillet serve` (default model, --api-key secret), its log in test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    server = rillet_proc.RilletServer(api_key=API_KEY, log_path=ARTIFACTS / "rillet-serve.log",
                                      start_timeout_s=180.0)
    try:
        server.wait_ready()
    except AssertionError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


# ------------------------------------------------------------------ page helpers

def open_chat(page: Page, server, api_key: str | None = None) -> None:
    """Load the chat page; with `api_key`, store it first as the page would."""
    if api_key is not None:
        page.context.add_init_script(
            f"try {{ if (!localStorage.getItem('rillet.apiKey')) localStorage.setItem('rillet.apiKey', {api_key!r}); }}"
            " catch (e) {}"
        )
    page.goto(server.url + "/")
    expect(page.locator("#prompt")).to_be_focused()


def set_max_tokens(page: Page, n: int) -> None:
    # A click on the summary toggles: the page may have opened Settings itself (to show the key
    # field after a 401), and a second click would close it again.
    if not page.locator("#settings").evaluate("el => el.open"):
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
