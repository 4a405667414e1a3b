"""OpenAI routes in-process against the fake engine: shapes, parameters, errors."""

from __future__ import annotations

import asyncio

import pytest
from conftest import running_app, sse_events, wait_for
from fakes import FakeEngine

from rillet.protocol import openai as oa

pytestmark = pytest.mark.anyio

REPLY = "Hello from the fake engine, one token at a time."


async def test_models():
    async with running_app() as (client, _, _):
        r = await client.get("/v1/models")
        assert r.status_code == 200
        body = oa.ModelList.model_validate(r.json())
        assert [m.id for m in body.data] == ["fake-model"]
        assert (await client.get("/v1/models/fake-model")).json()["id"] == "fake-model"
        r = await client.get("/v1/models/nope")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"


async def test_chat_non_streaming_shape_and_usage():
    async with running_app() as (client, _, engine):
        r = await client.post("/v1/chat/completions", json={
            "model": "fake-model", "messages": [{"role": "user", "content": "hi there"}]})
        assert r.status_code == 200, r.text
        body = oa.ChatCompletionResponse.model_validate(r.json())
        assert body.choices[0].message.content == REPLY
        assert body.choices[0].finish_reason == "stop"
        assert body.usage.completion_tokens == 10
        assert body.usage.prompt_tokens > 0
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
        assert body.id.startswith("chatcmpl-")
        # max_tokens absent: the room left in the context
        (params,) = engine.params.values()
        assert params.max_tokens is None


async def test_chat_streaming_chunks():
    async with running_app() as (client, _, _):
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = [oa.ChatCompletionChunk.model_validate(e) for e in events[:-1]]
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == REPLY
        finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
        assert all(c.usage is None for c in chunks[:-1])
        assert len({c.id for c in chunks}) == 1


async def test_chat_content_parts_and_developer_role():
    async with running_app() as (client, _, engine):
        r = await client.post("/v1/chat/completions", json={"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]})
        assert r.status_code == 200, r.text
        (prompt,) = engine.prompts.values()
        assert prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
        r = await client.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "messages"


async def test_sampling_parameters_reach_the_engine():
    async with running_app() as (client, _, engine):
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3, "max_tokens": 99,
            "temperature": 0.5, "top_p": 0.9, "n": 2, "stop": "xyz", "seed": 7, "frequency_penalty": 0.1,
            "presence_penalty": 0.2, "logit_bias": {"12": 1.5}, "logprobs": True, "top_logprobs": 2,
            "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True, "stop_token_ids": [3]})
        assert r.status_code == 200, r.text
        (p,) = engine.params.values()
        assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed) == (3, 0.5, 0.9, 2, ["xyz"], 7)
        assert (p.frequency_penalty, p.presence_penalty, p.logit_bias) == (0.1, 0.2, {12: 1.5})
        assert (p.logprobs, p.top_k, p.min_p, p.repetition_penalty, p.ignore_eos, p.stop_token_ids) == \
            (2, 5, 0.05, 1.1, True, [3])
        body = r.json()
        assert [c["index"] for c in body["choices"]] == [0, 1]
        assert all(c["finish_reason"] == "length" for c in body["choices"])
        content = body["choices"][0]["logprobs"]["content"]
        assert len(content) == 3 and len(content[0]["top_logprobs"]) == 2
        assert body["usage"]["completion_tokens"] == 6


async def test_stop_string_and_n_streaming():
    async with running_app() as (client, _, _):
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "stop": ["engine"], "n": 2, "stream": True})
        events = sse_events(r.text)
        texts = {0: "", 1: ""}
        reasons = {}
        for e in events[:-1]:
            for c in e["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
                if c["finish_reason"]:
                    reasons[c["index"]] = (c["finish_reason"], c.get("stop_reason"))
        assert texts == {0: "Hello from the fake ", 1: "Hello from the fake "}
        assert reasons == {0: ("stop", "engine"), 1: ("stop", "engine")}


async def test_completions_streaming_and_not():
    async with running_app() as (client, _, _):
        r = await client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 4, "echo": True,
                                                       "logprobs": 1})
        assert r.status_code == 200, r.text
        body = oa.CompletionResponse.model_validate(r.json())
        assert body.choices[0].text == "Once upon" + "Hello from the fake "
        assert body.choices[0].finish_reason == "length"
        assert body.choices[0].logprobs["text_offset"][0] == len("Once upon")
        assert body.usage.completion_tokens == 4
        r = await client.post("/v1/completions", json={"prompt": ["Once upon"], "stream": True})
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = [oa.CompletionChunk.model_validate(e) for e in events[:-1]]
        assert "".join(c.choices[0].text for c in chunks) == REPLY
        assert chunks[-1].choices[0].finish_reason == "stop"
        r = await client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
        assert r.status_code == 200
        r = await client.post("/v1/completions", json={"prompt": ["a", "b"]})
        assert r.status_code == 400


@pytest.mark.parametrize("payload,param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"presence_penalty": 3}, "presence_penalty"),
])
async def test_invalid_parameters_are_400_naming_the_field(payload, param):
    async with running_app() as (client, _, _):
        r = await client.post("/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "hi"}], **payload})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error"
        assert err["param"] == param
        assert set(err) == {"message", "type", "param", "code"}


async def test_schema_errors_are_422_and_bad_json_400():
    async with running_app() as (client, _, _):
        r = await client.post("/v1/chat/completions", json={"messages": "nope"})
        assert r.status_code == 422
        assert r.json()["error"]["param"] == "messages"
        r = await client.post("/v1/chat/completions", content=b"{not json",
                              headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert "JSON" in r.json()["error"]["message"]
        r = await client.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 400


async def test_unknown_model_404_and_missing_model_ok():
    async with running_app() as (client, _, _):
        r = await client.post("/v1/chat/completions", json={"model": "gpt-9",
                                                            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        r = await client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
        assert r.status_code == 404


async def test_prompt_too_long_400_and_max_tokens_clamped():
    engine = FakeEngine(max_model_len=32)
    async with running_app(engine) as (client, _, _):
        r = await client.post("/v1/completions", json={"prompt": "word " * 40})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"
        # prompt fits, prompt + max_tokens does not: generation stops at the context ("length")
        r = await client.post("/v1/completions", json={"prompt": "word " * 28, "max_tokens": 100,
                                                       "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 32


async def test_engine_error_mid_stream_is_a_terminal_error_event():
    engine = FakeEngine(fail_after=3)
    async with running_app(engine) as (client, app, _):
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "stream": True})
        assert r.status_code == 200
        events = sse_events(r.text)
        assert "[DONE]" not in events
        assert events[-1]["error"]["message"] == "simulated engine failure"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hello from the "
        # non-streaming: a clean 503 body
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "simulated engine failure"
        metrics = (await client.get("/metrics")).text
        assert "rillet:request_error_total 2.0" in metrics


async def test_engine_crash_mid_stream_is_a_terminal_error_event():
    engine = FakeEngine(raise_after=2)
    async with running_app(engine) as (client, _, _):
        r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
        events = sse_events(r.text)
        assert "simulated engine crash" in events[-1]["error"]["message"]
        assert "[DONE]" not in events
        r = await client.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503


async def test_queue_timeout_is_a_clear_error():
    engine = FakeEngine(max_num_seqs=1, queue_timeout_s=0.05, token_delay_s=0.05)
    async with running_app(engine) as (client, _, _):
        first = asyncio.create_task(client.post("/v1/completions", json={"prompt": "a", "max_tokens": 5}))
        await wait_for(lambda: engine.running == 1)
        second = await client.post("/v1/completions", json={"prompt": "b", "stream": True})
        events = sse_events(second.text)
        assert "[DONE]" not in events
        assert "waited more than" in events[-1]["error"]["message"]
        assert (await first).status_code == 200


async def test_nulls_mean_defaults():
    async with running_app() as (client, _, engine):
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "stream": None, "n": None, "logprobs": None,
            "max_tokens": None, "temperature": None, "stop": None, "ignore_eos": None, "seed": None})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == REPLY
        r = await client.post("/api/generate", json={"prompt": "x", "stream": None, "raw": None})
        assert r.headers["content-type"].startswith("application/x-ndjson")
