"""Server subprocesses for benchmarks, the soak script and the tests: start one on a free
loopback port, wait until it answers, read its log, stop it (its whole process group).

    with server_process([sys.executable, "-m", "benchmarks.baselines.seed_server", "--port", str(port)], url):
        ...
    server = RilletServer("--dtype", "float32", api_key="k").wait_ready()   # a real `rillet serve`
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

__all__ = ["RilletServer", "ServerProcess", "free_port", "poll_until", "server_process"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll `predicate` until truthy (returned) or the deadline passes (AssertionError): a polling
    interval, not synchronization."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


class ServerProcess:
    """A server subprocess in its own session (process group), its output in a log file.

    `wait_ready()` polls `url + ready_path` until it answers 200 and raises AssertionError (with the
    log's tail) when the process exits first or the timeout passes; `stop()` sends `stop_signal` to
    the group, then SIGKILL after `grace_s`."""

    def __init__(self, cmd: Sequence[str], url: str, *, ready_path: str = "/v1/models",
                 log_path: str | Path | None = None, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, start_timeout_s: float = 600.0,
                 stop_signal: int = signal.SIGINT, grace_s: float = 15.0) -> None:
        self.cmd = list(cmd)
        self.url = url
        self.ready_path = ready_path
        self.start_timeout_s = start_timeout_s
        self.stop_signal = stop_signal
        self.grace_s = grace_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="server-", suffix=".log")[1])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd,
                                     start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def is_ready(self) -> bool:
        import httpx

        if self.proc.poll() is not None:
            raise AssertionError(f"{' '.join(self.cmd)} exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            return httpx.get(self.url + self.ready_path, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self) -> Any:
        try:
            poll_until(self.is_ready, self.start_timeout_s, f"{self.url}{self.ready_path}", interval_s=0.25)
        except AssertionError as exc:
            self.stop()
            raise AssertionError(f"{exc}\n--- server log ---\n{self.log_tail()}") from None
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, self.stop_signal)
            try:
                self.proc.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> Any:
        return self.wait_ready()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def server_process(cmd: Sequence[str], url: str, *, ready_path: str = "/v1/models", timeout_s: float = 600.0,
                   log_path: Path | None = None, env: dict | None = None,
                   cwd: str | Path | None = None) -> Iterator[subprocess.Popen]:
    """Start a server subprocess, wait until `url + ready_path` answers 200, stop it afterwards
    (RuntimeError if it exits or times out first)."""
    server = ServerProcess(cmd, url, ready_path=ready_path, log_path=log_path, env=env, cwd=cwd,
                           start_timeout_s=timeout_s)
    try:
        server.wait_ready()
    except AssertionError as exc:
        raise RuntimeError(f"server not ready: {' '.join(cmd)}\n{exc}") from None
    try:
        yield server.proc
    finally:
        server.stop()


class RilletServer(ServerProcess):
    """A real `rillet serve` on a free loopback port (--max-model-len 2048 unless `extra_args` say
    otherwise, --api-key `api_key` when given), ready once /health answers 200."""

    def __init__(self, *extra_args: str, api_key: str | None = None, env: dict[str, str] | None = None,
                 log_path: str | Path | None = None, start_timeout_s: float = 240.0) -> None:
        self.port = free_port()
        self.api_key = api_key
        args = [sys.executable, "-m", "rillet.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                *(() if "--max-model-len" in extra_args else ("--max-model-len", "2048")), *extra_args]
        if api_key:
            args += ["--api-key", api_key]
        super().__init__(args, f"http://127.0.0.1:{self.port}", ready_path="/health", log_path=log_path, env=env,
                         start_timeout_s=start_timeout_s, stop_signal=signal.SIGTERM, grace_s=20.0)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self) -> RilletServer:
        return super().wait_ready()

    def metrics(self) -> str:
        import httpx

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
