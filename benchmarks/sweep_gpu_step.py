"""The batch-1 decode step on a CUDA GPU against the GPU kernels' block sizes, one setting at a time.

    python -m benchmarks.sweep_gpu_step --tokenizer-dir DIR [--only base] [--out FILE]

(with PYTHONPATH=src where rillet is not installed). On bench_gpu's model (random Llama-3.2-1B-shaped
weights in bfloat16), each setting swaps `cuda_kernels._gemv_config` (one weight shape) or
`cuda_kernels._decode_tile` before an LLMEngine captures its CUDA graphs, then times 3 x 150 steps of
one greedy stream (contexts 74-224) and keeps the median. The current settings ("base") are measured
between the groups, to show the drift of the series. Prints a JSON line a setting; --out writes
them all with the GPU's name and the commit. --only base times the current settings alone (twice),
for A/Bs of two trees run one after the other.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
from pathlib import Path

import torch

from benchmarks.bench_gpu import build_model, git_commit, timed_steps

QKV, O, GATE_UP, DOWN, HEAD = (3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)


def step_ms(model_dir: Path, gemv: dict | None = None, tile: tuple[int, int] | None = None) -> float:
    from rillet.engine.llm_engine import LLMEngine
    from rillet.models import cuda_kernels as ck
    from rillet.sampling_params import SamplingParams

    base_gemv, base_tile = ck._gemv_config, ck._decode_tile
    ck._gemv_config = lambda N, K, whole_rows=False: (gemv or {}).get((N, K)) or base_gemv(N, K, whole_rows)
    if tile is not None:
        ck._decode_tile = lambda head_dim, element_size, splits: tile
    engine = LLMEngine(model=str(model_dir), device="cuda", dtype="bfloat16", max_model_len=1024, max_num_seqs=8,
                       kv_cache_gib=1.0)
    times = []
    try:
        for rep in range(3):
            engine.add_request(f"s{rep}", None, SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True),
                               prompt_token_ids=list(range(100 + rep, 164 + rep)))
            for _ in range(10):  # the prompt, then warm decode steps
                engine.step()
            times.append(timed_steps(engine, 150) / 150 * 1e3)
            engine.abort(f"s{rep}")
            while engine.has_unfinished():
                engine.step()
    finally:
        ck._gemv_config, ck._decode_tile = base_gemv, base_tile
        engine = None
        gc.collect()
        torch.cuda.empty_cache()
    return round(statistics.median(times), 4)


def settings() -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    for keys, warps in itertools.product((64, 128, 256), (4, 8)):
        out.append((f"attention {keys} keys, {warps} warps", {"tile": (keys, warps)}))
    for rows, block_k, warps, stages in itertools.product((4, 8), (1024, 2048), (8,), (2, 4)):
        out.append((f"down rows {rows} K {block_k} warps {warps} stages {stages}",
                    {"gemv": {DOWN: (rows, block_k, warps, stages)}}))
    out.append(("base", {}))
    for shape, name in ((QKV, "qkv"), (O, "o"), (GATE_UP, "gate/up"), (HEAD, "head")):
        for rows, block_k, warps in itertools.product((2, 4, 8), (512, 1024, 2048), (4,)):
            out.append((f"{name} rows {rows} K {block_k} warps {warps}", {"gemv": {shape: (rows, block_k, warps, 2)}}))
        out.append(("base", {}))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer-dir", type=Path, required=True, help="a tokenizer directory (SmolLM2's)")
    parser.add_argument("--only", choices=["base"], help="time the current settings alone")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU: torch.cuda.is_available() is False")
    model_dir, _ = build_model(args.tokenizer_dir)
    rows = []
    for label, kwargs in [("base", {})] * 2 if args.only else [("base", {})] + settings():
        try:
            row = {"setting": label, "step_ms": step_ms(model_dir, **kwargs)}
        except Exception as exc:  # noqa: BLE001 - a setting that does not compile: recorded, the others go on
            row = {"setting": label, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        args.out.write_text(json.dumps({"benchmark": "sweep_gpu_step", "gpu": torch.cuda.get_device_name(),
                                        "commit": git_commit(), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
