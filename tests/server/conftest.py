"""Fixtures of the server tests: a fake engine in-process (support.asgi_app) or the session's real
`rillet serve` (support.rillet_proc)."""

from __future__ import annotations

import pytest

from support import rillet_proc


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def real_server():
    """The session's `rillet serve` (default model, --max-model-len 2048, --api-key rillet_proc.API_KEY)."""
    return rillet_proc.shared_server()


def pytest_sessionfinish(session, exitstatus):
    rillet_proc.stop_shared()
