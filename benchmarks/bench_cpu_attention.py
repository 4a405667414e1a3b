"""The CPU decode attention kernel with its software prefetch against the hardware prefetchers alone.

A sequence's KV blocks lie apart in the paged cache (blocks are handed out as sequences grow
together), so the hardware's stream prefetchers stop at every 2 KB block edge and each task
waits on memory. paged_attention.c asks for the next block's keys and each block's values
ahead (PREFETCH_BLOCKS, default 1); built with -DPREFETCH_BLOCKS=0 it does not. Both builds of
tests/kernels/bench_attention.c (every layer's own cache, 16 sequences by default, the default
model's shape) run alternately in this script, per instruction set this CPU runs, and the
medians are compared.

    .venv/bin/python -m benchmarks.bench_cpu_attention [--contexts 128,512,2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from rillet.bench.machine import machine_info
from rillet.bench.report import text_table, write_json
from rillet.models import cpu_isa

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "src" / "rillet" / "models" / "kernels"
BENCH = ROOT / "tests" / "kernels" / "bench_attention.c"
RESULTS = Path(__file__).parent / "results"
LINE = re.compile(r"ctx\s+(\d+):\s+([\d.]+) ms a step,\s+([\d.]+) GB/s")


def build(compiler: str, isa: str, prefetch_blocks: int | None, out: Path) -> Path:
    defines = [] if prefetch_blocks is None else [f"-DPREFETCH_BLOCKS={prefetch_blocks}"]
    subprocess.run([compiler, "-O3", "-fopenmp", *cpu_isa.compile_flags(isa), *defines, f"-I{KERNELS}", str(BENCH),
                    str(KERNELS / "paged_attention.c"), "-lm", "-o", str(out)], check=True, capture_output=True,
                   text=True, timeout=300)
    return out


def run(binary: Path, threads: int, contexts: str, seqs: int) -> dict[int, tuple[float, float]]:
    text = subprocess.run([str(binary), str(threads), contexts, str(seqs)], check=True, capture_output=True,
                          text=True, timeout=600).stdout
    return {int(c): (float(ms), float(gbs)) for c, ms, gbs in LINE.findall(text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="128,512,2048", help="tokens of context per sequence")
    parser.add_argument("--seqs", type=int, default=16, help="decode rows a step")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of both builds")
    parser.add_argument("--isas", default=None, help="comma-separated variants (default: every one this CPU runs"
                                                     " but generic)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_cpu_attention.json")
    args = parser.parse_args()

    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise SystemExit("no C compiler")
    isas = args.isas.split(",") if args.isas else [v for v in cpu_isa.VARIANTS
                                                    if v != "generic" and not cpu_isa.missing(v)]
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for isa in isas:
            builds = {"hardware only": build(compiler, isa, 0, Path(tmp) / f"{isa}_off"),
                      "prefetch": build(compiler, isa, None, Path(tmp) / f"{isa}_on")}
            runs: dict[str, dict[int, list[tuple[float, float]]]] = {name: {} for name in builds}
            for _ in range(args.rounds):  # alternating, so the machine's drift falls on both
                for name, binary in builds.items():
                    for ctx, timing in run(binary, args.threads, args.contexts, args.seqs).items():
                        runs[name].setdefault(ctx, []).append(timing)
            for ctx in sorted(runs["prefetch"]):
                off = statistics.median(ms for ms, _ in runs["hardware only"][ctx])
                on = statistics.median(ms for ms, _ in runs["prefetch"][ctx])
                gbs = statistics.median(g for _, g in runs["prefetch"][ctx])  # as the C program counts K/V bytes
                results.append({"isa": isa, "context": ctx, "seqs": args.seqs, "hardware_only_ms": off,
                                "prefetch_ms": on, "speedup": off / on, "prefetch_kv_gbs": gbs})
                rows.append([isa, ctx, f"{off:.2f}", f"{on:.2f}", f"{off / on:.2f}x", f"{gbs:.1f}"])
    info = machine_info("bfloat16")
    print(f"{info['cpu_model']} ({info['cpu_cores']} cores), commit {info['git_commit']}, {args.seqs} sequences, "
          f"30 layers of 3 KV heads x 64, median of {args.rounds} alternating rounds")
    print(text_table(["isa", "context", "hardware only (ms/step)", "prefetch (ms/step)", "speedup", "K/V GB/s"],
                     rows))
    write_json({"benchmark": "bench_cpu_attention", "machine": info, "threads": args.threads,
                "rounds": args.rounds, "results": results}, args.out)


if __name__ == "__main__":
    main()
