"""A real `rillet serve` subprocess for the client and CLI tests, started once per test session.

tests/client/conftest.py and tests/cli/conftest.py both load this file by path under one
module name (see `load()` in each), so the whole run shares one server process.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
START_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll `predicate` until truthy or the deadline passes (a polling interval, not synchronization)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


class RilletServer:
    def __init__(self, *extra_args: str, api_key: str | None = API_KEY) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = Path(tempfile.mkstemp(prefix="rillet-serve-", suffix=".log")[1])
        args = [sys.executable, "-m", "rillet.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--max-model-len", "2048", *extra_args]
        if api_key:
            args += ["--api-key", api_key]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self) -> RilletServer:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"rillet serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                return httpx.get(self.url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            poll_until(ready, START_TIMEOUT_S, "rillet serve /health", interval_s=0.25)
        except AssertionError as exc:
            self.stop()
            raise AssertionError(f"{exc}\n--- server log ---\n{self.log_tail()}") from None
        return self

    def metrics(self) -> str:
        res = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10)
        res.raise_for_status()
        return res.text

    def abort_count(self) -> float:
        """Sum of the abort counters in /metrics (`rillet:request_aborted_total` and kin)."""
        total = 0.0
        for line in self.metrics().splitlines():
            match = re.match(r"^([A-Za-z_:][\w:]*abort\w*)(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
            if match and match.group(1).endswith("_total"):
                total += float(match.group(2))
        return total

    def wait_abort_count_above(self, before: float, timeout_s: float = 30.0) -> float:
        return poll_until(lambda: (n := self.abort_count()) > before and n, timeout_s, "the abort counter to grow")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        if not self._log.closed:
            self._log.close()


_shared: RilletServer | None = None


def shared_server() -> RilletServer:
    """The session's server: default model, --api-key test-key."""
    global _shared
    if _shared is None:
        _shared = RilletServer()
        atexit.register(stop_shared)
        _shared.wait_ready()
    elif _shared.proc.poll() is not None:
        raise AssertionError(f"the shared rillet serve died:\n{_shared.log_tail()}")
    return _shared


def stop_shared() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None
