"""The mechanisms behind the reliability tests, in-process and fast: the fault-injection hook,
the engine-death watch (/health "dead", exit through on_engine_failure), the stall timeout of
streams whose client stops reading, and the drained 413 for oversized bodies."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from support.fakes import FakeEngine  # noqa: E402

from rillet.config import ServerConfig
from rillet.server import create_app, faults
from rillet.server.app import BodyLimitMiddleware
from rillet.server.streaming import StreamingBody


async def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


def test_fault_specs_and_hooks():
    assert faults.parse_fault_spec("step:once") == faults.FaultSpec("once", 0)
    assert faults.parse_fault_spec(" step:always@12 ") == faults.FaultSpec("always", 12)
    for bad in ("", "once", "step:sometimes", "step:once@-1", "step:once@x"):
        with pytest.raises(ValueError, match="RILLET_FAULT_INJECT"):
            faults.parse_fault_spec(bad)

    def outcomes(spec: str, steps: int) -> list[bool]:
        hook = faults.parse_fault_spec(spec).hook()
        result = []
        for _ in range(steps):
            try:
                hook(None)
                result.append(True)
            except faults.InjectedFault:
                result.append(False)
        return result

    assert outcomes("step:once@2", 5) == [True, True, False, True, True]
    assert outcomes("step:always@1", 4) == [True, False, False, False]

    class Core:  # what AsyncEngine's core_setup receives: the LLMEngine
        before_forward = None

    core = Core()
    assert faults.install_hook(core, {}) is None and core.before_forward is None
    assert faults.install_hook(core, {faults.ENV_VAR: "step:once"}) == faults.FaultSpec("once")
    assert callable(core.before_forward)


def test_a_bad_fault_spec_fails_at_startup(monkeypatch):
    monkeypatch.setenv(faults.ENV_VAR, "step:often")
    with pytest.raises(ValueError, match="RILLET_FAULT_INJECT"):
        create_app(ServerConfig(), engine=FakeEngine())


def test_engine_death_ends_streams_turns_health_dead_and_asks_to_exit():
    async def main():
        engine = FakeEngine(token_delay_s=0.01, reply="many words " * 50)
        app = create_app(ServerConfig(), engine=engine)
        failures: list[BaseException] = []
        app.state.rillet.on_engine_failure = failures.append
        async with app.router.lifespan_context(app):
            await app.state.rillet.start_task
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                body = {"prompt": "x", "stream": True, "max_tokens": 100}
                request = asyncio.ensure_future(client.post("/v1/completions", json=body))
                await wait_until(lambda: engine.running == 1)
                engine.kill("simulated: 3 failed steps in a row")
                r = await request
                lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
                assert '"engine_error"' in lines[-1] and "simulated" in lines[-1], lines[-2:]
                await wait_until(lambda: failures)
                assert "the engine died" in str(failures[0])
                app.state.rillet.state.draining = True  # shutting down after the death: still "dead"
                r = await client.get("/health")
                assert r.status_code == 503 and r.json()["status"] == "dead"

    asyncio.run(main())


def test_a_stream_whose_client_stops_reading_is_ended_after_the_stall_timeout():
    async def main():
        closed = asyncio.Event()
        produced = 0

        async def body():
            nonlocal produced
            try:
                while True:
                    produced += 1
                    yield b"data: x\n\n"
                    await asyncio.sleep(0.001)
            finally:
                closed.set()

        on_close_called = []

        async def on_close():
            on_close_called.append(True)

        sent = 0
        blocked = asyncio.Event()

        async def send(message):
            nonlocal sent
            sent += 1
            if sent > 3:  # the socket is full: this send never completes
                await blocked.wait()

        async def receive():
            await asyncio.Event().wait()  # the client never disconnects either

        response = StreamingBody(body(), media_type="text/event-stream", stall_timeout_s=0.2, on_close=on_close)
        t0 = time.monotonic()
        await asyncio.wait_for(response(scope={"type": "http"}, receive=receive, send=send), 10)
        took = time.monotonic() - t0
        assert response.client_stalled and not response.client_disconnected
        assert closed.is_set() and on_close_called  # the body (so the engine request) was closed
        assert 0.2 <= took < 3, took
        assert produced <= 4  # nothing was buffered beyond the blocked send

    asyncio.run(main())


def test_a_stream_that_keeps_flowing_is_never_cut_by_the_stall_timeout():
    async def main():
        async def body():
            for _ in range(30):
                yield b"data: x\n\n"
                await asyncio.sleep(0.01)

        async def send(message):
            await asyncio.sleep(0.005)  # slow but steady

        async def receive():
            await asyncio.Event().wait()

        response = StreamingBody(body(), media_type="text/event-stream", stall_timeout_s=0.1)
        await asyncio.wait_for(response(scope={"type": "http"}, receive=receive, send=send), 10)
        assert not response.client_stalled

    asyncio.run(main())


def test_an_oversized_body_is_read_to_its_end_before_the_413():
    async def main():
        chunks = [b"x" * (1 << 20)] * 10
        consumed = 0

        async def receive():
            nonlocal consumed
            consumed += 1
            return {"type": "http.request", "body": chunks[consumed - 1], "more_body": consumed < len(chunks)}

        sent = []

        async def send(message):
            sent.append(message)

        async def app(scope, receive, send):
            raise AssertionError("an oversized body must not reach the app")

        for declared in (None, str(10 << 20).encode()):
            consumed, sent[:] = 0, []
            headers = [(b"content-length", declared)] if declared else []
            scope = {"type": "http", "path": "/v1/completions", "method": "POST", "headers": headers}
            await BodyLimitMiddleware(app, max_bytes=4 << 20)(scope, receive, send)
            assert consumed == len(chunks)  # drained, so closing sends no reset
            assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]

    asyncio.run(main())
