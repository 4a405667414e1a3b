"""Fixtures of the CLI tests: the shared real `rillet serve`, a subprocess runner and a pseudo-terminal."""

from __future__ import annotations

import codecs
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from support import rillet_proc

REPO = Path(__file__).resolve().parents[2]


# The machine's kernel choice stays: the shared server has it too, and greedy answers compared
# between the CLI and that server must come from the same kernels (RILLET_CPU_ISA=avx2 make test).
MACHINE_SETTINGS = ("RILLET_CPU_ISA", "RILLET_CPU_KERNELS")


def cli_env() -> dict[str, str]:
    """The test's environment without the RILLET_* settings a user might have (URL, API key...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RILLET_") or k in MACHINE_SETTINGS}
    env.update(PYTHONUNBUFFERED="1", NO_COLOR="1", TERM="dumb", COLUMNS="120", LINES="40")
    return env


@pytest.fixture(scope="session")
def server():
    return rillet_proc.shared_server()


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m rillet.cli ARGS` to completion; returns the CompletedProcess (text mode)."""

    def run(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rillet.cli", *args], input=input, capture_output=True,
                              text=True, timeout=timeout, cwd=tmp_path, env=cli_env(),
                              stdin=None if input is not None else subprocess.DEVNULL)

    return run


class PtyChild:
    """A child process on a pseudo-terminal (its controlling tty), driven pexpect-style."""

    def __init__(self, *args: str) -> None:
        argv = [sys.executable, "-m", "rillet.cli", *args]
        env = cli_env()
        pid, fd = pty.fork()
        if pid == 0:  # child: exec at once
            try:
                # as from a terminal: a suite started in the background of a script inherits
                # SIGINT ignored, and an ignored signal stays ignored across exec (no Ctrl-C)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.chdir(REPO)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns
        self.output = ""  # everything read so far
        self.pos = 0  # where the next expect() starts looking
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.eof = False
        self.status: int | None = None

    def _read(self, timeout: float) -> bool:
        if self.eof:
            return False
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            self.eof = True
            return False
        self.output += self._decoder.decode(data).replace("\r\n", "\n")
        return True

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        """Wait until `pattern` (a regex) appears after the previous match; returns the match."""
        regex = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self.pos)
            if match:
                self.pos = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.eof and not self._read(0)):
                raise AssertionError(f"{pattern!r} not seen in {timeout:.0f} s (eof={self.eof}); "
                                     f"output after the last match:\n{self.output[self.pos:][-3000:]}")
            self._read(remaining)

    def wait_for_input_read(self, timeout: float = 30) -> None:
        """Wait until the child sleeps waiting for terminal input (select/poll/read on its tty).

        A Ctrl-C typed between readline printing the prompt and entering select() stays pending
        until the next key (a CPython readline race), so tests send it only once the child waits.
        """
        def waiting() -> bool:
            try:
                wchan = Path(f"/proc/{self.pid}/wchan").read_text()
            except OSError:
                return False
            return wchan.startswith(("poll_schedule_timeout", "do_select", "n_tty_read", "wait_woken"))

        rillet_proc.poll_until(waiting, timeout, "the chat to wait for input", interval_s=0.02)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        """Read to the end of output, then reap the child; returns its exit status."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
        assert self.eof, f"the child did not exit; output:\n{self.output[-3000:]}"
        _, status = os.waitpid(self.pid, 0)
        self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.status = -9
        os.close(self.fd)


@pytest.fixture
def spawn():
    children: list[PtyChild] = []

    def start(*args: str) -> PtyChild:
        child = PtyChild(*args)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


def pytest_sessionfinish(session, exitstatus):
    rillet_proc.stop_shared()
