"""The in-process transport's other half: the EngineCore loop in a process of its own, as
vLLM's V1 engine core runs (`engine_process=True`, the default of `rillet serve`).

Why: on a CPU the forward pass wants every core, and in one process it shares them, and the
GIL, with the event loop that tokenizes, encodes JSON and writes to sockets. Each OpenMP region
then waits for whichever worker the loop descheduled, and the engine thread waits for the GIL
between its ~1,500 op dispatches a step. In its own process the core owns its threads and its
GIL; the front end only tokenizes, routes deltas and serves HTTP.

Protocol over one `multiprocessing` pipe (pickled objects, engine/core.py):
  front end -> core: (config, log level, setup) first, then AddRequest | AbortRequest | Stop
  core -> front end: ("ready", CoreInfo) | ("failed", exception)      at start
                     CoreOutputs                                      after each cycle (final after Stop)
                     ("dead", reason)                                 the loop cannot go on
The core ignores SIGINT/SIGTERM: the front end decides when it stops (graceful drain), and it
exits by itself when the front end goes away (its pipe reaches EOF).
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from rillet.engine.core import Command, CoreClientBase, CoreInfo, CoreOutputs, TransportClosed

logger = logging.getLogger(__name__)

__all__ = ["CoreProcess", "core_main"]

CORE_ENTRY = ("import sys; from multiprocessing.connection import Connection; "
              "from rillet.engine.core_process import core_main; core_main(Connection(int(sys.argv[1])))")
GATHER_QUIET_S = 0.001
GATHER_MAX_S = 0.005


class PipeTransport:
    """The core's side (CoreTransport) over the pipe.

    Between steps it takes whatever has arrived without waiting. While idle it blocks; then it
    lets a burst of requests gather for a moment (until the pipe is quiet for GATHER_QUIET_S,
    GATHER_MAX_S at most) so its first step is not a lone prompt the others queue behind."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def receive(self, wait: bool) -> list[Command]:
        conn = self._conn
        try:
            commands: list[Command] = []
            if wait:
                commands.append(conn.recv())
                deadline = time.monotonic() + GATHER_MAX_S
                while time.monotonic() < deadline and conn.poll(GATHER_QUIET_S):
                    commands.append(conn.recv())
            while conn.poll():
                commands.append(conn.recv())
        except (EOFError, OSError) as exc:
            raise TransportClosed from exc
        return commands

    def publish(self, outputs: CoreOutputs) -> None:
        try:
            self._conn.send(outputs)
        except OSError as exc:  # BrokenPipeError, ConnectionResetError: the front end went away
            raise TransportClosed from exc

    def die(self, reason: str) -> None:
        try:
            self._conn.send(("dead", reason))
        except OSError:
            pass


def core_main(conn: Connection) -> None:
    """Entry point of the engine process: the first message is (config, log level, setup)."""
    config, log_level, setup = conn.recv()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    root = logging.getLogger("rillet")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [engine process]: %(message)s"))
        root.addHandler(handler)
        root.setLevel(log_level)
        root.propagate = False
    from rillet.engine.core import EngineCore

    try:
        core = EngineCore(config, setup)
    except BaseException as exc:  # sent back whole when it pickles, so the caller sees its type
        conn.send(("failed", _picklable(exc)))
        return
    conn.send(("ready", core.info()))
    core.run(PipeTransport(conn))
    if core.dead_reason is not None:
        sys.exit(1)


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class CoreProcess(CoreClientBase):
    """The front end's side (CoreClient): start the core process, send it commands, hear from it.

    `on_outputs` and `on_dead` are called on a reader thread; a core that exits without saying
    why reaches `on_dead` too."""

    def _init_transport(self) -> None:
        self._conn: Connection | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._outbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> CoreInfo:
        # A fresh interpreter, not fork (the parent has torch's thread pools) nor multiprocessing's
        # spawn (it re-runs the caller's __main__ script).
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        process = self.process = subprocess.Popen([sys.executable, "-c", CORE_ENTRY, str(theirs.fileno())],
                                                  pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        conn = Connection(ours.detach())
        conn.send((self.config, logging.getLogger("rillet").getEffectiveLevel(), self._setup))
        try:
            kind, payload = conn.recv()
        except EOFError:
            status = process.wait()
            raise RuntimeError(f"the engine process exited while starting (status {status})") from None
        if kind == "failed":
            process.wait()
            raise payload
        self._conn = conn
        self._threads = [threading.Thread(target=self._read, args=(conn, process), name="rillet-core-reader",
                                          daemon=True),
                         threading.Thread(target=self._write, args=(conn,), name="rillet-core-writer", daemon=True)]
        for thread in self._threads:
            thread.start()
        info: CoreInfo = payload
        return info

    def send(self, command: Command) -> None:
        self._outbox.put(command)  # a writer thread does the sending

    def join(self, timeout: float | None = None) -> None:
        if self._threads:
            self._threads[0].join(timeout)
        self._outbox.put(None)
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _write(self, conn: Connection) -> None:
        while (command := self._outbox.get()) is not None:
            try:
                conn.send(command)
            except OSError:
                return  # the core is gone; the reader reports it

    def _read(self, conn: Connection, process: subprocess.Popen[bytes]) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                try:
                    status: int | str = process.wait(5)
                except subprocess.TimeoutExpired:
                    status = "still running"
                self._on_dead(f"the engine process exited (status {status})")
                return
            if isinstance(message, CoreOutputs):
                self._on_outputs(message)
                if message.final:
                    return
            else:  # ("dead", reason)
                self._on_dead(message[1])
                return
