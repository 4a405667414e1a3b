"""Serving benchmark: streaming chat over HTTP, rillet against the seed article's server.

One after another (never two at once), each measured with the same load generator
(`rillet.bench.loadgen.run_level`):

1. ``rillet serve``            started here as a subprocess on a free loopback port;
2. rillet's in-process engine  (``rillet.AsyncEngine``, no HTTP), same concurrency and work,
                               to show what the HTTP layer costs;
3. the seed server             benchmarks/baselines/seed_server.py (FastAPI StreamingResponse over
                               TextIteratorStreamer, one generate thread per request), subprocess.

Work: --concurrency streams (default 16) kept in flight until --num-requests (default:
max(concurrency, --min-requests 16)) streaming chat requests are done, each forced to
--max-tokens (default 128) output tokens (ignore_eos, greedy). Each system first warms up on
WARMUP_PROMPTS, none of which is measured, so TTFT is never that of a prompt the warm-up left
in rillet's prefix cache; each measured prompt is a new one too (PROMPTS cycled, each opening
with its own "[C.i]" tag; --repeat-prompts: verbatim). Metrics: output tokens/s, TTFT p50/p99, inter-token latency
(gaps between streamed chunks) p50/p99, time per output token p50/p99.

Bars (issue 3): rillet >= 15x seed output tokens/s at 16 streams; rillet TTFT p50 <= 1/4 of
the seed's; HTTP overhead (1 - rillet HTTP tok/s / in-process tok/s) <= 10%.

    python -m benchmarks.bench_serving             # full size
    python -m benchmarks.bench_serving --quick     # smoke: 4 streams x 16 tokens
    python -m benchmarks.bench_serving --rillet-isa avx2   # AVX2 stand-in (torch held to AVX2 too)

Writes benchmarks/results/bench_serving.json (bench_serving.quick.json with --quick) and prints
a text table and a Markdown table for the README. Server logs go to benchmarks/results/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Callable

from rillet.bench.inprocess import run_engine_level, start_engine
from rillet.bench.loadgen import run_level
from rillet.bench.machine import BenchRun, add_isa_argument, apply_isa
from rillet.bench.report import fmt, fmt_ratio, log, markdown_table, ratio, text_table
from rillet.bench.servers import free_port, server_process
from rillet.bench.workload import PROMPTS, WARMUP_PROMPTS, add_prompt_argument, measured_prompts

from benchmarks import REPO_ROOT, RESULTS_DIR
from benchmarks.baselines.seed_server import seed_server_command
BAR_THROUGHPUT = 15.0  # rillet / seed output tokens/s
BAR_TTFT = 4.0  # seed TTFT p50 / rillet TTFT p50
BAR_HTTP_OVERHEAD = 0.10  # 1 - HTTP tok/s / in-process tok/s


def max_num_seqs(args: argparse.Namespace) -> int:
    """rillet's default batch size (32), or more when more streams are asked for; same for HTTP and in-process."""
    return max(32, args.concurrency)


def run_http(args: argparse.Namespace, url: str, label: str) -> dict:
    log(f"{label}: warm-up")
    asyncio.run(run_level(url, model=None, concurrency=2, num_requests=2, max_tokens=min(8, args.max_tokens),
                          api=args.api, prompts=list(WARMUP_PROMPTS), temperature=0.0))
    log(f"{label}: {args.concurrency} streams, {args.num_requests} requests x {args.max_tokens} tokens ({args.api})")
    result = asyncio.run(run_level(url, model=None, concurrency=args.concurrency, num_requests=args.num_requests,
                                   max_tokens=args.max_tokens, api=args.api, ignore_eos=True, temperature=0.0,
                                   prompts=measured_prompts(args.num_requests, args.concurrency,
                                                            distinct=not args.repeat_prompts)))
    log(f"{label}: {fmt(result['output_token_throughput'])} tok/s, TTFT p50 {fmt(result['ttft_ms']['p50'], 0)} ms, "
        f"failed {result['failed']}")
    return result


def bench_http(args: argparse.Namespace, label: str, log_name: str, command: Callable[[int], list[str]]) -> dict:
    """Start the server `command(port)` on a free port, measure it over HTTP, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = command(port)
    log(f"{label}: starting on port {port}")
    with server_process(cmd, url, log_path=args.log_dir / log_name, timeout_s=args.start_timeout, cwd=REPO_ROOT):
        result = run_http(args, url, label)
    result["system"] = label
    result["command"] = " ".join(cmd[1:])
    return result


def bench_rillet_http(args: argparse.Namespace) -> dict:
    return bench_http(args, "rillet serve", "rillet_serve.log", lambda port: [
        sys.executable, "-m", "rillet.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
        "--max-num-seqs", str(max_num_seqs(args)), *args.rillet_arg, *(["--model", args.model] if args.model else [])])


def bench_seed_http(args: argparse.Namespace) -> dict:
    return bench_http(args, "seed server", "seed_server.log", lambda port: seed_server_command(port, args.dtype, args.model))


def bench_rillet_inprocess(args: argparse.Namespace) -> dict:
    async def go() -> dict:
        log(f"rillet in-process: starting AsyncEngine ({args.dtype})")
        engine = await start_engine(args.model, args.dtype, max_num_seqs(args))
        try:
            await run_engine_level(engine, concurrency=2, num_requests=2, max_tokens=min(8, args.max_tokens),
                                   prompts=WARMUP_PROMPTS, tag="warmup")
            log(f"rillet in-process: {args.concurrency} streams, {args.num_requests} requests x {args.max_tokens} tokens")
            return await run_engine_level(engine, concurrency=args.concurrency, num_requests=args.num_requests,
                                          max_tokens=args.max_tokens,
                                          prompts=measured_prompts(args.num_requests, args.concurrency,
                                                                   distinct=not args.repeat_prompts))
        finally:
            await engine.shutdown()

    result = asyncio.run(go())
    log(f"rillet in-process: {fmt(result['output_token_throughput'])} tok/s, "
        f"TTFT p50 {fmt(result['ttft_ms']['p50'], 0)} ms, failed {result['failed']}")
    result["system"] = "rillet in-process"
    return result


def comparisons(results: dict[str, dict]) -> dict:
    http, inproc, seed = results.get("rillet serve"), results.get("rillet in-process"), results.get("seed server")

    def tps(r: dict | None) -> float | None:
        return r["output_token_throughput"] if r else None

    def ttft50(r: dict | None) -> float | None:
        return r["ttft_ms"]["p50"] if r else None

    speedup = ratio(tps(http), tps(seed))
    ttft_gain = ratio(ttft50(seed), ttft50(http))
    overhead = None
    if tps(http) and tps(inproc):
        overhead = round(1.0 - tps(http) / tps(inproc), 4)
    return {
        "throughput_rillet_over_seed": speedup,
        "throughput_bar": BAR_THROUGHPUT,
        "throughput_meets_bar": None if speedup is None else speedup >= BAR_THROUGHPUT,
        "ttft_p50_seed_over_rillet": ttft_gain,
        "ttft_bar": BAR_TTFT,
        "ttft_meets_bar": None if ttft_gain is None else ttft_gain >= BAR_TTFT,
        "http_overhead": overhead,
        "http_overhead_bar": BAR_HTTP_OVERHEAD,
        "http_overhead_meets_bar": None if overhead is None else overhead <= BAR_HTTP_OVERHEAD,
    }


def render(results: dict[str, dict]) -> tuple[str, str]:
    headers = ["system", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "TPOT p50 ms",
               "TPOT p99 ms", "chunks/req", "failed"]
    rows = []
    for name, r in results.items():
        chunks = r.get("mean_chunks_per_request")
        rows.append([name, fmt(r["output_token_throughput"]), fmt(r["ttft_ms"]["p50"], 0), fmt(r["ttft_ms"]["p99"], 0),
                     fmt(r["itl_ms"]["p50"], 1), fmt(r["itl_ms"]["p99"], 1), fmt(r["tpot_ms"]["p50"], 1),
                     fmt(r["tpot_ms"]["p99"], 1), fmt(chunks, 1), str(r["failed"])])
    return text_table(headers, rows, first_left=True), markdown_table(headers, rows)


def render_comparisons(c: dict) -> str:
    def verdict(ok: bool | None) -> str:
        return "" if ok is None else (" (met)" if ok else " (MISSED)")

    overhead = "-" if c["http_overhead"] is None else f"{c['http_overhead'] * 100:.1f}%"
    return "\n".join([
        f"- output tokens/s, rillet serve / seed server: {fmt_ratio(c['throughput_rillet_over_seed'])} "
        f"(bar >= {c['throughput_bar']:g}x){verdict(c['throughput_meets_bar'])}",
        f"- TTFT p50, seed server / rillet serve: {fmt_ratio(c['ttft_p50_seed_over_rillet'])} "
        f"(bar >= {c['ttft_bar']:g}x){verdict(c['ttft_meets_bar'])}",
        f"- HTTP overhead, 1 - rillet serve / in-process tok/s: {overhead} "
        f"(bar <= {c['http_overhead_bar'] * 100:g}%){verdict(c['http_overhead_meets_bar'])}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--concurrency", type=int, default=None, help="streams in flight (default 16)")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="requests per system (default: max(--concurrency, --min-requests))")
    parser.add_argument("--min-requests", type=int, default=None,
                        help="fewest requests measured per system (default 16; --quick: --concurrency)")
    parser.add_argument("--max-tokens", type=int, default=None, help="forced output tokens per request (default 128)")
    parser.add_argument("--api", default="openai", choices=("openai", "ollama"),
                        help="openai: /v1/chat/completions SSE; ollama: /api/chat NDJSON")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--skip-rillet", action="store_true", help="skip rillet serve")
    parser.add_argument("--skip-inprocess", action="store_true", help="skip rillet's in-process engine")
    parser.add_argument("--rillet-arg", action="append", default=[],
                        help="extra argument for `rillet serve` (repeatable), e.g. --rillet-arg=--num-threads=2")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds a server may take to start")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 streams x 16 tokens")
    add_isa_argument(parser)
    add_prompt_argument(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/bench_serving.json)")
    args = parser.parse_args(argv)

    args.concurrency = args.concurrency or (4 if args.quick else 16)
    args.min_requests = args.min_requests or (args.concurrency if args.quick else 16)
    args.num_requests = args.num_requests or max(args.concurrency, args.min_requests)
    isa_env = apply_isa(args.rillet_isa)
    args.max_tokens = args.max_tokens or (16 if args.quick else 128)
    args.log_dir = RESULTS_DIR / "logs"
    args.log_dir.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS_DIR / ("bench_serving.quick.json" if args.quick else "bench_serving.json")

    run = BenchRun.begin(parser, args.dtype, args.rillet_isa)
    info, header = run.info, run.header
    results: dict[str, dict] = {}
    if not args.skip_rillet:
        results["rillet serve"] = bench_rillet_http(args)
    if not args.skip_inprocess:
        results["rillet in-process"] = bench_rillet_inprocess(args)
    if not args.skip_seed:
        results["seed server"] = bench_seed_http(args)
    comp = comparisons(results)
    text, markdown = render(results)

    payload = {
        "benchmark": "bench_serving",
        "description": "Streaming chat over loopback HTTP: rillet serve vs the seed article's FastAPI server, "
                       "plus rillet's in-process engine for the HTTP overhead; forced-length requests.",
        "settings": {"concurrency": args.concurrency, "num_requests": args.num_requests,
                     "max_tokens": args.max_tokens, "api": args.api, "ignore_eos": True, "temperature": 0.0,
                     "dtype": args.dtype, "model": args.model or "default (SmolLM2-135M-Instruct)",
                     "loadgen": "rillet.bench.loadgen", "quick": args.quick, "prompts": list(PROMPTS),
                     "distinct_prompts": not args.repeat_prompts,
                     "warmup_prompts": list(WARMUP_PROMPTS), "min_requests": args.min_requests,
                     "rillet_isa": args.rillet_isa, "isa_env": isa_env},
        "header": header,
        "comparisons": comp,
        "results": results,
    }
    run.finish(payload, out)

    print(f"\nbench_serving: {info['cpu_model']} ({info['cpu_cores']} cores), torch {info['torch']}, {args.dtype}, "
          f"{args.concurrency} streams, {args.num_requests} requests x {args.max_tokens} forced tokens, {args.api} API\n")
    print(header)
    print(text)
    print()
    print(render_comparisons(comp))
    print("\nMarkdown:\n")
    print(header + "\n")
    print(markdown)
    print()
    print(render_comparisons(comp))
    print(f"\nJSON: {out}")
    run.print_warnings()
    failed = sum(r["failed"] for r in results.values())
    if failed:
        print(f"warning: {failed} request(s) failed; see the JSON and {args.log_dir}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
