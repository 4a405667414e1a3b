"""OpenAI routes in-process against the fake engine: shapes, parameters, errors."""

from __future__ import annotations

import asyncio

import pytest
from support.asgi_app import running_app, sse_events, wait_for
from support.fakes import FakeEngine

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
        r = await client.post("/v1/completions", json={"prompt": ["a", ""]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


async def test_completions_of_a_list_of_prompts_number_choices_prompt_by_prompt():
    async with running_app() as (client, _, engine):
        body = {"prompt": ["Once upon", "Far away"], "n": 2, "max_tokens": 4, "echo": True, "logprobs": 1}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        answer = oa.CompletionResponse.model_validate(r.json())
        assert [c.index for c in answer.choices] == [0, 1, 2, 3]
        assert [c.text for c in answer.choices] == ["Once upon" + "Hello from the fake "] * 2 + \
            ["Far away" + "Hello from the fake "] * 2
        assert [c.logprobs["text_offset"][0] for c in answer.choices] == [len("Once upon")] * 2 + [len("Far away")] * 2
        assert answer.usage.completion_tokens == 4 * 4
        assert answer.usage.prompt_tokens == answer.usage.total_tokens - 16 == 4  # two words a prompt
        r = await client.post("/v1/completions", json={"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 2})
        assert [c.text for c in oa.CompletionResponse.model_validate(r.json()).choices] == ["Hello from "] * 2
        assert r.json()["usage"]["prompt_tokens"] == 5

        r = await client.post("/v1/completions", json={**body, "echo": False, "stream": True,
                                                       "stream_options": {"include_usage": True}})
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = [oa.CompletionChunk.model_validate(e) for e in events[:-1]]
        texts: dict[int, str] = {}
        for chunk in chunks[:-1]:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
        assert texts == {i: "Hello from the fake " for i in range(4)}
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
        assert len(engine.prompts) == 6 and not engine.streams  # every engine request ended


async def test_a_refused_prompt_of_a_list_ends_the_prompts_admitted_before_it():
    async with running_app(FakeEngine(max_model_len=32)) as (client, _, engine):
        r = await client.post("/v1/completions", json={"prompt": ["short", "word " * 40, "never"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert list(engine.prompts.values()) == ["short"] and not engine.streams  # admitted, then aborted


async def test_an_engine_failure_mid_list_ends_the_prompts_admitted_before_it():
    engine = FakeEngine()
    add_request = engine.add_request

    async def fails_on_the_second(prompt, params, request_id=None, **kwargs):
        if len(engine.prompts) == 1:
            raise RuntimeError("the engine broke")
        return await add_request(prompt, params, request_id, **kwargs)

    engine.add_request = fails_on_the_second
    async with running_app(engine) as (client, _, _):
        r = await client.post("/v1/completions", json={"prompt": ["first", "second"]})
        assert r.status_code == 500 and "the engine broke" not in r.text
        assert list(engine.prompts.values()) == ["first"] and not engine.streams  # admitted, then aborted


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


async def test_null_content_is_400_except_an_assistants():
    """As OpenAI: a user, system or tool message needs its text; an assistant's may be null."""
    async with running_app() as (client, _, engine):
        for role in ("user", "system", "developer", "tool"):
            r = await client.post("/v1/chat/completions", json={"messages": [
                {"role": role, "content": None, "tool_call_id": "c1"}, {"role": "user", "content": "hi"}]})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "messages" and "messages[0].content is null" in r.text
        assert not engine.prompts
        r = await client.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
            {"role": "user", "content": "again"}]})
        assert r.status_code == 200, r.text


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


def assert_openai_400(r, param=None, fragment=""):
    """A 400 in OpenAI's error shape; `param` and a piece of the message checked where given."""
    assert r.status_code == 400, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    assert fragment.lower() in error["message"].lower(), error
    return error


async def test_prompt_too_long_400_and_max_tokens_beyond_the_context_400_with_the_numbers():
    """Issue 14: prompt + max_tokens beyond the context was silently clamped (200, holding a slot).
    OpenAI and vLLM answer 400 stating the limit; so does rillet, and nothing is queued."""
    engine = FakeEngine(max_model_len=32)
    async with running_app(engine) as (client, _, _):
        r = await client.post("/v1/completions", json={"prompt": "word " * 40})
        assert assert_openai_400(r, "prompt")["code"] == "context_length_exceeded"
        r = await client.post("/v1/completions", json={"prompt": "word " * 28, "max_tokens": 100,
                                                       "ignore_eos": True})
        error = assert_openai_400(r, "prompt", "This model's maximum context length is 32 tokens. However, you "
                                               "requested 128 tokens (28 in the prompt, 100 in the completion)")
        assert error["code"] == "context_length_exceeded"
        # chat: max_tokens, and max_completion_tokens, counted against the templated messages
        chat = {"messages": [{"role": "user", "content": "word " * 20}]}
        num_prompt = engine.num_tokens([{"role": "user", "content": "word " * 20}])
        for field in ("max_tokens", "max_completion_tokens"):
            r = await client.post("/v1/chat/completions", json={**chat, field: 10**9})
            error = assert_openai_400(r, "messages", f"you requested {num_prompt + 10**9} tokens ({num_prompt} in "
                                                     f"the messages, {10**9} in the completion)")
            assert error["code"] == "context_length_exceeded"
        r = await client.post("/v1/chat/completions", json={**chat, "max_tokens": 32 - num_prompt + 1, "stream": True})
        assert_openai_400(r, "messages", "maximum context length is 32")  # before the stream starts
        assert engine.params == {}  # none of them reached the engine's queue
        # exactly the room left: accepted
        r = await client.post("/v1/completions", json={"prompt": "word " * 28, "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200, r.text
        # no max_tokens: up to the context, which ends the answer ("length")
        r = await client.post("/v1/completions", json={"prompt": "word " * 28, "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 32


async def test_token_ids_outside_the_vocabulary_are_400():
    """Issue 14: logit_bias keys past the vocabulary were accepted (and silently ignored by the sampler)."""
    engine = FakeEngine()  # vocabulary 0..999
    async with running_app(engine) as (client, _, _):
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": "hi"})):
            for bias in ({"1000": 5}, {"5": 1, "99999999999999999999999": -100}):
                r = await client.post(path, json={**body, "logit_bias": bias})
                assert_openai_400(r, "logit_bias", "outside the vocabulary (0..999)")
            r = await client.post(path, json={**body, "stop_token_ids": [2, 10**12]})
            assert_openai_400(r, "stop_token_ids", "outside the vocabulary (0..999)")
            r = await client.post(path, json={**body, "logit_bias": {"-1": 5}})
            assert_openai_400(r, "logit_bias", "token ids >= 0")
            r = await client.post(path, json={**body, "logit_bias": {"999": 100}, "stop_token_ids": [0, 999]})
            assert r.status_code == 200, r.text


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
COMP = {"prompt": "hi"}

# Every numeric and id-like field of both OpenAI routes, out of range: (route body, field values, param)
HOSTILE_OPENAI = [
    (CHAT, {"max_tokens": 0}, "max_tokens"),
    (CHAT, {"max_tokens": -1}, "max_tokens"),
    (CHAT, {"max_completion_tokens": 0}, "max_completion_tokens"),
    (COMP, {"max_tokens": 10**30}, "prompt"),  # beyond the context: context_length_exceeded
    (CHAT, {"max_completion_tokens": 10**30}, "messages"),
    (CHAT, {"n": 0}, "n"),
    (COMP, {"n": 17}, "n"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs"),
    (COMP, {"logprobs": 21}, "logprobs"),
    (COMP, {"logprobs": -1}, "logprobs"),
    (CHAT, {"logit_bias": {"1": 101}}, "logit_bias"),
    (CHAT, {"logit_bias": {"x": 1}}, "logit_bias"),
    (COMP, {"logit_bias": {"1000": 1}}, "logit_bias"),
    (CHAT, {"seed": 2**63, "temperature": 1}, "seed"),
    (CHAT, {"seed": -(2**63) - 1}, "seed"),
    (COMP, {"stop": ["x"] * 65}, "stop"),
    (COMP, {"stop": ["y" * 1025]}, "stop"),
    (COMP, {"stop": ""}, "stop"),
    (COMP, {"stop_token_ids": [-1]}, "stop_token_ids"),
    (COMP, {"stop_token_ids": [1000]}, "stop_token_ids"),
    (CHAT, {"temperature": -0.1}, "temperature"),
    (CHAT, {"temperature": 101}, "temperature"),
    (CHAT, {"top_p": 0}, "top_p"),
    (CHAT, {"top_p": 1.01}, "top_p"),
    (CHAT, {"top_k": -2}, "top_k"),
    (CHAT, {"min_p": -0.1}, "min_p"),
    (CHAT, {"min_p": 1.1}, "min_p"),
    (CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
    (CHAT, {"repetition_penalty": 10.5}, "repetition_penalty"),
    (CHAT, {"frequency_penalty": 2.1}, "frequency_penalty"),
    (CHAT, {"presence_penalty": -2.1}, "presence_penalty"),
    (COMP, {"best_of": 3}, "best_of"),
]


@pytest.mark.parametrize("body, fields, param", HOSTILE_OPENAI,
                         ids=[f"{'chat' if 'messages' in b else 'comp'}-{next(iter(f))}={next(iter(f.values()))!r}"[:60]
                              for b, f, _ in HOSTILE_OPENAI])
async def test_out_of_range_fields_are_400_in_openai_shape(body, fields, param):
    engine = FakeEngine(max_model_len=64)
    async with running_app(engine) as (client, _, _):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        for stream in (False, True):
            r = await client.post(path, json={**body, **fields, "stream": stream})
            error = assert_openai_400(r, param)
            assert error["message"].lower().startswith(param) or param in ("prompt", "messages"), error
        assert engine.params == {}


async def test_refused_requests_do_not_disturb_running_streams():
    engine = FakeEngine(max_model_len=64, token_delay_s=0.01)
    async with running_app(engine) as (client, _, _):
        streams = [asyncio.ensure_future(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
                   for _ in range(3)]
        await wait_for(lambda: engine.running == 3)
        for body, fields, param in HOSTILE_OPENAI:
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            assert_openai_400(await client.post(path, json={**body, **fields}), param)
        for r in await asyncio.gather(*streams):
            assert r.status_code == 200
            events = sse_events(r.text)
            assert events[-1] == "[DONE]"
            assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == REPLY


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
