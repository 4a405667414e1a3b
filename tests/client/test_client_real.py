"""rillet.Client / rillet.AsyncClient against a real `rillet serve` subprocess (default model)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pydantic
import pytest

from rillet.client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    NotFoundError,
    RateLimitError,
)

LONG = dict(max_tokens=1500, ignore_eos=True)  # an answer that cannot finish before the test leaves it


@pytest.fixture
def client(server):
    with Client(server.url, api_key=server.api_key, timeout=120) as c:
        yield c


def test_models_and_health(server, client):
    assert client.health()["status"] in ("ok", "ready")
    models = client.models()
    assert models and isinstance(models[0], str)

    async def main():
        async with AsyncClient(server.url, api_key=server.api_key, api="ollama") as ac:
            return await ac.models(), await ac.health()

    ollama_models, health = asyncio.run(main())
    assert ollama_models[0] == models[0] and health["status"] in ("ok", "ready")


def test_sync_openai_chat_stream_matches_non_stream(client):
    params = dict(max_tokens=12, temperature=0, seed=7)
    with client.chat("Name three colours.", stream=True, **params) as stream:
        deltas = list(stream)
    assert stream.text and stream.text == "".join(d.text for d in deltas)
    assert sum(1 for d in deltas if d.text) >= 2  # it really streamed
    assert stream.finish_reason in ("stop", "length")
    assert deltas[-1].usage is not None and 1 <= stream.usage.completion_tokens <= 12
    whole = client.chat([{"role": "user", "content": "Name three colours."}], **params)
    assert whole.text == stream.text and whole.usage.completion_tokens == stream.usage.completion_tokens
    assert whole.model == client.model


def test_async_openai_completion_stream_and_ignore_eos(server):
    async def main():
        async with AsyncClient(server.url, api_key=server.api_key) as ac:
            texts = []
            async for delta in ac.complete("Once upon a time", stream=True, max_tokens=9, ignore_eos=True):
                texts.append(delta.text)
            stream = ac.complete("Once upon a time", stream=True, max_tokens=9, ignore_eos=True, temperature=0)
            await stream  # opening it sends the request
            result = await stream.until_done()
            whole = await ac.complete("Once upon a time", max_tokens=9, ignore_eos=True, temperature=0)
            return texts, result, whole

    texts, stream, whole = asyncio.run(main())
    assert "".join(texts)
    assert stream.finish_reason == "length" and stream.usage.completion_tokens == 9
    assert whole.text == stream.text and whole.finish_reason == "length"


@pytest.mark.parametrize("kind", ["chat", "complete"])
def test_ollama_api_sync(server, kind):
    with Client(server.url, api_key=server.api_key, api="ollama") as oc:
        call = oc.chat if kind == "chat" else oc.complete
        with call("Say hi", stream=True, max_tokens=6, ignore_eos=True) as stream:
            deltas = list(stream)
        whole = call("Say hi", max_tokens=6, temperature=0)
    assert stream.text and deltas[-1].finish_reason == "length" and stream.usage.completion_tokens == 6
    assert whole.text and whole.usage.completion_tokens <= 6


def test_ollama_api_async(server):
    async def main():
        async with AsyncClient(server.url, api_key=server.api_key, api="ollama") as ac:
            async with ac.chat("Say hi", stream=True, max_tokens=5, ignore_eos=True) as stream:
                texts = [d.text async for d in stream]
            return texts, stream

    texts, stream = asyncio.run(main())
    assert "".join(texts) == stream.text and stream.text
    assert stream.finish_reason == "length" and stream.usage.completion_tokens == 5


def test_leaving_a_sync_stream_early_aborts_on_the_server(server, client):
    before = server.abort_count()
    with client.chat("Tell me a very long story.", stream=True, **LONG) as stream:
        first = next(iter(stream))
    assert stream.closed and first is not None
    server.wait_abort_count_above(before)


def test_leaving_an_async_stream_early_aborts_on_the_server(server):
    before = server.abort_count()

    async def main():
        async with AsyncClient(server.url, api_key=server.api_key, api="ollama") as ac:
            async with ac.chat("Tell me a very long story.", stream=True, **LONG) as stream:
                async for delta in stream:
                    if delta.text:
                        break
            return stream

    assert asyncio.run(main()).closed
    server.wait_abort_count_above(before)


def test_wrong_api_key_is_401(server):
    for api in ("openai", "ollama"):
        with Client(server.url, api_key="wrong", api=api, model="m", max_retries=0) as bad:
            with pytest.raises(AuthenticationError) as info:
                bad.chat("hi", stream=True)
        assert info.value.status == 401 and info.value.message


def test_unknown_model_is_404(client):
    with pytest.raises(NotFoundError) as info:
        client.chat("hi", model="no-such-model")
    assert info.value.status == 404 and "no-such-model" in info.value.message
    with pytest.raises(NotFoundError):
        client.complete("hi", model="no-such-model", stream=True)


def test_bad_parameter_is_400(server, client):
    with pytest.raises(BadRequestError) as info:
        client.chat("hi", temperature=-1)
    assert info.value.status == 400 and "temperature" in info.value.message
    assert info.value.type == "invalid_request_error"

    async def main():
        async with AsyncClient(server.url, api_key=server.api_key) as ac:
            await ac.complete("hi", stream=True, top_p=0)

    with pytest.raises(BadRequestError) as info:
        asyncio.run(main())
    assert info.value.status == 400 and "top_p" in info.value.message


@pytest.fixture(scope="module")
def tiny_server(server, server_class):
    """A second server with one slot and a one-request queue (started after the shared one: cached weights)."""
    proc = server_class("--max-num-seqs", "1", "--max-waiting", "1")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_overload_429_is_retried_after_retry_after(tiny_server):
    url, key = tiny_server.url, tiny_server.api_key
    refused = threading.Event()

    def on_response(response: httpx.Response) -> None:
        if response.status_code == 429:
            refused.set()

    with Client(url, api_key=key) as holder:
        running = holder.chat("Tell a long story.", stream=True, **LONG)
        next(iter(running))  # it holds the only slot
        waiting = holder.chat("Tell another long story.", stream=True, **LONG)  # queued: the queue is full
        with Client(url, api_key=key, max_retries=0) as impatient:
            with pytest.raises(RateLimitError) as info:
                impatient.chat("hi", max_tokens=2)
        assert info.value.status == 429 and info.value.retry_after is not None

        result: dict = {}
        http = httpx.Client(timeout=120, event_hooks={"response": [on_response]})
        patient = Client(url, api_key=key, max_retries=8, max_backoff=2, http_client=http)

        def ask() -> None:
            try:
                result["answer"] = patient.chat("hi", max_tokens=2)
            except Exception as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        thread = threading.Thread(target=ask)
        thread.start()
        assert refused.wait(60), "the patient client was never refused"
        running.close()  # free the slot and the queue: the retry gets in
        waiting.close()
        thread.join(120)
        http.close()
    assert "error" not in result, result.get("error")
    assert result["answer"].usage.completion_tokens <= 2


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}


class Planet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    moons: int = pydantic.Field(ge=0, le=200)


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_response_format_model_is_parsed_on_both_apis(server, api):
    with Client(server.url, api_key=server.api_key, api=api, timeout=120) as client:
        answer = client.chat("Describe a planet as JSON.", response_format=Planet, temperature=0, max_tokens=60)
        assert answer.finish_reason == "stop", answer.text
        assert isinstance(answer.parsed, Planet) and answer.json() == answer.parsed.model_dump()
        with client.chat("Describe a planet as JSON.", response_format=Planet, temperature=0, max_tokens=60,
                         stream=True) as stream:
            stream.until_done()
        assert stream.text == answer.text  # greedy: streamed and whole answers agree


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_tool_calls_come_back_parsed_whole_and_streamed(server, api):
    forced = {"tool_choice": "required"} if api == "openai" else {}
    with Client(server.url, api_key=server.api_key, api=api, timeout=120) as client:
        answer = client.chat("What is the weather in Paris?", tools=[WEATHER], temperature=0, max_tokens=60,
                             **forced)
        with client.chat("What is the weather in Paris?", tools=[WEATHER], temperature=0, max_tokens=60,
                         stream=True, **forced) as stream:
            stream.until_done()
    if api == "openai":  # forced: always a valid call
        assert answer.finish_reason == "tool_calls" and answer.tool_calls, answer.raw
        assert all(c.name == "get_weather" and isinstance(c.args["city"], str) for c in answer.tool_calls)
        assert all(c.id and c.id.startswith("call_") for c in answer.tool_calls)
    # whatever the model chose (Ollama has no tool_choice), streaming assembles the same calls
    assert [(c.name, c.args) for c in stream.tool_calls] == [(c.name, c.args) for c in answer.tool_calls]
    assert stream.text == answer.text


def test_a_schema_that_cannot_compile_is_a_bad_request(client):
    with pytest.raises(BadRequestError) as info:
        client.chat("hi", response_format={"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "string", "pattern": "([a-z"}}})
    assert info.value.status == 400 and "pattern" in info.value.message.lower() or "regex" in info.value.message.lower()
