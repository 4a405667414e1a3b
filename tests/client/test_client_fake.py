"""Client behaviour that a real server cannot trigger on demand: retries, Retry-After, in-stream errors.

These run against tests/support/fake_openai.py, in addition to test_client_real.py's real server.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

import rillet
from rillet import client as client_module
from rillet.client import base as client_base
from rillet.client.errors import status_error
from rillet.client import (
    APIConnectionError,
    AsyncClient,
    Client,
    InternalServerError,
    RateLimitError,
    ServiceUnavailableError,
    StreamError,
)
from rillet.client.wire import Decoder


@pytest.fixture
def sleeps(monkeypatch):
    """Record the client's backoff waits instead of waiting."""
    waits: list[float] = []
    monkeypatch.setattr(client_base, "sleep", waits.append)

    async def fake_async_sleep(delay: float) -> None:
        waits.append(delay)

    monkeypatch.setattr(client_base, "async_sleep", fake_async_sleep)
    return waits


def test_public_exports():
    assert rillet.Client is Client and rillet.AsyncClient is AsyncClient
    assert set(client_module.__all__) <= set(dir(client_module))


def test_retry_on_429_honours_retry_after(fake, sleeps):
    fake.state.fail_next, fake.state.retry_after = 2, "3"
    with Client(fake.url, model="fake-model", max_retries=3) as client:
        answer = client.chat("hi")
    assert answer.text == "Hello there, café friend!"
    assert len(fake.state.requests) == 3
    assert sleeps == [3.0, 3.0]


def test_retry_backoff_without_retry_after_grows(fake, sleeps):
    fake.state.fail_next, fake.state.fail_status, fake.state.retry_after = 3, 503, None
    with Client(fake.url, model="fake-model", max_retries=3, backoff=1.0, max_backoff=3.0) as client:
        with client.chat("hi", stream=True) as stream:
            assert stream.until_done().text == "Hello there, café friend!"
    assert len(sleeps) == 3
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0 and 1.5 <= sleeps[2] <= 3.0


def test_retries_exhausted_raise_rate_limit_error(fake, sleeps):
    fake.state.fail_next, fake.state.retry_after = 5, "7"
    with Client(fake.url, model="fake-model", max_retries=1) as client:
        with pytest.raises(RateLimitError) as info:
            client.complete("x", stream=True)
    err = info.value
    assert (err.status, err.retry_after, err.message) == (429, 7.0, "server busy")
    assert err.type == "rate_limit" and err.body["error"]["code"] == 429
    assert len(fake.state.requests) == 2 and sleeps == [7.0]


def test_no_retry_when_disabled(fake, sleeps):
    fake.state.fail_next, fake.state.fail_status = 1, 503
    with Client(fake.url, model="fake-model", max_retries=0) as client:
        with pytest.raises(ServiceUnavailableError):
            client.chat("hi")
    assert sleeps == []


def test_500_is_not_retried(fake, sleeps):
    fake.state.fail_next, fake.state.fail_status = 1, 500
    with Client(fake.url, model="fake-model") as client:
        with pytest.raises(InternalServerError) as info:
            client.chat("hi")
    assert info.value.status == 500 and sleeps == []


def test_async_retry_on_429(fake, sleeps):
    fake.state.fail_next, fake.state.retry_after = 1, "2"

    async def main():
        async with AsyncClient(fake.url, max_retries=2) as client:
            async with client.chat("hi", stream=True, max_tokens=2) as stream:
                texts = [d.text async for d in stream if d.text]
            return texts, stream

    texts, stream = asyncio.run(main())
    assert texts == ["Hello", " there"]
    assert stream.usage.completion_tokens == 2 and stream.finish_reason == "length"
    assert sleeps == [2.0]


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_in_stream_error_raises_stream_error(fake, api):
    fake.state.stream_error = True
    with Client(fake.url, api=api, model="fake-model") as client:
        received = []
        with pytest.raises(StreamError) as info:
            with client.chat("hi", stream=True) as stream:
                for delta in stream:
                    received.append(delta.text)
    assert info.value.message == "engine died"
    if api == "openai":
        assert received == ["Hello"] and info.value.status == 500 and info.value.type == "server_error"


def test_ollama_options_mapping(fake):
    with Client(fake.url, api="ollama") as client:
        answer = client.complete("x", max_tokens=3, temperature=0.5, repetition_penalty=1.1, seed=4, top_k=None)
    assert answer.text == "Hello there," and answer.usage.completion_tokens == 3
    body = fake.state.requests[-1]
    assert body["options"] == {"num_predict": 3, "temperature": 0.5, "repeat_penalty": 1.1, "seed": 4}
    assert body["stream"] is False and body["model"] == "fake-model"  # from /api/tags, else /v1/models


def test_openai_stream_asks_for_usage_and_accepts_v1_base_url(fake):
    with Client(fake.url + "/v1/") as client:
        stream = client.chat([{"role": "user", "content": "hi"}], stream=True, top_k=5)
        deltas = list(stream)
    body = fake.state.requests[-1]
    assert body["stream_options"] == {"include_usage": True} and body["top_k"] == 5
    assert deltas[-1].usage.completion_tokens == 6 and stream.closed


def test_connection_refused_raises_api_connection_error(sleeps):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with Client(url, model="m", max_retries=2) as client:
        with pytest.raises(APIConnectionError):
            client.chat("hi")
    assert len(sleeps) == 2  # connection failures are retried too


def test_sse_decoder_handles_comments_multiline_data_and_crlf():
    decoder = Decoder("openai", "complete")
    out = []
    for line in [": ping", "event: message", 'data: {"choices": [{"index": 0,', 'data:  "text": "a"}]}\r', "",
                 'data: {"choices": [{"index": 0, "text": "b", "finish_reason": "stop"}], '
                 '"usage": {"prompt_tokens": 1, "completion_tokens": 2}}', "", "data: [DONE]", "",
                 'data: {"choices": [{"index": 0, "text": "ignored"}]}', ""]:
        out += decoder.feed(line)
    assert [d.text for d in out] == ["a", "b"]
    assert out[1].finish_reason == "stop" and out[1].usage.total_tokens == 3
    assert decoder.done


def test_retry_after_http_date():
    from email.utils import formatdate
    import time

    err = status_error(429, b"{}", {"retry-after": formatdate(time.time() + 30, usegmt=True)})
    assert isinstance(err, RateLimitError) and 25 <= err.retry_after <= 31


def test_error_body_shapes():
    ollama = status_error(404, b'{"error": "model \\"x\\" not found"}', {})
    assert ollama.status == 404 and ollama.message == 'model "x" not found'
    fastapi = status_error(422, b'{"detail": [{"loc": ["body"], "msg": "bad"}]}', {})
    assert fastapi.status == 422 and "bad" in fastapi.message
    text = status_error(502, b"Bad Gateway", {})
    assert isinstance(text, InternalServerError) and text.message == "Bad Gateway"


def test_transport_errors_mid_stream_become_api_connection_error():
    def handler(request: httpx.Request) -> httpx.Response:
        def body():
            yield b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
            raise httpx.ReadError("connection reset")

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    with Client("http://test", model="m", transport=httpx.MockTransport(handler)) as client:
        stream = client.chat("hi", stream=True)
        with pytest.raises(APIConnectionError):
            for _ in stream:
                pass
        assert stream.text == "x" and stream.closed
