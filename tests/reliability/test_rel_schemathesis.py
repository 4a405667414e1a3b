"""Hostile input, generated: schemathesis against the server's own /openapi.json, every route,
valid and invalid (negative) inputs, in-process over the ASGI app with the fake engine in
tests/support/fakes.py. Nothing may answer 5xx or hang. A bounded number of examples per route, no
example database, derandomized: the same inputs every run."""

from __future__ import annotations

import asyncio

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.generation import GenerationMode

from support.fakes import FakeEngine  # noqa: E402

from rillet.config import ServerConfig
from rillet.server import create_app

EXAMPLES_PER_ROUTE = 100


def _app():
    """The app over a started fake engine, without its lifespan: schemathesis' pytest plugin ends
    an ASGI app's lifespan after each test (which drains the server) and restarts it on the next
    request (which would race the engine's start). A short reply and a small context keep every
    generated request (even ignore_eos with a huge max_tokens) to a few fake tokens."""
    engine = FakeEngine(reply="A short fake answer.", max_model_len=64)
    asyncio.run(engine.start())
    app = create_app(ServerConfig(), engine=engine)

    async def without_lifespan(scope, receive, send):
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan: the engine is already started")
        await app(scope, receive, send)

    return without_lifespan


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=EXAMPLES_PER_ROUTE, deterministic=True, database="none")


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_no_route_answers_5xx_or_hangs(case):
    response = case.call(timeout=10)
    assert response.status_code < 500, (response.status_code, response.text[:500], case.as_curl_command())
    if response.status_code >= 400:
        body = response.json()  # a JSON error with a message, OpenAI- or Ollama-shaped
        error = body["error"]
        assert (error["message"] if isinstance(error, dict) else error), body
