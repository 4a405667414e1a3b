"""A consumer that falls behind gets the deltas that piled up as one (RequestStream +
outputs.merged); one that keeps up gets them one step at a time. First on RequestStream alone,
then on the real engine with a consumer that stops reading until its request has finished."""

import asyncio

from rillet import AsyncEngine, SamplingParams
from rillet.engine.async_engine import RequestStream
from rillet.engine.core import CoreOutputs
from rillet.engine.llm_engine import EngineStats
from rillet.engine.errors import EngineDeadError
from rillet.engine.outputs import RequestOutput, TokenLogprob


class NoAborts:
    def __init__(self, gap=0.0):
        self.aborted = []
        self.gap = gap

    def abort_nowait(self, request_id):
        self.aborted.append(request_id)

    def min_event_gap(self):
        return self.gap


def delta(index, token, num, finish=None, logprob=False):
    return RequestOutput("r", index, f"<{token}>", [token], 7, num, finish_reason=finish,
                         stop_reason=None if finish is None else "x",
                         logprobs=[TokenLogprob(token, f"<{token}>", -0.5)] if logprob else None,
                         num_cached_tokens=3 if num > 1 else 0)


def drain(stream):
    async def main():
        return [out async for out in stream]
    return asyncio.run(main())


def test_piled_up_deltas_of_a_choice_come_out_as_one():
    stream = RequestStream(NoAborts(), "r", 7, n=1)
    for i in range(5):
        stream._put(delta(0, 100 + i, i + 1, logprob=True))
    stream._put(delta(0, 105, 6, finish="length", logprob=True))
    (out,) = drain(stream)
    assert out.text == "".join(f"<{t}>" for t in range(100, 106))
    assert out.token_ids == list(range(100, 106))
    assert [lp.token_id for lp in out.logprobs] == list(range(100, 106))
    assert (out.num_output_tokens, out.finish_reason, out.stop_reason) == (6, "length", "x")
    assert (out.num_prompt_tokens, out.num_cached_tokens) == (7, 3)
    assert stream.finished


def test_deltas_of_different_choices_are_never_joined():
    stream = RequestStream(NoAborts(), "r", 7, n=2)
    for item in (delta(0, 1, 1), delta(0, 2, 2), delta(1, 3, 1), delta(1, 4, 2),
                 delta(0, 5, 3, finish="stop"), delta(1, 6, 3, finish="stop")):
        stream._put(item)
    outs = drain(stream)
    assert [(o.index, o.token_ids, o.finish_reason) for o in outs] == [
        (0, [1, 2], None), (1, [3, 4], None), (0, [5], "stop"), (1, [6], "stop")]


def test_an_error_after_piled_up_deltas_comes_after_them():
    stream = RequestStream(NoAborts(), "r", 7, n=1)
    stream._put(delta(0, 1, 1))
    stream._put(delta(0, 2, 2))
    stream._put(EngineDeadError("gone"))

    async def main():
        first = await stream.__anext__()
        try:
            await stream.__anext__()
        except EngineDeadError as exc:
            return first, exc
        raise AssertionError("no error")

    first, exc = asyncio.run(main())
    assert first.token_ids == [1, 2] and first.finish_reason is None
    assert str(exc) == "gone" and stream.finished


def test_a_waiting_consumer_wakes_for_each_delta():
    stream = RequestStream(NoAborts(), "r", 7, n=1)

    async def main():
        loop = asyncio.get_running_loop()
        loop.call_soon(stream._put, delta(0, 1, 1))
        first = await stream.__anext__()
        loop.call_soon(stream._put, delta(0, 2, 2, finish="stop"))
        second = await stream.__anext__()
        return first, second

    first, second = asyncio.run(main())
    assert (first.token_ids, second.token_ids, second.finish_reason) == ([1], [2], "stop")


def test_a_lagging_consumer_of_the_real_engine_gets_the_rest_in_one_delta():
    prompt = [{"role": "user", "content": "Count from one to twenty in words."}]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)

    async def main():
        async with AsyncEngine(dtype="float32", max_num_seqs=2, max_model_len=512, kv_cache_gib=0.1) as engine:
            eager = [out async for out in engine.generate(prompt, params)]
            stream = await engine.add_request(prompt, params)
            first = await stream.__anext__()
            deadline = asyncio.get_running_loop().time() + 60
            while stream._undelivered:  # every delta routed to the stream, none read yet
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            rest = [out async for out in stream]
            return eager, first, rest

    eager, first, rest = asyncio.run(main())
    assert len(eager) > 2 and all(len(out.token_ids) >= 1 for out in eager)
    (last,) = rest
    assert last.finish_reason == "length" and last.num_output_tokens == 24
    assert first.token_ids + last.token_ids == [t for out in eager for t in out.token_ids]
    assert first.text + last.text == "".join(out.text for out in eager)
    assert len(last.logprobs) == len(last.token_ids)


def test_under_load_a_delta_waits_out_the_gap_gathering_the_tokens_made_meanwhile():
    """min_event_gap 50 ms: the first delta goes at once; the next ones, put one at a time while
    the consumer waits, come out as one delta once the gap has passed; the last never waits."""
    owner = NoAborts(gap=0.05)
    stream = RequestStream(owner, "r", 7, n=1)

    async def main():
        loop = asyncio.get_running_loop()
        stream._put(delta(0, 1, 1))
        first = await stream.__anext__()
        sent = loop.time()
        for i in range(2, 5):  # three more, 5 ms apart, while the consumer waits
            loop.call_later(0.005 * (i - 1), stream._put, delta(0, i, i))
        second = await stream.__anext__()
        gap = loop.time() - sent
        stream._put(delta(0, 5, 5, finish="stop"))
        before = loop.time()
        last = await stream.__anext__()
        return first, second, gap, last, loop.time() - before

    first, second, gap, last, last_wait = asyncio.run(main())
    assert first.token_ids == [1]
    assert second.token_ids == [2, 3, 4] and gap >= 0.05
    assert last.token_ids == [5] and last.finish_reason == "stop" and last_wait < 0.04


def test_the_gap_is_running_sequences_over_the_event_budget():
    """Sequences waiting for a slot send nothing: only the running ones share the budget."""
    engine = AsyncEngine(dtype="float32", max_stream_events_per_s=1000)
    engine._streams = {str(i): None for i in range(500)}
    assert engine.min_event_gap() == 0.5  # before the core's first stats: every stream
    engine._stats = EngineStats(num_running=50, num_waiting=450, kv_cache_usage=0.5, num_kv_blocks_used=1,
                                num_kv_blocks_total=2, num_preemptions_total=0, num_aborted_total=0,
                                num_failed_total=0)
    assert engine.min_event_gap() == 0.05
    assert AsyncEngine(dtype="float32", max_stream_events_per_s=0).min_event_gap() == 0.0


def test_outputs_cross_the_process_pipe_whole():
    """RequestOutput pickles as its fields in order (engine process -> server): every field back."""
    import pickle

    out = RequestOutput("r", 1, "é", [5, 6], 7, 9, finish_reason="stop", stop_reason="</s>",
                        logprobs=[TokenLogprob(5, "é", -0.25, [(6, "x", -1.5)])], error=None, num_cached_tokens=4)
    assert pickle.loads(pickle.dumps(out)) == out
    assert pickle.loads(pickle.dumps(delta(0, 3, 1))) == delta(0, 3, 1)
    # a step's outputs travel as one CoreOutputs, its outputs as tuples of their fields
    stats = EngineStats(num_running=2, num_waiting=0, kv_cache_usage=0.5, num_kv_blocks_used=1,
                        num_kv_blocks_total=2, num_preemptions_total=0, num_aborted_total=0, num_failed_total=0)
    step = CoreOutputs([out, delta(0, 3, 1)], stats, 12, final=True)
    back = pickle.loads(pickle.dumps(step))
    assert back == step and all(type(o) is RequestOutput for o in back.outputs)
    assert pickle.loads(pickle.dumps(CoreOutputs([], stats, 0))) == CoreOutputs([], stats, 0)
