"""How far is one decode step from the machine's memory-bandwidth floor?

A decode step must read every weight once (the projections and the output head) and, per
sequence, the K/V of its whole context. At batch sizes where compute is cheap, the step can be
no faster than  bytes_read / memory_bandwidth.  This script measures the bandwidth (a large
tensor reduction, all threads), counts the bytes, times real engine steps, and prints the ratio.

    .venv/bin/python -m benchmarks.bench_roofline [--batches 1,16,32] [--context 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from rillet.bench.machine import machine_info
from rillet.bench.report import write_json

RESULTS = Path(__file__).parent / "results"


def measure_bandwidth_gbs(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    x = torch.ones(num_bytes // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return num_bytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes(engine) -> int:
    """Bytes of every matrix a decode step reads, in the format it runs in (bf16, int8, or 4-bit
    blocks with their scales; the embedding lookup's few rows are negligible)."""
    model = engine.model
    total = 0
    for module in model.modules():
        packed = getattr(module, "packed", None)  # rillet's kernel linears and oneDNN's
        if isinstance(packed, torch.Tensor):
            total += packed.numel() * packed.element_size()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    if getattr(model, "lm_head", None) is None:  # a tied head reads the embedding table
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def step_time_ms(engine, batch: int, context: int, steps: int) -> float:
    from rillet.sampling_params import SamplingParams

    for i in range(batch):  # a prompt of its own each: shared prefix blocks would be read once, from cache
        prompt = [1000 + (i * 7919 + j) % 30000 for j in range(context)]
        engine.add_request(f"b{batch}-{i}", None, SamplingParams(max_tokens=steps + 8, ignore_eos=True,
                                                                 temperature=0), prompt_token_ids=prompt)
    while any(s.num_computed_tokens < context for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()
    times = [_timed(engine.step) for _ in range(steps)]
    for rid in list(engine.requests):
        engine.abort(rid)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16,32")
    parser.add_argument("--context", type=int, default=256, help="tokens of context per sequence")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_roofline.json")
    args = parser.parse_args()

    from rillet.engine.llm_engine import LLMEngine
    from rillet.engine.model_runner import kv_bytes_per_token

    batches = [int(b) for b in args.batches.split(",")]
    engine = LLMEngine(dtype=args.dtype, max_num_seqs=max(batches), max_model_len=args.context + args.steps + 64)
    bandwidth = measure_bandwidth_gbs()
    weights = weight_bytes(engine)
    kv_token = kv_bytes_per_token(engine.model, engine.dtype)
    rows = []
    for batch in batches:
        kv = batch * (args.context + args.steps // 2) * kv_token
        floor_ms = (weights + kv) / (bandwidth * 1e9) * 1e3
        measured = step_time_ms(engine, batch, args.context, args.steps)
        rows.append({"batch": batch, "weights_mb": weights / 1e6, "kv_mb": kv / 1e6, "floor_ms": floor_ms,
                     "measured_ms": measured, "measured_over_floor": measured / floor_ms,
                     "tokens_per_s": batch / measured * 1e3})
    backend = engine.backend.describe()
    result = {"machine": machine_info(backend["dtype"]), "backend": backend, "bandwidth_gbs": bandwidth,
              "context": args.context, "rows": rows}
    info = result["machine"]
    print(f"{info['cpu_model']} ({info['cpu_cores']} cores), commit {info['git_commit']}, rillet {backend}")
    print(f"memory bandwidth {bandwidth:.1f} GB/s, weights {weights / 1e6:.0f} MB as {backend['weights']}, "
          f"context {args.context} tokens")
    print("| batch | bytes/step (MB) | floor (ms) | measured (ms) | measured / floor | tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['weights_mb'] + r['kv_mb']:.0f} | {r['floor_ms']:.1f} | {r['measured_ms']:.1f} "
              f"| {r['measured_over_floor']:.2f}x | {r['tokens_per_s']:.0f} |")
    write_json(result, args.out)


if __name__ == "__main__":
    main()
