"""AsyncEngine on the real default model, driven from an event loop in a background thread.

Every test runs against both ways of running the engine loop: a thread, and its own process
(`engine_process=True`, what `rillet serve` uses)."""

import asyncio
import threading

import pytest

from rillet import AsyncEngine, SamplingParams
from rillet.engine.errors import EngineDeadError, EngineNotReadyError, PromptTooLongError, QueueFullError


class LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


MODES = {"thread": False, "process": True}


@pytest.fixture(scope="module", params=list(MODES))
def env(request):
    lt = LoopThread()
    engine = AsyncEngine(dtype="float32", max_num_seqs=2, max_waiting=2, queue_timeout_s=2.0,
                         max_model_len=1024, kv_cache_gib=0.2, engine_process=MODES[request.param])
    assert engine.health == "stopped"
    lt.run(engine.start())
    assert engine.health == "ready"
    yield lt, engine
    lt.run(engine.shutdown())
    assert engine.health == "stopped"
    lt.close()


def chat(text):
    return [{"role": "user", "content": text}]


async def wait_idle(engine, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while engine.stats().num_running or engine.stats().num_waiting:
        assert asyncio.get_running_loop().time() < deadline, engine.stats()
        await asyncio.sleep(0.01)


def test_generate_streams_deltas_and_ends_with_a_finish_reason(env):
    lt, engine = env

    async def main():
        outs = [o async for o in engine.generate(chat("Say hello."), SamplingParams(max_tokens=12, temperature=0))]
        await wait_idle(engine)
        return outs

    outs = lt.run(main())
    assert outs[-1].finish_reason in ("stop", "length")
    assert all(o.finish_reason is None for o in outs[:-1])
    assert sum(len(o.token_ids) for o in outs) == outs[-1].num_output_tokens
    assert engine.stats().kv_cache_usage == 0.0


def test_stop_strings_end_a_choice_in_the_front_end_as_the_engine_ends_it(env):
    """The core sends token ids; AsyncEngine decodes them and looks for stop strings. A stop
    string found there ends that choice at once ("stop", the text cut before it, the tokens up to
    it counted) as LLMEngine ends it in process; the other choice of the request runs on; the
    core frees the stopped choice, and it is not counted as aborted."""
    from rillet.engine.llm_engine import LLMEngine

    lt, engine = env

    async def run(params):
        outs = [o async for o in engine.generate(chat("Write two sentences about the sea."), params)]
        await wait_idle(engine)
        return outs

    def by_choice(outs):
        return {i: ("".join(o.text for o in outs if o.index == i), [t for o in outs if o.index == i for t in o.token_ids],
                    [o for o in outs if o.index == i][-1]) for i in {o.index for o in outs}}

    full = by_choice(lt.run(run(SamplingParams(max_tokens=30, temperature=1.0, seed=5, n=2, ignore_eos=True))))
    (text0, tokens0, last0), (text1, _, last1) = full[0], full[1]
    assert last0.finish_reason == last1.finish_reason == "length"
    stop = next(text0[i:i + 3] for i in range(len(text0) // 2, len(text0) - 3) if text0[i:i + 3] not in text1
                and text0[i:i + 3].strip())
    aborted = engine.stats().num_aborted_total
    cut = by_choice(lt.run(run(SamplingParams(max_tokens=30, temperature=1.0, seed=5, n=2, ignore_eos=True,
                                               stop=[stop]))))
    assert cut[0][0] == text0[:text0.index(stop)] and stop not in cut[0][0]
    assert cut[0][2].finish_reason == "stop" and cut[0][2].stop_reason == stop
    assert cut[0][1] == tokens0[:len(cut[0][1])] and cut[0][2].num_output_tokens == len(cut[0][1]) < 30
    assert cut[1][0] == text1 and cut[1][2].finish_reason == "length"  # the other choice ran on
    stats = engine.stats()
    assert stats.num_aborted_total == aborted and stats.num_kv_blocks_used == 0 and stats.num_running == 0

    # the same request in process (LLMEngine decodes and stops itself): the same text and count
    alone = LLMEngine(dtype="float32", max_model_len=1024, kv_cache_gib=0.2)
    alone.add_request("same", chat("Write two sentences about the sea."),
                      SamplingParams(max_tokens=30, temperature=1.0, seed=5, n=2, ignore_eos=True, stop=[stop]))
    outs = []
    while alone.has_unfinished():
        outs += alone.step()
    assert by_choice(outs)[0][0] == cut[0][0] and by_choice(outs)[0][2].num_output_tokens == cut[0][2].num_output_tokens


def test_leaving_the_iterator_early_aborts_the_request(env):
    lt, engine = env

    async def main():
        before = engine.stats().num_aborted_total
        agen = engine.generate(chat("Tell me a long story."), SamplingParams(max_tokens=500, ignore_eos=True))
        async for _ in agen:
            break
        await agen.aclose()
        await wait_idle(engine)
        return before

    before = lt.run(main())
    assert engine.stats().num_aborted_total == before + 1
    assert engine.stats().kv_cache_usage == 0.0


def test_cancelling_the_consumer_task_aborts_too(env):
    lt, engine = env

    async def main():
        before = engine.stats().num_aborted_total
        first = asyncio.Event()

        async def consume():
            async for _ in engine.generate(chat("Count to a thousand."), SamplingParams(max_tokens=500)):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine)
        return before

    before = lt.run(main())
    assert engine.stats().num_aborted_total == before + 1


def test_queue_full_is_refused_at_once_and_waiting_too_long_is_an_error(env):
    lt, engine = env  # max_num_seqs=2, max_waiting=2, queue_timeout_s=2

    async def main():
        long = SamplingParams(max_tokens=900, ignore_eos=True)  # prompt + max_tokens within the 1024 context
        streams = [await engine.add_request(chat(f"Story {i}"), long) for i in range(4)]  # 2 run, 2 queue
        with pytest.raises(QueueFullError):
            await engine.add_request(chat("one too many"), long)
        queued_finals = []
        for s in streams[2:]:
            async for out in s:
                if out.finish_reason:
                    queued_finals.append(out)
        for s in streams[:2]:
            await s.abort()
            async for _ in s:
                pass
        await wait_idle(engine)
        return queued_finals

    finals = lt.run(main())
    assert [o.finish_reason for o in finals] == ["error", "error"]
    assert "waited more than" in finals[0].error


def test_bad_requests_are_rejected_before_queueing(env):
    lt, engine = env
    with pytest.raises(PromptTooLongError):
        lt.run(engine.add_request("word " * 2000, SamplingParams()))
    with pytest.raises(ValueError, match="role"):
        lt.run(engine.add_request([{"role": "wizard", "content": "hi"}], SamplingParams()))
    with pytest.raises(ValueError, match="empty"):
        lt.run(engine.add_request("", SamplingParams()))
    assert engine.stats().num_waiting == 0


def test_max_tokens_beyond_the_context_and_foreign_token_ids_are_refused(env):
    """Issue 14: prompt + max_tokens past max_model_len is refused with the numbers (it was clamped
    silently); logit_bias keys and stop_token_ids outside the vocabulary are refused (they were ignored)."""
    lt, engine = env
    n = len(engine.prompts.encode_prompt("The capital of France is"))
    room = engine.max_model_len - n
    with pytest.raises(PromptTooLongError, match=f"maximum context length is {engine.max_model_len} tokens") as info:
        lt.run(engine.add_request("The capital of France is", SamplingParams(max_tokens=room + 1)))
    err = info.value
    assert (err.max_model_len, err.num_prompt_tokens, err.max_tokens) == (engine.max_model_len, n, room + 1)
    assert f"({n} in the prompt, {room + 1} in the completion)" in str(err)
    with pytest.raises(PromptTooLongError, match="in the messages"):
        lt.run(engine.add_request([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=10**9)))
    vocab = engine.prompts.vocab_size
    with pytest.raises(ValueError, match=rf"logit_bias .*outside the vocabulary \(0..{vocab - 1}\): {vocab}"):
        lt.run(engine.add_request("hi", SamplingParams(logit_bias={vocab: 5.0})))
    with pytest.raises(ValueError, match="stop_token_ids .*outside the vocabulary"):
        lt.run(engine.add_request("hi", SamplingParams(stop_token_ids=[2, 10**12])))
    assert engine.stats().num_waiting == 0

    async def exactly_the_room_left():
        stream = await engine.add_request("The capital of France is", SamplingParams(max_tokens=room, temperature=0,
                                                                                     logit_bias={vocab - 1: 1.0}))
        await stream.abort()
        async for _ in stream:
            pass

    lt.run(exactly_the_room_left())
    lt.run(wait_idle(engine))


@pytest.mark.parametrize("mode", list(MODES))
def test_shutdown_ends_running_requests_with_abort(mode):
    lt = LoopThread()
    engine = AsyncEngine(dtype="float32", max_model_len=512, kv_cache_gib=0.05, engine_process=MODES[mode])

    async def main():
        await engine.start()
        stream = await engine.add_request(chat("Go on forever."), SamplingParams(max_tokens=400, ignore_eos=True))
        async for _ in stream:
            break
        await engine.shutdown()
        rest = [o async for o in stream]
        with pytest.raises(EngineNotReadyError):
            await engine.add_request("hi", SamplingParams())
        return rest

    try:
        rest = lt.run(main())
    finally:
        lt.close()
    assert rest[-1].finish_reason == "abort"


def test_a_core_process_that_dies_ends_every_stream_with_an_error():
    lt = LoopThread()
    engine = AsyncEngine(dtype="float32", max_model_len=512, kv_cache_gib=0.05, engine_process=True)

    async def main():
        await engine.start()
        streams = [await engine.add_request(chat(f"Go on forever {i}."), SamplingParams(max_tokens=400, ignore_eos=True))
                   for i in range(2)]
        async for _ in streams[0]:
            break
        engine._core.process.kill()  # what the OOM killer would do
        errors = []
        for stream in streams:
            with pytest.raises(EngineDeadError) as info:
                async for _ in stream:
                    pass
            errors.append(str(info.value))
        with pytest.raises(EngineDeadError):
            await engine.add_request("hi", SamplingParams())
        await engine.shutdown()
        return errors

    try:
        errors = lt.run(main())
    finally:
        lt.close()
    assert engine.health == "dead" and "engine process exited" in engine.dead_reason
    assert all("engine process exited" in e for e in errors)


def test_the_core_process_reports_a_bad_model_as_the_same_error_a_thread_does(tmp_path):
    lt = LoopThread()
    engine = AsyncEngine(model=str(tmp_path / "missing"), engine_process=True)
    try:
        with pytest.raises(ValueError, match="missing"):
            lt.run(engine.start())
    finally:
        lt.close()
    assert engine.health == "dead"


def test_min_tokens_and_include_stop_str_in_output_in_the_front_end_as_in_the_engine(env):
    """The front end decodes and looks for stop strings itself: min_tokens holds its stop strings
    back as LLMEngine's own check does, and include_stop_str_in_output keeps the stop string or
    the stop token's text. Each request gives the same text, count and finish as in process."""
    from rillet.engine.llm_engine import LLMEngine

    lt, engine = env
    cases = [("Say hello.", dict(stop=["!"])), ("Say hello.", dict(stop=["!"], include_stop_str_in_output=True)),
             ("Say hello.", dict(stop=["!"], min_tokens=12)),
             ("Reply with one word: yes or no?", dict(min_tokens=10)),
             ("Reply with one word: yes or no?", dict(stop_token_ids=[30], include_stop_str_in_output=True))]

    async def run(prompt, params):
        outs = [o async for o in engine.generate(chat(prompt), params)]
        await wait_idle(engine)
        return outs

    alone = LLMEngine(dtype="float32", max_model_len=1024, kv_cache_gib=0.2)
    for prompt, extra in cases:
        params = SamplingParams(max_tokens=40, temperature=0, **extra)
        front = lt.run(run(prompt, params))
        alone.add_request("same", chat(prompt), params)
        outs = []
        while alone.has_unfinished():
            outs += alone.step()
        for got in (front, outs):
            assert got[-1].finish_reason in ("stop", "length")
        summary = [("".join(o.text for o in got), got[-1].num_output_tokens, got[-1].finish_reason,
                    got[-1].stop_reason) for got in (front, outs)]
        assert summary[0] == summary[1], (extra, summary)
    stats = engine.stats()
    assert stats.num_kv_blocks_used == 0 and stats.num_running == 0
