"""SharedPipeTransport, the core's side of one engine core serving several API servers: each
front end hears only its own requests' outputs, aborts only its own, and stops alone."""

from __future__ import annotations

import socket
from multiprocessing.connection import Connection

import pytest

from rillet.engine.core import AbortRequest, AddRequest, CoreOutputs, Stop, TransportClosed
from rillet.engine.core_shared import SharedPipeTransport
from rillet.engine.llm_engine import EngineStats
from rillet.engine.outputs import RequestOutput
from rillet.sampling_params import SamplingParams

STATS = EngineStats(2, 0, 0.1, 1, 10, 0, 0, 0)


def pipes(count: int) -> tuple[list[Connection], list[Connection]]:
    """(the core's ends, the front ends' ends)"""
    pairs = [socket.socketpair() for _ in range(count)]
    return [Connection(a.detach()) for a, _ in pairs], [Connection(b.detach()) for _, b in pairs]


def out(request_id: str, index: int = 0, finish: str | None = None) -> RequestOutput:
    return RequestOutput(request_id, index, "x", [7], 3, 1, finish_reason=finish)


def heard(front_end: Connection) -> CoreOutputs:
    assert front_end.poll(5)
    message = front_end.recv()
    assert isinstance(message, CoreOutputs)
    return message


def add_one_each(transport: SharedPipeTransport, a: Connection, b: Connection) -> None:
    """Request "ra" from a, "rb" from b, both taken in by the core."""
    a.send(AddRequest("ra", [1], SamplingParams()))
    b.send(AddRequest("rb", [1], SamplingParams()))
    got = transport.receive(wait=True)
    while len(got) < 2:  # the second pipe's bytes may land just after the burst window
        got += transport.receive(wait=True)


def test_each_front_end_hears_its_own_requests_and_the_shared_stats():
    core_ends, (a, b) = pipes(2)
    transport = SharedPipeTransport(core_ends, stats_every_s=0.0)  # the stats every cycle
    a.send(AddRequest("ra", [1, 2], SamplingParams()))
    b.send(AddRequest("rb", [1, 2], SamplingParams(n=2, temperature=1.0)))
    b.send(AddRequest("rb2", [1], SamplingParams()))
    commands = transport.receive(wait=True)
    while len(commands) < 3:  # the second pipe's bytes may land just after the burst window
        commands += transport.receive(wait=True)
    assert sorted(c.request_id for c in commands if isinstance(c, AddRequest)) == ["ra", "rb", "rb2"]

    transport.publish(CoreOutputs([out("ra"), out("rb", 0), out("rb", 1, "stop"), out("rb2")], STATS, 3))
    to_a, to_b = heard(a), heard(b)
    assert [o.request_id for o in to_a.outputs] == ["ra"] and to_a.num_added == 1 and to_a.stats == STATS
    assert [(o.request_id, o.index) for o in to_b.outputs] == [("rb", 0), ("rb", 1), ("rb2", 0)]
    assert to_b.num_added == 2 and not to_b.final

    # one of rb's two choices has finished: the other is still routed to b
    transport.publish(CoreOutputs([out("rb", 0, "length")], STATS, 3))
    assert heard(a).outputs == [] and [o.index for o in heard(b).outputs] == [0]


def test_a_front_end_aborts_only_its_own_requests():
    core_ends, (a, b) = pipes(2)
    transport = SharedPipeTransport(core_ends)
    add_one_each(transport, a, b)
    a.send(AbortRequest("rb"))
    a.send(AbortRequest("ra"))
    got = transport.receive(wait=True)
    assert got == [AbortRequest("ra")]


def test_stop_ends_one_front_end_and_the_last_stops_the_core():
    core_ends, (a, b) = pipes(2)
    transport = SharedPipeTransport(core_ends)
    add_one_each(transport, a, b)
    a.send(Stop())
    assert transport.receive(wait=True) == [AbortRequest("ra")]  # not a Stop: b is still served
    transport.publish(CoreOutputs([out("ra", 0, "abort"), out("rb")], STATS, 2))
    final = heard(a)
    assert final.final and [(o.request_id, o.finish_reason) for o in final.outputs] == [("ra", "abort")]
    assert [o.request_id for o in heard(b).outputs] == ["rb"]

    transport.publish(CoreOutputs([out("rb")], STATS, 2))  # a hears nothing more
    heard(b)
    assert not a.poll(0.05)

    b.send(Stop())
    assert transport.receive(wait=True) == [AbortRequest("rb")]
    transport.publish(CoreOutputs([out("rb", 0, "abort")], STATS, 2))
    assert heard(b).final
    assert transport.receive(wait=True) == [Stop()]


def test_a_front_end_that_goes_away_has_its_requests_aborted():
    core_ends, (a, b) = pipes(2)
    transport = SharedPipeTransport(core_ends)
    a.send(AddRequest("ra", [1], SamplingParams()))
    assert transport.receive(wait=True) == [AddRequest("ra", [1], SamplingParams())]
    a.close()
    assert transport.receive(wait=True) == [AbortRequest("ra")]
    transport.die("boom")
    assert b.recv() == ("dead", "boom")
    b.close()
    with pytest.raises(TransportClosed):
        transport.receive(wait=True)


def test_a_front_end_with_nothing_new_is_not_sent_every_cycle():
    core_ends, (a, b) = pipes(2)
    transport = SharedPipeTransport(core_ends, stats_every_s=3600.0)  # never for staleness alone
    add_one_each(transport, a, b)
    transport.publish(CoreOutputs([out("ra")], STATS, 2))
    assert [o.request_id for o in heard(a).outputs] == ["ra"]
    assert heard(b).num_added == 1  # its add was taken: news for b
    transport.publish(CoreOutputs([out("ra")], STATS, 2))
    assert [o.request_id for o in heard(a).outputs] == ["ra"] and not b.poll()  # publish has sent what it sends
    transport.publish(CoreOutputs([out("rb", finish="stop")], STATS, 2))
    assert heard(b).outputs[0].finish_reason == "stop" and not a.poll()
