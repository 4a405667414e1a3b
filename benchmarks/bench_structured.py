"""Structured output's cost to everyone else: 16 concurrent streams on the CPU through
rillet.AsyncEngine (engine core in its own process, as `rillet serve` runs it).

Closed loop of 16 clients. Eight "measured" clients each run --requests free chat requests of
exactly --max-tokens tokens (ignore_eos, greedy). The other eight keep one request each in
flight until the measured ones are done, on prompts asking for a JSON example of a schema from
rillet.bench.schemas:
- run B: constrained to that schema (greedy, ending when the grammar completes, --max-tokens
  at most); the length of each is recorded;
- run A: the same prompts free, each forced (ignore_eos) to the length its run-B twin had.
So both runs feed the engine the same prompts and the same numbers of tokens, 16 streams
throughout, and differ only in the constraint. The rounds alternate B A, A B, ... (A forced to
the latest B's lengths), so a drift of the machine's speed favours neither; every prompt opens with its own "[run.round.client.i]" tag, so no run reuses another's
prompt prefix, and the warm-up uses other prompts and schemas than the measured ones.

Then, with the AsyncEngine stopped, the same comparison inside the engine with the drift
cancelled (benchmarks/structured_twin.py: two engines stepped alternately), as B's step time
over A's.

Reported: the measured (free) half's output tokens/s in B against A (bar: at most 5% lower),
ITL p50 of the constrained streams against the free ones in B (bar: at most 1.15x), grammar
compile time of each schema (a fresh compiler, so every schema is a miss) and how many
constrained outputs parse and validate.

    python -m benchmarks.bench_structured            # ~2-4 min on 2 cores
    python -m benchmarks.bench_structured --quick    # smoke: 1 round, 1 request, 16 tokens

Writes benchmarks/results/bench_structured.json (bench_structured.quick.json with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from rillet.bench.inprocess import engine_request, forced_params, start_engine
from rillet.bench.loadgen import RequestRecord, stats_ms, summarize
from rillet.bench.machine import BenchRun
from rillet.bench.report import fmt, fmt_ratio, log, ratio
from rillet.bench.schemas import SCHEMAS
from rillet.bench.workload import PROMPTS, WARMUP_PROMPTS, chat_messages

from benchmarks import RESULTS_DIR
from benchmarks.structured_twin import twin_steps

STREAMS = 16
BAR_FREE_LOSS = 0.05  # the free half's tok/s may drop at most 5% when the other half is constrained
BAR_ITL_RATIO = 1.15  # constrained ITL p50 at most 1.15x the free streams' in the same batch
WARMUP_SCHEMAS = SCHEMAS[-2:]  # compiled during the warm-up only; the measured runs use the others
MEASURED_SCHEMAS = SCHEMAS[:-2]


def schema_prompt(tag: str, name: str) -> list[dict]:
    return chat_messages(f"[{tag}] Reply with a short JSON example of '{name.replace('_', ' ')}'.")


def validates(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


async def constrained_request(engine, messages: list[dict], schema: dict, max_tokens: int,
                              request_id: str) -> RequestRecord:
    """One greedy request constrained to `schema` (its text is validated after the run, so that
    the checking does not take CPU from the engine while it is measured)."""
    from rillet import SamplingParams
    from rillet.structured import StructuredOutputs

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, structured=StructuredOutputs.from_schema(schema))
    return await engine_request(engine, messages, params, request_id, keep_text=True)


async def one_run(engine, run: str, rnd: int, args: argparse.Namespace, lengths: dict[int, list[int]]) -> dict:
    """Run B (the other half constrained; fills `lengths`: output tokens of each other client's
    requests) or A (the other half free, forced to those lengths)."""
    measured: list[RequestRecord] = []
    others: list[RequestRecord] = []
    schemas: list[dict] = []
    done = asyncio.Event()

    async def measured_client(j: int) -> None:
        for i in range(args.requests):
            prompt = PROMPTS[(j + i) % len(PROMPTS)]
            messages = chat_messages(f"[{run}.{rnd}.{j}.{i}] {prompt}")
            measured.append(await engine_request(engine, messages, forced_params(args.max_tokens),
                                                 f"{run}{rnd}-m{j}-{i}"))

    async def other_client(j: int) -> None:
        i = 0
        while not done.is_set():
            name, schema = MEASURED_SCHEMAS[(j * 5 + i) % len(MEASURED_SCHEMAS)]
            messages = schema_prompt(f"{run}.{rnd}.o{j}.{i}", name)
            request_id = f"{run}{rnd}-o{j}-{i}"
            if run == "B":
                record = await constrained_request(engine, messages, schema, args.max_tokens, request_id)
                others.append(record)
                schemas.append(schema)
                lengths.setdefault(j, []).append(max(1, record.output_tokens))
            else:
                twin = lengths[j][i % len(lengths[j])]  # A may need more requests than B made: cycle
                others.append(await engine_request(engine, messages, forced_params(twin), request_id))
            i += 1

    start = time.perf_counter()
    background = [asyncio.create_task(other_client(j)) for j in range(STREAMS // 2)]
    await asyncio.gather(*(measured_client(j) for j in range(STREAMS // 2)))
    duration = time.perf_counter() - start
    done.set()
    await asyncio.gather(*background)
    free = summarize(measured, duration, concurrency=STREAMS // 2, max_tokens=args.max_tokens)
    other = summarize(others, time.perf_counter() - start, concurrency=STREAMS // 2, max_tokens=args.max_tokens)
    if run == "B":
        other["valid_json"] = sum(validates(r.text, schema) for r, schema in zip(others, schemas))
    return {"run": run, "round": rnd, "free_half": free, "other_half": other,
            "free_itl": [b - a for r in measured if r.ok for a, b in zip(r.chunk_times, r.chunk_times[1:])],
            "other_itl": [b - a for r in others if r.ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]}


def compile_times(tokenizer) -> dict[str, float]:
    """Milliseconds to compile each measured schema with a fresh compiler (no cache hits)."""
    from rillet.structured import StructuredOutputs
    from rillet.structured.grammar import GrammarCompiler

    compiler = GrammarCompiler(tokenizer)
    times = {"_tokenizer_tables": round(compiler.tokenizer_s * 1e3, 2)}
    for name, schema in MEASURED_SCHEMAS:
        times[name] = round(compiler.compile(StructuredOutputs.from_schema(schema)).compile_s * 1e3, 3)
    return times


async def bench(args: argparse.Namespace) -> dict:
    log(f"starting AsyncEngine ({args.dtype}, engine process)")
    engine = await start_engine(args.model, args.dtype, 32)
    try:
        log("warm-up: free and constrained requests on other prompts and schemas")
        warm = [engine_request(engine, chat_messages(p), forced_params(8), f"warm{i}")
                for i, p in enumerate(WARMUP_PROMPTS)]
        warm += [constrained_request(engine, chat_messages(WARMUP_PROMPTS[i]), schema, 16, f"warm-s{i}")
                 for i, (_, schema) in enumerate(WARMUP_SCHEMAS)]
        await asyncio.gather(*warm)
        runs = []
        lengths: dict[int, list[int]] = {}  # the latest run B's output lengths, which A is forced to
        for rnd in range(args.rounds):
            # B A, then A B (A forced to the previous B's lengths), ...: a machine that speeds up
            # or slows down during the benchmark favours neither run.
            for run in ("B", "A") if rnd % 2 == 0 else ("A", "B"):
                log(f"round {rnd + 1}/{args.rounds}, run {run}")
                if run == "B":
                    lengths = {}
                result = await one_run(engine, run, rnd, args, lengths)
                log(f"  free half {fmt(result['free_half']['output_token_throughput'])} tok/s")
                runs.append(result)
        times = compile_times(engine.tokenizer)
    finally:
        await engine.shutdown()
    return {"runs": runs, "compile_ms": times}


def report(runs: list[dict]) -> dict:
    def total_rate(run: str) -> float | None:
        rows = [r["free_half"] for r in runs if r["run"] == run]
        duration = sum(r["duration_s"] for r in rows)
        return sum(r["total_output_tokens"] for r in rows) / duration if duration else None

    a_rate, b_rate = total_rate("A"), total_rate("B")
    free_itl = stats_ms([x for r in runs if r["run"] == "B" for x in r["free_itl"]])
    constrained_itl = stats_ms([x for r in runs if r["run"] == "B" for x in r["other_itl"]])
    loss = None if not a_rate or b_rate is None else 1.0 - b_rate / a_rate
    itl_ratio = ratio(constrained_itl["p50"], free_itl["p50"])
    b_other = [r["other_half"] for r in runs if r["run"] == "B"]
    return {
        "free_half_tok_s_A": round(a_rate, 2) if a_rate else None,
        "free_half_tok_s_B": round(b_rate, 2) if b_rate else None,
        "free_half_loss": None if loss is None else round(loss, 4),
        "free_half_loss_bar": BAR_FREE_LOSS,
        "meets_free_loss_bar": None if loss is None else loss <= BAR_FREE_LOSS,
        "itl_ms_B_free": free_itl,
        "itl_ms_B_constrained": constrained_itl,
        "itl_p50_ratio_constrained_vs_free": None if itl_ratio is None else round(itl_ratio, 3),
        "itl_ratio_bar": BAR_ITL_RATIO,
        "meets_itl_bar": None if itl_ratio is None else itl_ratio <= BAR_ITL_RATIO,
        "constrained_requests": sum(r["completed"] for r in b_other),
        "constrained_valid_json": sum(r.get("valid_json", 0) for r in b_other),
        "constrained_finish_reasons": {k: sum(r["finish_reasons"].get(k, 0) for r in b_other)
                                       for k in {k for r in b_other for k in r["finish_reasons"]}},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hugging Face directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--rounds", type=int, default=None, help="A/B pairs, order alternating (default 4; --quick 1)")
    parser.add_argument("--requests", type=int, default=None, help="requests per measured client (default 3; --quick 1)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per free request (default 96; --quick 16)")
    parser.add_argument("--twin-steps", type=int, default=None,
                        help="steps of the in-process twin-engine measurement (default 200; --quick 0: skipped)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 4)
    args.requests = args.requests or (1 if args.quick else 3)
    args.max_tokens = args.max_tokens or (16 if args.quick else 96)
    if args.twin_steps is None:
        args.twin_steps = 0 if args.quick else 200
    out = args.out or RESULTS_DIR / ("bench_structured.quick.json" if args.quick else "bench_structured.json")

    bench_run = BenchRun.begin(dtype=args.dtype)
    info = bench_run.info
    result = asyncio.run(bench(args))
    summary = report(result["runs"])
    if args.twin_steps:
        log(f"in-process twin engines: {args.twin_steps} alternate steps each (benchmarks/structured_twin.py)")
        summary["engine_twin"] = twin_steps(args.twin_steps, args.dtype)
    for run in result["runs"]:  # the raw gaps are summarized above; keep the JSON small
        run.pop("free_itl"), run.pop("other_itl")
    compile_ms = [v for k, v in result["compile_ms"].items() if not k.startswith("_")]
    summary["compile_ms_per_schema"] = {"mean": round(sum(compile_ms) / len(compile_ms), 3),
                                        "max": max(compile_ms), "schemas": len(compile_ms)}
    payload = {
        "benchmark": "bench_structured",
        "description": "16 streams through AsyncEngine: run A all free, run B half constrained to JSON schemas; "
                       "the free half's tok/s and the constrained ITL against the free.",
        "header": bench_run.header,
        "settings": {"streams": STREAMS, "rounds": args.rounds, "requests_per_measured_client": args.requests,
                     "max_tokens": args.max_tokens, "dtype": args.dtype, "temperature": 0.0,
                     "model": args.model or "default (SmolLM2-135M-Instruct)",
                     "measured_schemas": [name for name, _ in MEASURED_SCHEMAS], "quick": args.quick},
        "summary": summary,
        "compile_ms": result["compile_ms"],
        "runs": result["runs"],
    }
    bench_run.finish(payload, out)

    print(f"\nbench_structured: {info['cpu_model']} ({info['cpu_cores']} cores), commit {info['git_commit']}, "
          f"{args.dtype}, {STREAMS} streams\n")
    print(f"free half, run A (all free):          {fmt(summary['free_half_tok_s_A'])} tok/s")
    print(f"free half, run B (half constrained):  {fmt(summary['free_half_tok_s_B'])} tok/s")
    loss = summary["free_half_loss"]
    print(f"free half loss: {'-' if loss is None else f'{loss * 100:.1f}%'} (bar <= {BAR_FREE_LOSS * 100:.0f}%: "
          f"{'met' if summary['meets_free_loss_bar'] else 'MISSED'})")
    print(f"ITL p50 in run B: constrained {fmt(summary['itl_ms_B_constrained']['p50'])} ms, free "
          f"{fmt(summary['itl_ms_B_free']['p50'])} ms, ratio {fmt_ratio(summary['itl_p50_ratio_constrained_vs_free'])} "
          f"(bar <= {BAR_ITL_RATIO}x: {'met' if summary['meets_itl_bar'] else 'MISSED'})")
    twin = summary.get("engine_twin")
    if twin:
        print(f"engine step, in-process twins (B constrained / A free, alternate steps): mean "
              f"{twin['B_constrained']['mean']} / {twin['A_free']['mean']} ms = {twin['B_over_A_mean']:.3f}x, p50 "
              f"{twin['B_constrained']['p50']} / {twin['A_free']['p50']} ms = {twin['B_over_A_p50']:.3f}x")
    print(f"grammar compile per schema: mean {summary['compile_ms_per_schema']['mean']} ms, max "
          f"{summary['compile_ms_per_schema']['max']} ms ({len(compile_ms)} schemas); tokenizer tables "
          f"{result['compile_ms']['_tokenizer_tables']} ms once")
    print(f"constrained outputs valid: {summary['constrained_valid_json']}/{summary['constrained_requests']} "
          f"(finish reasons {summary['constrained_finish_reasons']})")
    print(f"\nJSON: {out}")
    bench_run.print_warnings()
    failed = sum(r["free_half"]["failed"] + r["other_half"]["failed"] for r in result["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
