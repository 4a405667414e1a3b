"""The test session's real `rillet serve` (default model, --api-key API_KEY), shared by every
suite that needs one (tests/client, tests/cli, tests/server, tests/reliability), and the helpers
around it. The process handling itself is `rillet.bench.servers` (also used by the benchmarks and
scripts/soak.py).

    from support import rillet_proc
    server = rillet_proc.shared_server()                       # started once per session
    own = rillet_proc.RilletServer("--max-num-seqs", "1").wait_ready()
"""

from __future__ import annotations

import atexit

from rillet.bench import servers
from rillet.bench.servers import free_port, poll_until

__all__ = ["API_KEY", "RilletServer", "free_port", "poll_until", "shared_server", "stop_shared"]

API_KEY = "test-key"


class RilletServer(servers.RilletServer):
    """`rillet serve` on a free port, --max-model-len 2048, --api-key API_KEY unless `api_key` says otherwise."""

    def __init__(self, *extra_args: str, api_key: str | None = API_KEY, **kwargs) -> None:
        super().__init__(*extra_args, api_key=api_key, **kwargs)


_shared: RilletServer | None = None


def shared_server() -> RilletServer:
    """The session's server: default model, --api-key API_KEY."""
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
