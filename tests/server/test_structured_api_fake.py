"""Structured output and tool calling over the HTTP APIs, in-process against the fake engine:
how request fields map to `SamplingParams.structured` and to the tools the engine gets, the
wire shapes of tool calls (OpenAI and Ollama, streamed and whole), the 400s, and the tool-call
parsers on crafted text."""

from __future__ import annotations

import json

import pytest
from support.asgi_app import ndjson_lines, running_app, sse_events
from support.fakes import FakeEngine

from rillet.engine.prompts import PromptEncoder
from rillet.protocol import ollama as ol
from rillet.protocol import openai as oa
from rillet.server.tool_calls import ToolSession, plan_tools
from rillet.structured.spec import StructuredOutputs

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                    "b": {"type": "integer"}}}}}
TOOLS = [WEATHER, ADD]
HERMES_REPLY = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def _structured(engine: FakeEngine) -> StructuredOutputs | None:
    (params,) = engine.params.values()
    return params.structured


async def _chat(client, **body):
    return await client.post("/v1/chat/completions", json={"messages": USER, **body})


# ------------------------------------------------------------------ request fields -> constraint


@pytest.mark.parametrize("body, expected", [
    ({"response_format": {"type": "json_object"}}, StructuredOutputs(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}},
     StructuredOutputs(json=json.dumps(PERSON, separators=(",", ":")))),
    ({"structured_outputs": {"json": PERSON}}, StructuredOutputs(json=json.dumps(PERSON, separators=(",", ":")))),
    ({"structured_outputs": {"json": json.dumps(PERSON)}},
     StructuredOutputs(json=json.dumps(PERSON, separators=(",", ":")))),
    ({"structured_outputs": {"regex": "[0-9]{3}"}}, StructuredOutputs(regex="[0-9]{3}")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutputs(choice=("yes", "no"))),
    ({"structured_outputs": {"grammar": 'start: "a"+'}}, StructuredOutputs(grammar='start: "a"+')),
    ({"structured_outputs": {"json_object": True}}, StructuredOutputs(json_object=True)),
    ({"guided_json": PERSON}, StructuredOutputs(json=json.dumps(PERSON, separators=(",", ":")))),
    ({"guided_regex": "a|b"}, StructuredOutputs(regex="a|b")),
    ({"guided_choice": ["x"]}, StructuredOutputs(choice=("x",))),
    ({"guided_grammar": 'start: "x"'}, StructuredOutputs(grammar='start: "x"')),
    ({"response_format": {"type": "text"}}, None),
    ({}, None),
])
async def test_constraint_fields_on_chat_and_completions(body, expected):
    async with running_app() as (client, _, engine):
        r = await _chat(client, **body)
        assert r.status_code == 200, r.text
        assert _structured(engine) == expected
    async with running_app() as (client, _, engine):
        r = await client.post("/v1/completions", json={"prompt": "x", **body})
        assert r.status_code == 200, r.text
        assert _structured(engine) == expected


async def test_json_schema_keeps_the_schema_key_order():
    """llguidance writes properties in schema order: the constraint must not sort them."""
    schema = {"type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "integer"}}}
    async with running_app() as (client, _, engine):
        r = await _chat(client, response_format={"type": "json_schema", "json_schema": {"name": "z", "schema": schema}})
        assert r.status_code == 200
        text = _structured(engine).json
        assert text.index('"zeta"') < text.index('"alpha"')


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "only one"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice", "only one"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "not supported"),
    ({"response_format": "json"}, "response_format", "object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema", "schema"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
    ({"structured_outputs": {"choice": "yes"}}, "structured_outputs.choice", "list of strings"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "choice"),
    ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex", "string"),
    ({"structured_outputs": ["json"]}, "structured_outputs", "object"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "name is missing"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools", "JSON schema object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     "object"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "'function'"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "twice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "letters"),
    ({"tools": "get_weather"}, "tools", "list"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "tool_choice, response_format"),
])
async def test_bad_constraints_and_tools_are_400_naming_the_field(body, param, words):
    async with running_app() as (client, _, engine):
        r = await _chat(client, **body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], error
        assert error["type"] == "invalid_request_error"
        assert not engine.params  # refused before anything was queued


class RefusingEngine(FakeEngine):
    """The real engine's refusal of a constraint that does not compile (structured/grammar.py)."""

    async def add_request(self, prompt, params, request_id=None, *, tools=None):
        if params.structured is not None and params.structured.regex == "(":
            raise ValueError("the regular expression does not compile: unclosed group")
        return await super().add_request(prompt, params, request_id, tools=tools)


async def test_a_constraint_the_engine_cannot_compile_is_400_naming_its_field():
    async with running_app(RefusingEngine()) as (client, _, _):
        for body, param in (({"structured_outputs": {"regex": "("}}, "structured_outputs"),
                            ({"guided_regex": "("}, "guided_regex")):
            r = await _chat(client, **body)
            assert r.status_code == 400
            assert r.json()["error"]["param"] == param
            assert "does not compile" in r.json()["error"]["message"]


# ------------------------------------------------------------------ tools -> engine


async def test_tool_choice_decides_the_tools_and_constraint_the_engine_gets():
    async with running_app() as (client, _, engine):
        cases = {"auto": None, "none": None, "required": None, "named": None}
        for name, choice in (("auto", "auto"), ("none", "none"), ("required", "required"),
                             ("named", {"type": "function", "function": {"name": "add"}})):
            engine.params.clear()
            engine.tools.clear()
            r = await _chat(client, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
            assert r.status_code == 200, r.text
            ((tools,),) = [engine.tools.values()]
            cases[name] = (tools, _structured(engine))
    assert [t["function"]["name"] for t in cases["auto"][0]] == ["get_weather", "add"]
    assert cases["auto"][1] is None
    assert cases["none"] == (None, None)  # not offered, not parsed
    assert cases["named"][0] == [ADD]
    named = json.loads(cases["named"][1].json)
    assert named["properties"] == ADD["function"]["parameters"]["properties"]
    assert named["additionalProperties"] is False  # a forced call holds only the declared arguments
    required = json.loads(cases["required"][1].json)
    assert required["type"] == "array" and required["minItems"] == 1 and required["maxItems"] == 1
    variants = required["items"]["anyOf"]
    assert [list(v["properties"]) for v in variants] == [["name", "arguments"]] * 2  # name first
    assert [v["properties"]["name"]["const"] for v in variants] == ["get_weather", "add"]


def test_required_schema_keeps_nested_model_refs_resolvable():
    """pydantic writes nested models as $defs + $ref; nested under the call array they are hoisted."""
    import jsonschema

    address = {"type": "object", "properties": {"street": {"type": "string"}}, "required": ["street"]}
    tools = [{"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"home": {"$ref": "#/$defs/Address"}}, "required": ["home"],
        "$defs": {"Address": address}}}} for name in ("ship", "bill")]
    schema = json.loads(plan_tools(tools, "required").structured.json)
    assert set(schema["$defs"]) == {"ship__Address", "bill__Address"}
    jsonschema.validate([{"name": "bill", "arguments": {"home": {"street": "Main"}}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "bill", "arguments": {"home": {"city": "X"}}}], schema)


async def test_tool_messages_reach_the_template_with_arguments_as_objects():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
    ]
    async with running_app(FakeEngine(reply="It is 22 C.")) as (client, _, engine):
        r = await client.post("/v1/chat/completions", json={"messages": messages, "tools": TOOLS})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "It is 22 C."}
        (prompt,) = engine.prompts.values()
        assert prompt[1]["tool_calls"] == [{"type": "function", "id": "call_1", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]
        assert prompt[1]["content"] == ""
        assert prompt[2] == {"role": "tool", "content": "22 C", "tool_call_id": "call_1", "name": "get_weather"}
        for bad, words in (
                ({"role": "tool", "content": "x"}, "tool_call_id"),
                ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
                 "not valid JSON"),
                ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, "name is missing"),
                ({"role": "assistant", "tool_calls": "f"}, "must be a list")):
            r = await client.post("/v1/chat/completions", json={"messages": [*messages[:1], bad]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
            assert words in r.json()["error"]["message"]


def test_templates_without_tools_get_them_as_a_system_section():
    """SmolLM2's template ignores tools: they are listed in the Hermes format, calls and results
    rendered as text (a template that knows tools gets them as they are)."""

    class Tokenizer:
        chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

        def __init__(self):
            self.seen = None

        def apply_chat_template(self, messages, tools=None, **_):
            self.seen = (messages, tools)
            return "x"

        def encode(self, text, add_special_tokens=False):
            return [1]

    tok = Tokenizer()
    encoder = PromptEncoder(tok, 100, 100)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "X"}}}]},
               {"role": "tool", "content": "22 C", "tool_call_id": "c1"},
               {"role": "tool", "content": "windy", "tool_call_id": "c2"}]
    encoder.encode_chat(history, [WEATHER])
    messages, tools = tok.seen
    assert tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n") and "<tools>" in messages[0]["content"]
    assert json.dumps(WEATHER) in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "X"}}\n</tool_call>'
    assert messages[3]["content"] == "<tool_response>\n22 C\n</tool_response>\n<tool_response>\nwindy\n</tool_response>"

    tok.chat_template = "{% if tools %}{{ tools }}{% endif %}{% for m in messages %}{{ m.tool_calls }}{% endfor %}"
    encoder.encode_chat(history, [WEATHER])
    assert tok.seen == (history, [WEATHER])
    with pytest.raises(ValueError, match="content must be a string"):
        encoder.encode_chat([{"role": "user", "content": None}])


# ------------------------------------------------------------------ OpenAI answers


def _assembled(events: list) -> tuple[str, dict[int, dict], list[str]]:
    """(content, {index: {id, name, arguments}}, finish reasons) from chat chunks."""
    content, calls, reasons = "", {}, []
    for e in events:
        if e == "[DONE]" or not e["choices"]:
            continue
        choice = e["choices"][0]
        delta = oa.DeltaMessage.model_validate(choice["delta"])
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.id is not None:
                assert tc.index not in calls and tc.function.name and tc.type == "function"
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
            else:
                assert tc.function.name is None  # the name comes once, in the first delta
                calls[tc.index]["arguments"] += tc.function.arguments
        if choice["finish_reason"]:
            reasons.append(choice["finish_reason"])
    return content, calls, reasons


@pytest.mark.parametrize("reply, content, calls", [
    (HERMES_REPLY, "Let me check.", [("get_weather", {"city": "Paris"})]),
    ('<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": '
     '{"city": "Rome"}}]</tool_call>', None, [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome"})]),
    ('{"name": "add", "parameters": {"a": 5, "b": 6}}', None, [("add", {"a": 5, "b": 6})]),
    ('{"name": "unknown_fn", "parameters": {}}', '{"name": "unknown_fn", "parameters": {}}', []),
    ("The weather is sunny < 30 C, <tool maybe.", "The weather is sunny < 30 C, <tool maybe.", []),
])
async def test_auto_tool_calls_whole_and_streamed_agree(reply, content, calls):
    async with running_app(FakeEngine(reply=reply)) as (client, _, _):
        r = await _chat(client, tools=TOOLS)
        assert r.status_code == 200, r.text
        choice = oa.ChatCompletionResponse.model_validate(r.json()).choices[0]
        assert choice.message.content == content
        got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        assert got == calls
        assert all(c.id.startswith("call_") for c in choice.message.tool_calls or [])
        assert choice.finish_reason == ("tool_calls" if calls else "stop")

        r = await _chat(client, tools=TOOLS, stream=True)
        s_content, s_calls, reasons = _assembled(sse_events(r.text))
        assert s_content == (content or "")
        assert "<tool_call>" not in s_content or not calls
        assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(s_calls.items())] == calls
        assert reasons == [choice.finish_reason]


async def test_tool_choice_none_leaves_markup_as_content():
    async with running_app(FakeEngine(reply=HERMES_REPLY)) as (client, _, _):
        r = await _chat(client, tools=TOOLS, tool_choice="none")
        message = r.json()["choices"][0]["message"]
        assert message == {"role": "assistant", "content": HERMES_REPLY}


async def test_named_and_required_stream_the_arguments_in_pieces():
    named = {"type": "function", "function": {"name": "add"}}
    async with running_app(FakeEngine(reply='{"a": 12, "b": 30}')) as (client, _, _):
        r = await _chat(client, tools=TOOLS, tool_choice=named, stream=True)
        events = sse_events(r.text)
        content, calls, reasons = _assembled(events)
        assert content == "" and reasons == ["tool_calls"]
        assert calls[0]["name"] == "add" and json.loads(calls[0]["arguments"]) == {"a": 12, "b": 30}
        pieces = [e for e in events if e != "[DONE]" and e["choices"] and e["choices"][0]["delta"].get("tool_calls")]
        assert pieces[0]["choices"][0]["delta"]["tool_calls"][0]["function"] == {"name": "add", "arguments": ""}
        assert len(pieces) > 3  # arguments token by token, after the announcement
        full = (await _chat(client, tools=TOOLS, tool_choice=named)).json()["choices"][0]
        assert full["finish_reason"] == "tool_calls" and full["message"]["content"] is None
        assert full["message"]["tool_calls"][0]["function"] == {"name": "add", "arguments": calls[0]["arguments"]}

    reply = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]'
    async with running_app(FakeEngine(reply=reply)) as (client, _, _):
        r = await _chat(client, tools=TOOLS, tool_choice="required", stream=True)
        content, calls, reasons = _assembled(sse_events(r.text))
        assert content == "" and reasons == ["tool_calls"]
        assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
            ("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
        full = (await _chat(client, tools=TOOLS, tool_choice="required")).json()["choices"][0]
        assert [c["function"] for c in full["message"]["tool_calls"]] == [
            {"name": c["name"], "arguments": c["arguments"]} for _, c in sorted(calls.items())]


async def test_a_forced_call_cut_short_finishes_with_length():
    async with running_app(FakeEngine(reply='{"a": 12, "b": 30}')) as (client, _, _):
        r = await _chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                        max_tokens=2)
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"a": 12,'


async def test_n_choices_parse_independently():
    async with running_app(FakeEngine(reply=HERMES_REPLY)) as (client, _, _):
        r = await _chat(client, tools=TOOLS, n=2, stream=True)
        events = [e for e in sse_events(r.text) if e != "[DONE]"]
        for i in range(2):
            mine = [e for e in events if e["choices"] and e["choices"][0]["index"] == i]
            content, calls, reasons = _assembled(mine)
            assert content == "Let me check." and calls[0]["name"] == "get_weather" and reasons == ["tool_calls"]


# ------------------------------------------------------------------ Ollama


async def test_ollama_format_maps_to_the_constraint():
    async with running_app() as (client, _, engine):
        for fmt, expected in (("json", StructuredOutputs(json_object=True)),
                              (PERSON, StructuredOutputs(json=json.dumps(PERSON, separators=(",", ":")))),
                              ("", None)):
            engine.params.clear()
            r = await client.post("/api/chat", json={"messages": USER, "format": fmt, "stream": False})
            assert r.status_code == 200, r.text
            assert _structured(engine) == expected
            engine.params.clear()
            r = await client.post("/api/generate", json={"prompt": "x", "format": fmt, "stream": False})
            assert r.status_code == 200 and _structured(engine) == expected
        for bad in ("yaml", 5, ["json"]):
            r = await client.post("/api/chat", json={"messages": USER, "format": bad})
            assert r.status_code == 400 and "format" in r.json()["error"]


async def test_ollama_tool_calls_whole_and_streamed():
    async with running_app(FakeEngine(reply=HERMES_REPLY)) as (client, _, engine):
        r = await client.post("/api/chat", json={"messages": USER, "tools": TOOLS, "stream": False})
        assert r.status_code == 200, r.text
        body = ol.ChatResponse.model_validate(r.json())
        assert body.message.content == "Let me check."
        assert [c.model_dump() for c in body.message.tool_calls] == [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
        (tools,) = engine.tools.values()
        assert [t["function"]["name"] for t in tools] == ["get_weather", "add"]

        r = await client.post("/api/chat", json={"messages": USER, "tools": TOOLS})
        lines = ndjson_lines(r.text)
        assert lines[-1]["done"] is True and "tool_calls" not in lines[-1]["message"]
        content = "".join(line["message"]["content"] for line in lines)
        calls = [c for line in lines for c in line["message"].get("tool_calls", [])]
        assert content == "Let me check." and "<tool_call>" not in content
        assert calls == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]

        r = await client.post("/api/chat", json={"messages": USER, "tools": [{"type": "function", "function": {}}]})
        assert r.status_code == 400 and "name is missing" in r.json()["error"]


async def test_ollama_tool_messages():
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "22 C", "tool_name": "get_weather"}]
    async with running_app(FakeEngine(reply="22 C.")) as (client, _, engine):
        r = await client.post("/api/chat", json={"messages": messages, "tools": TOOLS, "stream": False})
        assert r.status_code == 200, r.text
        (prompt,) = engine.prompts.values()
        assert prompt[1]["tool_calls"] == [{"type": "function", "function": {"name": "get_weather",
                                                                             "arguments": {"city": "Paris"}}}]
        assert prompt[2] == {"role": "tool", "content": "22 C", "name": "get_weather"}
        r = await client.post("/api/chat", json={"messages": [{"role": "user", "content": "x", "tool_calls": [
            {"function": {"name": "f", "arguments": {}}}]}]})
        assert r.status_code == 400 and "assistant" in r.json()["error"]


# ------------------------------------------------------------------ parsers on crafted text


def _parse(plan, text: str, step: int) -> tuple[str | None, list[tuple[str, str]], str]:
    """Feed `text` in pieces of `step` characters; (content, [(name, arguments)], streamed content)."""
    session = ToolSession(plan, 1)
    deltas = []
    for k in range(0, len(text), step):
        deltas += session.openai_deltas(0, text[k:k + step], False)
    deltas += session.openai_deltas(0, "", True)
    streamed = "".join(d.get("content", "") for d in deltas)
    parser = session.parsers[0]
    return parser.content, [(c.name, c.arguments) for c in parser.calls], streamed


@pytest.mark.parametrize("text, content, calls", [
    ("<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>", None,
     [("add", '{"a": 1, "b": 2}')]),
    ('Sure.\n<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>\n<tool_call>{"name": "get_weather", '
     '"arguments": {"city": "Oslo"}}</tool_call>', "Sure.", [("add", '{"a": 1}'), ("get_weather", '{"city": "Oslo"}')]),
    ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call>', None, [("add", '{"a": 3}')]),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}', None, [("add", '{"a": 1}')]),  # EOS before the close
    ("<tool_call>not json</tool_call> then text", "<tool_call>not json</tool_call> then text", []),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}', None,
     [("get_weather", '{"city": "Lima"}')]),
    ('[{"name": "add", "parameters": {"a": 2}}]', None, [("add", '{"a": 2}')]),
    ('{"name": "add", "parameters": {"a": 2}} and more', '{"name": "add", "parameters": {"a": 2}} and more', []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ("plain text\n", "plain text", []),
    ("<tool_call", "<tool_call", []),
    ("", None, []),
])
@pytest.mark.parametrize("step", [1, 4, 1000])
def test_auto_parser_on_crafted_text(text, content, calls, step):
    got_content, got_calls, streamed = _parse(plan_tools(TOOLS), text, step)
    assert got_content == content
    assert got_calls == calls
    assert streamed == (content or "")


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_required_parser_any_key_order_and_nesting(step):
    text = '[{"arguments":{"city":"Pa,ri}s\\""},"name":"get_weather"},{"name":"add","arguments":{"a":[1,{"b":2}]}}]'
    _, calls, streamed = _parse(plan_tools(TOOLS, "required"), text, step)
    assert calls == [("get_weather", '{"city":"Pa,ri}s\\""}'), ("add", '{"a":[1,{"b":2}]}')]
    assert streamed == ""
    content, calls, streamed = _parse(plan_tools(TOOLS, "required"), "I will not call anything.", step)
    assert calls == [] and content == streamed == "I will not call anything."
