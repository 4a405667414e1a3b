"""EngineCore, the one engine loop, driven in this thread through a scripted transport: the rules
both transports (thread and process) share."""

from __future__ import annotations

import pytest

from rillet.config import EngineConfig
from rillet.engine.core import AbortRequest, AddRequest, Command, CoreOutputs, EngineCore, Stop
from rillet.engine.llm_engine import LLMEngine
from rillet.engine.outputs import RequestOutput
from rillet.sampling_params import SamplingParams


class ScriptedTransport:
    """Hands the core one scripted batch of commands per receive(); Stop once the script is out."""

    def __init__(self, *batches: list[Command]) -> None:
        self.batches = list(batches)
        self.published: list[CoreOutputs] = []
        self.dead: str | None = None
        self.gathers: list[bool] = []

    def receive(self, wait: bool, gather: bool = True) -> list[Command]:
        self.gathers.append(gather)
        return self.batches.pop(0) if self.batches else [Stop()]

    def publish(self, outputs: CoreOutputs) -> None:
        self.published.append(outputs)

    def die(self, reason: str) -> None:
        self.dead = reason

    @property
    def outputs(self) -> list[RequestOutput]:
        return [o for message in self.published for o in message.outputs]


class Broken(RuntimeError):
    pass


def fail_every_step(engine: LLMEngine) -> None:
    def explode(batch: object) -> None:
        raise Broken("boom")
    engine.before_forward = explode


@pytest.fixture(scope="module")
def core() -> EngineCore:
    seen: list[LLMEngine] = []
    core = EngineCore(EngineConfig(dtype="float32", max_model_len=256, kv_cache_gib=0.02), seen.append)
    assert seen == [core.engine]  # core_setup runs on the LLMEngine the core built
    return core


def add(request_id: str, max_tokens: int = 3, **params: object) -> AddRequest:
    return AddRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params))


def test_requests_run_to_the_end_and_stop_ends_the_loop(core: EngineCore) -> None:
    transport = ScriptedTransport([add("a")], [], [])
    core.run(transport)
    assert transport.dead is None and transport.published[-1].final
    done = [o for o in transport.outputs if o.request_id == "a" and o.finish_reason]
    assert [o.finish_reason for o in done] == ["length"]
    assert transport.published[-1].num_added == core.num_added
    assert all(transport.gathers)  # a CPU engine's prompt steps are long: a burst is worth gathering


def test_an_add_the_engine_refuses_ends_with_an_error_not_a_hang(core: EngineCore) -> None:
    transport = ScriptedTransport([add("dup", 50), add("dup", 50, n=2)], [AbortRequest("dup")])
    core.run(transport)
    refused = [o for o in transport.outputs if o.finish_reason == "error"]
    assert len(refused) == 2 and all("already in use" in (o.error or "") for o in refused)
    assert [o.finish_reason for o in transport.outputs if o.finish_reason != "error"][-1] == "abort"
    assert not core.engine.has_unfinished()


def test_stop_aborts_every_live_request(core: EngineCore) -> None:
    transport = ScriptedTransport([add("x", 100), add("y", 100)], [])
    core.run(transport)
    final = transport.published[-1]
    assert final.final and sorted(o.request_id for o in final.outputs) == ["x", "y"]
    assert {o.finish_reason for o in final.outputs} == {"abort"}


def test_repeated_step_failures_kill_the_loop_and_the_transport_hears_why() -> None:
    core = EngineCore(EngineConfig(dtype="float32", max_model_len=256, kv_cache_gib=0.02), fail_every_step)
    transport = ScriptedTransport([add("a")], [add("b")], [add("c")], [add("d")])
    core.run(transport)
    assert [o.finish_reason for o in transport.outputs] == ["error", "error"]  # a, b: their batch failed
    assert transport.dead is not None and "steps failed in a row" in transport.dead
    assert core.dead_reason == transport.dead
    assert not transport.published[-1].final
