"""Tensor parallelism over HTTP: `rillet serve --tensor-parallel-size N` against N = 1, same run.

    python -m benchmarks.bench_tp --tokenizer-dir DIR [--shape 8b] [--sizes 1,2] [--levels 1,64]
        [--device cuda] [--out benchmarks/results/bench_tp.json]

(with PYTHONPATH=src where rillet is not installed). The issue's bars: on 2 GPUs, the
Llama-3.1-8B shape in bfloat16, one stream >= 1.6x and 64 streams >= 1.7x the single GPU's tok/s;
the Llama-3.1-70B shape (which does not fit one GPU) at TP=4 or 8, its tok/s reported
(`--shape 70b --sizes 4`).

1. writes a random checkpoint of the shape (bfloat16, std 0.02, seed 0) one tensor at a time,
   generated on the GPU where there is one, so even 70B needs no host copy of the whole model.
   Embedding rows past the tokenizer's vocabulary are zero, as in bench_gpu (every streamed
   chunk is then one real token);
2. for each size: starts `rillet serve --tensor-parallel-size N --max-num-seqs <largest level>`
   and drives it with rillet.bench.loadgen as bench_gpu does: streaming chat, prompts of ~64
   tokens, 128 forced output tokens, greedy, a warm-up on other prompts first, 2 requests a
   stream (at least 8);
3. records tok/s, ITL p50 and TTFT p50 per size and level, each size's tok/s over size 1's, and
   the bars (null where a size was not run). Prints a Markdown table.

`--device cpu --shape tiny` runs the same on CPU processes over gloo (a smoke test of the path;
on a CPU the ranks share the same cores, so no speed-up is to be expected).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks import RESULTS_DIR
from benchmarks.bench_gpu import FILLER, git_commit, log, warmed_server

OUTPUT_TOKENS = 128
BARS = {"stream1_over_tp1": 1.6, "streams64_over_tp1": 1.7}
LLAMA3 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, head_dim=128,
              max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
              rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
              rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"})
SHAPES = {
    "8b": {**LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8},
    "70b": {**LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8},
    "1b": {**LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
           "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "tiny": {**LLAMA3, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "head_dim": 64,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152},
}
SHARD_BYTES = 4 << 30


def write_checkpoint(shape: str, tokenizer_dir: Path, out: Path, device: str) -> int:
    """A random bf16 checkpoint of `shape` in `out`, written a tensor at a time; returns its bytes."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    config = LlamaConfig(**SHAPES[shape])
    config.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    vocab = len(AutoTokenizer.from_pretrained(out))
    H, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, H), "model.norm.weight": (H,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, H)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
                       p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
                       p + "mlp.down_proj.weight": (H, inter)})
    generator = torch.Generator(device).manual_seed(0)
    index: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    total = shard_bytes = files = 0

    def flush() -> None:
        nonlocal shard, shard_bytes, files
        if shard:
            files += 1
            name = f"model-{files:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for name, dims in shapes.items():
        if len(dims) == 1:
            tensor = torch.ones(dims, dtype=torch.bfloat16)
        else:
            tensor = torch.randn(dims, generator=generator, device=device, dtype=torch.float32).mul_(0.02)
            tensor = tensor.to(torch.bfloat16).cpu()
            if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                tensor[vocab:] = 0
        size = tensor.numel() * 2
        if shard_bytes + size > SHARD_BYTES:
            flush()
        shard[name] = tensor
        shard_bytes += size
        total += size
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": index}))
    return total


def bench_size(args, model_dir: Path, size: int) -> dict:
    top = max(args.levels)
    flags = ["--model", str(model_dir), "--device", args.device, "--dtype", "bfloat16", "--max-num-seqs", str(top),
             "--max-num-batched-tokens", "8192", "--max-model-len", "1024", "--tensor-parallel-size", str(size),
             *args.serve_arg]
    out: dict = {"command": "rillet serve " + " ".join(flags), "levels": {}}
    with warmed_server(flags, model_dir, top, args.client_procs, RESULTS_DIR / "logs" / f"bench_tp_serve_tp{size}.log",
                       args.start_timeout, out, env={"NCCL_NVLS_ENABLE": "0"}) as level:
        for c in args.levels:
            r = level(c, max(8, 2 * c), str(c), FILLER, args.output_tokens)
            out["levels"][str(c)] = {"tokens_per_s": r["output_token_throughput"], "itl_p50_ms": r["itl_ms"]["p50"],
                                     "ttft_p50_ms": r["ttft_ms"]["p50"], "requests": r["num_requests"],
                                     "failed": r["failed"], "sample_error": r["sample_error"]}
            log(f"TP={size}, {c} streams: {r['output_token_throughput']:,.1f} tok/s, ITL p50 {r['itl_ms']['p50']} ms, "
                f"TTFT p50 {r['ttft_ms']['p50']} ms, failed {r['failed']}")
    return out


def judge(result: dict) -> None:
    sizes = result["sizes"]
    base = sizes.get("1", {}).get("levels", {})
    for name, run in sizes.items():
        run["over_tp1"] = {c: round(v["tokens_per_s"] / base[c]["tokens_per_s"], 2)
                           for c, v in run.get("levels", {}).items() if base.get(c, {}).get("tokens_per_s")}
    ratios = sizes.get("2", {}).get("over_tp1", {})

    def at_least(value, bar):
        return None if value is None else value >= bar

    result["bars"] = {"tp2_stream1_ge_1.6x_tp1": at_least(ratios.get("1"), BARS["stream1_over_tp1"]),
                      "tp2_streams64_ge_1.7x_tp1": at_least(ratios.get("64"), BARS["streams64_over_tp1"])}


def markdown(result: dict) -> str:
    lines = ["| TP size | streams | tok/s | ITL p50 ms | TTFT p50 ms | over TP=1 |", "|---:|---:|---:|---:|---:|---:|"]
    for size, run in sorted(result["sizes"].items(), key=lambda kv: int(kv[0])):
        for c, r in sorted(run.get("levels", {}).items(), key=lambda kv: int(kv[0])):
            ratio = run.get("over_tp1", {}).get(c)
            lines.append(f"| {size} | {c} | {r['tokens_per_s']:,.1f} | {r['itl_p50_ms']} | {r['ttft_p50_ms']} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
    lines += [""] + [f"- {name}: {'-' if ok is None else ('met' if ok else 'MISSED')}"
                     for name, ok in result["bars"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", type=Path, required=True, help="a tokenizer directory (SmolLM2's)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2],
                        help="tensor-parallel sizes to serve, one after another (default 1,2)")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 64],
                        help="concurrent streams, comma-separated (default 1,64)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--output-tokens", type=int, default=OUTPUT_TOKENS)
    parser.add_argument("--client-procs", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)))
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `rillet serve` argument (repeatable)")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_tp.json")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU: torch.cuda.is_available() is False (use --device cpu --shape tiny)")
        too_many = [n for n in args.sizes if n > torch.cuda.device_count()]
        if too_many and not os.environ.get("RILLET_TP_BACKEND"):  # gloo may put several ranks on one GPU
            parser.error(f"sizes {too_many} need more GPUs than the {torch.cuda.device_count()} torch sees")
    from rillet.bench.machine import cpu_model

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    result: dict = {"benchmark": "bench_tp", "device": gpu or f"{cpu_model()}, {os.cpu_count()} cores",
                    "devices_seen": torch.cuda.device_count() if args.device == "cuda" else os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version(), "commit": git_commit(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    "model": f"Llama {args.shape} shape, random weights (seed 0), bfloat16",
                    "settings": {"sizes": args.sizes, "levels": args.levels, "output_tokens": args.output_tokens,
                                 "bars": BARS, "transport": os.environ.get("RILLET_TP_BACKEND")
                                 or ("nccl" if args.device == "cuda" else "gloo")},
                    "sizes": {}, "errors": {}}
    model_dir = Path(tempfile.mkdtemp(prefix=f"rillet-tp-{args.shape}-"))
    try:
        t0 = time.monotonic()
        result["weight_bytes"] = write_checkpoint(args.shape, args.tokenizer_dir, model_dir, args.device)
        log(f"{args.shape} checkpoint: {result['weight_bytes'] / 1e9:.2f} GB in {time.monotonic() - t0:.0f} s")
        for size in args.sizes:
            try:
                result["sizes"][str(size)] = bench_size(args, model_dir, size)
            except Exception as exc:  # noqa: BLE001 - record it and run the other sizes
                result["errors"][str(size)] = f"{type(exc).__name__}: {exc}"[:2000]
                log(f"TP={size} failed:\n{traceback.format_exc()}")
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    judge(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0 if not result["errors"] and all(math.isfinite(r["tokens_per_s"]) for run in result["sizes"].values()
                                             for r in run["levels"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
