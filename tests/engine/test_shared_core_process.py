"""One engine core process serving two AsyncEngines, a pipe each (what `rillet serve
--api-servers 2` runs): each hears its own requests, and one stopping leaves the other's
streams running; the core exits once both have stopped."""

from __future__ import annotations

import asyncio
import functools
import socket
from multiprocessing.connection import Connection

from rillet import AsyncEngine, SamplingParams
from rillet.config import EngineConfig
from rillet.engine.core_process import spawn_core
from rillet.engine.core_shared import AttachedCore


def test_two_front_ends_share_one_core_and_stop_one_at_a_time():
    config = EngineConfig(max_model_len=512, kv_cache_gib=0.05, engine_process=True)
    pairs = [socket.socketpair() for _ in range(2)]
    setup, core = spawn_core(config, None, [core_end.fileno() for _, core_end in pairs])
    setup.close()
    for _, core_end in pairs:
        core_end.close()
    a, b = (AsyncEngine(config, transport=functools.partial(AttachedCore, Connection(ours.detach())))
            for ours, _ in pairs)
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.0)
    prompt = [{"role": "user", "content": "Tell me about rivers."}]

    async def main():
        await asyncio.gather(a.start(), b.start())
        alone = [o async for o in await b.add_request(prompt, params)]
        stream_a = await a.add_request(prompt, params)
        stream_b = await b.add_request(prompt, params)
        first_a = await anext(stream_a)
        await a.shutdown()  # a's request ends with it; b's goes on
        rest_a = [o async for o in stream_a]
        outs_b = [o async for o in stream_b]
        assert b.health == "ready" and b.stats().num_running == 0
        await b.shutdown()
        return alone, [first_a, *rest_a], outs_b

    try:
        alone, outs_a, outs_b = asyncio.run(main())
        assert core.wait(60) == 0
    finally:
        if core.poll() is None:
            core.kill()
    assert outs_a[-1].finish_reason == "abort" and sum(len(o.token_ids) for o in outs_a) < 24
    assert outs_b[-1].finish_reason == "length"
    assert "".join(o.text for o in outs_b) == "".join(o.text for o in alone)  # the default bf16 path: batch-invariant
