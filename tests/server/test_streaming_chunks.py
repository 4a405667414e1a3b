"""The streamed token's chunk is built as a plain dict (no pydantic models: ~0.5 us instead of ~9
a token), and its SSE event from a template (one string's JSON a token); both must be exactly
what the models would have dumped and the encoder made of it."""

from __future__ import annotations

import pytest

from rillet.protocol import ollama as ol
from rillet.server import serving_ollama
from rillet.server.serving_chat import _Chat
from rillet.server.serving_chat import _choice as chat_choice
from rillet.server.serving_completion import _Completion
from rillet.server.serving_completion import _choice as completion_choice
from rillet.server.streaming import EventTemplate, ndjson_line, sse_event


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", ["hi", "", "é\n\"quoted\""])
def test_openai_text_chunks_equal_the_models_dump(include_usage, text):
    fields = dict(id="chatcmpl-1", model="m", created=123, n=2, include_usage=include_usage, logprobs=False)
    chat = _Chat(**fields)
    assert chat.text_chunk(1, text) == chat.chunk([chat_choice(1, {"content": text})])
    completion = _Completion(**fields)
    assert completion.text_chunk(1, text) == completion.chunk([completion_choice(1, text)])


@pytest.mark.parametrize("chat", [False, True])
def test_ollama_text_lines_equal_the_models_dump(chat, monkeypatch):
    monkeypatch.setattr(serving_ollama, "ollama_timestamp", lambda: "2026-12-03T00:00:00.000000Z")
    line = serving_ollama._delta("m", chat, "hello")
    if chat:
        want = ol.ChatResponse(model="m", created_at="2026-12-03T00:00:00.000000Z",
                               message=ol.AssistantMessage(role="assistant", content="hello"), done=False)
    else:
        want = ol.GenerateResponse(model="m", created_at="2026-12-03T00:00:00.000000Z", response="hello", done=False)
    assert line == want.model_dump(exclude_unset=True)


TEXTS = ["hi", "", "é\n\"quoted\"", "back\\slash", "\x00\x1f\u2028 tab\t", "🙂 ☃", "\x00rillet-text\x00",
         "data: [DONE]\n\n", "}]}"]


@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_text_events_equal_the_encoded_chunks(include_usage):
    fields = dict(id="chatcmpl-\"1\"", model="m/é", created=123, n=3, include_usage=include_usage, logprobs=False)
    for answer in (_Chat(**fields), _Completion(**fields)):
        for index in (2, 0, 2):
            for text in TEXTS:
                assert answer.text_event(index, text) == sse_event(answer.text_chunk(index, text))


def test_an_event_template_needs_its_string_once():
    template = EventTemplate(lambda text: {"a": text, "b": [1, {"c": None}]}, ndjson_line)
    assert template("x\n") == ndjson_line({"a": "x\n", "b": [1, {"c": None}]})
    with pytest.raises(ValueError):
        EventTemplate(lambda text: {"a": text, "b": text}, ndjson_line)
    with pytest.raises(ValueError):
        EventTemplate(lambda text: {"a": "fixed"}, ndjson_line)
