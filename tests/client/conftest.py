"""Fixtures of the client tests: a real `rillet serve` (shared with tests/cli) and a fake server."""

from __future__ import annotations

import pytest

from support import rillet_proc
from support.fake_openai import FakeServer


@pytest.fixture(scope="session")
def server():
    """The real server (default model, api key rillet_proc.API_KEY), shared by the whole session."""
    return rillet_proc.shared_server()


@pytest.fixture(scope="session")
def server_class():
    """rillet_proc.RilletServer, to start a server of one's own (`RilletServer(*flags).wait_ready()`)."""
    return rillet_proc.RilletServer


@pytest.fixture(scope="session")
def _fake_session():
    fake = FakeServer().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(_fake_session):
    """The fake OpenAI/Ollama server, its state reset for each test."""
    _fake_session.state.reset()
    return _fake_session


def pytest_sessionfinish(session, exitstatus):
    rillet_proc.stop_shared()
