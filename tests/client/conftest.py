"""Fixtures of the client tests: a real `rillet serve` (shared with tests/cli) and a fake server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # fake_openai
sys.path.insert(0, str(HERE.parent))  # shared_rillet_proc

from fake_openai import FakeServer  # noqa: E402
from shared_rillet_proc import rillet_proc  # noqa: E402




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
    state = _fake_session.state
    state.fail_next, state.fail_status, state.retry_after, state.stream_error = 0, 429, "0", False
    state.requests.clear()
    return _fake_session


def pytest_sessionfinish(session, exitstatus):
    rillet_proc.stop_shared()
