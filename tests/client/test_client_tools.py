"""The client's structured-output and tool-call wire handling: request bodies for both APIs, whole
answers, and tool calls assembled from streamed pieces (OpenAI's fragments, Ollama's whole calls)."""

from __future__ import annotations

import json

import pydantic
import pytest

from rillet.client.wire import StreamState, build_request, parse_completion

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class City(pydantic.BaseModel):
    name: str
    population: int


def test_pydantic_response_format_becomes_a_strict_json_schema_or_ollama_format():
    _, body = build_request("openai", "chat", "hi", "m", False, {"response_format": City, "tools": None})
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["name"] == "City"
    assert fmt["json_schema"]["schema"] == {**City.model_json_schema(), "additionalProperties": False}
    assert "tools" not in body
    _, body = build_request("ollama", "chat", "hi", "m", False, {"response_format": City, "tools": [WEATHER]})
    assert body["format"] == {**City.model_json_schema(), "additionalProperties": False}
    assert body["tools"] == [WEATHER] and "options" not in body


@pytest.mark.parametrize("response_format, expected", [
    ({"type": "json_object"}, "json"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array"}}}, {"type": "array"}),
    ({"type": "text"}, None),
])
def test_openai_response_formats_map_to_ollama_format(response_format, expected):
    _, body = build_request("ollama", "complete", "hi", "m", False, {"response_format": response_format})
    assert body.get("format") == expected


def test_ollama_refuses_openai_only_tool_fields():
    with pytest.raises(ValueError, match="tool_choice"):
        build_request("ollama", "chat", "hi", "m", False, {"tools": [WEATHER], "tool_choice": "required"})


def test_whole_answers_carry_tool_calls_and_parsed_models():
    openai = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}}]}
    answer = parse_completion("openai", "chat", openai)
    assert answer.text == "" and answer.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.args) for c in answer.tool_calls] == [("call_1", "get_weather", {"city": "Paris"})]

    ollama = {"done": True, "done_reason": "stop", "message": {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}}
    answer = parse_completion("ollama", "chat", ollama)
    assert [(c.name, c.args) for c in answer.tool_calls] == [("get_weather", {"city": "Oslo"})]

    text = json.dumps({"name": "Lagos", "population": 15000000})
    answer = parse_completion("openai", "chat", {"choices": [{"index": 0, "finish_reason": "stop",
                                                              "message": {"content": text}}]}, City)
    assert answer.parsed == City(name="Lagos", population=15000000) and answer.json()["name"] == "Lagos"
    cut = parse_completion("openai", "chat", {"choices": [{"index": 0, "finish_reason": "length",
                                                           "message": {"content": text[:9]}}]}, City)
    assert cut.parsed is None  # a truncated answer is not validated


def feed(api: str, lines: list[str]) -> StreamState:
    state = StreamState()
    state._init_state(api, "chat")
    for line in [*lines, None]:
        state._take(line)
    return state


def sse(obj: dict) -> list[str]:
    return [f"data: {json.dumps(obj)}", ""]


def chunk(delta: dict, finish: str | None = None) -> list[str]:
    return sse({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def test_streamed_openai_tool_calls_are_assembled_from_fragments():
    lines = (chunk({"role": "assistant"})
             + chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                      "function": {"name": "get_weather", "arguments": ""}}]})
             + chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]})
             + chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Rome"}'}}]})
             + chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}]})
             + chunk({}, "tool_calls") + ["data: [DONE]", ""])
    state = feed("openai", lines)
    assert state.text == "" and state.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.args) for c in state.tool_calls] == [
        ("call_a", "get_weather", {"city": "Rome"}), ("call_b", "get_weather", {"city": "Lima"})]


def test_streamed_ollama_tool_calls_arrive_whole():
    lines = [json.dumps({"message": {"role": "assistant", "content": "", "tool_calls": [
                 {"function": {"name": "get_weather", "arguments": {"city": "Kyiv"}}}]}, "done": False}),
             json.dumps({"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
                         "eval_count": 9, "prompt_eval_count": 30})]
    state = feed("ollama", lines)
    assert [(c.name, c.args) for c in state.tool_calls] == [("get_weather", {"city": "Kyiv"})]
    assert state.finish_reason == "stop" and state.usage.completion_tokens == 9


def test_strict_schema_closes_every_object_nested_ones_included():
    from rillet.client.wire import strict_schema

    class Address(pydantic.BaseModel):
        street: str

    class Person(pydantic.BaseModel):
        name: str
        home: Address
        extra: dict[str, int] = {}

    schema = strict_schema(Person.model_json_schema())
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Address"]["additionalProperties"] is False
    # a free-form mapping (no properties) keeps its own additionalProperties
    assert schema["properties"]["extra"]["additionalProperties"] == {"type": "integer"}
