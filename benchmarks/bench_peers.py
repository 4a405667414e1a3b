"""Peer benchmark (issue 7): streaming chat over HTTP, rillet against vLLM and other servers.

Strictly one server at a time (peers would fight over the cores): each is started here on a
free loopback port, warmed up, measured at every concurrency level, asked for one greedy
sample answer, and stopped (its whole process group) before the next one starts.

1. ``rillet serve``          this repository, with this script's interpreter (the project venv);
2. vLLM                      its OpenAI server (``python -m vllm.entrypoints.openai.api_server``)
                             from a SEPARATE virtual environment: --vllm-python (default
                             /opt/vllm-venv/bin/python when it exists; skipped with a note
                             otherwise). vLLM is never imported here and never a dependency of
                             rillet; see benchmarks/README.md for how to make that venv;
3. llama-cpp-python          ``python -m llama_cpp.server`` on the GGUF itself, when
                             --llamacpp-python points at an interpreter that has it (skipped
                             with a note otherwise);
4. the seed server           benchmarks/baselines/seed_server.py, only with --with-seed.

Work per level C: C streams kept in flight until max(--min-requests, C x --rounds) streaming
chat requests are done (greedy), each forced to --max-tokens output tokens: rillet, vLLM and the
seed with ``ignore_eos``; llama.cpp with a -100 logit bias on the end-of-generation tokens plus
``min_tokens``. rillet and vLLM load the same weights: the default GGUF dequantised once by
``rillet.models.resolve`` (a plain Hugging Face directory) in the same dtype (--dtype).
The load generator is ``rillet.bench.loadgen.run_level``, run in this process (same cores).

Metrics: output tokens/s, TTFT p50/p99, inter-token latency p50/p99 (plus TPOT in the JSON).
Bars (issue 7): at 16 and 32 streams rillet >= 1.2x vLLM's output tokens/s with a TTFT p50 no
worse than vLLM's; at 1 stream rillet >= vLLM's output tokens/s. With several vLLM variants
(--vllm-cores auto,all) each level is compared with the best of them.

    .venv/bin/python benchmarks/bench_peers.py                 # 1, 16, 32 streams x 128 tokens
    .venv/bin/python benchmarks/bench_peers.py --quick         # smoke: 1, 2 streams x 16 tokens

Writes benchmarks/results/bench_peers.json (bench_peers.quick.json with --quick) and prints a
text table and a Markdown table with the ratios. Server logs go to benchmarks/results/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: `benchmarks` importable

from benchmarks.common import (  # noqa: E402
    PROMPTS,
    RESULTS_DIR,
    busy_machine_warning,
    default_gguf_path,
    fmt,
    fmt_ratio,
    free_port,
    log,
    machine_info,
    markdown_table,
    ratio,
    resolve_model_dir,
    server_process,
    text_table,
    write_json,
)

SEED_SERVER = Path(__file__).resolve().parent / "baselines" / "seed_server.py"
DEFAULT_VLLM_PYTHON = Path("/opt/vllm-venv/bin/python")
SERVED_NAME = "smollm2"
BAR_THROUGHPUT = 1.2  # rillet / vLLM output tokens/s at the multi-stream levels
BAR_LEVELS = (16, 32)  # levels held to BAR_THROUGHPUT and the TTFT bar
# vLLM's CPU backend by default ("auto") binds one compute thread to each physical core but the ones it
# reserves for its API-server and engine-core processes (on this 2-core machine: compute on core 0, core 1
# reserved). "all" binds its compute threads to every core this process may use, reserving none.
VLLM_CORE_CHOICES = ("auto", "all")


def vllm_cores_env(cores: str) -> dict[str, str]:
    if cores == "auto":
        return {}
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


# ----------------------------------------------------------------------------- helpers


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return levels


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--*-env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def python_has(python: Path, module: str) -> bool:
    """Whether `python` can find `module` (found, not imported: vLLM's import takes seconds)."""
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    try:
        return subprocess.run([str(python), "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def python_version_of(python: Path, distribution: str) -> str | None:
    code = ("import importlib.metadata as m, sys\n"
            f"try: print(m.version({distribution!r}))\n"
            "except Exception: sys.exit(1)")
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def kill_group(pgid: int) -> None:
    """Stop whatever is left of a server's process group (vLLM's engine-core and worker processes)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.2)


@contextlib.contextmanager
def serve(cmd: list[str], url: str, log_path: Path, timeout_s: float, env: dict | None = None):
    """Start a server, yield its startup time in seconds, and stop it and its children."""
    started = time.perf_counter()
    pgid = None
    try:
        with server_process(cmd, url, log_path=log_path, timeout_s=timeout_s, env=env) as proc:
            pgid = proc.pid  # start_new_session: the leader's pid is the group id
            yield round(time.perf_counter() - started, 1)
    finally:
        if pgid is not None:
            kill_group(pgid)
        time.sleep(2.0)  # let the cores go quiet before the next server


async def sample_answer(url: str, max_tokens: int, params: dict) -> dict:
    """One greedy non-streaming answer to the first prompt: both sides load the same weights, so
    rillet's and vLLM's should read the same (until bf16 rounding makes them diverge)."""
    import httpx

    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": False, **params}
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            models = (await client.get(url + "/v1/models")).json()
            body["model"] = models["data"][0]["id"]
            response = await client.post(url + "/v1/chat/completions", json=body)
            data = response.json()
        return {"prompt": PROMPTS[1], "text": data["choices"][0]["message"]["content"],
                "completion_tokens": (data.get("usage") or {}).get("completion_tokens")}
    except Exception as exc:  # noqa: BLE001 - informative only
        return {"prompt": PROMPTS[1], "error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def measure(args: argparse.Namespace, url: str, label: str, levels: list[int], extra_params: dict | None = None,
            ignore_eos: bool = True) -> dict:
    from rillet.bench.loadgen import run_level

    def level(concurrency: int, num_requests: int, max_tokens: int) -> dict:
        return asyncio.run(run_level(url, model=None, concurrency=concurrency, num_requests=num_requests,
                                     max_tokens=max_tokens, api="openai", ignore_eos=ignore_eos,
                                     prompts=list(PROMPTS), temperature=0.0, extra_params=extra_params,
                                     timeout=args.request_timeout))

    warm = min(4, max(levels))
    log(f"{label}: warm-up ({warm} streams x {min(8, args.max_tokens)} tokens)")
    level(warm, warm, min(8, args.max_tokens))
    out: dict = {"levels": {}}
    for c in levels:
        n = max(args.min_requests, c * args.rounds)
        log(f"{label}: {c} streams, {n} requests x {args.max_tokens} tokens")
        r = level(c, n, args.max_tokens)
        log(f"{label}: {c} streams: {fmt(r['output_token_throughput'])} tok/s, "
            f"TTFT p50 {fmt(r['ttft_ms']['p50'], 0)} ms, "
            f"ITL p50 {fmt(r['itl_ms']['p50'], 1)} ms, failed {r['failed']}, "
            f"{r['mean_output_tokens']} tokens/request ({r['tokens_counted_from']})")
        out["levels"][str(c)] = r
    if args.sample_tokens:
        out["sample"] = asyncio.run(sample_answer(url, args.sample_tokens, {"ignore_eos": True} if ignore_eos else {}))
    return out


# ----------------------------------------------------------------------------- systems


def bench_rillet(args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "rillet.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", args.dtype, "--served-model-name", SERVED_NAME,
           "--max-num-seqs", str(max(32, max(args.concurrency))), *args.rillet_arg]
    if args.model:
        cmd += ["--model", args.model]
    log(f"rillet serve: starting on port {port}")
    with serve(cmd, url, args.log_dir / "peers_rillet.log", args.start_timeout) as startup_s:
        log(f"rillet serve: ready after {startup_s} s")
        result = measure(args, url, "rillet", args.concurrency)
    from importlib.metadata import version

    result.update(system="rillet", version=version("rillet"), startup_s=startup_s, command=" ".join(cmd[1:]))
    return result


def bench_vllm(args: argparse.Namespace, python: Path, cores: str, model_dir: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED_NAME, "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
           "--host", "127.0.0.1", "--port", str(port), *args.vllm_arg]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib), **vllm_cores_env(cores), **parse_env(args.vllm_env)}
    name = "vllm" if cores == "auto" else f"vllm ({cores} cores)"
    log(f"{name}: starting on port {port} (python {python}, {' '.join(f'{k}={v}' for k, v in env.items())})")
    log_path = args.log_dir / f"peers_vllm_{cores}.log"
    with serve(cmd, url, log_path, args.start_timeout, env=env) as startup_s:
        log(f"{name}: ready after {startup_s} s")
        result = measure(args, url, name, args.concurrency)
    result.update(system=name, version=python_version_of(python, "vllm-cpu") or python_version_of(python, "vllm"),
                  torch=python_version_of(python, "torch"), startup_s=startup_s, env=env,
                  command=" ".join(cmd[1:]), vllm_log_notes=vllm_log_notes(log_path))
    return result


def vllm_log_notes(path: Path) -> list[str]:
    """The lines of vLLM's log that say how it ran: architecture, dtype, thread binding, KV cache."""
    keys = ("Resolved architecture", "OpenMP thread binding", "core ids=", "reserved_cpus", "Reducing Torch threads",
            "KV cache size", "Maximum concurrency", "init engine", "Supported tasks")
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.strip()[:240] for line in lines if any(k in line for k in keys)][:20]


def llamacpp_eog_params(args: argparse.Namespace, model_dir: Path) -> dict:
    """Force the length on llama.cpp: -100 logit bias on the end-of-generation tokens, and min_tokens."""
    import json

    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        with contextlib.suppress(OSError, ValueError):
            eos = json.loads((model_dir / name).read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    with contextlib.suppress(Exception):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        for t in ("<|im_end|>", "<|endoftext|>", tok.eos_token):
            if t and t in tok.get_vocab():
                ids.add(tok.convert_tokens_to_ids(t))
    return {"logit_bias": {str(i): -100 for i in sorted(ids)}, "min_tokens": args.max_tokens}


def bench_llamacpp(args: argparse.Namespace, python: Path, gguf: Path, model_dir: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    threads = os.cpu_count() or 1
    cmd = [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED_NAME,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.max_model_len),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), *args.llamacpp_arg]
    params = llamacpp_eog_params(args, model_dir)
    log(f"llama.cpp: starting on port {port} (python {python}); forcing length with {params}")
    with serve(cmd, url, args.log_dir / "peers_llamacpp.log", args.start_timeout) as startup_s:
        log(f"llama.cpp: ready after {startup_s} s")
        result = measure(args, url, "llama.cpp", args.concurrency, extra_params=params, ignore_eos=False)
    result.update(system="llama.cpp", version=python_version_of(python, "llama_cpp_python"), startup_s=startup_s,
                  command=" ".join(cmd[1:]), forced_length=params)
    return result


def bench_seed(args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(SEED_SERVER), "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
           "--streamer-timeout", "0"]
    if args.model:
        cmd += ["--model", args.model]
    log(f"seed server: starting on port {port}")
    with serve(cmd, url, args.log_dir / "peers_seed.log", args.start_timeout) as startup_s:
        log(f"seed server: ready after {startup_s} s")
        result = measure(args, url, "seed", args.seed_concurrency or args.concurrency)
    result.update(system="seed server", startup_s=startup_s, command=" ".join(cmd[1:]))
    return result


# ----------------------------------------------------------------------------- report


def comparisons(results: dict[str, dict], levels: list[int]) -> dict:
    rillet = results.get("rillet")
    vllms = {k: v for k, v in results.items() if k.startswith("vllm") and "levels" in v}
    out: dict = {"bar_throughput": BAR_THROUGHPUT, "bar_levels": list(BAR_LEVELS), "levels": {}, "meets_bars": None}
    if not rillet or "levels" not in rillet or not vllms:
        return out
    verdicts = []
    for c in levels:
        r = rillet["levels"].get(str(c))
        candidates = [(k, v["levels"][str(c)]) for k, v in vllms.items() if str(c) in v["levels"]]
        if not r or not candidates:
            continue
        best_name, best = max(candidates, key=lambda kv: kv[1]["output_token_throughput"] or 0.0)
        tps = ratio(r["output_token_throughput"], best["output_token_throughput"])
        ttft = ratio(r["ttft_ms"]["p50"], best["ttft_ms"]["p50"])  # rillet / vLLM: <= 1 is no worse
        entry = {"vs": best_name, "throughput_ratio": tps, "ttft_p50_ratio": ttft, "bar": None, "meets_bar": None}
        if c == 1:
            entry["bar"] = "rillet tok/s >= vLLM's"
            entry["meets_bar"] = None if tps is None else tps >= 1.0
        elif c in BAR_LEVELS:
            entry["bar"] = f"rillet tok/s >= {BAR_THROUGHPUT:g}x vLLM's and TTFT p50 <= vLLM's"
            entry["meets_bar"] = None if tps is None or ttft is None else (tps >= BAR_THROUGHPUT and ttft <= 1.0)
        if entry["meets_bar"] is not None:
            verdicts.append(entry["meets_bar"])
        out["levels"][str(c)] = entry
    out["meets_bars"] = all(verdicts) if verdicts else None
    return out


def render(results: dict[str, dict], comp: dict) -> tuple[str, str]:
    headers = ["system", "streams", "output tok/s", "vs vLLM", "TTFT p50 ms", "TTFT p99 ms", "TTFT vs vLLM",
               "ITL p50 ms", "ITL p99 ms", "failed"]
    rows = []
    for name, res in results.items():
        for c, r in res.get("levels", {}).items():
            vs = ttft_vs = "-"
            cmp_ = comp["levels"].get(c)
            if name == "rillet" and cmp_:
                mark = "" if cmp_["meets_bar"] is None else (" ok" if cmp_["meets_bar"] else " MISSED")
                vs = fmt_ratio(cmp_["throughput_ratio"]) + mark
                ttft_vs = fmt_ratio(cmp_["ttft_p50_ratio"])
            rows.append([name, c, fmt(r["output_token_throughput"]), vs, fmt(r["ttft_ms"]["p50"], 0),
                         fmt(r["ttft_ms"]["p99"], 0), ttft_vs, fmt(r["itl_ms"]["p50"], 1), fmt(r["itl_ms"]["p99"], 1),
                         str(r["failed"])])
    return text_table(headers, rows), markdown_table(headers, rows)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=parse_levels, default=None, help="levels, e.g. 1,16,32 (the default)")
    parser.add_argument("--max-tokens", type=int, default=None, help="forced output tokens per request (default 128)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="requests per stream at each level (default 2; --quick 1)")
    parser.add_argument("--min-requests", type=int, default=None, help="fewest requests at a level (default 4)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1, 2 streams x 16 tokens, few requests")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                        help="dtype of rillet, vLLM and the seed (default bfloat16)")
    parser.add_argument("--model", default=None,
                        help="model for rillet and the seed (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="context of vLLM and llama.cpp (default 2048)")
    parser.add_argument("--skip-rillet", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-python", type=Path, default=None,
                        help=f"interpreter of a venv with vllm-cpu (default {DEFAULT_VLLM_PYTHON} when it exists)")
    parser.add_argument("--vllm-model", type=Path, default=None,
                        help="Hugging Face directory for vLLM (default: rillet's converted directory of --model)")
    parser.add_argument("--vllm-cores", default="auto",
                        help="comma list of vLLM thread bindings to run: auto (vLLM's default: one core reserved "
                             "for its frontend on a small machine), all (compute threads on every core)")
    parser.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (default 2)")
    parser.add_argument("--vllm-env", action="append", default=[], help="KEY=VALUE for vLLM's environment (repeatable)")
    parser.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM server argument (repeatable)")
    parser.add_argument("--llamacpp-python", type=Path, default=None,
                        help="interpreter of a venv with llama-cpp-python[server] (skipped when not given)")
    parser.add_argument("--llamacpp-gguf", type=Path, default=None,
                        help="GGUF for llama.cpp (default: the embedded one)")
    parser.add_argument("--llamacpp-arg", action="append", default=[], help="extra llama_cpp.server argument")
    parser.add_argument("--with-seed", action="store_true", help="also run benchmarks/baselines/seed_server.py")
    parser.add_argument("--seed-concurrency", type=parse_levels, default=None,
                        help="levels for the seed only (it is slow at 32 x 128)")
    parser.add_argument("--rillet-arg", action="append", default=[],
                        help="extra `rillet serve` argument (repeatable), e.g. --rillet-arg=--num-threads=2")
    parser.add_argument("--sample-tokens", type=int, default=32, help="tokens of the greedy sample answer (0: none)")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to start")
    parser.add_argument("--request-timeout", type=float, default=900.0, help="seconds one request may take")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/bench_peers.json)")
    args = parser.parse_args(argv)

    args.concurrency = args.concurrency or ([1, 2] if args.quick else [1, 16, 32])
    args.max_tokens = args.max_tokens or (16 if args.quick else 128)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.min_requests = args.min_requests or (2 if args.quick else 4)
    args.log_dir = RESULTS_DIR / "logs"
    args.log_dir.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS_DIR / ("bench_peers.quick.json" if args.quick else "bench_peers.json")
    vllm_cores = [c.strip() for c in args.vllm_cores.split(",") if c.strip()]
    if unknown := [c for c in vllm_cores if c not in VLLM_CORE_CHOICES]:
        parser.error(f"--vllm-cores: unknown {unknown}; choose from {', '.join(VLLM_CORE_CHOICES)}")

    info = machine_info(args.dtype)
    warning = busy_machine_warning(info)
    if warning:
        log(f"warning: {warning}")
    model_dir, model_name = resolve_model_dir(args.model)
    notes: list[str] = []
    results: dict[str, dict] = {}
    started = time.perf_counter()

    def attempt(name: str, fn, *fargs) -> None:
        try:
            results[name] = fn(*fargs)
        except Exception as exc:  # noqa: BLE001 - one failing peer should not lose the others' numbers
            log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            results[name] = {"system": name, "error": f"{type(exc).__name__}: {str(exc)[:3000]}"}

    if not args.skip_rillet:
        attempt("rillet", bench_rillet, args)

    vllm_python = args.vllm_python or (DEFAULT_VLLM_PYTHON if DEFAULT_VLLM_PYTHON.exists() else None)
    if args.skip_vllm:
        notes.append("vLLM: skipped (--skip-vllm)")
    elif vllm_python is None:
        notes.append(f"vLLM: skipped: no {DEFAULT_VLLM_PYTHON} and no --vllm-python "
                     "(see benchmarks/README.md, 'bench_peers.py', for the separate venv)")
    elif not python_has(vllm_python, "vllm"):
        notes.append(f"vLLM: skipped: {vllm_python} cannot import vllm")
    else:
        vllm_model = args.vllm_model or model_dir
        for cores in vllm_cores:
            name = "vllm" if cores == "auto" else f"vllm ({cores} cores)"
            attempt(name, bench_vllm, args, vllm_python, cores, vllm_model)

    if args.llamacpp_python is None:
        notes.append("llama.cpp: skipped: no --llamacpp-python (a venv with llama-cpp-python[server]; "
                     "PyPI has only its source, which builds llama.cpp)")
    elif not python_has(args.llamacpp_python, "llama_cpp"):
        notes.append(f"llama.cpp: skipped: {args.llamacpp_python} cannot import llama_cpp")
    else:
        gguf = args.llamacpp_gguf or (Path(args.model) if args.model and args.model.endswith(".gguf")
                                      else default_gguf_path())
        attempt("llama.cpp", bench_llamacpp, args, args.llamacpp_python, gguf, model_dir)

    if args.with_seed:
        attempt("seed server", bench_seed, args)
    for note in notes:
        log(note)

    measured = {k: v for k, v in results.items() if "levels" in v}
    comp = comparisons(measured, args.concurrency)
    text, markdown = render(measured, comp)
    payload = {
        "benchmark": "bench_peers",
        "description": "Streaming chat over loopback HTTP, one server at a time: rillet serve vs vLLM "
                       "(separate venv) and optionally llama-cpp-python and the seed server; forced-length "
                       "greedy requests through rillet.bench.loadgen.",
        "machine": info,
        "settings": {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "rounds": args.rounds,
                     "min_requests": args.min_requests, "dtype": args.dtype, "temperature": 0.0,
                     "model": args.model or f"default ({model_name})", "model_dir": str(model_dir),
                     "vllm_cores": vllm_cores, "quick": args.quick, "prompts": list(PROMPTS)},
        "comparisons": comp,
        "results": results,
        "notes": notes,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    payload["warnings"] = [warning] if warning else []
    payload["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    write_json(out, payload)

    print(f"\nbench_peers: {info['cpu_model']} ({info['cpu_cores']} cores), {args.dtype}, levels "
          f"{','.join(map(str, args.concurrency))}, {args.max_tokens} forced tokens, "
          f"max({args.min_requests}, {args.rounds} x streams) requests per level\n")
    for name, res in results.items():
        if "levels" in res:
            print(f"- {name} {res.get('version') or ''}: ready after {res['startup_s']} s")
        else:
            print(f"- {name}: FAILED: {res['error'].splitlines()[0][:300]}")
    for note in notes:
        print(f"- {note}")
    print()
    print(text)
    print("\nMarkdown:\n")
    print(markdown)
    if comp["levels"]:
        print(f"\nBars (vs the best vLLM variant per level): rillet >= {BAR_THROUGHPUT:g}x vLLM tok/s with TTFT p50 "
              f"no worse at {', '.join(map(str, BAR_LEVELS))} streams; >= 1x at 1 stream: "
              + ("met" if comp["meets_bars"] else "MISSED" if comp["meets_bars"] is False else "not measured"))
    samples = {k: v["sample"] for k, v in measured.items() if v.get("sample")}
    if samples:
        print("\nGreedy sample answers (same weights, so they should read alike):")
        for name, s in samples.items():
            print(f"- {name}: {s.get('text', s.get('error'))!r}")
    print(f"\nJSON: {out}")
    if warning:
        print(f"\nwarning: {warning}", file=sys.stderr)
    failed = sum(r["failed"] for v in measured.values() for r in v["levels"].values())
    broken = [k for k, v in results.items() if "error" in v]
    if failed or broken:
        print(f"warning: {failed} request(s) failed, systems failed: {broken or 'none'}; see the JSON and "
              f"{args.log_dir}", file=sys.stderr)
    return 1 if failed or broken else 0


if __name__ == "__main__":
    sys.exit(main())
