"""The app in-process over httpx.ASGITransport with a fake engine, and decoders of its bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx

from rillet.config import ServerConfig
from rillet.server import create_app
from support.fakes import FakeEngine


@contextlib.asynccontextmanager
async def running_app(engine: FakeEngine | None = None, **server_options: Any):
    """Yield (client, app, engine) with the lifespan running and the engine started."""
    engine = engine if engine is not None else FakeEngine()
    app = create_app(ServerConfig(**server_options), engine=engine)
    async with app.router.lifespan_context(app):
        ctx = app.state.rillet
        if ctx.start_task is not None:
            await ctx.start_task
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client, app, engine


def sse_events(text: str) -> list[Any]:
    """Decode an SSE body: JSON objects, and the string "[DONE]"."""
    events = []
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def ndjson_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line]


async def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    """Poll `condition()` until true (a deadline, not a sleep: fails loudly if it never holds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.002)
