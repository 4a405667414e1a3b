"""Run the app on uvicorn, with a graceful SIGTERM/SIGINT drain.

First signal: new requests get 503, /health says "draining", running streams may finish for
`drain_timeout_s`; then the rest are aborted (their streams end with a terminal error event)
and uvicorn shuts down; exit status 0. A second signal aborts the running streams at once;
a third exits immediately.

If the engine fails to load, or its loop dies while serving (see `create_app`), the server
shuts down the same way and exits with status 1, so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn

from rillet.config import EngineConfig, ServerConfig
from rillet.engine.engine_client import EngineClient
from rillet.server.app import create_app
from rillet.server.context import AppContext

__all__ = ["DrainingServer", "configure_logging", "serve"]

logger = logging.getLogger("rillet.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app_context: AppContext, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.ctx = app_context
        self.drain_timeout_s = drain_timeout_s
        self.exit_code = 0
        self._signals = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
                pass
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            logger.info("%s: draining (up to %.1fs for %d running request(s))", name, self.drain_timeout_s,
                        len(self.ctx.state.active))
            self._spawn(self._drain(self.drain_timeout_s))
        elif self._signals == 2:
            logger.warning("%s again: aborting running requests now", name)
            self._spawn(self._drain(0.0))
        else:
            self.force_exit = True
            self.should_exit = True

    async def _drain(self, timeout_s: float) -> None:
        try:
            await self.ctx.state.drain(timeout_s)
        finally:
            self.should_exit = True

    def engine_failed(self, exc: BaseException) -> None:
        """The engine failed to load or died while serving: exit with status 1 (a supervisor restarts)."""
        if self.ctx.start_error is exc:
            logger.error("exiting with status 1: the model could not be loaded")
        else:
            logger.error("exiting with status 1: %s", exc)
        self.exit_code = 1
        self.should_exit = True


def configure_logging(level: str) -> None:
    logger_ = logging.getLogger("rillet")
    if not logger_.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger_.addHandler(handler)
    logger_.setLevel(level.upper())
    logger_.propagate = False


def serve(server_config: ServerConfig | None = None, engine_config: EngineConfig | None = None, *,
          engine: EngineClient | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit status."""
    server_config = server_config or ServerConfig()
    configure_logging(server_config.log_level)
    engine_config = engine_config or EngineConfig()
    if engine_config.engine_process is None:
        engine_config = dataclasses.replace(engine_config, engine_process=True)
    app = create_app(server_config, engine_config, engine=engine)
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                            log_level=server_config.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5, ws="none", server_header=False)
    server = DrainingServer(config, app.state.rillet, server_config.drain_timeout_s)
    app.state.rillet.on_engine_failure = server.engine_failed
    sockets = None
    if server_config.send_buffer_bytes:
        # Accepted connections inherit the listening socket's SO_SNDBUF (which also turns off the
        # kernel's autotuning of it, up to net.ipv4.tcp_wmem's max: 4 MiB on common systems).
        sock = config.bind_socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_config.send_buffer_bytes)
        sockets = [sock]
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(server.serve(sockets=sockets))
    return server.exit_code


def _loop_factory() -> Any:
    """uvloop's event loop where installed (a dependency except on Windows): it and httptools
    (which uvicorn picks by itself) cut the server's CPU per streamed token by about a tenth,
    and on a small machine that CPU comes out of the engine's share."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
