"""Fixtures of the client tests: a real `rillet serve` (shared with tests/cli) and a fake server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # fake_openai

from fake_openai import FakeServer  # noqa: E402


def load_rillet_proc():
    """tests/client/rillet_proc.py under one module name, so tests/client and tests/cli share its server."""
    name = "rillet_tests_rillet_proc"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "rillet_proc.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


rillet_proc = load_rillet_proc()


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
