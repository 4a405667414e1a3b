"""Load shapes of the reliability tests (fast variants, tests/reliability) and scripts/soak.py
(long variants, `make soak`): a disconnect storm, an overload, a mixed soak; and the probes they
read: a server's RSS (with its engine process), its /metrics gauges, when it is idle.

Each scenario returns a plain dict report (what was tried, what was seen), which the tests assert
on and the soak script prints; docs/RELIABILITY.md records the figures. Requests go through
`rillet.bench.rawhttp`; servers are `rillet.bench.servers.RilletServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import resource
import statistics
import time
from typing import Any

from rillet.bench.loadgen import percentile
from rillet.bench.rawhttp import (
    LONG_PROMPT_WORDS,
    REFERENCE_PATH,
    StreamResult,
    chat_body,
    completion_body,
    http_request,
    iter_body,
    iter_lines,
    long_prompt,
    ollama_body,
    read_head,
    reference_body,
    request_bytes,
    split_url,
)
from rillet.bench.servers import RilletServer, poll_until

__all__ = ["REFERENCE_PATH", "RilletServer", "RssSampler", "StreamResult", "chat_body", "completion_body",
           "disconnect_storm", "engine_gauges", "get_metrics", "http_request", "iter_body", "iter_lines", "median",
           "metric", "mixed_soak", "ollama_body", "overload", "pct", "poll_until", "raise_nofile", "read_head",
           "reference_body", "request_bytes", "rss_bytes", "split_url", "summarize_ms", "wait_engine_idle",
           "wait_until"]


# ------------------------------------------------------------------ processes


def rss_bytes(pid: int) -> int:
    """Resident memory (VmRSS) of a process plus its descendants: `rillet serve` runs its engine
    core as a child process, and both count."""
    with open(f"/proc/{pid}/status") as f:
        own = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), None)
    if own is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return own + sum(rss_bytes(child) for child in child_pids(pid))


def child_pids(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the parenthesised name
            children.append(int(entry))
    return children


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class RssSampler:
    """Samples a process's RSS in the background (peak, first, last)."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                self.samples.append(rss_bytes(self.pid))
            await asyncio.sleep(self.interval_s)  # a sampling period, not synchronization

    def __enter__(self) -> RssSampler:
        with contextlib.suppress(OSError, RuntimeError):
            self.samples.append(rss_bytes(self.pid))
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(OSError, RuntimeError):
            self.samples.append(rss_bytes(self.pid))

    @property
    def peak(self) -> int:
        return max(self.samples)



# ------------------------------------------------------------------ metrics


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples over all label sets (0 when absent)."""
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+([0-9.eE+-]+|NaN)$", text, re.M):
        total += float(match.group(1))
    return total


def get_metrics(url: str, headers: dict[str, str] | None = None) -> str:
    import httpx

    r = httpx.get(url + "/metrics", headers=headers or {}, timeout=30)
    r.raise_for_status()
    return r.text


def engine_gauges(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    text = get_metrics(url, headers)
    return {"running": metric(text, "rillet:num_requests_running"),
            "waiting": metric(text, "rillet:num_requests_waiting"),
            "kv_cache_usage": metric(text, "rillet:kv_cache_usage_perc"),
            "aborted": metric(text, "rillet:request_aborted_total"),
            "errors": metric(text, "rillet:request_error_total"),
            "success": metric(text, "rillet:request_success_total"),
            "rejected": metric(text, "rillet:request_rejected_total")}


def wait_engine_idle(url: str, headers: dict[str, str] | None = None, timeout_s: float = 60.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and the KV cache is empty."""
    def idle():
        g = engine_gauges(url, headers)
        return g if g["running"] == 0 and g["waiting"] == 0 and g["kv_cache_usage"] == 0 else None

    return poll_until(idle, timeout_s, "the engine to go idle (no running/waiting request, KV usage 0)", 0.2)


def summarize_ms(values: list[float]) -> dict[str, float | None]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    return {"n": len(values), "p50_ms": ms(percentile(values, 50)), "p99_ms": ms(percentile(values, 99)),
            "max_ms": ms(max(values) if values else None)}



# ------------------------------------------------------------------ scenario: disconnect storm


STORM_MODES = ("close_after_send", "partial_body", "close_after_head_long_prompt", "mid_stream",
               "mid_stream_ollama")


async def disconnect_storm(url: str, *, n: int, headers: dict[str, str] | None = None, seed: int = 0,
                           max_in_flight: int = 32, long_prompt_words: int = 600,
                           reference: StreamResult | None = None) -> dict[str, Any]:
    """`n` streams, each dropped at a random point: right after sending (before any token), halfway
    through the request body, after the response headers while a long prompt is being prefilled,
    or after a random number of events (mid-stream, OpenAI SSE or Ollama NDJSON). Meanwhile one
    well-behaved greedy stream runs from start to end (compared against `reference` by the caller)."""
    rng = random.Random(seed)
    plan = [rng.choice(STORM_MODES) for _ in range(n)]
    gate = asyncio.Semaphore(max_in_flight)
    host, port = split_url(url)

    async def one(i: int, mode: str) -> StreamResult | None:
        async with gate:
            if mode == "close_after_send":
                return await http_request(url, "/v1/chat/completions",
                                          chat_body(f"Story {i}: once upon a time", 200), headers=headers,
                                          close_after_send=True)
            if mode == "partial_body":
                body = json.dumps(chat_body(f"Story {i}", 200)).encode()
                try:
                    _, writer = await asyncio.open_connection(host, port)
                    writer.write(request_bytes("POST", "/v1/chat/completions", body[: len(body) // 2], headers,
                                               content_length=len(body)))
                    await writer.drain()
                    writer.close()
                    await writer.wait_closed()
                except OSError:
                    pass
                return None
            if mode == "close_after_head_long_prompt":
                return await http_request(url, "/v1/completions",
                                          completion_body(long_prompt(rng, long_prompt_words), 200),
                                          headers=headers, close_after_head=True)
            k = rng.randint(1, 24)
            if mode == "mid_stream":
                return await http_request(url, "/v1/completions",
                                          completion_body(f"Tale {i}: the dragon said", 300, ignore_eos=True),
                                          headers=headers, close_after_events=k)
            return await http_request(url, "/api/chat", ollama_body(f"Tell tale {i}.", 300), headers=headers,
                                      close_after_events=k)

    t0 = time.perf_counter()
    good_task = asyncio.ensure_future(http_request(url, REFERENCE_PATH, reference_body(), headers=headers))
    results = await asyncio.gather(*[one(i, m) for i, m in enumerate(plan)])
    good = await good_task
    modes = {m: plan.count(m) for m in STORM_MODES}
    unexpected = [r.exception for r in results if r is not None and r.exception and not r.closed_early]
    statuses: dict[str, int] = {}
    for r in results:
        if r is not None and r.status:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {"streams": n, "modes": modes, "statuses": statuses, "client_errors": unexpected,
            "seconds": round(time.perf_counter() - t0, 1), "well_behaved": good,
            "well_behaved_ok": reference is None or (good.text == reference.text and good.done
                                                     and good.finish_reason == reference.finish_reason)}


# ------------------------------------------------------------------ scenario: overload


async def queue_sampler(url: str, headers: dict[str, str] | None, max_num_seqs: int, out: list[float],
                        interval_s: float = 0.05) -> None:
    """Sample /metrics: requests queued beyond the free slots (what --max-waiting bounds)."""
    while True:
        r = await http_request(url, "/metrics", None, headers=headers, method="GET")
        if r.status == 200 and isinstance(r.body, str):
            waiting = metric(r.body, "rillet:num_requests_waiting")
            running = metric(r.body, "rillet:num_requests_running")
            out.append(max(0.0, waiting - max(0.0, max_num_seqs - running)))
        await asyncio.sleep(interval_s)  # a sampling period


async def overload(url: str, *, n: int, headers: dict[str, str] | None = None, max_tokens: int = 8,
                   pid: int | None = None, seed: int = 0, max_num_seqs: int | None = None) -> dict[str, Any]:
    """`n` connections at once (chat / completions / Ollama, streamed or not). Reports statuses,
    how fast the refusals came, whether every accepted request finished, peak server RSS and
    (given max_num_seqs) the most requests seen queued beyond the free slots."""
    rng = random.Random(seed)
    kinds = ["chat_stream", "chat", "completion_stream", "completion", "ollama_stream"]

    def request(i: int) -> tuple[str, dict[str, Any]]:
        kind = rng.choice(kinds)
        text = f"Give me fact number {i} about owls."
        if kind.startswith("chat"):
            return "/v1/chat/completions", chat_body(text, max_tokens, stream=kind.endswith("stream"))
        if kind.startswith("completion"):
            return "/v1/completions", completion_body(text, max_tokens, stream=kind.endswith("stream"))
        return "/api/chat", ollama_body(text, max_tokens)

    plan = [request(i) for i in range(n)]
    sampler = RssSampler(pid) if pid else contextlib.nullcontext()
    t0 = time.perf_counter()
    queued: list[float] = []
    qtask = asyncio.ensure_future(queue_sampler(url, headers, max_num_seqs, queued)) if max_num_seqs else None
    try:
        with sampler:
            results = await asyncio.gather(*[http_request(url, p, b, headers=headers) for p, b in plan])
    finally:
        if qtask is not None:
            qtask.cancel()
    elapsed = time.perf_counter() - t0
    statuses: dict[str, int] = {}
    for r in results:
        key = str(r.status) if r.status else f"no response ({(r.exception or '').split(':')[0]})"
        statuses[key] = statuses.get(key, 0) + 1
    refused = [r for r in results if r.status == 429]
    accepted = [r for r in results if r.status == 200]
    unfinished = [r for r in accepted if not (r.done and r.finish_reason in ("stop", "length")) or r.error]
    report = {
        "connections": n, "seconds": round(elapsed, 1), "statuses": statuses,
        "accepted": len(accepted), "accepted_unfinished": len(unfinished),
        "refused_429": len(refused),
        "refusal_latency": summarize_ms([r.t_head - r.t_sent for r in refused if r.t_head]),
        "accepted_latency": summarize_ms([r.t_head - r.t_sent for r in accepted if r.t_head]),
        "retry_after_missing": sum(1 for r in refused if "retry-after" not in r.headers),
        "server_5xx": sum(1 for r in results if r.status >= 500),
        "no_response": sum(1 for r in results if not r.status),
    }
    if queued:
        report["max_queued_seen"] = max(queued)
    if pid:
        report["rss_mb"] = {"start": round(sampler.samples[0] / 2**20, 1),
                            "peak": round(sampler.peak / 2**20, 1),
                            "end": round(sampler.samples[-1] / 2**20, 1)}
    return report


# ------------------------------------------------------------------ scenario: mixed soak


INVALID_BODIES: list[tuple[str, bytes]] = [
    ("/v1/chat/completions", b'{"messages": ['),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}'),
    ("/v1/completions", b'{"prompt": "x", "n": 99}'),
    ("/api/chat", b'{"messages": "not a list"}'),
    ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}'),
]


async def mixed_soak(url: str, *, duration_s: float, concurrency: int, headers: dict[str, str] | None = None,
                     pid: int | None = None, seed: int = 0, max_tokens: int = 48,
                     progress_every_s: float = 0.0) -> dict[str, Any]:
    """`concurrency` clients, each sending one request after another until `duration_s` is over:
    streaming (OpenAI chat / completions, Ollama), non-streaming, aborted mid-stream, invalid."""
    rng = random.Random(seed)
    weights = {"stream_chat": 30, "stream_completion": 15, "stream_ollama": 10, "non_stream": 20,
               "aborted": 15, "invalid": 10}
    kinds = list(weights)
    counts: dict[str, int] = {k: 0 for k in kinds}
    outcomes: dict[str, int] = {}
    ttfts: list[float] = []
    itls: list[float] = []
    rss: list[tuple[float, int]] = []
    deadline = time.perf_counter() + duration_s
    t0 = time.perf_counter()

    def note(outcome: str) -> None:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async def client(c: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            i += 1
            kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
            counts[kind] += 1
            text = f"Client {c} request {i}: write about {rng.choice(LONG_PROMPT_WORDS)}s."
            n_tokens = rng.randint(8, max_tokens)
            if kind == "invalid":
                path, raw = rng.choice(INVALID_BODIES)
                r = await http_request(url, path, raw, headers=headers)
                note(f"invalid->{r.status or r.exception}")
                continue
            if kind == "aborted":
                r = await http_request(url, "/v1/chat/completions", chat_body(text, 200, ignore_eos=True),
                                       headers=headers, close_after_events=rng.randint(1, 10))
                note("aborted" if r.closed_early else f"aborted->{r.status or r.exception}:unexpected")
                continue
            if kind == "stream_chat":
                r = await http_request(url, "/v1/chat/completions", chat_body(text, n_tokens), headers=headers)
            elif kind == "stream_completion":
                r = await http_request(url, "/v1/completions", completion_body(text, n_tokens), headers=headers)
            elif kind == "stream_ollama":
                r = await http_request(url, "/api/chat", ollama_body(text, n_tokens), headers=headers)
            else:
                r = await http_request(url, "/v1/chat/completions", chat_body(text, n_tokens, stream=False),
                                       headers=headers)
            if r.status == 200 and r.ended_cleanly and r.error is None:
                note("ok")
                if kind != "non_stream":
                    if r.ttft is not None:
                        ttfts.append(r.ttft)
                    itls.extend(r.itls)
            elif r.status == 200 and r.error is not None:
                note("error_event")
            elif r.status:
                note(f"http_{r.status}")
            else:
                note(f"client_error:{(r.exception or '').split(':')[0]}")

    async def watch() -> None:
        next_progress = t0 + progress_every_s
        while True:
            if pid:
                with contextlib.suppress(OSError, RuntimeError):
                    rss.append((time.perf_counter() - t0, rss_bytes(pid)))
            if progress_every_s and time.perf_counter() >= next_progress:
                next_progress += progress_every_s
                print(f"  soak {time.perf_counter() - t0:6.0f}s: {sum(counts.values())} requests, "
                      f"outcomes {outcomes}, rss {rss[-1][1] / 2**20 if rss else 0:.0f} MB", flush=True)
            await asyncio.sleep(1.0)  # a sampling period

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.gather(*[client(c) for c in range(concurrency)])
    finally:
        watcher.cancel()
    if pid:
        rss.append((time.perf_counter() - t0, rss_bytes(pid)))
    elapsed = time.perf_counter() - t0
    report = {"seconds": round(elapsed, 1), "concurrency": concurrency, "requests": sum(counts.values()),
              "by_kind": counts, "outcomes": outcomes, "ttft": summarize_ms(ttfts), "itl": summarize_ms(itls)}
    if rss:
        # RSS climbs at first while KV-cache pages are touched for the first time; the growth that
        # matters is from the end of that warm-up (a quarter of the run, at most 60 s) to the end
        warm_t = min(60.0, elapsed / 4)
        warm = next((v for t, v in rss if t >= warm_t), rss[-1][1])
        report["rss_mb"] = {"start": round(rss[0][1] / 2**20, 1), "after_warmup": round(warm / 2**20, 1),
                            "warmup_s": round(warm_t, 1), "end": round(rss[-1][1] / 2**20, 1),
                            "peak": round(max(v for _, v in rss) / 2**20, 1)}
    return report


async def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    """Poll `condition()` on the event loop until true, failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


def pct(a: float, b: float) -> float:
    return round(100.0 * (b - a) / a, 2)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
