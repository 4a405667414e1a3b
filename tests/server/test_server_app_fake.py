"""App-level behaviour in-process: auth, CORS, limits, health, metrics, request ids, disconnects, drain."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from support.asgi_app import running_app, sse_events, wait_for
from support.fakes import FakeEngine

from rillet.config import ServerConfig
from rillet.server import create_app

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def test_api_key_guards_v1_and_api_only():
    async with running_app(api_key="s3cret") as (client, _, _):
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await client.get("/api/tags")
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert (await client.get("/api/tags", headers={"Authorization": "bearer s3cret"})).status_code == 200
        for open_path in ("/health", "/metrics"):
            assert (await client.get(open_path)).status_code == 200


async def test_cors_preflight_and_headers():
    async with running_app(allowed_origins=["http://ui.example"], api_key="k") as (client, _, _):
        r = await client.options("/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        r = await client.get("/v1/models", headers={"Origin": "http://ui.example", "Authorization": "Bearer k"})
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        r = await client.get("/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in r.headers


async def test_body_limit_413_with_length_and_chunked():
    async with running_app(max_request_bytes=2048) as (client, _, _):
        big = {"messages": [{"role": "user", "content": "x" * 4000}]}
        r = await client.post("/v1/chat/completions", json=big)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"

        async def chunks():
            for _ in range(10):
                yield b" " * 500

        r = await client.post("/v1/chat/completions", content=chunks(),
                              headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = await client.post("/api/chat", json=big)
        assert r.status_code == 413 and isinstance(r.json()["error"], str)


async def test_unknown_route_404_and_wrong_method_405():
    async with running_app() as (client, _, _):
        r = await client.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = await client.get("/v1/chat/completions")
        assert r.status_code == 405 and "error" in r.json()


async def test_request_id_echoed_or_generated(caplog):
    caplog.set_level(logging.INFO, logger="rillet.server")
    async with running_app(api_key="topsecret") as (client, _, _):
        r = await client.get("/v1/models", headers={"X-Request-Id": "abc-123", "Authorization": "Bearer topsecret"})
        assert r.headers["x-request-id"] == "abc-123"
        r = await client.get("/health")
        assert len(r.headers["x-request-id"]) == 32
        r = await client.get("/v1/models", headers={"X-Request-Id": "bad id\twith spaces"})
        assert r.headers["x-request-id"] != "bad id\twith spaces"
    assert "[abc-123]" in caplog.text
    assert "topsecret" not in caplog.text


async def test_health_loading_ready_dead():
    engine = FakeEngine(start_delay_s=10)
    app = create_app(ServerConfig(), engine=engine)
    import httpx

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            r = await client.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = await client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            assert "retry-after" in r.headers
            app.state.rillet.start_task.cancel()
    engine = FakeEngine(start_error=RuntimeError("no weights"))
    async with running_app(engine) as (client, _, _):
        r = await client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "dead"
        assert "no weights" in r.json()["error"]
    async with running_app() as (client, _, engine):
        assert (await client.get("/health")).status_code == 200
        engine.kill()
        r = await client.get("/health")
        assert r.status_code == 503
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


async def test_queue_full_is_429_with_retry_after():
    engine = FakeEngine(max_num_seqs=1, max_waiting=0)
    engine.gate = asyncio.Event()
    async with running_app(engine) as (client, _, _):
        first = asyncio.create_task(client.post("/v1/completions", json={"prompt": "a"}))
        await wait_for(lambda: engine.running == 1)
        r = await client.post("/v1/completions", json={"prompt": "b"})
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        r = await client.post("/api/generate", json={"prompt": "b"})
        assert r.status_code == 429 and isinstance(r.json()["error"], str)
        engine.gate.set()
        assert (await first).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'rillet:request_rejected_total{reason="queue_full"} 2.0' in metrics


async def test_metrics_names():
    async with running_app() as (client, _, _):
        await client.post("/v1/chat/completions", json=CHAT)
        await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        text = (await client.get("/metrics")).text
    for name in ("rillet:num_requests_running", "rillet:num_requests_waiting", "rillet:kv_cache_usage_perc",
                 "rillet:time_to_first_token_seconds_bucket", "rillet:inter_token_latency_seconds_bucket",
                 "rillet:e2e_request_latency_seconds_count", "rillet:prompt_tokens_total",
                 "rillet:generation_tokens_total 12.0", "rillet:request_aborted_total",
                 "rillet:num_preemptions_total", "rillet:prefix_cache_queries_total", "rillet:prefix_cache_hits_total",
                 'rillet:request_success_total{finished_reason="stop"} 1.0',
                 'rillet:request_success_total{finished_reason="length"} 1.0'):
        assert name in text, name


async def test_root_serves_the_chat_page_or_404():
    from rillet.server.app import STATIC_DIR

    async with running_app() as (client, _, _):
        r = await client.get("/")
        if (STATIC_DIR / "index.html").is_file():
            assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        else:
            assert r.status_code == 404 and "error" in r.json()


# ---- disconnects and drain: drive the ASGI app directly to control the connection


async def call_app(app, method: str, path: str, body: dict, disconnect: asyncio.Event):
    """Run one request; `disconnect` set -> the client hangs up. Returns (status, received bytes)."""
    payload = json.dumps(body).encode()
    sent_body = False
    messages: list[dict] = []
    first_body = asyncio.Event()

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_body.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"t"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("t", 80)}
    task = asyncio.create_task(app(scope, receive, send))
    return task, messages, first_body


async def test_client_disconnect_aborts_only_that_request():
    engine = FakeEngine(reply="tick " * 200, token_delay_s=0.01)
    async with running_app(engine) as (client, app, _):
        gone, stay = asyncio.Event(), asyncio.Event()
        t1, m1, first1 = await call_app(app, "POST", "/v1/chat/completions", {**CHAT, "stream": True}, gone)
        t2, m2, first2 = await call_app(app, "POST", "/api/chat", {"messages": CHAT["messages"]}, stay)
        await first1.wait()
        await first2.wait()
        gone.set()
        await asyncio.wait_for(t1, 5)
        await wait_for(lambda: engine.running == 1)
        assert engine.aborted_total == 1
        state = app.state.rillet.state
        assert len(state.active) == 1
        text = (await client.get("/metrics")).text
        assert "rillet:request_aborted_total 1.0" in text
        await asyncio.wait_for(t2, 10)  # the other stream is untouched and finishes
        lines = [json.loads(x) for m in m2 if m["type"] == "http.response.body"
                 for x in m.get("body", b"").splitlines() if x]
        assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
        assert engine.running == 0 and not state.active


async def test_disconnect_during_non_streaming_request_aborts():
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    async with running_app(engine) as (client, app, _):
        gone = asyncio.Event()
        task, _, _ = await call_app(app, "POST", "/v1/completions", {"prompt": "x"}, gone)
        await wait_for(lambda: engine.running == 1)
        gone.set()
        await asyncio.wait_for(task, 5)
        assert engine.aborted_total == 1 and not app.state.rillet.state.active


@pytest.mark.parametrize("stream", [True, False])
async def test_disconnect_aborts_every_prompt_of_a_list(stream):
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    async with running_app(engine) as (client, app, _):
        gone = asyncio.Event()
        task, _, _ = await call_app(app, "POST", "/v1/completions", {"prompt": ["x", "y", "z"], "stream": stream},
                                    gone)
        await wait_for(lambda: engine.running == 3)
        gone.set()
        await asyncio.wait_for(task, 5)
        assert engine.aborted_total == 3 and engine.running == 0 and not app.state.rillet.state.active


async def test_drain_lets_streams_finish_then_aborts_the_rest():
    engine = FakeEngine(reply="tick " * 20, token_delay_s=0.005)
    async with running_app(engine) as (client, app, _):
        never = asyncio.Event()
        state = app.state.rillet.state
        # a short stream finishes within the drain timeout
        short, m_short, f1 = await call_app(app, "POST", "/v1/completions",
                                            {"prompt": "x", "stream": True, "max_tokens": 5}, never)
        await f1.wait()
        await state.drain(5.0)
        await asyncio.wait_for(short, 5)
        events = sse_events(b"".join(m.get("body", b"") for m in m_short if "body" in m).decode())
        assert events[-1] == "[DONE]"
        # while draining: new requests are refused, /health says so
        r = await client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        assert (await client.get("/health")).json()["status"] == "draining"

    engine = FakeEngine(reply="tick " * 500, token_delay_s=0.01)
    async with running_app(engine) as (client, app, _):
        state = app.state.rillet.state
        never = asyncio.Event()
        long1, m1, f1 = await call_app(app, "POST", "/v1/chat/completions", {**CHAT, "stream": True}, never)
        long2, m2, f2 = await call_app(app, "POST", "/api/generate", {"prompt": "x"}, never)
        await f1.wait()
        await f2.wait()
        await state.drain(0.05)
        await asyncio.wait_for(asyncio.gather(long1, long2), 5)
        sse = sse_events(b"".join(m.get("body", b"") for m in m1 if "body" in m).decode())
        assert "shutting down" in sse[-1]["error"]["message"]
        nd = b"".join(m.get("body", b"") for m in m2 if "body" in m).decode().splitlines()
        assert json.loads(nd[-1])["done"] is True and "shutting down" in json.loads(nd[-1])["error"]
        assert m1[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_unexpected_bug_is_a_clean_json_500(caplog):
    class Broken(FakeEngine):
        async def add_request(self, *args, **kwargs):
            raise RuntimeError("a genuine bug")

    async with running_app(Broken()) as (client, _, _):
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "bug-1"})
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error"
        assert "Traceback" not in r.text and "genuine bug" not in r.text
        assert r.headers["x-request-id"] == "bug-1"
        r = await client.post("/api/chat", json={"messages": CHAT["messages"]})
        assert r.status_code == 500 and isinstance(r.json()["error"], str)
    assert "a genuine bug" in caplog.text  # logged with its traceback
