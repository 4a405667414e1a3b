"""`rillet serve --api-servers N`: N HTTP server processes over one engine core.

This process supervises them. It binds the listening socket, starts the engine core with one
pipe per API server (rillet.engine.core_shared), and starts the N API servers, fresh
interpreters that accept on the shared socket (the kernel hands each connection to one of
them) and serve the same app as a lone `rillet serve`, over their pipe to the core. While the
model loads only the first accepts (and answers 503 "loading"); the others accept once ready.

- Signals: SIGINT and SIGTERM are passed on to every API server, which drains as a lone server
  does (runner.DrainingServer): a second signal aborts the running streams, a third exits. The
  API servers run in a session of their own, so a terminal's Ctrl-C reaches them once, from
  here. The core stops once every API server has stopped.
- Exit status: 0 after a drain; 1 when the model failed to load, the engine died (every API
  server then ends its streams with an error event and exits 1), or an API server exited
  unexpectedly (the others are drained then), so that a supervisor restarts the whole.
- /metrics: the API servers count into one Prometheus multiprocess directory
  (PROMETHEUS_MULTIPROC_DIR, made here, removed at exit), so any of them reports the requests
  of all; the engine's gauges are the core's, the same from each.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection
from types import FrameType

from rillet.config import EngineConfig, ServerConfig
from rillet.server import faults

__all__ = ["api_server_main", "serve_api_servers"]

logger = logging.getLogger("rillet.server")

# argv: the server's index, the listening socket's fd, its pipe's fd, the supervisor's pid; its
# configs come on stdin
API_SERVER_ENTRY = "from rillet.server.api_servers import api_server_main; api_server_main()"
CORE_EXIT_TIMEOUT_S = 60.0  # after the last API server, for the core to release the model
PR_SET_PDEATHSIG = 1  # prctl(2)


def serve_api_servers(server_config: ServerConfig, engine_config: EngineConfig, count: int) -> int:
    """Serve with `count` API servers until they have drained; returns the exit status."""
    from rillet.engine.core_process import spawn_core
    from rillet.server.runner import listen_socket

    fault_spec = os.environ.get(faults.ENV_VAR)
    if fault_spec:
        faults.parse_fault_spec(fault_spec)  # a typo fails at startup, not silently
    sock = listen_socket(server_config)
    metrics_dir = tempfile.mkdtemp(prefix="rillet-metrics-")
    pipes = [socket.socketpair() for _ in range(count)]
    servers: list[subprocess.Popen[bytes]] = []
    core = None
    try:
        setup_pipe, core = spawn_core(engine_config, faults.install_in_core if fault_spec else None,
                                      [core_end.fileno() for _, core_end in pipes])
        setup_pipe.close()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
                   PROMETHEUS_MULTIPROC_DIR=metrics_dir)
        env.pop(faults.ENV_VAR, None)  # the hook lives in the core; the servers would only warn of it
        configs = pickle.dumps((server_config, engine_config))
        for index, (server_end, core_end) in enumerate(pipes):
            core_end.close()
            fds = [sock.fileno(), server_end.fileno()]
            server = subprocess.Popen([sys.executable, "-c", API_SERVER_ENTRY, str(index), *map(str, fds),
                                       str(os.getpid())],
                                      pass_fds=fds, env=env, stdin=subprocess.PIPE, start_new_session=True)
            assert server.stdin is not None
            server.stdin.write(configs)
            server.stdin.close()
            server_end.close()
            servers.append(server)
        sock.close()
        logger.info("%d API servers on http://%s:%d over one engine core", count, server_config.host,
                    server_config.port)
        return _supervise(servers, core)
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
                server.wait()
        if core is not None and core.poll() is None:
            core.kill()
            core.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(servers: list[subprocess.Popen[bytes]], core: subprocess.Popen[bytes]) -> int:
    live = {server.pid: server for server in servers}
    index = {server.pid: i for i, server in enumerate(servers)}
    signalled = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal signalled
        signalled = True
        for server in live.values():
            server.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        while live:
            pid, status = os.wait()
            code = os.waitstatus_to_exitcode(status)
            if pid == core.pid:
                core.returncode = code
                if code != 0:  # the servers hear "dead" (or EOF) on their pipes and exit 1
                    logger.error("the engine process exited (status %d)", code)
                    exit_code = 1
                continue
            server = live.pop(pid, None)
            if server is None:
                continue
            server.returncode = code
            if code != 0 or not signalled:
                exit_code = 1
                if not signalled:  # one went down by itself: take the rest down with it, drained
                    logger.error("API server %d exited (status %d); stopping the others", index[pid], code)
                    forward(signal.SIGTERM, None)
        if core.returncode is None:
            try:
                if core.wait(CORE_EXIT_TIMEOUT_S) != 0:
                    exit_code = 1
            except subprocess.TimeoutExpired:
                logger.error("the engine process did not exit; killing it")
                exit_code = 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code


def api_server_main() -> None:
    """Entry point of one API server (see API_SERVER_ENTRY)."""
    from rillet.engine.async_engine import AsyncEngine
    from rillet.engine.core_shared import AttachedCore
    from rillet.server.app import create_app
    from rillet.server.runner import configure_logging, run_app

    index, listen_fd, pipe_fd, supervisor = map(int, sys.argv[1:5])
    _drain_when_orphaned(supervisor)
    server_config, engine_config = pickle.load(sys.stdin.buffer)
    configure_logging(server_config.log_level)
    handler = logging.getLogger("rillet").handlers[0]
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s [api server {index}]: %(message)s"))
    engine = AsyncEngine(engine_config, transport=functools.partial(AttachedCore, Connection(pipe_fd)))
    app = create_app(server_config, engine=engine, serve_once_ready=index > 0)
    sys.exit(run_app(app, server_config, socket.socket(fileno=listen_fd)))


def _drain_when_orphaned(supervisor: int) -> None:
    """Linux: SIGTERM (a drain) for this API server when its supervisor dies, even by SIGKILL,
    so that it does not serve on alone; the core then stops once every API server has."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
