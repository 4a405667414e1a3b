"""2 engine replicas through Ray Serve vs 2 separate `rillet serve` processes, same cores.

Measures, on one machine:
  - greedy answers through Ray Serve against a single `rillet serve` (must be equal);
  - generated tok/s of `--streams` concurrent streams (OpenAI SSE, ignore_eos) spread over
    2 separate servers (round-robin by the client) and over 2 Ray Serve replicas (one URL);
  - TTFT p50/p99 of both;
  - Ray at each `--stream-intervals` value (how long a replica gathers a stream's tokens into
    one item through Ray; the first is the deployment's default).
Each engine gets `cores / 2` threads. Writes benchmarks/results/bench_ray.json (CPU, commit).

    .venv/bin/python -m benchmarks.bench_ray [--streams 16] [--requests 64] [--max-tokens 64] [--stream-intervals 50,200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rillet.bench.machine import machine_info
from rillet.deploy.ray import STREAM_INTERVAL_MS

ROOT = Path(__file__).resolve().parent.parent

GREEDY_PROMPTS = ["The capital of France is", "Write a haiku about rivers.", "List three prime numbers:",
                  "Explain what a compiler does in one sentence.", "def fibonacci(n):",
                  "The best way to learn a language is", "Translate 'good morning' to Spanish:",
                  "Once upon a time, in a quiet village,"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_ready(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"{url}/health", timeout=5)).json().get("status") == "ready":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not ready")


async def greedy(url: str, max_tokens: int = 24) -> list[str]:
    async with httpx.AsyncClient(timeout=120) as client:
        answers = []
        for prompt in GREEDY_PROMPTS:
            r = await client.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                                 "temperature": 0})
            r.raise_for_status()
            answers.append(r.json()["choices"][0]["text"])
        return answers


async def load(urls: list[str], streams: int, requests: int, max_tokens: int) -> dict:
    """`streams` concurrent SSE streams; request i goes to urls[i % len(urls)]."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    ttfts: list[float] = []
    tokens = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            body = {"prompt": f"Request {i}: write a long story about {GREEDY_PROMPTS[i % 8]}", "stream": True,
                    "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                    "stream_options": {"include_usage": True}}
            started = time.perf_counter()
            first = None
            async with client.stream("POST", f"{urls[i % len(urls)]}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(event["error"])
                    if first is None and event.get("choices"):
                        first = time.perf_counter() - started
                    if event.get("usage") and not event.get("choices"):
                        tokens += event["usage"]["completion_tokens"]
            ttfts.append(first or 0.0)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=streams * 2)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(streams)))
        wall = time.perf_counter() - started
    ttfts.sort()
    return {"tok_s": round(tokens / wall, 1), "tokens": tokens, "wall_s": round(wall, 2),
            "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
            "ttft_p99_ms": round(ttfts[int(0.99 * (len(ttfts) - 1))] * 1000, 1)}


def run_separate(args: argparse.Namespace, threads: int, extra: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    ports = [_port(), _port()]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "rillet.cli", "serve", "--port", str(p), "--num-threads",
                               str(threads), "--max-num-seqs", str(args.streams), "--log-level", "warning",
                               *extra],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        async def go() -> tuple[list[str], dict]:
            for url in urls:
                await _wait_ready(url)
            answers = await greedy(urls[0])
            await load(urls, args.streams, args.streams, 8)  # warm-up
            return answers, await load(urls, args.streams, args.requests, args.max_tokens)
        return asyncio.run(go())
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def run_ray(args: argparse.Namespace, threads: int, interval_ms: float) -> tuple[list[str], dict]:
    import ray
    from ray import serve

    from rillet.deploy.ray import OBJECT_STORE_BYTES, build_app

    cores = os.cpu_count() or 2
    ray.init(num_cpus=cores, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False)
    port = _port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"num_replicas": 2, "num_cpus": cores / 2, "num_threads": threads,
                             "max_num_seqs": args.streams, "stream_interval_ms": interval_ms}),
                  name="rillet", route_prefix="/")
        url = f"http://127.0.0.1:{port}"

        async def go() -> tuple[list[str], dict]:
            await _wait_ready(url)
            answers = await greedy(url)
            await load([url], args.streams, args.streams, 8)
            result = await load([url], args.streams, args.requests, args.max_tokens)
            async with httpx.AsyncClient() as client:  # the router's own timing, in the ingress
                metrics = (await client.get(f"{url}/metrics", timeout=30)).text
            for line in metrics.splitlines():
                if line.startswith("rillet:router_choose_seconds{"):
                    q = line.split('"')[1]
                    result[f"router_p{round(float(q) * 100)}_us"] = round(float(line.split()[-1]) * 1e6, 1)
            return answers, result
        return asyncio.run(go())
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternate separate/ray this many times")
    parser.add_argument("--stream-intervals", default=f"{STREAM_INTERVAL_MS:g},200",
                        help="Ray runs, one per stream_interval_ms (comma-separated; the first is the default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_ray.json")
    args = parser.parse_args()
    threads = max(1, (os.cpu_count() or 2) // 2)
    rounds = []
    intervals = [float(x) for x in args.stream_intervals.split(",") if x.strip()]

    def ray_key(interval: float) -> str:  # a round's entry of one Ray run; the default's is plain "ray"
        return "ray" if interval == intervals[0] else f"ray_interval_{interval:g}ms"
    answers_single = None
    ray_answers: list[list[str]] = []  # every Ray run's greedy answers: each must equal one server's
    for _ in range(args.rounds):
        answers_single, separate = run_separate(args, threads)
        print("separate", separate, flush=True)
        # like for like with a Ray replica: the engine in a thread of the serving process
        _, separate_thread = run_separate(args, threads, ("--no-engine-process",))
        print("separate (engine thread)", separate_thread, flush=True)
        entry = {"separate": separate, "separate_engine_thread": separate_thread}
        for interval in intervals:
            answers, via_ray = run_ray(args, threads, interval)
            ray_answers.append(answers)
            print(f"ray (stream_interval_ms={interval:g})", via_ray, flush=True)
            entry[ray_key(interval)] = via_ray
        rounds.append(entry)
    best_sep = max(max(r["separate"]["tok_s"], r["separate_engine_thread"]["tok_s"]) for r in rounds)
    best_ray = max(r["ray"]["tok_s"] for r in rounds)
    by_interval = {f"{i:g}": max(r[ray_key(i)]["tok_s"] for r in rounds) for i in intervals}
    report = {
        "benchmark": "bench_ray", "machine": machine_info(), "load_1m": os.getloadavg()[0],
        "command": f"python benchmarks/bench_ray.py --streams {args.streams} --requests {args.requests} "
                   f"--max-tokens {args.max_tokens} --rounds {args.rounds} --stream-intervals {args.stream_intervals}",
        "threads_per_engine": threads,
        "greedy_equal": all(answers == answers_single for answers in ray_answers), "greedy_prompts": len(GREEDY_PROMPTS),
        "greedy_single": answers_single, "greedy_ray": ray_answers[-1],
        "rounds": rounds, "best_separate_tok_s (either mode)": best_sep, "best_ray_tok_s": best_ray,
        "ray_vs_separate": round(best_ray / best_sep, 3),
        "stream_interval_ms_default": intervals[0],
        "best_ray_tok_s_by_stream_interval_ms": by_interval,
        "ray_vs_separate_by_stream_interval_ms": {k: round(v / best_sep, 3) for k, v in by_interval.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("greedy_") or k == "greedy_equal"}))


if __name__ == "__main__":
    main()
