"""The engine core in its own process, as vLLM's V1 engine core runs.

Why: on a CPU the forward pass wants every core, and in one process it shares them, and the
GIL, with the event loop that tokenizes, encodes JSON and writes to sockets. Each OpenMP region
then waits for whichever worker the loop descheduled, and the engine thread waits for the GIL
between its ~1,500 op dispatches a step. In its own process the core owns its threads and its
GIL; the front end only tokenizes, routes deltas and serves HTTP.

Protocol over one `multiprocessing` pipe (pickled tuples):
  front end -> core: ("add", request_id, token_ids, params) | ("abort", request_id) | ("stop",)
  core -> front end: ("ready", CoreInfo) | ("failed", exception)            at start
                     ("outputs", [RequestOutput], EngineStats, num_added)   after each step
                     ("stopped", [RequestOutput], EngineStats, num_added)   after "stop"
                     ("dead", reason)                                       the loop cannot go on
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
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

from rillet.config import EngineConfig
from rillet.engine.outputs import RequestOutput

logger = logging.getLogger(__name__)

CORE_ENTRY = ("import sys; from multiprocessing.connection import Connection; "
              "from rillet.engine.core_process import core_main; core_main(Connection(int(sys.argv[1])))")
GATHER_QUIET_S = 0.001
GATHER_MAX_S = 0.005
CoreSetup = Callable[[Any], None]  # runs on the LLMEngine once built (test hooks); must pickle


@dataclass
class CoreInfo:
    model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any
    stats: Any  # EngineStats
    eos_token_ids: tuple[int, ...] = ()  # the front end compiles structured-output grammars with them


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
    from rillet.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(config)
        if setup is not None:
            setup(engine)
    except BaseException as exc:  # sent back whole when it pickles, so the caller sees its type
        conn.send(("failed", _picklable(exc)))
        return
    conn.send(("ready", CoreInfo(engine.model_name, engine.max_model_len, engine.vocab_size, engine.tokenizer,
                                 engine.stats(), tuple(sorted(engine.eos_token_ids)))))
    try:
        _serve(engine, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the front end went away
    except BaseException as exc:
        logger.exception("engine loop died")
        try:
            conn.send(("dead", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        sys.exit(1)


def _serve(engine: Any, conn: Any) -> None:
    num_added = 0
    while True:
        # Between steps take whatever has arrived without waiting. While idle, block; then let
        # a burst of requests gather for a moment (until the pipe is quiet for GATHER_QUIET_S,
        # GATHER_MAX_S at most) so its first step is not a lone prompt the others queue behind.
        if engine.has_unfinished():
            messages = []
        else:
            messages = [conn.recv()]
            deadline = time.monotonic() + GATHER_MAX_S
            while time.monotonic() < deadline and conn.poll(GATHER_QUIET_S):
                messages.append(conn.recv())
        while conn.poll():
            messages.append(conn.recv())
        outputs: list[RequestOutput] = []
        for message in messages:
            kind = message[0]
            if kind == "add":
                _, request_id, token_ids, params = message
                num_added += 1
                try:
                    engine.add_request(request_id, None, params, prompt_token_ids=token_ids)
                except ValueError as exc:  # the front end validated it; never leave a stream hanging
                    outputs += [RequestOutput(request_id=request_id, index=i, text="", token_ids=[],
                                              num_prompt_tokens=len(token_ids), num_output_tokens=0,
                                              finish_reason="error", error=str(exc)) for i in range(params.n)]
            elif kind == "abort":
                outputs += engine.abort(message[1])
            elif kind == "stop":
                for request_id in list(engine.requests):
                    outputs += engine.abort(request_id)
                conn.send(("stopped", outputs, engine.stats(), num_added))
                return
        outputs += engine.step()
        conn.send(("outputs", outputs, engine.stats(), num_added))


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class EngineProcess:
    """Front-end handle on the core process: start it, send it messages, hear from it.

    `on_message` is called on a reader thread with every message after "ready"; a core that
    exits without saying why reaches it as ("dead", reason).
    """

    def __init__(self, config: EngineConfig, on_message: Callable[[tuple], None], setup: CoreSetup | None = None):
        self.config = config
        self._on_message = on_message
        self._setup = setup
        self._conn: Any = None
        self._process: Any = None
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> CoreInfo:
        """Start the core and wait until its model is loaded (blocking: call it off the event loop)."""
        # A fresh interpreter, not fork (the parent has torch's thread pools) nor multiprocessing's
        # spawn (it re-runs the caller's __main__ script).
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._process = subprocess.Popen([sys.executable, "-c", CORE_ENTRY, str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        conn = Connection(ours.detach())
        conn.send((self.config, logging.getLogger("rillet").getEffectiveLevel(), self._setup))
        try:
            kind, payload = conn.recv()
        except EOFError:
            status = self._process.wait()
            raise RuntimeError(f"the engine process exited while starting (status {status})") from None
        if kind == "failed":
            self._process.wait()
            raise payload
        self._conn = conn
        self._threads = [threading.Thread(target=self._read, name="rillet-core-reader", daemon=True),
                         threading.Thread(target=self._write, name="rillet-core-writer", daemon=True)]
        for thread in self._threads:
            thread.start()
        return payload

    def send(self, message: tuple) -> None:
        """Queue a message for the core; never blocks the caller (a writer thread does the sending)."""
        self._outbox.put(message)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the core to finish (after "stop", or once it died), then release its resources."""
        if self._threads:
            self._threads[0].join(timeout)
        self._outbox.put(None)
        if self._process is not None:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except OSError:
                return  # the core is gone; the reader reports it

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                try:
                    status = self._process.wait(5)
                except subprocess.TimeoutExpired:
                    status = "still running"
                self._on_message(("dead", f"the engine process exited (status {status})"))
                return
            self._on_message(message)
            if message[0] in ("stopped", "dead"):
                return

