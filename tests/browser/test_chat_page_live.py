"""The chat page against a real `rillet serve` (default model, --api-key secret)."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from .conftest import (API_KEY, ARTIFACTS, Server, last_answer, open_chat, poll_until, send, set_max_tokens,
                       wait_finished)

RECORD_GROWTH = """() => {
  window.__growth = [];
  const log = document.getElementById('messages');
  new MutationObserver(() => {
    const all = log.querySelectorAll('.msg.assistant');
    const answer = all[all.length - 1];
    if (!answer) return;
    const len = answer.querySelector('.content').textContent.length;
    const prev = window.__growth[window.__growth.length - 1];
    if (!prev || prev.len !== len || prev.state !== answer.dataset.state)
      window.__growth.push({len, state: answer.dataset.state});
  }).observe(log, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def aborted_count(server: Server) -> float:
    """Sum of the server's abort counters (samples named like *abort*_total)."""
    total = 0.0
    for line in server.metrics().splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and "abort" in m.group(1) and m.group(1).endswith("_total"):
            total += float(m.group(3))
    return total


def test_wrong_key_shows_401_and_the_key_field(page: Page, rillet_server: Server):
    requests = []
    page.on("request", lambda r: requests.append((r.url, r.headers.get("authorization"))))
    open_chat(page, rillet_server)
    # Listing the models already needs the key: the page says so and shows the field.
    expect(page.locator("#status")).to_contain_text("401")
    key = page.locator("#api-key")
    expect(key).to_be_visible()

    key.fill("wrong-key")
    set_max_tokens(page, 12)
    send(page, "Hello")
    wait_finished(page)
    error = page.locator("#messages .msg.error")
    expect(error).to_contain_text("401")
    expect(error).to_contain_text("API key")
    expect(key).to_be_visible()
    expect(key).to_be_focused()
    assert ("Bearer wrong-key") in [auth for url, auth in requests if url.endswith("/v1/chat/completions")]

    # The right key: the models load, and Enter in the composer retries the question.
    key.fill(API_KEY)
    key.press("Enter")
    expect(page.locator("#model")).to_have_value(re.compile(r"\S"))
    expect(page.locator("#status")).to_be_hidden()
    expect(page.locator("#prompt")).to_have_value("Hello")
    page.locator("#prompt").press("Enter")
    wait_finished(page)
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    assert page.evaluate("localStorage.getItem('rillet.apiKey')") == API_KEY
    # The key travels only in the Authorization header, never in a URL.
    assert not [url for url, _ in requests if "wrong-key" in url or API_KEY in url]


def test_answer_grows_while_streaming(page: Page, rillet_server: Server):
    open_chat(page, rillet_server, api_key=API_KEY)
    set_max_tokens(page, 128)
    page.locator("#temperature").fill("0")  # greedy: this prompt runs to the token limit
    page.evaluate(RECORD_GROWTH)
    send(page, "Write a long story about a fox who lives in a forest.")
    wait_finished(page, timeout_ms=90_000)

    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "done")
    growth = page.evaluate("window.__growth")
    streaming = [g["len"] for g in growth if g["state"] == "streaming" and g["len"] > 0]
    final = answer.locator(".content").text_content()
    # The text was seen at several lengths, each longer than the last, before the answer finished.
    assert len(set(streaming)) >= 3, growth
    assert streaming == sorted(streaming), growth
    assert streaming[0] < len(final), growth
    meta = answer.locator(".meta")
    expect(meta.locator(".ttft")).to_contain_text("first token")
    expect(meta.locator(".tps")).to_contain_text("tok/s")
    expect(meta.locator(".finish")).to_have_text("finish: length")


def test_stop_ends_the_stream_and_the_server_counts_the_abort(page: Page, rillet_server: Server):
    before = aborted_count(rillet_server)
    open_chat(page, rillet_server, api_key=API_KEY)
    set_max_tokens(page, 2000)
    page.locator("#temperature").fill("0")  # greedy: this prompt does not end by itself soon
    send(page, "Write a long story about a fox who lives in a forest.")
    page.wait_for_function(
        "() => { const a = document.querySelectorAll('#messages .msg.assistant'); const last = a[a.length - 1];"
        " return last && last.dataset.state === 'streaming' && last.querySelector('.content').textContent.length > 10; }",
        timeout=90_000,
    )
    expect(page.locator("#stop")).to_be_enabled()
    page.locator("#stop").click()

    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "stopped")
    expect(answer.locator(".finish")).to_have_text("finish: stopped")
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#messages .msg.error")).to_have_count(0)
    # Closing the connection made the server abort the request.
    poll_until(lambda: aborted_count(rillet_server) > before, 20, "the server's abort counter to increase")


def test_user_html_is_shown_as_text(page: Page, rillet_server: Server):
    hostile = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1"> Say hi.'
    open_chat(page, rillet_server, api_key=API_KEY)
    set_max_tokens(page, 16)
    send(page, hostile)
    expect(page.locator("#messages .msg.user .content")).to_have_text(hostile)
    wait_finished(page)
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    assert page.locator("#messages script, #messages img").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_screenshot_of_a_finished_answer(page: Page, rillet_server: Server):
    open_chat(page, rillet_server, api_key=API_KEY)
    set_max_tokens(page, 160)
    page.locator("#temperature").fill("0")
    page.locator("#settings summary").click()  # close the settings again for the picture
    send(page, "How do I print hello world in Python? Show the code.")
    wait_finished(page, timeout_ms=90_000)
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    expect(last_answer(page).locator(".meta .finish")).to_be_visible()
    # Markdown became a code block (the answer may hold several)
    expect(last_answer(page).locator(".content pre code", has_text="print(").first).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "chat-page.png"
    page.set_viewport_size({"width": 900, "height": 520})
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 5000
