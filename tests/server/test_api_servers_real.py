"""`rillet serve --api-servers 2`: two HTTP server processes over one engine core, with the
default model and real clients. The same answers as one server, metrics summed over both, a
client's disconnect aborting its request, a drain on SIGTERM, and the engine's death ending
every stream with an error event and the whole server with status 1."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import openai
import psutil
import pytest
from support import rillet_proc
from support.sse_stream import BackgroundStream
from test_server_real import metric

KEY = rillet_proc.API_KEY
PROMPTS = [f"Name a colour that starts with the letter {c}." for c in "BGRPOYWS"]


@pytest.fixture(scope="module")
def two_servers():
    """test_sigterm_drains_both_servers_then_exits_0, the last test here to use it, ends it."""
    server = rillet_proc.RilletServer("--api-servers", "2")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name)] in " {")


def processes(server: rillet_proc.RilletServer) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(the API servers, the engine core) among the supervisor's children."""
    children = psutil.Process(server.proc.pid).children()
    api = [p for p in children if "api_server_main" in " ".join(p.cmdline())]
    core = [p for p in children if "core_main" in " ".join(p.cmdline())]
    return api, core


def test_two_api_servers_answer_as_one_server_does(two_servers, real_server):
    api, core = processes(two_servers)
    assert len(api) == 2 and len(core) == 1

    async def answers(server, stream: bool) -> list[tuple[str, int]]:
        """(text, tokens) per prompt"""
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        (card,) = (await client.models.list()).data

        async def one(prompt: str) -> tuple[str, int]:
            messages = [{"role": "user", "content": prompt}]
            if not stream:
                res = await client.chat.completions.create(model=card.id, messages=messages, max_tokens=16,
                                                           temperature=0)
                return res.choices[0].message.content or "", res.usage.completion_tokens
            chunks = await client.chat.completions.create(model=card.id, messages=messages, max_tokens=16,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True})
            text, tokens = "", 0
            async for chunk in chunks:
                text += "".join(c.delta.content or "" for c in chunk.choices)
                tokens = chunk.usage.completion_tokens if chunk.usage else tokens
            return text, tokens

        try:
            if stream:  # all at once: the connections spread over both API servers
                return list(await asyncio.gather(*map(one, PROMPTS)))
            return [await one(p) for p in PROMPTS]  # each alone
        finally:
            await client.close()

    alone = asyncio.run(answers(real_server, stream=False))
    together = asyncio.run(answers(two_servers, stream=True))
    assert together == alone
    # One scrape, whichever server answers it, counts both. A request is counted as its response
    # closes, just after its last chunk has gone out: the client may scrape before the last does.
    metrics = rillet_proc.poll_until(
        lambda: text if total(text := two_servers.metrics(), "rillet:request_success_total") >= len(PROMPTS) else "",
        30, "both servers to count every request")
    assert total(metrics, "rillet:request_success_total") == len(PROMPTS)  # over finished_reason labels
    assert metric(metrics, "rillet:generation_tokens_total") == sum(tokens for _, tokens in alone)


def test_a_disconnect_aborts_its_request_through_either_server(two_servers):
    before = two_servers.abort_count()
    body = {"prompt": "Count to a thousand:", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    for _ in range(2):  # two connections: at least one of them may reach each server
        with httpx.stream("POST", two_servers.url + "/v1/completions", json=body, headers=two_servers.headers,
                          timeout=60) as res:
            for line in res.iter_lines():
                if line.startswith("data: "):
                    break
    two_servers.wait_abort_count_above(before + 1)
    rillet_proc.poll_until(lambda: metric(two_servers.metrics(), "rillet:num_requests_running") == 0, 30,
                           "the aborted requests to leave the engine")


def test_a_refused_stream_says_why_instead_of_waiting_for_its_first_event(two_servers):
    body = {"prompt": "Once upon a time", "max_tokens": 4, "stream": True}
    stream = BackgroundStream(two_servers.url + "/v1/completions", body, {"Authorization": "Bearer wrong"})
    with pytest.raises(AssertionError, match="status 401"):
        stream.wait_started(60)


def test_sigterm_drains_both_servers_then_exits_0(two_servers):
    api, core = processes(two_servers)
    body = {"prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True, "stream": True}
    stream = BackgroundStream(two_servers.url + "/v1/completions", body, two_servers.headers)
    assert stream.wait_started(60)
    two_servers.proc.send_signal(signal.SIGTERM)  # the supervisor alone: it tells the API servers
    assert two_servers.proc.wait(60) == 0, two_servers.log_tail()
    assert stream.join(10)
    events = stream.events
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in api + core)


def test_the_engine_dying_ends_every_stream_with_an_error_and_the_server_with_status_1():
    server = rillet_proc.RilletServer("--api-servers", "2").wait_ready()
    try:
        api, (core,) = processes(server)
        streams = [BackgroundStream(server.url + "/v1/completions",
                                    {"prompt": f"Story {i}:", "max_tokens": 1500, "ignore_eos": True, "stream": True},
                                    server.headers) for i in range(4)]
        assert all(s.wait_started(60) for s in streams), server.log_tail()
        core.kill()  # what the OOM killer would do
        for s in streams:
            assert s.join(60), "a stream hung after the engine died"
            event = json.loads(s.events[-1])
            assert "engine" in event["error"]["message"], event
        assert server.proc.wait(60) == 1, server.log_tail()
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in api)
    finally:
        server.stop()
