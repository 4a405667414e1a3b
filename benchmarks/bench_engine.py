"""Engine throughput: rillet's in-process engine against the seed design, same run, same weights.

For each concurrency level C (default 1, 8, 32), C clients keep one request each in flight
until max(C, --min-requests 16) requests have finished (so the 1-stream level too measures 16
requests); every request is a chat prompt forced to exactly --max-tokens output tokens
(ignore_eos, greedy). Measured per level: aggregate output tokens/s, TTFT, time per output
token. Both systems warm up on WARMUP_PROMPTS, none of which is a measured prompt, so no
warm-up leaves a measured prompt in rillet's prefix cache; each measured prompt is a new one too
(PROMPTS cycled, each opening with its own "[C.i]" tag; --repeat-prompts: verbatim).

- seed:   benchmarks/baselines/seed_engine.py -- one Thread(target=model.generate) with a
          TextIteratorStreamer per request (the article's design), plain transformers model.
- rillet: rillet.AsyncEngine -- one engine loop batching every live request.

Bars (issue 2): at 32 concurrent, rillet >= 15x seed output tokens/s; single stream >= 3x.

    python -m benchmarks.bench_engine                 # full size (slow: the seed at 32 takes minutes)
    python -m benchmarks.bench_engine --quick         # smoke: levels 1,4, 16 tokens
    python -m benchmarks.bench_engine --seed-concurrency 1,8   # skip the slowest seed level
    python -m benchmarks.bench_engine --rillet-isa avx2        # AVX2 stand-in (torch held to AVX2 too)

Writes benchmarks/results/bench_engine.json (bench_engine.quick.json with --quick) and prints
a text table and a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from pathlib import Path

from rillet.bench.inprocess import run_engine_level, start_engine
from rillet.bench.machine import BenchRun, add_isa_argument, apply_isa
from rillet.bench.report import fmt, fmt_ratio, log, markdown_table, ratio, text_table
from rillet.bench.workload import PROMPTS, WARMUP_PROMPTS, add_prompt_argument, measured_prompts, warmup_cycle

from benchmarks import RESULTS_DIR

BARS = {1: 3.0, 32: 15.0}  # concurrency -> minimum rillet/seed output tokens/s


def parse_levels(text: str) -> list[int]:
    levels = sorted({int(part) for part in text.split(",") if part.strip()})
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("levels must be integers >= 1, e.g. 1,8,32")
    return levels


def num_requests_for(concurrency: int, min_requests: int) -> int:
    return max(concurrency, min_requests)


# ----------------------------------------------------------------------------- seed


def bench_seed(args: argparse.Namespace, levels: list[int]) -> dict[int, dict]:
    from benchmarks.baselines.seed_engine import SeedEngine, consume, run_concurrent

    log(f"seed: loading model ({args.dtype})")
    engine = SeedEngine(args.model, args.dtype, streamer_timeout=None)
    consume(engine, warmup_cycle(1)[0], min(8, args.max_tokens))  # warm-up, not a measured prompt
    results = {}
    for c in levels:
        n = num_requests_for(c, args.min_requests)
        log(f"seed: concurrency {c}, {n} requests x {args.max_tokens} tokens")
        result = run_concurrent(engine, concurrency=c, num_requests=n, max_tokens=args.max_tokens,
                                prompts=measured_prompts(n, c, distinct=not args.repeat_prompts))
        log(f"seed: concurrency {c}: {fmt(result['output_token_throughput'])} tok/s, "
            f"TTFT p50 {fmt(result['ttft_ms']['p50'], 0)} ms, failed {result['failed']}")
        results[c] = result
    del engine
    gc.collect()
    return results


# ----------------------------------------------------------------------------- rillet


async def _bench_rillet(args: argparse.Namespace, levels: list[int]) -> dict[int, dict]:
    max_num_seqs = max(32, *levels)  # rillet's default batch size, or more when more is asked for
    log(f"rillet: starting AsyncEngine ({args.dtype}, max_num_seqs={max_num_seqs})")
    engine = await start_engine(args.model, args.dtype, max_num_seqs)
    try:
        await run_engine_level(engine, concurrency=min(4, max(levels)), num_requests=min(4, max(levels)),
                               max_tokens=min(8, args.max_tokens), prompts=WARMUP_PROMPTS, tag="warmup")
        results = {}
        for c in levels:
            n = num_requests_for(c, args.min_requests)
            log(f"rillet: concurrency {c}, {n} requests x {args.max_tokens} tokens")
            result = await run_engine_level(engine, concurrency=c, num_requests=n, max_tokens=args.max_tokens,
                                            prompts=measured_prompts(n, c, distinct=not args.repeat_prompts))
            log(f"rillet: concurrency {c}: {fmt(result['output_token_throughput'])} tok/s, "
                f"TTFT p50 {fmt(result['ttft_ms']['p50'], 0)} ms, failed {result['failed']}")
            results[c] = result
        return results
    finally:
        await engine.shutdown()


def bench_rillet(args: argparse.Namespace, levels: list[int]) -> dict[int, dict]:
    return asyncio.run(_bench_rillet(args, levels))


# ----------------------------------------------------------------------------- report


def build_rows(levels: list[int], seed: dict[int, dict], rillet: dict[int, dict]) -> list[dict]:
    rows = []
    for c in levels:
        s, r = seed.get(c), rillet.get(c)
        s_tps = s["output_token_throughput"] if s else None
        r_tps = r["output_token_throughput"] if r else None
        speedup = ratio(r_tps, s_tps)
        bar = BARS.get(c)
        rows.append({
            "concurrency": c,
            "seed_tok_s": s_tps,
            "rillet_tok_s": r_tps,
            "speedup": speedup,
            "seed_ttft_p50_ms": s["ttft_ms"]["p50"] if s else None,
            "rillet_ttft_p50_ms": r["ttft_ms"]["p50"] if r else None,
            "seed_tpot_p50_ms": s["tpot_ms"]["p50"] if s else None,
            "rillet_tpot_p50_ms": r["tpot_ms"]["p50"] if r else None,
            "bar": bar,
            "meets_bar": None if bar is None or speedup is None else speedup >= bar,
        })
    return rows


def greedy_parity(seed: dict[int, dict], rillet: dict[int, dict]) -> dict | None:
    """Single-stream greedy answers of both systems, prompt by prompt: same weights, template and
    length should give the same text, up to where bf16 rounding differences make them diverge."""
    s_texts, r_texts = (seed.get(1) or {}).get("texts"), (rillet.get(1) or {}).get("texts")
    if not s_texts or not r_texts:
        return None
    pairs = list(zip(s_texts, r_texts))

    def common_prefix(a: str, b: str) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    return {"compared": len(pairs), "identical": sum(a == b for a, b in pairs),
            "common_prefix_chars": [common_prefix(a, b) for a, b in pairs],
            "seed_chars": [len(a) for a, _ in pairs], "rillet_chars": [len(b) for _, b in pairs]}


def render(rows: list[dict]) -> tuple[str, str]:
    headers = ["concurrency", "seed tok/s", "rillet tok/s", "rillet/seed", "bar", "seed TTFT p50 ms",
               "rillet TTFT p50 ms", "seed TPOT p50 ms", "rillet TPOT p50 ms"]
    cells = []
    for row in rows:
        bar = "-" if row["bar"] is None else f">= {row['bar']:g}x " + (
            "" if row["meets_bar"] is None else ("(met)" if row["meets_bar"] else "(MISSED)"))
        cells.append([str(row["concurrency"]), fmt(row["seed_tok_s"]), fmt(row["rillet_tok_s"]),
                      fmt_ratio(row["speedup"]), bar.strip(), fmt(row["seed_ttft_p50_ms"], 0),
                      fmt(row["rillet_ttft_p50_ms"], 0), fmt(row["seed_tpot_p50_ms"], 1),
                      fmt(row["rillet_tpot_p50_ms"], 1)])
    return text_table(headers, cells, first_left=True), markdown_table(headers, cells)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Output tokens/s against concurrency, both systems, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, marker in (("rillet_tok_s", "rillet AsyncEngine", "o"), ("seed_tok_s", "seed (thread per request)", "s")):
        points = [(r["concurrency"], r[key]) for r in rows if r[key]]
        if points:
            ax.plot(*zip(*points), marker=marker, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype of both systems (default: bfloat16, rillet's default on a bf16-capable CPU)")
    parser.add_argument("--concurrency", type=parse_levels, default=None, help="levels (default 1,8,32)")
    parser.add_argument("--seed-concurrency", type=parse_levels, default=None,
                        help="levels to run the seed at (default: the same; its 32 level takes minutes)")
    parser.add_argument("--max-tokens", type=int, default=None, help="forced output tokens per request (default 128)")
    parser.add_argument("--min-requests", type=int, default=None,
                        help="requests per level are max(concurrency, this) (default 16; --quick 1)")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--skip-rillet", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: levels 1,4; 16 tokens; 1 request minimum")
    add_isa_argument(parser)
    add_prompt_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/bench_engine.json)")
    parser.add_argument("--plot", type=Path, nargs="?", const=Path("auto"), default=None,
                        help="also draw tokens/s vs concurrency (PNG; default path: next to the JSON)")
    args = parser.parse_args(argv)

    levels = args.concurrency or ([1, 4] if args.quick else [1, 8, 32])
    args.max_tokens = args.max_tokens or (16 if args.quick else 128)
    args.min_requests = args.min_requests or (1 if args.quick else 16)
    isa_env = apply_isa(args.rillet_isa)
    seed_levels = [] if args.skip_seed else (args.seed_concurrency or levels)
    rillet_levels = [] if args.skip_rillet else levels
    out = args.out or RESULTS_DIR / ("bench_engine.quick.json" if args.quick else "bench_engine.json")

    run = BenchRun.begin(parser, args.dtype, args.rillet_isa)
    info, header = run.info, run.header
    seed = bench_seed(args, seed_levels) if seed_levels else {}
    rillet = bench_rillet(args, rillet_levels) if rillet_levels else {}
    all_levels = sorted(set(seed_levels) | set(rillet_levels))
    rows = build_rows(all_levels, seed, rillet)
    text, markdown = render(rows)
    parity = greedy_parity(seed, rillet)

    payload = {
        "benchmark": "bench_engine",
        "description": "In-process output tokens/s: rillet AsyncEngine vs the seed design (thread + "
                       "TextIteratorStreamer per request), forced-length chat requests.",
        "settings": {"levels": levels, "seed_levels": seed_levels, "max_tokens": args.max_tokens,
                     "min_requests": args.min_requests, "ignore_eos": True, "temperature": 0.0,
                     "dtype": args.dtype, "model": args.model or "default (SmolLM2-135M-Instruct)",
                     "quick": args.quick, "prompts": list(PROMPTS), "warmup_prompts": list(WARMUP_PROMPTS),
                     "distinct_prompts": not args.repeat_prompts, "rillet_isa": args.rillet_isa, "isa_env": isa_env},
        "header": header,
        "bars": {str(c): f"rillet >= {b:g}x seed output tokens/s" for c, b in BARS.items()},
        "summary": rows,
        "greedy_parity": parity,
        "seed": {str(c): r for c, r in seed.items()},
        "rillet": {str(c): r for c, r in rillet.items()},
    }
    run.finish(payload, out)

    print(f"\nbench_engine: {info['cpu_model']} ({info['cpu_cores']} cores), torch {info['torch']}, "
          f"{args.dtype}, {args.max_tokens} forced tokens/request, max(C, {args.min_requests}) requests per level\n")
    print(header)
    print(text)
    print("\nMarkdown:\n")
    print(header + "\n")
    print(markdown)
    if args.plot is not None:
        png = out.with_suffix(".png") if str(args.plot) == "auto" else args.plot
        plot(rows, png, f"{info['cpu_model']} ({info['cpu_cores']} cores), {args.dtype}, "
                        f"{args.max_tokens} tokens/request")
        print(f"\nplot: {png}")
    if parity:
        print(f"\ngreedy parity at 1 stream: {parity['identical']}/{parity['compared']} answers identical "
              f"(common prefix, chars: {parity['common_prefix_chars']})")
    print(f"\nJSON: {out}")
    run.print_warnings()
    failed = sum(r["failed"] for r in (*seed.values(), *rillet.values()))
    if failed:
        print(f"warning: {failed} request(s) failed; see the JSON", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
