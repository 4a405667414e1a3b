"""Load generator behind `rillet bench`: N streaming requests at a fixed concurrency.

Works against any OpenAI-compatible server (rillet, vLLM, llama.cpp, Ollama's /v1)
and against Ollama's NDJSON API (`api="ollama"`). Importable API::

    from rillet.bench.loadgen import run_level
    result = asyncio.run(run_level("http://127.0.0.1:8000", model=None, concurrency=4,
                                   num_requests=16, max_tokens=64))

`run_level` returns one dict per concurrency level (see `summarize` for its keys;
latencies are in seconds, `*_ms` entries in milliseconds).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from rillet.client import (
    APIConnectionError,
    APIStatusError,
    AsyncClient,
    RilletError,
    StreamError,
)

__all__ = ["DEFAULT_PROMPTS", "WARMUP_PROMPT", "RequestRecord", "load_prompts", "percentile", "resolve_model",
           "run_level", "run_level_processes", "run_records", "stats_ms", "summarize", "tagged"]

DEFAULT_PROMPTS: tuple[str, ...] = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List ten creative uses for an old bicycle and explain each one briefly.",
    "Describe the water cycle, step by step.",
    "What are the main differences between a cat and a dog as pets?",
    "Write a poem about autumn leaves falling in a quiet city park.",
    "Give me a recipe for a simple vegetable soup with instructions.",
    "Explain why the sky is blue in a few paragraphs.",
    "Describe a day in the life of a medieval blacksmith.",
    "Summarize the plot of a heist movie you invent on the spot.",
    "Teach me the basics of chess openings.",
    "Write a friendly letter inviting a neighbour to a garden party.",
)

# Warm-up requests ask this, which no measured request does: warming up must not leave a measured
# prompt in the server's prefix cache.
WARMUP_PROMPT = "Reply with one short greeting."

Prompt = str | list[dict]


def tagged(prompt: Prompt, tag: str) -> Prompt:
    """`prompt` with `tag` in front of its (last user) text: a request whose prompt differs from
    every earlier one from its first word, so no server answers it from a prefix cache that an
    earlier request filled (the chat template's shared system prompt aside)."""
    if isinstance(prompt, str):
        return f"[{tag}] {prompt}"
    messages = [dict(m) for m in prompt]
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            message["content"] = f"[{tag}] {message['content']}"
            break
    return messages


@dataclass
class RequestRecord:
    """What one request measured. Times are seconds from the request's start."""

    ok: bool = False
    error: str | None = None  # kind: "http_429", "stream_error", "connection", ...
    error_message: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival time of each content chunk
    output_tokens: int = 0
    tokens_from_usage: bool = False
    prompt_tokens: int | None = None
    num_chunks: int = 0
    fffd: int = 0
    finish_reason: str | None = None
    text_chars: int = 0
    pieces: list[str] = field(default_factory=list)  # the text, kept only when asked (keep_text)
    keep_text: bool = False

    def add_text(self, now: float, text: str) -> None:
        """A piece of text arrived `now` seconds after the start: the first is the TTFT, every
        non-empty piece is one chunk (one token for rillet; a word or more for the seed design)."""
        if not text:
            return
        if self.ttft is None:
            self.ttft = now
        self.chunk_times.append(now)
        self.fffd += text.count("\ufffd")
        self.text_chars += len(text)
        if self.keep_text:
            self.pieces.append(text)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a JSONL file: each line a string, {"prompt": ...}, {"text": ...},
    {"messages": [...]} or a ShareGPT {"conversations": [{"from": "human", "value": ...}]}."""
    prompts: list[Prompt] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
        if isinstance(obj, str):
            prompts.append(obj)
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            prompts.append(obj["messages"])
        elif isinstance(obj, dict) and isinstance(obj.get("prompt") or obj.get("text"), str):
            prompts.append(obj.get("prompt") or obj["text"])
        elif isinstance(obj, dict) and isinstance(obj.get("conversations"), list):
            turns = [t.get("value", "") for t in obj["conversations"] if t.get("from") in ("human", "user")]
            if turns:
                prompts.append(turns[0])
        else:
            raise ValueError(f"{path}:{number}: expected a string or an object with prompt/text/messages")
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


async def resolve_model(client: AsyncClient) -> str:
    """The first model id the server lists."""
    ids = await client.models()
    if not ids:
        raise RilletError("the server lists no models; pass --model")
    return ids[0]


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, APIStatusError):
        return f"http_{exc.status}"
    if isinstance(exc, StreamError):
        return f"stream_{exc.type or exc.code or 'error'}"
    if isinstance(exc, APIConnectionError):
        return "timeout" if "timed out" in str(exc) else "connection"
    return type(exc).__name__


async def _one_request(client: AsyncClient, prompt: Prompt, params: dict, api: str) -> RequestRecord:
    record = RequestRecord()
    start = time.perf_counter()
    try:
        if isinstance(prompt, str):
            messages: Any = [{"role": "user", "content": prompt}]
        else:
            messages = prompt
        async with client.chat(messages, stream=True, **params) as stream:
            async for delta in stream:
                record.add_text(time.perf_counter() - start, delta.text)
                if delta.finish_reason:
                    record.finish_reason = delta.finish_reason
                if delta.usage is not None:
                    record.output_tokens = delta.usage.completion_tokens
                    record.prompt_tokens = delta.usage.prompt_tokens
                    record.tokens_from_usage = True
        record.e2e = time.perf_counter() - start
        record.num_chunks = len(record.chunk_times)
        if not record.tokens_from_usage:
            record.output_tokens = record.num_chunks
        record.ok = True
    except (RilletError, OSError, ValueError) as exc:
        record.e2e = time.perf_counter() - start
        record.num_chunks = len(record.chunk_times)
        record.error = _error_kind(exc)
        record.error_message = str(exc)[:300]
    return record


def stats_ms(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """{"mean", "p50", "p90", "p99", "max"} of latencies in seconds, in milliseconds."""
    def s(v: float | None) -> float | None:
        return None if v is None else round(v * scale, 3)

    mean = sum(values) / len(values) if values else None
    return {"mean": s(mean), "p50": s(percentile(values, 50)), "p90": s(percentile(values, 90)),
            "p99": s(percentile(values, 99)), "max": s(max(values) if values else None)}


def summarize(records: Sequence[RequestRecord], duration_s: float, *, concurrency: int,
              max_tokens: int, keep_texts: bool = False) -> dict:
    """Aggregate one level. Latency stats are in milliseconds: {"mean", "p50", "p90", "p99", "max"}.
    `keep_texts`: also each record's text, in order ("texts"; records made with keep_text)."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    output_tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    # TPOT: time per output token after the first; ITL: gaps between content chunks.
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok
             if r.ttft is not None and r.e2e is not None and r.output_tokens > 1]
    itls = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    sample_error = next((f"{r.error}: {r.error_message}" for r in records if not r.ok), None)
    return {
        "concurrency": concurrency,
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "max_tokens": max_tokens,
        "duration_s": round(duration_s, 4),
        "request_throughput": round(len(ok) / duration_s, 4) if duration_s > 0 else None,
        "output_token_throughput": round(output_tokens / duration_s, 3) if duration_s > 0 else None,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "mean_output_tokens": round(output_tokens / len(ok), 2) if ok else None,
        "tokens_counted_from": ("usage" if ok and all(r.tokens_from_usage for r in ok)
                                else "chunks" if ok and not any(r.tokens_from_usage for r in ok)
                                else "mixed" if ok else None),
        "ttft_ms": stats_ms(ttfts),
        "tpot_ms": stats_ms(tpots),
        "itl_ms": stats_ms(itls),
        "e2e_ms": stats_ms(e2es),
        "mean_chunks_per_request": round(sum(len(r.chunk_times) for r in ok) / len(ok), 2) if ok else None,
        "errors": errors,
        "sample_error": sample_error,
        "replacement_chars": sum(r.fffd for r in records),
        "finish_reasons": _count(r.finish_reason or "none" for r in ok),
        **({"texts": [r.text for r in records]} if keep_texts else {}),
    }


def _count(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _sampling_params(api: str, max_tokens: int, ignore_eos: bool, eos_token_id: int | None,
                     temperature: float | None, extra: dict | None) -> dict:
    params: dict[str, Any] = {"max_tokens": max_tokens}
    if temperature is not None:
        params["temperature"] = temperature
    if ignore_eos:
        params["ignore_eos"] = True
    if eos_token_id is not None:
        if api == "openai":
            params["logit_bias"] = {str(eos_token_id): -100}
        else:  # Ollama has no logit_bias; the closest is a stop-token-free run with ignore_eos
            params.setdefault("ignore_eos", True)
    params.update(extra or {})
    return params


async def run_level(url: str, **options: Any) -> dict:
    """Send `num_requests` streaming chat requests, at most `concurrency` at a time, and summarize
    them (summarize's keys, plus "model", "api" and "url"). Options: run_records'."""
    records, start, end, model = await run_records(url, **options)
    return _level_result(records, end - start, options["concurrency"], options["max_tokens"], model,
                         options.get("api", "openai"), url)


def _level_result(records: list[RequestRecord], duration: float, concurrency: int, max_tokens: int,
                  model: str, api: str, url: str) -> dict:
    result = summarize(records, duration, concurrency=concurrency, max_tokens=max_tokens)
    result["model"] = model
    result["api"] = api
    result["url"] = url
    return result


async def run_records(url: str, *, model: str | None, concurrency: int, num_requests: int, max_tokens: int,
                       api: str = "openai", ignore_eos: bool = True, prompts: Sequence[Prompt] | None = None,
                       api_key: str | None = None, eos_token_id: int | None = None,
                       temperature: float | None = None, extra_params: dict | None = None,
                       timeout: float = 600.0, on_request_done: Callable[[RequestRecord], None] | None = None,
                       tag: str | None = None, first_index: int = 0, ready: Callable[[], Any] | None = None
                       ) -> tuple[list[RequestRecord], float, float, str]:
    """The requests of one level: (records, start, end on time.monotonic(), the model).
    With `tag`, request i's prompt starts with "[tag-i]" (i from `first_index`; see `tagged`): no
    two requests share more than the chat template's prefix.

    `model=None` takes the first id from /v1/models (or /api/tags). `ignore_eos` asks the
    server to generate exactly `max_tokens` tokens (vLLM/rillet extra); `eos_token_id`
    adds a logit_bias of -100 on that token for servers without `ignore_eos`.
    `on_request_done` is called after each request (e.g. to advance a progress bar); `ready`, once
    the client is set up, just before the first request (run_level_processes: a barrier)."""
    if concurrency < 1 or num_requests < 1 or max_tokens < 1:
        raise ValueError("concurrency, num_requests and max_tokens must be >= 1")
    prompt_list = list(prompts or DEFAULT_PROMPTS)
    params = _sampling_params(api, max_tokens, ignore_eos, eos_token_id, temperature, extra_params)
    async with AsyncClient(url, api=api, api_key=api_key, timeout=timeout, max_retries=0,
                           max_connections=concurrency + 2) as client:
        if model is None:
            model = await resolve_model(client)
        client.model = model
        queue: asyncio.Queue[Prompt] = asyncio.Queue()
        for i in range(num_requests):
            prompt = prompt_list[i % len(prompt_list)]
            queue.put_nowait(prompt if tag is None else tagged(prompt, f"{tag}-{first_index + i}"))
        records: list[RequestRecord] = []

        async def worker() -> None:
            while True:
                try:
                    prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                record = await _one_request(client, prompt, params, api)
                records.append(record)
                if on_request_done is not None:
                    on_request_done(record)

        if ready is not None:
            await asyncio.to_thread(ready)
        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
        end = time.monotonic()
    return records, start, end, model


def _records_in_process(kwargs: dict) -> tuple[list[RequestRecord], float, float, str]:
    """One client process's share of run_level_processes (libuv's loop where installed). A failure
    comes back as a RuntimeError naming it: the client's errors do not all survive pickling."""
    barrier = kwargs.pop("barrier")
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(run_records(ready=barrier.wait, **kwargs))
        return uvloop.run(run_records(ready=barrier.wait, **kwargs))
    except Exception as exc:
        barrier.abort()  # the others stop waiting for this one
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None


def run_level_processes(url: str, *, processes: int, model: str | None, concurrency: int, num_requests: int,
                        max_tokens: int, prompts: Sequence[Prompt] | None = None, **options: Any) -> dict:
    """run_level with the streams spread over `processes` client processes, for levels where one
    Python client cannot parse the events as fast as the server sends them (~10k events/s: at
    hundreds of streams a single-process client measures itself). Request i goes to process
    i % processes, each runs its share at concurrency / processes; all start together, once every
    one has its client set up (a barrier: spawning takes a second or more, as long as a whole
    level), and the level's duration runs from that start to the last one's end. Options as
    run_level's, but no on_request_done (it would run in the child processes)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    processes = max(1, min(processes, concurrency, num_requests))
    prompt_list = list(prompts or DEFAULT_PROMPTS)
    shares = []
    for p in range(processes):
        indices = range(p, num_requests, processes)
        shares.append(dict(url=url, model=model, concurrency=max(1, concurrency // processes + (p < concurrency % processes)),
                           num_requests=len(indices), max_tokens=max_tokens,
                           prompts=[prompt_list[i % len(prompt_list)] for i in indices],
                           first_index=p * num_requests, **options))
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(processes, mp_context=context) as pool:
        barrier = manager.Barrier(processes, timeout=120)
        for share in shares:
            share["barrier"] = barrier
        parts = list(pool.map(_records_in_process, shares))
    records = [r for part in parts for r in part[0]]
    duration = max(part[2] for part in parts) - min(part[1] for part in parts)
    return _level_result(records, duration, concurrency, max_tokens, parts[0][3], options.get("api", "openai"), url)
