"""Ollama routes in-process against the fake engine."""

from __future__ import annotations

import pytest
from support.asgi_app import ndjson_lines, running_app
from support.fakes import FakeEngine

from rillet.protocol import ollama as ol

pytestmark = pytest.mark.anyio

REPLY = "Hello from the fake engine, one token at a time."
DURATIONS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
             "eval_duration")


async def test_chat_streams_ndjson_by_default():
    async with running_app() as (client, _, _):
        r = await client.post("/api/chat", json={"model": "fake-model",
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert r.headers["cache-control"] == "no-cache"
        lines = ndjson_lines(r.text)
        assert all(not line["done"] for line in lines[:-1])
        assert "".join(line["message"]["content"] for line in lines) == REPLY
        final = ol.ChatResponse.model_validate(lines[-1])
        assert final.done and final.done_reason == "stop"
        assert final.eval_count == 10 and final.prompt_eval_count > 0
        for key in DURATIONS:
            assert isinstance(lines[-1][key], int) and lines[-1][key] >= 0, key
        assert lines[-1]["total_duration"] >= lines[-1]["eval_duration"]


async def test_chat_non_streaming_and_latest_tag():
    async with running_app() as (client, _, _):
        r = await client.post("/api/chat", json={"model": "fake-model:latest", "stream": False,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        body = ol.ChatResponse.model_validate(r.json())
        assert body.message.content == REPLY and body.done_reason == "stop"


async def test_generate_system_raw_and_options():
    async with running_app() as (client, _, engine):
        r = await client.post("/api/generate", json={
            "model": "fake-model", "prompt": "hi", "system": "be brief", "stream": False,
            "options": {"temperature": 0, "top_p": 0.5, "top_k": 3, "min_p": 0.1, "num_predict": 4,
                        "stop": ["zzz"], "seed": 1, "repeat_penalty": 1.2, "frequency_penalty": 0.3,
                        "presence_penalty": 0.4, "num_ctx": 2048}})
        assert r.status_code == 200, r.text
        body = ol.GenerateResponse.model_validate(r.json())
        assert body.response == "Hello from the fake " and body.done_reason == "length"
        (rid,) = engine.params
        p = engine.params[rid]
        assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.stop, p.seed) == \
            (0.0, 0.5, 3, 0.1, 4, ["zzz"], 1)
        assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.2, 0.3, 0.4)
        assert engine.prompts[rid] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        r = await client.post("/api/generate", json={"model": "fake-model", "prompt": "raw text", "raw": True,
                                                     "options": {"num_predict": -1}})
        lines = ndjson_lines(r.text)
        assert "".join(line["response"] for line in lines) == REPLY
        rid = [k for k in engine.params if k != rid][0]
        assert engine.prompts[rid] == "raw text"
        assert engine.params[rid].max_tokens is None


async def test_empty_requests_load_the_model():
    async with running_app() as (client, _, _):
        r = await client.post("/api/generate", json={"model": "fake-model"})
        assert r.json()["done_reason"] == "load"
        r = await client.post("/api/chat", json={"model": "fake-model", "messages": []})
        assert r.json()["done_reason"] == "load"


async def test_errors_are_ollama_shaped():
    async with running_app() as (client, _, _):
        r = await client.post("/api/chat", json={"model": "llama9", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and set(r.json()) == {"error"}
        r = await client.post("/api/chat", json={"model": "fake-model", "messages": "x"})
        assert r.status_code == 400 and isinstance(r.json()["error"], str)
        r = await client.post("/api/generate", json={"prompt": "x", "options": {"temperature": -2}})
        assert r.status_code == 400 and "temperature" in r.json()["error"]
        r = await client.post("/api/generate", json={"prompt": "x", "format": "yaml"})
        assert r.status_code == 400 and "format" in r.json()["error"]
        # what rillet cannot honour is refused, not ignored: images, fill-in-the-middle, a Go template
        for field, value, fragment in (("images", ["AAAA"], "images"), ("suffix", "}", "does not support insert"),
                                       ("template", "{{ .Prompt }}", "template")):
            r = await client.post("/api/generate", json={"prompt": "x", field: value})
            assert r.status_code == 400 and fragment in r.json()["error"], (field, r.text)
        r = await client.post("/api/generate", json={"prompt": "x", "suffix": "", "template": "", "stream": False})
        assert r.status_code == 200  # empty: as if absent
        r = await client.get("/api/nope")
        assert r.status_code == 404 and isinstance(r.json()["error"], str)


async def test_error_mid_stream_is_a_final_error_line():
    async with running_app(FakeEngine(fail_after=2)) as (client, _, _):
        r = await client.post("/api/generate", json={"prompt": "x"})
        lines = ndjson_lines(r.text)
        assert lines[-1] == {"error": "simulated engine failure", "done": True}
        assert "".join(line.get("response", "") for line in lines[:-1]) == "Hello from "


async def test_tags_version_show_ps():
    async with running_app() as (client, _, _):
        tags = ol.TagsResponse.model_validate((await client.get("/api/tags")).json())
        assert [m.name for m in tags.models] == ["fake-model"]
        assert (await client.get("/api/version")).json()["version"]
        show = (await client.post("/api/show", json={"model": "fake-model"})).json()
        # read from the model the fake's config names (the embedded default, SmolLM2-135M: a llama)
        assert show["model_info"]["llama.context_length"] == 512
        assert show["details"]["family"] == "llama" and show["details"]["families"] == ["llama"]
        assert show["model_info"]["general.parameter_count"] > 100_000_000
        assert show["details"]["parameter_size"].endswith("M") and show["details"]["format"] == "gguf"
        assert show["model_info"]["llama.block_count"] > 0
        assert (await client.post("/api/show", json={"model": "x"})).status_code == 404
        assert (await client.get("/api/ps")).json()["models"][0]["name"] == "fake-model"


def assert_ollama_400(r, fragment: str = "") -> str:
    """A 400 in Ollama's shape: {"error": "..."} and nothing else."""
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert fragment.lower() in body["error"].lower(), body
    return body["error"]


async def test_num_predict_beyond_the_context_is_400_with_the_numbers():
    """Issue 14: num_predict past the context was clamped (200, holding a slot) instead of refused."""
    engine = FakeEngine(max_model_len=32)
    async with running_app(engine) as (client, _, _):
        messages = [{"role": "user", "content": "word " * 10}]
        num_prompt = engine.num_tokens(messages)
        for stream in (True, False):
            r = await client.post("/api/chat", json={"messages": messages, "stream": stream,
                                                     "options": {"num_predict": 1000}})
            assert_ollama_400(r, f"maximum context length is 32 tokens. However, you requested {num_prompt + 1000} "
                                 f"tokens ({num_prompt} in the messages, 1000 in the completion)")
            r = await client.post("/api/generate", json={"prompt": "word " * 10, "raw": True, "stream": stream,
                                                         "options": {"num_predict": 10**12}})
            assert_ollama_400(r, "in the prompt")
        assert engine.params == {}
        for num_predict in (-1, -2, 32 - num_prompt):  # up to the context, or exactly the room left
            r = await client.post("/api/chat", json={"messages": messages, "stream": False,
                                                     "options": {"num_predict": num_predict}})
            assert r.status_code == 200, r.text


@pytest.mark.parametrize("options, fragment", [
    ({"num_predict": 0}, "num_predict"),
    ({"num_ctx": -1}, "num_ctx"),
    ({"num_ctx": "big"}, "num_ctx"),
    ({"top_k": -2}, "top_k"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_p": -1}, "min_p"),
    ({"temperature": -1}, "temperature"),
    ({"seed": 2**64}, "seed"),
    ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"stop": ["x"] * 65}, "stop"),
    ({"num_predict": 10**30}, "maximum context length"),
])
async def test_out_of_range_options_are_400_in_ollama_shape(options, fragment):
    engine = FakeEngine(max_model_len=64)
    async with running_app(engine) as (client, _, _):
        for path, body in (("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/api/generate", {"prompt": "hi"})):
            assert_ollama_400(await client.post(path, json={**body, "options": options}), fragment)
        assert engine.params == {}


async def test_num_ctx_and_seed_follow_ollama():
    """num_ctx past the server's context is served within it (Ollama caps it to the model's); seed -1
    is Ollama's "random"."""
    engine = FakeEngine(max_model_len=64)
    async with running_app(engine) as (client, _, _):
        for options, seed in (({"num_ctx": 10**9, "seed": -1}, None), ({"num_ctx": 0, "seed": 7}, 7), ({}, None)):
            r = await client.post("/api/generate", json={"prompt": "hi", "stream": False, "options": options})
            assert r.status_code == 200, r.text
            assert list(engine.params.values())[-1].seed == seed
