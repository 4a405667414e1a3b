"""EngineCore: the one engine loop, whichever transport carries its requests and outputs.

As vLLM v1's in-process and multiprocess engine clients share one `EngineCore`, AsyncEngine
runs this loop either in a thread of its own process (engine/core_thread.py) or in a process
of its own (engine/core_process.py). The loop is written once, here:

  wait for commands while idle (never while requests are live) -> add / abort / stop
  -> one LLMEngine.step() -> publish the outputs, the stats and the count of adds taken

A transport only moves commands in and outputs out. The rules live here, for both:
- an add the LLMEngine refuses (ValueError: the front end checked it, but never leave a stream
  hanging) ends at once with finish_reason "error";
- a step that fails ends its batch's requests with "error" (LLMEngine.step); once
  MAX_CONSECUTIVE_STEP_FAILURES steps in a row have failed it raises EngineDeadError, the loop
  stops and the transport hears `die(reason)`: every open stream gets that error;
- with tensor parallelism a failed step is fatal at once, and a worker rank that exits is
  reported by the workers' watchdog straight to the transport, even while the loop is idle or
  blocked in a collective;
- "stop" aborts every live request (finish_reason "abort") and publishes them as the last outputs;
- outputs carry token ids, not text: the front end detokenizes and looks for stop strings (as
  vLLM v1's does), and ends a choice whose text hit one with an AbortRequest naming the choice
  and the stop string (it ends as "stop", not counted as aborted; the few tokens made meanwhile
  are dropped there).
`core_setup(llm_engine)` (test hooks) runs on the LLMEngine once it is built, in the thread or
process that runs the loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, Union

import torch

from rillet.config import EngineConfig
from rillet.engine.llm_engine import EngineStats, LLMEngine
from rillet.engine.outputs import RequestOutput, output_rows, outputs_from_rows
from rillet.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AddRequest", "AbortRequest", "Stop", "Command", "CoreOutputs", "CoreInfo", "CoreSetup",
           "CoreTransport", "CoreClient", "CoreClientBase", "EngineCore", "TransportClosed"]

CoreSetup = Callable[[LLMEngine], None]  # runs on the LLMEngine once built; must pickle in process mode


# ---- what travels: front end -> core ------------------------------------------------------------

@dataclass(frozen=True)
class AddRequest:
    request_id: str
    token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    request_id: str
    index: int | None = None  # one choice only
    stop: str | None = None  # the stop string the front end found in that choice: it ends as "stop"


@dataclass(frozen=True)
class Stop:
    """Abort every live request, publish them, and end the loop."""


Command = Union[AddRequest, AbortRequest, Stop]


# ---- what travels: core -> front end ------------------------------------------------------------

@dataclass
class CoreOutputs:
    """One cycle's outputs. `num_added`: adds the core has taken so far (the front end counts the
    ones it sent, so stats() can count those still in transit as waiting). `final`: the loop has
    stopped after these."""
    outputs: list[RequestOutput]
    stats: EngineStats
    num_added: int
    final: bool = False

    def __reduce__(self) -> tuple[Callable[..., CoreOutputs], tuple[object, ...]]:
        # sent to the front ends every step: one Python call for the batch, not one per output
        return (_core_outputs, (output_rows(self.outputs), self.stats, self.num_added, self.final))


def _core_outputs(rows: list[tuple[object, ...]], stats: EngineStats, num_added: int, final: bool) -> CoreOutputs:
    return CoreOutputs(outputs_from_rows(rows), stats, num_added, final)


@dataclass
class CoreInfo:
    """What the front end needs once the model has loaded."""
    model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any  # a Hugging Face tokenizer
    stats: EngineStats
    eos_token_ids: tuple[int, ...] = ()  # the front end compiles structured-output grammars with them


class TransportClosed(Exception):
    """The front end went away (the process transport's pipe reached EOF): stop quietly."""


class CoreTransport(Protocol):
    """The core's side of a transport."""

    def receive(self, wait: bool, gather: bool = True) -> list[Command]:
        """The commands that have arrived, in order. `wait`: block until there is at least one
        (the core is idle); then with `gather`, a transport that can tell a burst is arriving may
        wait a moment for the rest of it. Raises TransportClosed when the front end is gone."""
        ...

    def publish(self, outputs: CoreOutputs) -> None:
        """Hand one cycle's outputs to the front end (never blocks on it)."""
        ...

    def die(self, reason: str) -> None:
        """The loop cannot go on: tell the front end why."""
        ...


class CoreClient(Protocol):
    """The front end's side of a transport (AsyncEngine holds one). It calls back
    `on_outputs(CoreOutputs)` and `on_dead(reason)` from a thread of its own."""

    def start(self) -> CoreInfo:
        """Build the core and start its loop (blocking: call it off the event loop). Raises what
        building the LLMEngine raised."""
        ...

    def send(self, command: Command) -> None:
        """Queue a command for the core; never blocks."""
        ...

    def join(self, timeout: float | None = None) -> None:
        """Wait for the loop to end (after Stop, or once it died) and release its resources."""
        ...


class CoreClientBase:
    """What both CoreClients hold: the config, the callbacks, the setup hook."""

    def __init__(self, config: EngineConfig, on_outputs: Callable[[CoreOutputs], None],
                 on_dead: Callable[[str], None], setup: CoreSetup | None = None) -> None:
        self.config = config
        self._on_outputs = on_outputs
        self._on_dead = on_dead
        self._setup = setup
        self._init_transport()

    def _init_transport(self) -> None:
        """The transport's own state."""


class EngineCore:
    """Owns the LLMEngine and runs the add / abort / step cycle over a transport."""

    def __init__(self, config: EngineConfig, setup: CoreSetup | None = None) -> None:
        self.config = config
        self.engine = LLMEngine(config)
        self.engine.detokenize = False  # the front end (AsyncEngine) turns the token ids into text
        if setup is not None:
            setup(self.engine)
        self.num_added = 0
        self.dead_reason: str | None = None
        self._transport_lock = threading.Lock()  # the loop's publish and the TP watchdog's die

    def info(self) -> CoreInfo:
        engine = self.engine
        return CoreInfo(engine.model_name, engine.max_model_len, engine.vocab_size, engine.tokenizer,
                        engine.stats(), tuple(sorted(engine.eos_token_ids)))

    def add(self, command: AddRequest) -> list[RequestOutput]:
        self.num_added += 1
        try:
            self.engine.add_request(command.request_id, None, command.params, prompt_token_ids=command.token_ids)
        except ValueError as exc:  # the front end validated it; never leave a stream hanging
            return [RequestOutput(request_id=command.request_id, index=i, text="", token_ids=[],
                                  num_prompt_tokens=len(command.token_ids), num_output_tokens=0,
                                  finish_reason="error", error=str(exc)) for i in range(command.params.n)]
        return []

    def abort_all(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for request_id in list(self.engine.requests):
            outputs += self.engine.abort(request_id)
        return outputs

    def run(self, transport: CoreTransport) -> None:
        """The loop, until Stop, the transport closing, or a failure it cannot get past (then
        `dead_reason` is set and the transport has been told)."""
        threads = self.engine.config.num_threads  # the engine's: tensor parallelism on a CPU sets its share
        if threads:  # OpenMP settings are per calling thread
            torch.set_num_threads(threads)
        if self.engine.workers is not None:
            self.engine.workers.on_death = lambda reason: self._die(transport, reason)
        try:
            self._loop(transport)
        except TransportClosed:
            return
        except BaseException as exc:
            logger.exception("engine loop died")
            self._die(transport, f"{type(exc).__name__}: {exc}")
        finally:
            self.engine.close()

    def _die(self, transport: CoreTransport, reason: str) -> None:
        with self._transport_lock:
            if self.dead_reason is None:
                self.dead_reason = reason
                transport.die(reason)

    def _loop(self, transport: CoreTransport) -> None:
        engine = self.engine
        # A burst is worth gathering where the first step would otherwise be a lone prompt the
        # rest queue behind for long; where prompt steps replay graphs (~1-2 ms) the rest join
        # the next step, and a lone request would only wait.
        gather = not engine.runner.replays_prompts
        while True:
            outputs: list[RequestOutput] = []
            for command in transport.receive(wait=not engine.has_unfinished(), gather=gather):
                if isinstance(command, AddRequest):
                    outputs += self.add(command)
                elif isinstance(command, AbortRequest):
                    outputs += engine.abort(command.request_id, index=command.index, stop=command.stop)
                else:
                    outputs += self.abort_all()
                    transport.publish(CoreOutputs(outputs, engine.stats(), self.num_added, final=True))
                    return
            outputs += engine.step()
            with self._transport_lock:
                transport.publish(CoreOutputs(outputs, engine.stats(), self.num_added))
