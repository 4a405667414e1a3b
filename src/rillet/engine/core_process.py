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
exits by itself when the front end goes away (its pipe reaches EOF). The core's side of the pipe
is engine/core_shared.py's SharedPipeTransport, which also serves several front ends, one pipe
each (`rillet serve --api-servers N`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

from rillet.config import EngineConfig
from rillet.engine.core import Command, CoreClientBase, CoreInfo, CoreOutputs, CoreSetup
from rillet.engine.loop_pipe import LoopPipe

logger = logging.getLogger(__name__)

__all__ = ["CoreProcess", "PipeClient", "core_main", "spawn_core"]

# argv: the setup pipe's fd, then (a core shared by several front ends) one pipe fd per front end
CORE_ENTRY = ("import sys; from multiprocessing.connection import Connection; "
              "from rillet.engine.core_process import core_main; "
              "core_main(Connection(int(sys.argv[1])), [Connection(int(fd)) for fd in sys.argv[2:]])")


def core_main(conn: Connection, front_ends: list[Connection] | None = None) -> None:
    """Entry point of the engine process: the first message on `conn` is (config, log level,
    setup). With `front_ends` (rillet.engine.core_shared) the core serves those pipes instead
    of `conn`, each of which hears ("ready", info) or ("failed", exception)."""
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
    from rillet.engine.core_shared import SharedPipeTransport  # one pipe or several: one transport

    pipes = front_ends or [conn]
    try:
        core = EngineCore(config, setup)
    except BaseException as exc:  # sent back whole when it pickles, so the caller sees its type
        tell_all(pipes, ("failed", _picklable(exc)))
        return
    # the first front end hears last: it alone serves (503 "loading") before it is ready, the
    # others accept connections only once they are, so it must not say "ready" before them
    tell_all(pipes[::-1], ("ready", core.info()))
    core.run(SharedPipeTransport(pipes))
    if core.dead_reason is not None:
        sys.exit(1)


def tell_all(pipes: list[Connection], message: object) -> None:
    for pipe in pipes:
        try:
            pipe.send(message)
        except OSError:  # that front end is gone already; the others still hear it
            pass


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class PipeClient(CoreClientBase):
    """The front end's side (CoreClient) of a core's pipe, served on the event loop it is built
    on (AsyncEngine builds it in start(), on its loop): commands are written and outputs read
    there, with no thread (engine/loop_pipe.py says why); `on_outputs` and `on_dead` are called
    on that loop. A core that goes away without saying why reaches `on_dead` too."""

    def _init_transport(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wire: LoopPipe | None = None
        self._exited: Callable[[], str] = lambda: "unknown"
        self._done = threading.Event()  # the final outputs, "dead", or EOF came

    def _handshake(self, conn: Connection, exited: Callable[[], str]) -> CoreInfo:
        """Wait for the core's ("ready", info) (blocking: this runs off the loop), then start
        reading on the loop. Raises what building the engine raised, or RuntimeError (with
        `exited()`'s account) if the pipe closes first."""
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"the engine process exited while starting ({exited()})") from None
        if kind == "failed":
            raise payload
        self._exited = exited
        self._wire = LoopPipe(conn, self._loop, self._message, self._closed)
        self._loop.call_soon_threadsafe(self._wire.start)
        info: CoreInfo = payload
        return info

    def send(self, command: Command) -> None:
        """Queue a command (never blocks; from any thread, the loop's is quickest)."""
        if self._wire is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wire.send(command)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wire.send, command)

    def join(self, timeout: float | None = None) -> None:
        if self._wire is not None:
            self._done.wait(timeout)

    def _message(self, message: object) -> None:
        if isinstance(message, CoreOutputs):
            self._on_outputs(message)
            if message.final:
                self._finish()
        else:  # ("dead", reason)
            assert isinstance(message, tuple)
            self._finish()
            self._on_dead(message[1])

    def _closed(self) -> None:
        self._done.set()
        # the exit status may take a moment to come: not on the loop
        threading.Thread(target=lambda: self._on_dead(f"the engine process exited ({self._exited()})"),
                         name="rillet-core-exit", daemon=True).start()

    def _finish(self) -> None:
        assert self._wire is not None
        self._wire.stop()
        self._done.set()


class CoreProcess(PipeClient):
    """A PipeClient that starts the core's process itself, in a fresh interpreter."""

    def _init_transport(self) -> None:
        super()._init_transport()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CoreInfo:
        conn, process = spawn_core(self.config, self._setup)
        self.process = process
        try:
            return self._handshake(conn, lambda: _exit_status(process))
        except BaseException:
            process.wait()
            raise

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn_core(config: EngineConfig, setup: CoreSetup | None, front_end_fds: Sequence[int] = ()
               ) -> tuple[Connection, subprocess.Popen[bytes]]:
    """Start the engine process and send it its setup; returns the setup pipe and the process.
    A fresh interpreter, not fork (the parent has torch's thread pools) nor multiprocessing's
    spawn (it re-runs the caller's __main__ script). With `front_end_fds` the core serves those
    pipes (their other ends held by the front ends) instead of the setup pipe."""
    ours, theirs = socket.socketpair()
    fds = [theirs.fileno(), *front_end_fds]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    process = subprocess.Popen([sys.executable, "-c", CORE_ENTRY, *map(str, fds)], pass_fds=fds, env=env)
    theirs.close()
    conn = Connection(ours.detach())
    conn.send((config, logging.getLogger("rillet").getEffectiveLevel(), setup))
    return conn, process


def _exit_status(process: subprocess.Popen[bytes]) -> str:
    try:
        return f"status {process.wait(5)}"
    except subprocess.TimeoutExpired:
        return "status: still running"
