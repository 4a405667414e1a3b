"""Where a batch-1 decode step's time goes on the GPU: the step timed alone, then its kernels
under torch.profiler (count, time, the order within a step) and how busy the GPU is.

    RILLET_GPU_TOKENIZER_DIR=DIR PYTHONPATH=src python -m benchmarks.profile_gpu_step [--eager]

The model is bench_gpu's: a random-initialised Llama-3.2-1B shape in bf16. Kernel times overlap
under programmatic dependent launch (a kernel starts, and loads its weights, while the one before
it runs), so a kernel's time here includes its wait; the busy time is their union.
"""

from __future__ import annotations

import argparse
import collections
import os
from pathlib import Path

import torch

from benchmarks.bench_gpu import build_model, timed_steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer-dir", type=Path, default=os.environ.get("RILLET_GPU_TOKENIZER_DIR"),
                        help="a tokenizer directory (SmolLM2's; default $RILLET_GPU_TOKENIZER_DIR)")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs (--enforce-eager)")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps (50 are timed first)")
    args = parser.parse_args(argv)
    if args.tokenizer_dir is None:
        parser.error("--tokenizer-dir or RILLET_GPU_TOKENIZER_DIR is needed")
    from torch.profiler import ProfilerActivity, profile

    from rillet.engine.llm_engine import LLMEngine
    from rillet.sampling_params import SamplingParams

    model_dir, _ = build_model(args.tokenizer_dir)
    engine = LLMEngine(model=str(model_dir), device="cuda", dtype="bfloat16", max_model_len=1024, max_num_seqs=8,
                       kv_cache_gib=1.0, enforce_eager=args.eager)
    engine.add_request("s", None, SamplingParams(max_tokens=100 + args.steps, temperature=0.0, ignore_eos=True),
                       prompt_token_ids=list(range(100, 164)))
    for _ in range(20):
        engine.step()
    print(f"step {timed_steps(engine, 50) / 50 * 1e3:.4f} ms (mean of 50, eager={args.eager})")

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for begin, end, name in kernels:
        per_name[name].append(end - begin)
    n = args.steps
    print(f"{len(kernels) / n:.1f} kernels a step")
    for name, times in sorted(per_name.items(), key=lambda kv: -sum(kv[1])):
        print(f"{sum(times) / n:9.1f} us a step  {len(times) / n:5.1f} a step  {sum(times) / len(times):7.2f} us each  "
              f"{name[:100]}")
    busy, reach = 0.0, float("-inf")
    for begin, end, _ in kernels:
        busy += max(0.0, end - max(begin, reach))
        reach = max(reach, end)
    print(f"span {(kernels[-1][1] - kernels[0][0]) / n:.1f} us a step, GPU busy {busy / n:.1f} us")
    one = len(kernels) // n
    print("one step's kernels in order:")
    for begin, end, name in kernels[one * (n // 2): one * (n // 2 + 1)]:
        print(f"  {end - begin:8.2f} us  {name[:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
