"""One engine core, several front ends: `rillet serve --api-servers N`, as vLLM runs N API
server processes over one engine core.

Why: on a GPU the core makes tokens faster than one Python process can take them in and send
them out. At 256 streams on an H200 the engine alone makes ~88k tokens/s, while one front end
(unpickling each step's outputs, routing them to their streams, framing SSE and writing
sockets, all under one GIL) tops out near 29k. N front ends split that work N ways.

Each front end has its own pipe to the core, with the protocol of engine/core_process.py. The
core's side, SharedPipeTransport:
- takes the commands of every pipe, and remembers which pipe added each request;
- sends each front end the outputs of its own requests, with the shared stats and its own count
  of adds taken, in every cycle that has any of these for it or that has taken one of its adds;
  a front end with nothing new hears the stats every STATS_EVERY_S (at one stream on a GPU a
  message to every idle front end each millisecond cost the core's loop, and woke them, for
  nothing);
- a front end's Stop aborts its own requests only, and their outputs, marked final, are the last
  it hears; a pipe that closes has its requests aborted. The loop stops once every front end
  has stopped or gone;
- "dead" goes to every front end.
The front end's side is AttachedCore: CoreProcess without the process, as the parent of the API
servers (rillet.server.api_servers) starts the core.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait as wait_for

from rillet.config import EngineConfig
from rillet.engine.core import AbortRequest, AddRequest, Command, CoreInfo, CoreOutputs, CoreSetup, Stop, \
    TransportClosed
from rillet.engine.core_process import PipeClient, tell_all
from rillet.engine.outputs import RequestOutput

__all__ = ["AttachedCore", "SharedPipeTransport"]

STATS_EVERY_S = 0.01  # how stale an idle front end's stats (/metrics, queue checks) may grow
GATHER_QUIET_S = 0.001  # an idle core lets a burst of adds gather until the pipes are this quiet ...
GATHER_MAX_S = 0.005  # ... for this long at most, so its first step is not a lone prompt


class SharedPipeTransport:
    """The core's side (CoreTransport) over one pipe per front end (a core started by one
    AsyncEngine has one). Between steps it takes whatever has arrived without waiting; while
    idle it blocks, then lets a burst of requests gather (see GATHER_MAX_S)."""

    def __init__(self, pipes: Sequence[Connection], stats_every_s: float = STATS_EVERY_S) -> None:
        self._pipes = list(pipes)  # front ends still served
        self._added = {id(pipe): 0 for pipe in pipes}
        self._told: dict[int, tuple[int, float]] = {}  # pipe -> (adds it was told of, when)
        self._stats_every_s = stats_every_s
        self._owner: dict[str, tuple[Connection, int]] = {}  # request id -> (its pipe, choices unfinished)
        self._stopping: list[Connection] = []  # sent Stop: their final outputs go with the next publish

    def receive(self, wait: bool, gather: bool = True) -> list[Command]:
        commands: list[Command] = []
        if wait and self._pipes:
            self._take(self._ready(None), commands)
        if wait and gather and self._pipes:
            deadline = time.monotonic() + GATHER_MAX_S
            while time.monotonic() < deadline and (ready := self._ready(GATHER_QUIET_S)):
                self._take(ready, commands)
        while ready := self._ready(0):
            self._take(ready, commands)
        if not self._pipes and not self._stopping:
            commands.append(Stop())  # every front end has stopped or gone
        return commands

    def _ready(self, timeout: float | None) -> list[Connection]:
        return [pipe for pipe in wait_for(self._pipes, timeout) if isinstance(pipe, Connection)] if self._pipes else []

    def _take(self, ready: list[Connection], commands: list[Command]) -> None:
        for pipe in ready:
            try:
                while pipe in self._pipes and pipe.poll():
                    self._command(pipe, pipe.recv(), commands)
            except (EOFError, OSError):  # that front end went away: its requests end with it
                self._pipes.remove(pipe)
                commands += self._release(pipe)
                if not self._pipes and not self._stopping:
                    raise TransportClosed from None

    def _command(self, pipe: Connection, command: Command, commands: list[Command]) -> None:
        if isinstance(command, AddRequest):
            self._added[id(pipe)] += 1
            self._owner[command.request_id] = (pipe, command.params.n)
            commands.append(command)
        elif isinstance(command, AbortRequest):
            owner = self._owner.get(command.request_id)
            if owner is not None and owner[0] is pipe:  # a front end aborts only its own requests
                commands.append(command)
        else:  # Stop: this front end's requests end, then its pipe
            self._pipes.remove(pipe)
            self._stopping.append(pipe)
            commands += self._release(pipe)

    def _release(self, pipe: Connection) -> list[Command]:
        return [AbortRequest(request_id) for request_id, (owner, _) in self._owner.items() if owner is pipe]

    def publish(self, outputs: CoreOutputs) -> None:
        by_pipe: dict[int, list[RequestOutput]] = {}
        for out in outputs.outputs:
            owner = self._owner.get(out.request_id)
            if owner is None:
                continue
            pipe, unfinished = owner
            by_pipe.setdefault(id(pipe), []).append(out)
            if out.finish_reason is not None:
                if unfinished > 1:
                    self._owner[out.request_id] = (pipe, unfinished - 1)
                else:
                    del self._owner[out.request_id]
        stopping, self._stopping = self._stopping, []
        now = time.monotonic()
        for pipe in self._pipes:
            key, mine, added = id(pipe), by_pipe.get(id(pipe), []), self._added[id(pipe)]
            told, told_at = self._told.get(key, (-1, 0.0))
            if mine or added != told or now - told_at >= self._stats_every_s:
                self._told[key] = (added, now)
                self._send(pipe, CoreOutputs(mine, outputs.stats, added))
        for pipe in stopping:
            self._send(pipe, CoreOutputs(by_pipe.get(id(pipe), []), outputs.stats, self._added[id(pipe)], final=True))
            self._owner = {rid: owner for rid, owner in self._owner.items() if owner[0] is not pipe}

    def _send(self, pipe: Connection, outputs: CoreOutputs) -> None:
        try:
            pipe.send(outputs)
        except OSError:  # gone: the next receive finds its EOF and releases its requests
            pass

    def die(self, reason: str) -> None:
        tell_all(self._pipes + self._stopping, ("dead", reason))


class AttachedCore(PipeClient):
    """A CoreClient over a pipe to a core that another process started (see the module doc).
    AsyncEngine takes it as `transport=functools.partial(AttachedCore, pipe)`."""

    def __init__(self, pipe: Connection, config: EngineConfig, on_outputs: Callable[[CoreOutputs], None],
                 on_dead: Callable[[str], None], setup: CoreSetup | None = None) -> None:
        super().__init__(config, on_outputs, on_dead, setup)  # setup ran where the core was built
        self._pipe = pipe

    def start(self) -> CoreInfo:
        return self._handshake(self._pipe, lambda: "its pipe closed")

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        self._pipe.close()
