"""The chat page against canned responses (fake server + page.route): rendering,
safety, errors, keyboard, phone width. No model needed."""

from __future__ import annotations

import json

from playwright.sync_api import Page, Route, expect

from support import fake_openai as fake
from .conftest import last_answer, open_chat, send, wait_finished

SCRIPT = "<script>window.__pwned=1</script>"
IMG = '<img src=x onerror="window.__pwned=1">'


def sse(*events: dict | str) -> str:
    out = []
    for event in events:
        out.append("data: " + (event if isinstance(event, str) else json.dumps(event)) + "\n\n")
    return "".join(out)


def chunk(content: str | None = None, finish: str | None = None, role: str | None = None) -> dict:
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def route_sse(page: Page, body: str, status: int = 200, headers: dict | None = None) -> list[dict]:
    """Answer /v1/chat/completions with `body`; returns the list of request bodies seen."""
    seen: list[dict] = []

    def handle(route: Route) -> None:
        seen.append(json.loads(route.request.post_data or "{}"))
        route.fulfill(status=status, body=body,
                      headers={"Content-Type": "text/event-stream" if status == 200 else "application/json",
                               **(headers or {})})

    page.route("**/v1/chat/completions", handle)
    return seen


def test_model_markdown_and_html_are_rendered_safely(page: Page, fake_server):
    hostile = (
        f"Here is some HTML: {SCRIPT} and {IMG}\n\n"
        "**bold** and *italic* and `<b>inline</b>`\n\n"
        "- item one\n- item <i>two</i>\n\n"
        "1. first\n2. second\n\n"
        "```html\n<script>window.__pwned=1</script>\n```\n\n"
        "[safe](https://example.com/a?b=1) [bad](javascript:window.__pwned=1) "
        "[data](data:text/html,<script>window.__pwned=1</script>)"
    )
    # Split the hostile text into small pieces, as a model would stream it.
    pieces = [hostile[i:i + 7] for i in range(0, len(hostile), 7)]
    events = [chunk("", role="assistant")] + [chunk(p) for p in pieces[:-1]] + [chunk(pieces[-1], "stop")]
    events.append({"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(pieces),
                                                        "total_tokens": 5 + len(pieces)}})
    route_sse(page, sse(*events, "[DONE]"))
    open_chat(page, fake_server)
    send(page, "show me html")
    wait_finished(page)

    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "done")
    content = answer.locator(".content")
    # The HTML is visible literally ...
    expect(content).to_contain_text(SCRIPT)
    expect(content).to_contain_text(IMG)
    expect(content.locator("li").nth(1)).to_have_text("item <i>two</i>")
    expect(content.locator("pre code")).to_have_text("<script>window.__pwned=1</script>")
    # ... and nothing of it ran or became an element.
    assert page.evaluate("window.__pwned") is None
    assert content.locator("script, img, i, b, iframe").count() == 0
    # Markdown did become structure.
    expect(content.locator("strong")).to_have_text("bold")
    expect(content.locator("em")).to_have_text("italic")
    expect(content.locator("p code")).to_have_text("<b>inline</b>")
    expect(content.locator("ul > li")).to_have_count(2)
    expect(content.locator("ol > li")).to_have_count(2)
    # Only the http(s) link is a link; it opens without access to this page.
    links = content.locator("a")
    expect(links).to_have_count(1)
    expect(links).to_have_attribute("href", "https://example.com/a?b=1")
    assert "noopener" in links.get_attribute("rel")
    expect(content).to_contain_text("[bad](javascript:window.__pwned=1)")
    # Stats under the answer: time to first token, tokens/s, finish reason.
    meta = answer.locator(".meta")
    expect(meta.locator(".ttft")).to_contain_text("first token")
    expect(meta.locator(".tps")).to_contain_text("tok/s")
    expect(meta.locator(".tokens")).to_have_text(f"{len(pieces)} tokens")
    expect(meta.locator(".finish")).to_have_text("finish: stop")
    assert page.evaluate("window.__pwned") is None


def test_mid_stream_error_event_is_shown(page: Page, fake_server):
    route_sse(page, sse(chunk("", role="assistant"), chunk("Partial "), chunk("answer"),
                        {"error": {"message": "engine failed: out of KV cache", "type": "server_error"}}))
    open_chat(page, fake_server)
    send(page, "hello")
    wait_finished(page)
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".content")).to_have_text("Partial answer")
    error = page.locator("#messages .msg.error")
    expect(error).to_have_count(1)
    expect(error).to_contain_text("engine failed: out of KV cache")
    expect(answer.locator(".finish")).to_have_text("finish: error")


def test_429_is_shown_and_the_question_can_be_retried(page: Page, fake_server):
    body = json.dumps({"error": {"message": "Too many requests waiting", "type": "rate_limit", "code": 429}})
    route_sse(page, body, status=429, headers={"Retry-After": "3"})
    open_chat(page, fake_server)
    send(page, "are you busy?")
    wait_finished(page)
    error = page.locator("#messages .msg.error")
    expect(error).to_contain_text("429")
    expect(error).to_contain_text("Too many requests waiting")
    expect(error).to_contain_text("retry after 3")
    expect(page.locator("#messages .msg.assistant")).to_have_count(0)
    # The question comes back to the composer; Enter retries it once the server has room.
    expect(page.locator("#prompt")).to_have_value("are you busy?")
    page.unroute("**/v1/chat/completions")
    page.locator("#prompt").press("Enter")
    wait_finished(page)
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    expect(last_answer(page).locator(".content")).to_contain_text("You said: are you busy?")


def test_network_error_is_shown(page: Page, fake_server):
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    open_chat(page, fake_server)
    send(page, "anyone there?")
    wait_finished(page)
    expect(page.locator("#messages .msg.error")).to_contain_text("Network error")


def test_stream_cut_without_finish_is_an_error(page: Page, fake_server):
    route_sse(page, sse(chunk("", role="assistant"), chunk("half an ans")))
    open_chat(page, fake_server)
    send(page, "hello")
    wait_finished(page)
    expect(page.locator("#messages .msg.error")).to_contain_text("closed before the answer finished")


def test_multi_turn_streaming_and_new_chat(page: Page, fake_server):
    fake_server.state.requests.clear()
    open_chat(page, fake_server)
    expect(page.locator("#model")).to_have_value(fake.MODEL_ID)
    expect(page.locator("#api-key-row")).to_be_hidden()  # this server asks for no key
    page.locator("#settings summary").click()
    page.locator("#system-prompt").fill("Be brief.")
    page.locator("#temperature").fill("0.3")
    page.locator("#max-tokens").fill("64")
    send(page, "first question")
    wait_finished(page)
    expect(last_answer(page).locator(".content")).to_contain_text("You said: first question")
    expect(last_answer(page).locator("pre code")).to_have_text("print('hi')")
    send(page, "second question")
    wait_finished(page)
    expect(page.locator("#messages .msg.assistant")).to_have_count(2)

    first, second = fake_server.state.requests[-2:]
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
    assert first["model"] == fake.MODEL_ID and first["temperature"] == 0.3 and first["max_tokens"] == 64
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][0]["content"] == "Be brief."
    assert second["messages"][2]["content"].startswith("You said: first question")
    assert second["messages"][3]["content"] == "second question"

    page.locator("#new-chat").click()
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#prompt")).to_be_focused()
    send(page, "fresh start")
    wait_finished(page)
    assert [m["role"] for m in fake_server.state.requests[-1]["messages"]] == ["system", "user"]
    # Settings survive a reload (localStorage).
    page.reload()
    expect(page.locator("#system-prompt")).to_have_value("Be brief.")


def test_keyboard_only(page: Page, fake_server):
    open_chat(page, fake_server)
    prompt = page.locator("#prompt")
    prompt.type("line one")
    prompt.press("Shift+Enter")
    prompt.type("line two")
    expect(prompt).to_have_value("line one\nline two")
    expect(page.locator("#messages .msg.user")).to_have_count(0)
    prompt.press("Enter")
    expect(page.locator("#messages .msg.user .content")).to_have_text("line one\nline two")
    wait_finished(page)
    expect(prompt).to_be_focused()
    # Tab reaches the buttons, and the focused one shows a visible outline.
    page.keyboard.press("Tab")
    expect(page.locator("#send")).to_be_focused()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle + ' ' + "
                            "getComputedStyle(document.activeElement).outlineWidth")
    assert not outline.startswith("none") and not outline.endswith(" 0px"), outline


def test_phone_width(page: Page, fake_server):
    page.set_viewport_size({"width": 375, "height": 700})
    open_chat(page, fake_server)
    send(page, "a phone question with a long-unbroken-word-" + "x" * 80)
    wait_finished(page)
    no_horizontal_scroll = page.evaluate(
        "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    assert no_horizontal_scroll
    for sel in ("#prompt", "#send", "#stop", "#new-chat"):
        box = page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, (sel, box)
    assert page.evaluate("document.querySelector('meta[name=viewport]').content").startswith("width=device-width")


def test_escape_stops_and_new_chat_abandons_a_stream(page: Page, fake_server):
    open_chat(page, fake_server)
    streaming = ("() => { const a = document.querySelectorAll('#messages .msg.assistant');"
                 " const last = a[a.length - 1]; return last && last.dataset.state === 'streaming'; }")
    send(page, "answer slowly please")
    page.wait_for_function(streaming)
    expect(page.locator("#stop")).to_be_enabled()
    page.keyboard.press("Escape")
    expect(last_answer(page)).to_have_attribute("data-state", "stopped")
    expect(last_answer(page).locator(".finish")).to_have_text("finish: stopped")
    expect(page.locator("#prompt")).to_be_focused()

    send(page, "slow again")
    page.wait_for_function(streaming)
    page.locator("#new-chat").click()
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


def test_models_are_fetched_again_while_the_server_loads(page: Page, fake_server):
    calls = []

    def models(route: Route) -> None:
        calls.append(route.request.url)
        if len(calls) == 1:
            route.fulfill(status=503, content_type="application/json",
                          body=json.dumps({"error": {"message": "loading", "type": "unavailable"}}))
        else:
            route.continue_()

    page.route("**/v1/models", models)
    page.goto(fake_server.url + "/")
    expect(page.locator("#status")).to_contain_text("not ready")
    expect(page.locator("#model")).to_have_value(fake.MODEL_ID)
    expect(page.locator("#status")).to_be_hidden()
    assert len(calls) >= 2


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tool_call_chunk(index: int, *, call_id: str | None = None, name: str | None = None,
                    arguments: str | None = None) -> dict:
    piece: dict = {"index": index, "function": {}}
    if call_id:
        piece.update(id=call_id, type="function")
    if name is not None:
        piece["function"]["name"] = name
    if arguments is not None:
        piece["function"]["arguments"] = arguments
    event = chunk()
    event["choices"][0]["delta"]["tool_calls"] = [piece]
    return event


def test_tools_and_answer_format_are_sent_and_tool_calls_shown(page: Page, fake_server):
    open_chat(page, fake_server)
    page.locator("#settings summary").click()
    page.locator("#tools").fill("{broken")
    send(page, "weather?")
    expect(page.locator("#status")).to_contain_text("Tools is not valid JSON")
    expect(page.locator("#messages .msg")).to_have_count(0)  # nothing sent
    expect(page.locator("#prompt")).to_have_value("weather?")

    page.locator("#tools").fill(json.dumps([WEATHER_TOOL]))
    page.locator("#json-schema").fill('{"type": "object"}')
    seen = route_sse(page, sse(chunk("", role="assistant"),
                               tool_call_chunk(0, call_id="call_1", name="get_weather", arguments=""),
                               tool_call_chunk(0, arguments='{"city": '),
                               tool_call_chunk(0, arguments='"<b>Paris</b>"}'),
                               chunk(None, "tool_calls"), "[DONE]"))
    page.locator("#prompt").fill("")
    send(page, "weather?")
    wait_finished(page)
    expect(page.locator("#status")).to_be_hidden()
    call = last_answer(page).locator(".tool-call")
    expect(call.locator(".tool-name")).to_have_text("Tool call: get_weather")
    expect(call.locator("pre code")).to_have_text('{\n  "city": "<b>Paris</b>"\n}')  # as text, never HTML
    expect(last_answer(page).locator(".meta")).to_contain_text("finish: tool_calls")
    body = seen[-1]
    assert body["tools"] == [WEATHER_TOOL]
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer",
                                                                             "schema": {"type": "object"}}}

    seen = route_sse(page, sse(chunk("Sunny.", "stop"), "[DONE]"))  # the newest route answers
    send(page, "thanks")
    wait_finished(page)
    assistant = seen[-1]["messages"][-2]
    assert assistant["role"] == "assistant" and assistant["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "<b>Paris</b>"}'}}]
