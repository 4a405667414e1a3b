"""rillet on a CUDA GPU against the issue's bars: random Llama-3.2-1B-shaped weights in bfloat16.

    python -m benchmarks.bench_gpu --tokenizer-dir DIR [--out benchmarks/results/bench_gpu.json]
        [--levels 1,32,128,256] [--client-procs N] [--api-servers N] [--skip-serve] [--skip-transformers] [--budget-s 360]

(with PYTHONPATH=src where rillet is not installed; `rillet serve` is started as
`sys.executable -m rillet.cli serve` with this process's environment). In one run:

1. builds the model directory (benchmarks.bench_cuda.make_model_dir, seed 0, bfloat16). The
   embedding rows, which are also the tied output head, of ids past the tokenizer's vocabulary
   are zeroed: their logits are then 0, under the best in-vocabulary logit (~4), so greedy text
   is made of real tokens and every streamed chunk is one token (ids the tokenizer lacks decode to
   nothing and would hide tokens from TTFT and ITL). The bytes read per step do not change;
2. measures the GPU's memory bandwidth (a 2 GiB device-to-device copy: bytes read + written over
   time) and the HBM bound of a decode step: every weight read once (the tied embedding once, as
   the head) / bandwidth;
3. transformers' generate on the same weights, static KV cache, greedy, 64-token prompts, 128
   forced new tokens, at batch 1 / 32 / 128 after a warm-up (eager; --compile-transformers tries
   torch.compile first and falls back);
4. rillet's decode step at batch 1 in-process (LLMEngine, CUDA graphs): --steps steps timed
   together, no sync between them, against the HBM bound; then the engine alone at each level
   (LLMEngine.step() until the requests are done, no HTTP), to tell the engine's share of a gap
   from the serving layer's;
5. `rillet serve --device cuda --dtype bfloat16 --max-num-seqs <largest level>
   --max-num-batched-tokens 8192 [--api-servers N]` (its API servers recorded) driven over HTTP by rillet.bench.loadgen (run_level; from 32
   streams on, run_level_processes: the streams spread over --client-procs client processes, as
   one Python client tops out near 10k events/s and would measure itself): streaming
   chat, --levels concurrent streams, 2 requests a stream (at least 8), --rounds times on new
   prompts (the round of median throughput is reported, all rounds' tok/s beside it), chat
   prompts of ~64 tokens (template included, each opening with its own tag, so only the
   template's system part is shared), 128 forced output tokens (ignore_eos, greedy), after a
   warm-up on other prompts.

Records tok/s, ITL p50 and TTFT p50 per level, rillet / transformers tok/s where the batch equals
the streams, and the bars as booleans (null when not measured): 1 stream >= 1,000 tok/s;
256 streams >= 40,000 tok/s with TTFT p50 <= 300 ms; 128 streams >= 2x transformers at batch 128;
batch-1 step <= 1.3x the HBM bound. A part that fails is recorded under "errors" and the others
run on. Prints a Markdown table for the README. Fits in about 6 minutes on an H200.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks import REPO_ROOT, RESULTS_DIR
from benchmarks.bench_cuda import LLAMA_32_1B, make_model_dir

PROMPT_TOKENS = 64
OUTPUT_TOKENS = 128
CLIENT_PROCS_FROM = 32  # streams from which the load generator runs in several processes
TRANSFORMERS_BATCHES = (1, 32, 128)
BARS = {"stream1_tok_s": 1000.0, "streams256_tok_s": 40000.0, "streams256_ttft_p50_ms": 300.0,
        "streams128_over_transformers128": 2.0, "batch1_step_over_hbm_bound": 1.3}
FILLER = ("The river bends past the old mill where the miller kept his ledgers in a tin box, and every spring "
          "the water rose to the third step of the stone stair, so the children counted the days until it fell "
          "again and the meadows dried enough for the fair with its music, bread and painted wooden horses").split()
WARMUP_FILLER = ("Snow settled on the railway platform while the stationmaster wound the clock, checked the "
                 "lamps and wrote the names of the late trains on a slate by the ticket window for the few "
                 "travellers who waited there with their coats buttoned against the wind").split()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("RILLET_COMMIT")


# ---- 1. the model ------------------------------------------------------------------------------

def timed_steps(engine, steps: int) -> float:
    """Seconds for `steps` engine steps queued back to back (no sync between them, so a step
    queued ahead of the last one's read-back overlaps as it does when serving)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def build_model(tokenizer_dir: Path) -> tuple[Path, int]:
    """The bf16 model directory and the tokenizer's vocabulary size (rows past it zeroed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    model_dir = make_model_dir(tokenizer_dir, torch.bfloat16)
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            if "model.embed_tokens.weight" not in f.keys():
                continue
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        tensors["model.embed_tokens.weight"][vocab:] = 0
        save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    return model_dir, vocab


def weight_bytes(model_dir: Path) -> int:
    """Bytes of every stored tensor: each parameter once (a tied head is not stored apart)."""
    from safetensors import safe_open

    sizes = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1}
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                total += sizes[tensor.get_dtype()] * math.prod(tensor.get_shape())
    return total


# ---- 2. memory bandwidth -----------------------------------------------------------------------

def measure_bandwidth(num_bytes: int = 2 << 30, iters: int = 20) -> dict:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    del src, dst
    free_cuda()
    return {"copy_bytes": num_bytes, "copy_ms": round(seconds * 1e3, 4),
            "bandwidth_gb_s": round(2 * num_bytes / seconds / 1e9, 1)}


# ---- 3. transformers ---------------------------------------------------------------------------

def bench_transformers(model_dir: Path, vocab: int, compile_model: bool) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    out: dict = {"cache_implementation": "static", "greedy": True, "prompt_tokens": PROMPT_TOKENS,
                 "new_tokens": OUTPUT_TOKENS, "compiled": False, "batches": {}}
    if compile_model:
        try:
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            out["compiled"] = True
        except Exception as exc:  # noqa: BLE001
            out["compile_error"] = f"{type(exc).__name__}: {exc}"
    gen = torch.Generator().manual_seed(0)

    def generate(batch: int, new_tokens: int) -> float:
        ids = torch.randint(0, vocab, (batch, PROMPT_TOKENS), generator=gen).cuda()
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            res = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, cache_implementation="static",
                                 pad_token_id=LLAMA_32_1B["eos_token_id"])
        torch.cuda.synchronize()
        assert res.shape == (batch, PROMPT_TOKENS + new_tokens), res.shape
        return time.perf_counter() - t

    for batch in TRANSFORMERS_BATCHES:
        try:
            # warm-up on other prompts, the same lengths: generate's static cache is sized by them, and a
            # new size recompiles the forward it compiles for that cache (26 s at batch 1 otherwise)
            generate(batch, OUTPUT_TOKENS)
            seconds = generate(batch, OUTPUT_TOKENS)
        except Exception as exc:  # noqa: BLE001
            if not out["compiled"]:
                raise
            out["compile_error"] = f"batch {batch}: {type(exc).__name__}: {exc}"[:500]
            model.forward = model.__class__.forward.__get__(model)  # back to eager
            out["compiled"] = False
            generate(batch, OUTPUT_TOKENS)
            seconds = generate(batch, OUTPUT_TOKENS)
        out["batches"][str(batch)] = {"seconds": round(seconds, 3),
                                      "tokens_per_s": round(batch * OUTPUT_TOKENS / seconds, 1)}
        log(f"transformers batch {batch}: {batch * OUTPUT_TOKENS / seconds:,.0f} tok/s")
    model = None  # frees the weights and caches (generate's closure holds the name)
    free_cuda()
    return out


# ---- 4. rillet's batch-1 decode step -----------------------------------------------------------

def bench_step(model_dir: Path, steps: int) -> dict:
    """Steady-state decode step at batch 1: `steps` steps timed together (no sync between them,
    so a step queued ahead of the last one's read-back overlaps as it does when serving)."""
    from rillet.engine.llm_engine import LLMEngine
    from rillet.sampling_params import SamplingParams

    engine = LLMEngine(model=str(model_dir), device="cuda", dtype="bfloat16", max_model_len=1024, max_num_seqs=8,
                       kv_cache_gib=1.0)
    try:
        engine.add_request("step", None, SamplingParams(max_tokens=steps + 32, temperature=0.0, ignore_eos=True),
                           prompt_token_ids=list(range(100, 100 + PROMPT_TOKENS)))
        for _ in range(10):  # the prompt, then warm decode steps
            engine.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        tokens = 0
        for _ in range(steps):
            tokens += sum(len(out.token_ids) for out in engine.step())
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        engine.abort("step")
        while engine.has_unfinished():
            engine.step()
        first_token_ms = []  # a lone prompt into an idle engine, to its first token on the host
        for i in range(12):
            ids = [(31 * i + 7 * j) % 40000 + 100 for j in range(PROMPT_TOKENS)]
            t = time.perf_counter()
            engine.add_request(f"ttft{i}", None, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                               prompt_token_ids=ids)
            while not any(out.token_ids for out in engine.step()):
                pass
            first_token_ms.append((time.perf_counter() - t) * 1e3)
            while engine.has_unfinished():
                engine.step()
    finally:
        engine = None
        free_cuda()
    first_token_ms = sorted(first_token_ms[2:])  # the first two warm the prompt path up
    return {"steps": steps, "tokens": tokens, "mean_ms": round(seconds / steps * 1e3, 4),
            "tokens_per_s": round(tokens / seconds, 1),
            "first_token_in_process_ms": {"p50": round(first_token_ms[len(first_token_ms) // 2], 3),
                                          "min": round(first_token_ms[0], 3), "max": round(first_token_ms[-1], 3)}}


def bench_engine(model_dir: Path, levels: list[int]) -> dict:
    """rillet's engine with no HTTP in front: LLMEngine.step() until `streams` requests of
    PROMPT_TOKENS prompts and OUTPUT_TOKENS forced tokens are done (prefill, sampling and
    detokenizing included), warmed up at each level on other prompts first. Set beside the HTTP
    levels, it says how much of a gap is the engine's and how much the serving layer's."""
    from rillet.engine.llm_engine import LLMEngine
    from rillet.sampling_params import SamplingParams

    engine = LLMEngine(model=str(model_dir), device="cuda", dtype="bfloat16", max_model_len=1024,
                       max_num_seqs=max(levels), max_num_batched_tokens=8192)
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    out = {}

    def run(streams: int, tag: int) -> tuple[int, float]:
        for i in range(streams):
            ids = [(7 * i + 13 * j + 101 * tag) % 49000 + 100 for j in range(PROMPT_TOKENS)]
            engine.add_request(f"e{tag}-{streams}-{i}", None, params, prompt_token_ids=ids)
        t, tokens = time.perf_counter(), 0
        while engine.has_unfinished():
            tokens += sum(len(o.token_ids) for o in engine.step())
        torch.cuda.synchronize()
        return tokens, time.perf_counter() - t

    try:
        for streams in levels:
            run(streams, 0)  # warm-up
            tokens, seconds = run(streams, 1)
            out[str(streams)] = {"tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 3)}
            log(f"engine in-process, {streams} streams: {out[str(streams)]['tokens_per_s']:,.0f} tok/s")
    finally:
        engine = None
        free_cuda()
    return out


# ---- 5. rillet serve over HTTP -----------------------------------------------------------------

class PromptMaker:
    """Chat prompts of about PROMPT_TOKENS tokens once the chat template is applied."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.words = 20

    def length(self, text: str) -> int:
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return len(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def make(self, tag: str, filler: list[str], offset: int) -> str:
        def text(n: int) -> str:
            words = [filler[(offset + j) % len(filler)] for j in range(n)]
            return f"[{tag}] " + " ".join(words)

        n = self.words
        while n > 1 and self.length(text(n)) > PROMPT_TOKENS:
            n -= 1
        while self.length(text(n + 1)) <= PROMPT_TOKENS:
            n += 1
        self.words = n
        return text(n)


def python_path_env() -> dict[str, str]:
    """PYTHONPATH with absolute entries (and src/ where rillet is not installed) for the server."""
    entries = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    import rillet

    rillet_root = str(Path(rillet.__file__).resolve().parent.parent)
    if rillet_root not in entries:
        entries.append(rillet_root)
    return {"PYTHONPATH": os.pathsep.join(entries)}


class LevelRunner:
    """One load level against a server: `level(concurrency, requests, tag, filler, max_tokens)`,
    streaming chat with prompts of PROMPT_TOKENS tagged `tag.i`, greedy and forced to max_tokens;
    from CLIENT_PROCS_FROM streams on, spread over `client_procs` processes."""

    def __init__(self, url: str, prompts: PromptMaker, client_procs: int) -> None:
        self.url, self.prompts, self.client_procs = url, prompts, client_procs

    def __call__(self, concurrency: int, num: int, tag: str, filler: list[str], max_tokens: int) -> dict:
        from rillet.bench.loadgen import run_level, run_level_processes

        texts = [self.prompts.make(f"{tag}.{i}", filler, 7 * i) for i in range(num)]
        options = dict(model=None, concurrency=concurrency, num_requests=num, max_tokens=max_tokens,
                       ignore_eos=True, temperature=0.0, prompts=texts)
        if concurrency >= CLIENT_PROCS_FROM and self.client_procs > 1:
            return run_level_processes(self.url, processes=self.client_procs, **options)
        return asyncio.run(run_level(self.url, **options))


@contextmanager
def warmed_server(flags: list[str], model_dir: Path, top: int, client_procs: int, log_path: Path,
                  start_timeout_s: float, record: dict, env: dict[str, str] | None = None) -> Iterator[LevelRunner]:
    """`rillet serve FLAGS` started and warmed up (`top` streams, then one, on other prompts than
    the measured ones); yields the LevelRunner on it and stops it after. Records the start-up
    time in `record`, and the server's log tail where anything fails."""
    from transformers import AutoTokenizer

    from rillet.bench.servers import RilletServer

    t0 = time.monotonic()
    server = RilletServer(*flags, env={**python_path_env(), **(env or {})}, log_path=log_path,
                          start_timeout_s=start_timeout_s)
    try:
        server.wait_ready()
        record["startup_s"] = round(time.monotonic() - t0, 1)
        log(f"rillet serve ready in {record['startup_s']} s; warm-up")
        level = LevelRunner(server.url, PromptMaker(AutoTokenizer.from_pretrained(model_dir)), client_procs)
        level(top, top, "warmup", WARMUP_FILLER, 16)
        level(1, 2, "warmup1", WARMUP_FILLER, 16)
        yield level
    except BaseException:
        record["log_tail"] = server.log_tail(3000)
        raise
    finally:
        server.stop()


def bench_serve(args, model_dir: Path, deadline: float, result: dict) -> None:
    from rillet.config import EngineConfig, ServerConfig
    from rillet.server.runner import api_server_count

    top = max(args.levels)
    flags = ["--model", str(model_dir), "--device", "cuda", "--dtype", "bfloat16", "--max-num-seqs", str(top),
             "--max-num-batched-tokens", "8192", "--max-model-len", "1024", *args.serve_arg]
    if args.api_servers:
        flags += ["--api-servers", str(args.api_servers)]
    serve = result["serve"] = {"command": "rillet serve " + " ".join(flags), "levels": {},
                               "api_servers": args.api_servers or api_server_count(
                                   ServerConfig(), EngineConfig(device="cuda", engine_process=True)),
                               "client_processes": {"processes": args.client_procs, "from_streams": CLIENT_PROCS_FROM}}
    start_timeout = max(30.0, min(args.start_timeout, deadline - time.monotonic()))
    with warmed_server(flags, model_dir, top, args.client_procs, RESULTS_DIR / "logs" / "bench_gpu_serve.log",
                       start_timeout, serve) as level:
        for c in args.levels:
            if time.monotonic() > deadline:
                serve["levels"][str(c)] = {"skipped": "time budget spent"}
                continue
            # a level is a second or two and moves by a third from one run to the next: the
            # round of median throughput stands for it, each round on prompts of its own
            rounds = [level(c, max(8, 2 * c), f"{c}r{k}", FILLER, OUTPUT_TOKENS) for k in range(args.rounds)]
            r = sorted(rounds, key=lambda x: x["output_token_throughput"])[len(rounds) // 2]
            serve["levels"][str(c)] = {
                "tokens_per_s": r["output_token_throughput"], "itl_p50_ms": r["itl_ms"]["p50"],
                "ttft_p50_ms": r["ttft_ms"]["p50"], "ttft_p99_ms": r["ttft_ms"]["p99"], "itl_p99_ms": r["itl_ms"]["p99"],
                "requests": r["num_requests"], "failed": sum(x["failed"] for x in rounds),
                "sample_error": r["sample_error"], "mean_output_tokens": r["mean_output_tokens"],
                "mean_prompt_tokens": round(r["total_prompt_tokens"] / max(1, r["completed"]), 1),
                "mean_chunks_per_request": r["mean_chunks_per_request"], "duration_s": r["duration_s"],
                "rounds_tokens_per_s": [round(x["output_token_throughput"], 1) for x in rounds]}
            log(f"{c} streams: {r['output_token_throughput']:,.0f} tok/s (median of "
                f"{[round(x['output_token_throughput']) for x in rounds]}), ITL p50 {r['itl_ms']['p50']} ms, "
                f"TTFT p50 {r['ttft_ms']['p50']} ms, failed {serve['levels'][str(c)]['failed']}")


# ---- report ------------------------------------------------------------------------------------

def judge(result: dict) -> None:
    levels = result.get("serve", {}).get("levels", {})
    hf = result.get("transformers_generate", {}).get("batches", {})

    def tps(c: int) -> float | None:
        return levels.get(str(c), {}).get("tokens_per_s")

    ratios = {b: round(tps(int(b)) / v["tokens_per_s"], 2) for b, v in hf.items() if tps(int(b))}
    result["rillet_over_transformers"] = ratios
    step, bound = result.get("decode_step_batch1", {}), result.get("hbm", {}).get("bound_ms")
    if step.get("mean_ms") and bound:
        step["over_hbm_bound"] = round(step["mean_ms"] / bound, 2)
    ttft256 = levels.get("256", {}).get("ttft_p50_ms")

    def at_least(value, bar):
        return None if value is None else value >= bar

    result["bars"] = {
        "stream1_ge_1000_tok_s": at_least(tps(1), BARS["stream1_tok_s"]),
        "streams256_ge_40000_tok_s": at_least(tps(256), BARS["streams256_tok_s"]),
        "streams256_ttft_p50_le_300_ms": None if ttft256 is None else ttft256 <= BARS["streams256_ttft_p50_ms"],
        "streams128_ge_2x_transformers_batch128": at_least(ratios.get("128"), BARS["streams128_over_transformers128"]),
        "batch1_step_le_1.3x_hbm_bound": (None if step.get("over_hbm_bound") is None
                                          else step["over_hbm_bound"] <= BARS["batch1_step_over_hbm_bound"]),
    }


def markdown(result: dict) -> str:
    def f(v, digits=1):
        return "-" if v is None else f"{v:,.{digits}f}"

    levels = result.get("serve", {}).get("levels", {})
    hf = result.get("transformers_generate", {}).get("batches", {})
    ratios = result.get("rillet_over_transformers", {})
    lines = ["| streams | rillet tok/s | ITL p50 ms | TTFT p50 ms | transformers tok/s (batch = streams) | rillet / transformers |",
             "|---:|---:|---:|---:|---:|---:|"]
    for c in sorted({*map(int, levels), *map(int, hf)}):
        r = levels.get(str(c), {})
        ratio = ratios.get(str(c))
        lines.append(f"| {c} | {f(r.get('tokens_per_s'), 0)} | {f(r.get('itl_p50_ms'), 2)} | {f(r.get('ttft_p50_ms'), 0)} "
                     f"| {f(hf.get(str(c), {}).get('tokens_per_s'), 0)} | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    step, hbm = result.get("decode_step_batch1", {}), result.get("hbm", {})
    lines += ["", f"Decode step at batch 1 (in-process, mean of {step.get('steps')}): {f(step.get('mean_ms'), 3)} ms; HBM bound "
              f"{f(hbm.get('bound_ms'), 3)} ms ({f((hbm.get('weight_bytes') or 0) / 1e9, 2)} GB of weights at "
              f"{f(hbm.get('bandwidth_gb_s'), 0)} GB/s): {f(step.get('over_hbm_bound'), 2)}x the bound. A lone "
              f"{PROMPT_TOKENS}-token prompt's first token, in-process: "
              f"{f(step.get('first_token_in_process_ms', {}).get('p50'), 2)} ms (p50).", ""]
    lines += [f"- {name}: {'-' if ok is None else ('met' if ok else 'MISSED')}" for name, ok in result["bars"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", type=Path, required=True, help="a tokenizer directory (SmolLM2's)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_gpu.json")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 32, 128, 256],
                        help="concurrent streams, comma-separated (default 1,32,128,256)")
    parser.add_argument("--skip-serve", action="store_true", help="skip rillet serve")
    parser.add_argument("--client-procs", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                        help=f"load-generator processes for levels of {CLIENT_PROCS_FROM}+ streams (one Python "
                             "process parses ~10k events/s; default: half the cores, at most 8)")
    parser.add_argument("--skip-transformers", action="store_true", help="skip transformers' generate")
    parser.add_argument("--compile-transformers", action="store_true",
                        help="try torch.compile on transformers' forward (falls back to eager)")
    parser.add_argument("--steps", type=int, default=100, help="timed batch-1 decode steps in-process")
    parser.add_argument("--rounds", type=lambda v: max(1, int(v)), default=3,
                        help="runs of each serve level, on new prompts each; the median one is reported")
    parser.add_argument("--api-servers", type=int, default=None,
                        help="rillet serve --api-servers (default: rillet's own choice, recorded in the JSON)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `rillet serve` argument (repeatable)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds rillet serve may take to start")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="run time budget: parts and levels not begun by then are skipped (default 360)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU: torch.cuda.is_available() is False")

    import transformers

    result: dict = {
        "benchmark": "bench_gpu", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "model": "Llama-3.2-1B shape, random weights (seed 0), bfloat16",
        "settings": {"levels": args.levels, "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS,
                     "transformers_batches": list(TRANSFORMERS_BATCHES), "bars": BARS, "budget_s": args.budget_s},
        "errors": {},
    }

    def part(name: str, fn) -> None:
        if time.monotonic() > deadline:
            result["errors"][name] = "skipped: time budget spent"
            return
        log(f"{name} ...")
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - record and go on, Ctrl-C aside
            if isinstance(exc, KeyboardInterrupt):
                raise
            result["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"{name} failed:\n{traceback.format_exc()}")
            free_cuda()

    built: list = []
    part("model", lambda: built.extend(build_model(args.tokenizer_dir)))
    if built:
        model_dir, vocab = built
        result["model"] += f"; embedding/head rows of ids >= {vocab} (past the tokenizer) zeroed"

        def hbm() -> None:
            bw = measure_bandwidth()
            weights = weight_bytes(model_dir)
            result["hbm"] = {**bw, "weight_bytes": weights,
                             "bound_ms": round(weights / (bw["bandwidth_gb_s"] * 1e9) * 1e3, 4)}

        def hf() -> None:
            result["transformers_generate"] = bench_transformers(model_dir, vocab, args.compile_transformers)

        def step() -> None:
            result["decode_step_batch1"] = bench_step(model_dir, args.steps)

        try:
            part("hbm", hbm)
            if not args.skip_transformers:
                part("transformers", hf)
            part("decode_step_batch1", step)
            part("engine_in_process", lambda: result.update(engine_in_process=bench_engine(model_dir, args.levels)))
            if not args.skip_serve:
                part("serve", lambda: bench_serve(args, model_dir, deadline, result))
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
    judge(result)
    table = markdown(result)
    result["markdown"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    print(f"\nJSON: {args.out}")
    if result["errors"]:
        print(f"errors: {json.dumps(result['errors'], indent=2)}", file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
