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
import os
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

__all__ = ["DrainingServer", "api_server_count", "configure_logging", "listen_socket", "run_app", "serve"]

API_SERVER_CORES = 4  # CPU cores per API server when their number is left to rillet
AUTO_API_SERVERS_MAX = 4
LISTEN_BACKLOG = 2048  # uvicorn's default

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
    """Serve until SIGTERM/SIGINT; returns the process exit status. With more than one API
    server (ServerConfig.api_servers; not with an `engine` of your own) this process supervises
    them (rillet.server.api_servers)."""
    server_config = server_config or ServerConfig()
    configure_logging(server_config.log_level)
    engine_config = engine_config or EngineConfig()
    if engine_config.engine_process is None:
        engine_config = dataclasses.replace(engine_config, engine_process=True)
    count = 1 if engine is not None else api_server_count(server_config, engine_config)
    if count > 1:
        from rillet.server.api_servers import serve_api_servers

        return serve_api_servers(server_config, engine_config, count)
    app = create_app(server_config, engine_config, engine=engine)
    return run_app(app, server_config, listen_socket(server_config) if server_config.send_buffer_bytes else None)


def api_server_count(server_config: ServerConfig, engine_config: EngineConfig) -> int:
    """ServerConfig.api_servers, or its default: one on a CPU (its cores run the model), and on
    a CUDA GPU one per API_SERVER_CORES cores, AUTO_API_SERVERS_MAX at most."""
    count = server_config.api_servers
    if count is None:
        count = 1
        if engine_config.device != "cpu" and engine_config.engine_process:
            import torch

            if engine_config.device.startswith("cuda") or torch.cuda.is_available():
                count = max(1, min(AUTO_API_SERVERS_MAX, (os.cpu_count() or 1) // API_SERVER_CORES))
    if count > 1 and not engine_config.engine_process:
        raise ValueError("several API servers need the engine in a process of its own (--engine-process)")
    return count


def listen_socket(server_config: ServerConfig) -> socket.socket:
    """The bound listening socket (with SO_REUSEADDR and uvicorn's backlog), with --send-buffer-bytes applied:
    accepted connections inherit its SO_SNDBUF (which also turns off the kernel's autotuning of
    it, up to net.ipv4.tcp_wmem's max: 4 MiB on common systems)."""
    host = server_config.host
    sock = socket.create_server((host, server_config.port), backlog=LISTEN_BACKLOG,
                                family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    if server_config.send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_config.send_buffer_bytes)
    return sock


def run_app(app: Any, server_config: ServerConfig, sock: socket.socket | None = None) -> int:
    """Run `app` (from create_app) on uvicorn until drained; returns the exit status. `sock`: a
    listening socket to accept on (else uvicorn binds --host/--port)."""
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                            log_level=server_config.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5, ws="none", server_header=False)
    server = DrainingServer(config, app.state.rillet, server_config.drain_timeout_s)
    app.state.rillet.on_engine_failure = server.engine_failed
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(server.serve(sockets=None if sock is None else [sock]))
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
