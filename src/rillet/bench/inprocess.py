"""The benchmark scripts' in-process load: closed-loop clients over a `rillet.AsyncEngine`, no
HTTP, measured into the same `RequestRecord`s and level summary as the HTTP load generator."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

from rillet.bench.loadgen import Prompt, RequestRecord, summarize
from rillet.bench.workload import prompt_cycle

__all__ = ["engine_request", "run_engine_level", "start_engine"]


async def engine_request(engine: Any, messages: list[dict], params: Any, request_id: str, *,
                         keep_text: bool = False) -> RequestRecord:
    """One request through `engine.generate`: time to the first visible text (as over HTTP and for
    the seed design), each piece's arrival, token counts, the finish reason."""
    record = RequestRecord(keep_text=keep_text)
    start = time.perf_counter()
    try:
        async for out in engine.generate(messages, params, request_id=request_id):
            record.add_text(time.perf_counter() - start, out.text)
            record.output_tokens = out.num_output_tokens
            record.prompt_tokens = out.num_prompt_tokens
            record.tokens_from_usage = True  # the engine's own count
            if out.finish_reason:
                record.finish_reason = out.finish_reason
                if out.finish_reason == "error":
                    record.error = getattr(out, "error", None) or "error"
        record.e2e = time.perf_counter() - start
        record.num_chunks = len(record.chunk_times)
        record.ok = record.error is None
    except Exception as exc:  # noqa: BLE001 - a benchmark records, it does not crash
        record.error = f"{type(exc).__name__}: {exc}"
        record.e2e = time.perf_counter() - start
    return record


def forced_params(max_tokens: int) -> Any:
    """Greedy, exactly `max_tokens` output tokens (ignore_eos): the work of one measured request."""
    from rillet import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)


async def run_engine_level(engine: Any, *, concurrency: int, num_requests: int, max_tokens: int,
                           prompts: Sequence[Prompt] | None = None, tag: str = "bench") -> dict:
    """Closed loop of `concurrency` asyncio clients over the in-process engine, each request forced
    to `max_tokens`. With one client the records are in prompt order and their texts are kept
    ("texts"), so they can be compared with another system's."""
    work = prompt_cycle(num_requests, prompts)
    records: list[RequestRecord] = []
    counter = iter(range(num_requests))
    keep = concurrency == 1

    async def client() -> None:
        while work:
            messages = work.pop(0)
            records.append(await engine_request(engine, messages, forced_params(max_tokens),
                                                f"{tag}-{concurrency}-{next(counter)}", keep_text=keep))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, num_requests))))
    duration = time.perf_counter() - start
    result = summarize(records, duration, concurrency=concurrency, max_tokens=max_tokens, keep_texts=keep)
    result["system"] = "rillet"
    return result


async def start_engine(model: str | None, dtype: str, max_num_seqs: int) -> Any:
    """An AsyncEngine with its loop in its own process, as `rillet serve` runs it."""
    from rillet import AsyncEngine

    engine = AsyncEngine(model=model, dtype=dtype, max_num_seqs=max_num_seqs, engine_process=True)
    await engine.start()
    return engine
