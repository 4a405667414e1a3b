"""Structured output and tool calling against a real `rillet serve` (default model, SmolLM2-135M),
driven by the openai SDK and the ollama package: constrained outputs validate, forced tool calls
always name a given tool with valid arguments, streamed equals whole, bad requests are 400s."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import jsonschema
import ollama
import openai
import pytest
from support import rillet_proc
from pydantic import BaseModel, ConfigDict, Field

from rillet.bench.schemas import SCHEMAS

KEY = rillet_proc.API_KEY
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send an email",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "string", "maxLength": 30}, "subject": {"type": "string", "maxLength": 30}},
            "required": ["to", "subject"]}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TOOL_PROMPTS = ["What is the weather in Paris?", "What is 17 plus 25?", "Email bob@example.com that I am late.",
                "Is it raining in Tokyo right now?"]


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def aclient_factory(real_server):
    return lambda: openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_every_schema_validates_at_temperature_0_7(aclient_factory, model):
    async def one(client, name, schema):
        res = await client.chat.completions.create(
            model=model, temperature=0.7, max_tokens=300, seed=len(name),
            messages=[{"role": "user", "content": f"Give an example {name.replace('_', ' ')} as JSON."}],
            response_format=_schema_format(name, schema))
        return name, schema, res.choices[0]

    async def main():
        client = aclient_factory()
        try:
            return await asyncio.gather(*(one(client, n, s) for n, s in SCHEMAS))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == len(SCHEMAS) >= 30
    for name, schema, choice in results:
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_streamed_equals_whole_for_greedy_constrained_output(client, model):
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    for name, schema in SCHEMAS[:3]:
        kwargs = dict(model=model, messages=messages, temperature=0, max_tokens=200,
                      response_format=_schema_format(name, schema))
        whole = client.chat.completions.create(**kwargs).choices[0].message.content
        chunks = client.chat.completions.create(**kwargs, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole
        jsonschema.validate(json.loads(whole), schema)
    # a forced tool call: the streamed pieces assemble to the whole answer's call
    kwargs = dict(model=model, messages=[{"role": "user", "content": TOOL_PROMPTS[0]}], temperature=0,
                  max_tokens=100, tools=TOOLS, tool_choice="required")
    whole = client.chat.completions.create(**kwargs).choices[0]
    names, args = {}, {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if tc.function.name:
                names[tc.index] = tc.function.name
            args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == [
        (names[i], args[i]) for i in sorted(names)]


def test_tool_choice_required_always_calls_a_given_tool_with_valid_arguments(aclient_factory, model):
    # Seeded (a seeded request is reproducible whatever its batch on the CPU in bf16): unseeded,
    # about one run in tens sampled arguments that ran to max_tokens (finish_reason "length").
    async def one(client, prompt, parallel, seed):
        res = await client.chat.completions.create(
            model=model, temperature=0.7, max_tokens=150, messages=[{"role": "user", "content": prompt}],
            tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel, seed=seed)
        return res.choices[0]

    async def main():
        client = aclient_factory()
        try:
            cases = [(p, parallel) for p in TOOL_PROMPTS for parallel in (True, False)]
            return await asyncio.gather(*(one(client, p, parallel, 100 + i) for i, (p, parallel) in enumerate(cases)))
        finally:
            await client.close()

    for choice in asyncio.run(main()):
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls and choice.message.content is None
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_named_tool_choice(client, model):
    for name in PARAMETERS:
        res = client.chat.completions.create(
            model=model, temperature=0.7, max_tokens=150, messages=[{"role": "user", "content": TOOL_PROMPTS[1]}],
            tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}})
        choice = res.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == name
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[name])


def test_auto_answers_are_content_or_calls_without_markup(client, model):
    """Whether a 135M model calls a tool is its choice; either way the answer is well formed."""
    for prompt in TOOL_PROMPTS[:2]:
        for stream in (False, True):
            kwargs = dict(model=model, temperature=0, max_tokens=80, messages=[{"role": "user", "content": prompt}],
                          tools=TOOLS)
            if stream:
                chunks = list(client.chat.completions.create(**kwargs, stream=True))
                content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
                assert reason == (["tool_calls"] if calls else reason) and len(reason) == 1
            else:
                choice = client.chat.completions.create(**kwargs).choices[0]
                content, calls = choice.message.content or "", choice.message.tool_calls or []
                for call in calls:
                    assert call.function.name in PARAMETERS
                    json.loads(call.function.arguments)
            assert "<tool_call>" not in content and "</tool_call>" not in content
    # the answer to a tool result, through the template that does not know tools
    res = client.chat.completions.create(model=model, temperature=0, max_tokens=30, tools=TOOLS, messages=[
        {"role": "user", "content": TOOL_PROMPTS[0]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21, "sky": "clear"}'}])
    assert res.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert res.usage.prompt_tokens > 150  # the tools section and the tool result were rendered


class Weather(BaseModel):
    # closed here as OpenAI's strict mode wants it; rillet closes open objects itself too (Country)
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=20)
    temperature_c: int = Field(ge=-50, le=60)
    sunny: bool


def test_openai_sdk_parse_with_a_pydantic_model(client, model):
    res = client.chat.completions.parse(model=model, temperature=0.7, max_tokens=100, response_format=Weather,
                                        messages=[{"role": "user", "content": "Weather report for Oslo."}])
    parsed = res.choices[0].message.parsed
    assert isinstance(parsed, Weather)
    assert Weather.model_validate_json(res.choices[0].message.content) == parsed


def test_completions_and_structured_outputs_extras(client, model):
    res = client.completions.create(model=model, prompt="Is the sky blue? Answer:", max_tokens=10, temperature=0.7,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert res.choices[0].text in ("yes", "no")
    res = client.chat.completions.create(model=model, max_tokens=20, temperature=0.7,
                                         messages=[{"role": "user", "content": "A US zip code?"}],
                                         extra_body={"guided_regex": "[0-9]{5}"})
    assert len(res.choices[0].message.content) == 5 and res.choices[0].message.content.isdigit()
    res = client.chat.completions.create(model=model, max_tokens=100, temperature=0,
                                         messages=[{"role": "user", "content": "Reply with a JSON object."}],
                                         response_format={"type": "json_object"})
    assert res.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(res.choices[0].message.content), dict)


@pytest.mark.parametrize("kwargs, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "schema"),
    ({"extra_body": {"structured_outputs": {"regex": "("}}}, "compile"),
    ({"extra_body": {"structured_outputs": {"grammar": "start: missing_rule"}}}, "compile"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]}, "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "parameters"),
    ({"tool_choice": "required"}, "tools"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "only one"),
])
def test_bad_requests_are_400(client, model, kwargs, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                                       **kwargs)
    assert info.value.status_code == 400 and words in info.value.message


class Country(BaseModel):
    """Ollama's documented pattern: a plain pydantic model, its schema sent as it is (objects open)."""

    name: str = Field(max_length=20)
    capital: str = Field(max_length=20)
    languages: list[Annotated[str, Field(max_length=15)]] = Field(max_length=3)


def test_ollama_package_format_and_tools(real_server, model):
    oc = ollama.Client(host=real_server.url, headers={"Authorization": f"Bearer {KEY}"})
    res = oc.chat(model=model, messages=[{"role": "user", "content": "Weather report for Oslo."}],
                  format=Weather.model_json_schema(), options={"temperature": 0.7, "num_predict": 100})
    Weather.model_validate_json(res.message.content)
    # An open schema is read as closed (as llama.cpp's grammar does for Ollama): greedy SmolLM2
    # otherwise adds keys of its own until num_predict.
    assert "additionalProperties" not in Country.model_json_schema()
    res = oc.chat(model=model, messages=[{"role": "user", "content": "Tell me about Canada, with more details."}],
                  format=Country.model_json_schema(), options={"temperature": 0, "num_predict": 150})
    assert res.done_reason == "stop", res.message.content
    assert list(json.loads(res.message.content)) == ["name", "capital", "languages"]
    chunks = list(oc.chat(model=model, messages=[{"role": "user", "content": "Reply with a JSON object."}],
                          format="json", stream=True, options={"temperature": 0, "num_predict": 100}))
    assert chunks[-1].done_reason == "stop"
    assert isinstance(json.loads("".join(c.message.content for c in chunks)), dict)

    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
          a: The first integer
          b: The second integer
        """
        return a + b

    for stream in (False, True):
        out = oc.chat(model=model, messages=[{"role": "user", "content": "What is 17 plus 25?"}],
                      tools=[add, TOOLS[0]], stream=stream, options={"temperature": 0, "num_predict": 60})
        parts = list(out) if stream else [out]
        for part in parts:
            for call in part.message.tool_calls or []:
                assert call.function.name in ("add", "get_weather")
                assert isinstance(call.function.arguments, dict)
            assert "<tool_call>" not in (part.message.content or "")
    # a conversation holding a call and its result
    res = oc.chat(model=model, tools=[add], options={"temperature": 0, "num_predict": 20}, messages=[
        {"role": "user", "content": "What is 17 plus 25?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add",
                                                                          "arguments": {"a": 17, "b": 25}}}]},
        {"role": "tool", "content": "42", "tool_name": "add"}])
    assert res.done and res.prompt_eval_count > 150
    with pytest.raises(ollama.ResponseError) as info:  # a schema the engine cannot compile
        oc.chat(model=model, messages=[{"role": "user", "content": "x"}], format={"type": "nonsense"})
    assert info.value.status_code == 400 and "schema" in str(info.value)
