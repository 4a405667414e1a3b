"""Fixtures of the reliability tests: real `rillet serve` processes and the load shapes in
rillet.bench.reliability (shared with scripts/soak.py, which runs the long variants)."""

from __future__ import annotations

import pytest

from rillet.bench.servers import RilletServer

from support.reliability import MAIN_KEY, STALL_TIMEOUT_S


@pytest.fixture(scope="session")
def main_server():
    """One server for the storm, slow-reader, hostile-input and auth tests: float32 (greedy text does
    not change with batch mates or preemption in practice, so the well-behaved stream can be compared), --api-key, debug logs
    (the auth test greps them for the key), and a short stall timeout for the slow-reader test."""
    server = RilletServer("--dtype", "float32", "--kv-cache-gib", "1", "--log-level", "debug",
                          "--stream-stall-timeout-s", str(STALL_TIMEOUT_S), "--send-buffer-bytes", "32768",
                          api_key=MAIN_KEY)
    try:
        yield server.wait_ready()
    finally:
        server.stop()
    # after every test that used it (the auth test checks this too, mid-run)
    assert MAIN_KEY not in server.log_path.read_text(errors="replace"), "the API key appeared in the server log"
