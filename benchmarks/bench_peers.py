"""Peer benchmark (issues 7, 13): streaming chat over HTTP, rillet against vLLM and llama.cpp.

Every peer in its best configuration for this CPU, in the same run, strictly one server at a
time (peers would fight over the cores): each is started here on a free loopback port, warmed
up, measured at every concurrency level, asked for one greedy sample answer, and stopped (its
whole process group) before the next one starts.

1. ``rillet serve``          this repository, with this script's interpreter (the project venv),
                             ``--dtype auto`` (its own best: the GGUF's Q4_1 blocks as they are,
                             bf16 activations) unless --dtype says otherwise;
2. vLLM                      its OpenAI server (``python -m vllm.entrypoints.openai.api_server``)
                             from a SEPARATE virtual environment: --vllm-python (default
                             /opt/vllm-venv/bin/python when it exists; skipped with a note
                             otherwise), on the GGUF converted to a Hugging Face directory by
                             ``rillet.models.resolve``, in ITS best dtype for this CPU, chosen
                             independently of rillet's (--vllm-dtype best: bfloat16 where the CPU
                             has native bf16, AVX512-BF16 or AMX, float32 otherwise), its compute
                             threads on every core (--vllm-cores all: VLLM_CPU_OMP_THREADS_BIND=
                             0-<n-1>, VLLM_CPU_NUM_OF_RESERVED_CPU=0; "auto", vLLM's own default,
                             stays available, and with --vllm-cores all,auto each level is
                             compared with the faster). vLLM is never imported here;
3. llama-cpp-python          ``python -m llama_cpp.server`` on the same GGUF, ``--n_threads <cores>
                             --interrupt_requests False``, from --llamacpp-python (default
                             /opt/llamacpp-venv/bin/python when it exists). The JSON records its
                             build (``llama_print_system_info()``: AVX, AVX2, AVX512 ...);
4. the seed server           benchmarks/baselines/seed_server.py, only with --with-seed.

ISA stand-ins: ``--rillet-isa avx2`` runs rillet's AVX2 kernels (RILLET_CPU_ISA=avx2) with
torch and oneDNN held to AVX2 as well (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2): an
AVX-512 machine standing in for an AVX2-only one. ``--peers-isa`` (default ``same``: what
--rillet-isa says) does the same for vLLM, which then also loads its AVX2 kernels
(benchmarks/peers/isa_standin/sitecustomize.py) and runs float32 (its best without native
bf16). llama.cpp runs what its build has; the JSON and a warning say when its build does not
match the run's ISA.

Work per level C: C streams kept in flight until max(--min-requests 16, C x --rounds) streaming
chat requests are done (so the 1-stream level measures 16 too), greedy, each forced to
--max-tokens output tokens, each prompt a new one (PROMPTS cycled, each opening with its own
"[level.i]" tag; --repeat-prompts: verbatim): rillet, vLLM and the seed with ``ignore_eos``; llama.cpp with a -100
logit bias on the end-of-generation tokens plus ``min_tokens``. Each server first warms up on
WARMUP_PROMPTS (rillet.bench.workload), none of which is measured, so no warm-up leaves a
measured prompt in a prefix cache. The load generator is ``rillet.bench.loadgen.run_level``,
run in this process (same cores).

Metrics: output tokens/s, TTFT p50/p99, inter-token latency p50/p99 (plus TPOT in the JSON).
Bars (issue 13), chosen by the ISA rillet runs:
- AVX2 (native or --rillet-isa avx2): at 1 stream rillet >= 1.5x llama.cpp's output tokens/s;
  at 16 streams rillet >= 3x vLLM's with a TTFT p50 no worse than vLLM's;
- AVX512 on a CPU with native bf16: at 16 and 32 streams rillet >= 1.5x vLLM's; at 1 stream
  rillet >= llama.cpp's.
Each bar is printed met / MISSED / not measured.

    .venv/bin/python -m benchmarks.bench_peers                 # 1, 16, 32 streams x 128 tokens
    .venv/bin/python -m benchmarks.bench_peers --rillet-isa avx2   # the AVX2 stand-in comparison
    .venv/bin/python -m benchmarks.bench_peers --quick         # smoke: 1, 2 streams x 16 tokens

Writes benchmarks/results/bench_peers.json (bench_peers.quick.json with --quick) and prints
a text table and a Markdown table, each headed by the CPU, the ISA and the commit, then the
bars. Server logs go to benchmarks/results/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from rillet.bench.machine import ISA_ENV, BenchRun, add_isa_argument, header_line, isa_env
from rillet.bench.report import fmt, fmt_ratio, log, markdown_table, ratio, text_table
from rillet.bench.servers import free_port, server_process
from rillet.bench.workload import PROMPTS, WARMUP_PROMPTS, add_prompt_argument, measured_prompts
from rillet.models.cpu_isa import has_native_bf16
from rillet.models.resolve import default_gguf_path, resolve_model

from benchmarks import REPO_ROOT, RESULTS_DIR
from benchmarks.baselines.seed_server import seed_server_command

ISA_STANDIN_DIR = Path(__file__).resolve().parent / "peers" / "isa_standin"
DEFAULT_VLLM_PYTHON = Path("/opt/vllm-venv/bin/python")
DEFAULT_LLAMACPP_PYTHON = Path("/opt/llamacpp-venv/bin/python")
SERVED_NAME = "smollm2"
# vLLM's CPU backend by default ("auto") binds one compute thread to each physical core but the ones it
# reserves for its API-server and engine-core processes (on a 2-core machine: compute on core 0, core 1
# reserved). "all" binds its compute threads to every core this process may use, reserving none.
VLLM_CORE_CHOICES = ("all", "auto")

# Issue 13's bars, by the ISA rillet runs: (level, peer, minimum rillet/peer output tokens/s,
# whether rillet's TTFT p50 must also be no worse than the peer's).
BARS = {
    "avx2": [(1, "llama.cpp", 1.5, False), (16, "vLLM", 3.0, True)],
    "avx512-bf16": [(1, "llama.cpp", 1.0, False), (16, "vLLM", 1.5, False), (32, "vLLM", 1.5, False)],
}


def cpu_list() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def cpu_spec(cpus: list[int]) -> str:
    """'0-<n-1>' for a contiguous range, else a comma list (VLLM_CPU_OMP_THREADS_BIND's two forms)."""
    if len(cpus) > 1 and cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def vllm_cores_env(cores: str) -> dict[str, str]:
    if cores == "auto":
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": cpu_spec(cpu_list()), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def peers_isa_of(args: argparse.Namespace) -> str | None:
    """The ISA the peers are held to: None for their native best."""
    if args.peers_isa == "same":
        return args.rillet_isa if args.rillet_isa in ISA_ENV else None
    return None if args.peers_isa == "native" else args.peers_isa


def vllm_standin_env(isa: str | None) -> dict[str, str]:
    """torch/oneDNN held to `isa`, and vLLM's own kernel choice too (peers/isa_standin/sitecustomize.py)."""
    if isa not in ISA_ENV:
        return {}
    path = os.pathsep.join(p for p in (str(ISA_STANDIN_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {**ISA_ENV[isa], "RILLET_BENCH_MAX_ISA": isa, "PYTHONPATH": path}


def best_vllm_dtype(peers_isa: str | None) -> str:
    """vLLM's best dtype on this CPU, whatever rillet runs: bf16 only where the CPU computes in it natively."""
    return "bfloat16" if peers_isa is None and has_native_bf16() else "float32"


def bars_kind(run_isa: str | None) -> str | None:
    if run_isa == "avx2":
        return "avx2"
    if run_isa == "avx512" and has_native_bf16():
        return "avx512-bf16"
    return None


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


def peer_python(name: str, given: Path | None, default: Path, module: str, skip: bool, notes: list[str],
                how: str) -> Path | None:
    """The python that runs a peer (`given`, else `default` if it exists), or None with a note why not."""
    flag = "--" + module.replace("_", "") + "-python"
    python = given or (default if default.exists() else None)
    if skip:
        notes.append(f"{name}: skipped (--skip-{module.replace('_', '')})")
    elif python is None:
        notes.append(f"{name}: skipped: no {default} and no {flag} ({how})")
    elif not python_has(python, module):
        notes.append(f"{name}: skipped: {python} cannot import {module}")
    else:
        return python
    return None


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


def llamacpp_build_info(python: Path) -> dict:
    """Which llama.cpp build the venv has: its `llama_print_system_info()` and the SIMD flags it was built with."""
    code = "import llama_cpp, sys; sys.stdout.write(llama_cpp.llama_print_system_info().decode(errors='replace'))"
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:]}
    text = done.stdout.strip()
    flags = sorted({m.group(1) for m in re.finditer(r"([A-Z][A-Z0-9_]*)\s*=\s*1\b", text)})
    simd_prefixes = ("AVX", "FMA", "F16C", "SSE", "SSSE", "BMI", "NEON", "ARM_FMA", "AMX", "SVE", "DOTPROD",
                     "MATMUL_INT8")
    simd = [f for f in flags if f.startswith(simd_prefixes)]
    return {"system_info": text, "flags": flags, "simd": simd, "avx2": "AVX2" in flags,
            "avx512": any(f.startswith("AVX512") for f in flags)}


def llamacpp_build_mismatch(build: dict, run_isa: str | None) -> str | None:
    """A warning when llama.cpp's build does not match the ISA the run compares at."""
    if "flags" not in build:
        return None
    if run_isa == "avx2" and build["avx512"]:
        return ("llama.cpp's build uses AVX-512 but this is an AVX2 comparison: it is not standing in for an "
                "AVX2-only CPU (build it with CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON "
                "-DGGML_F16C=ON\", see benchmarks/README.md)")
    if run_isa == "avx512" and not build["avx512"]:
        return ("llama.cpp's build has no AVX-512 but this CPU has it: llama.cpp is not at its best here and "
                "the comparison with it flatters rillet (give --llamacpp-python a native build, "
                "-DGGML_NATIVE=ON, see benchmarks/README.md)")
    return None


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
    """Start a server, yield (startup time in seconds, its process group id), and stop it and its children."""
    started = time.perf_counter()
    pgid = None
    try:
        with server_process(cmd, url, log_path=log_path, timeout_s=timeout_s, env=env, cwd=REPO_ROOT) as proc:
            pgid = proc.pid  # start_new_session: the leader's pid is the group id
            yield round(time.perf_counter() - started, 1), pgid
    finally:
        if pgid is not None:
            kill_group(pgid)
        time.sleep(2.0)  # let the cores go quiet before the next server


async def sample_answer(url: str, max_tokens: int, params: dict) -> dict:
    """One greedy non-streaming answer to the first prompt: both sides load the same weights, so
    rillet's and vLLM's should read the same (until rounding differences make them diverge)."""
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

    def level(concurrency: int, num_requests: int, max_tokens: int, prompts) -> dict:
        forced = []

        def count_forced(record) -> None:
            # A server that reports no usage while streaming (llama-cpp-python) is counted by its chunks,
            # and a chunk can hold several tokens (it holds back a partial UTF-8 character: CJK text), which
            # would under-count it. Its length is forced (min_tokens = max_tokens, end tokens banned), so a
            # request that ends for "length" generated exactly max_tokens tokens.
            if (not ignore_eos and record.ok and not record.tokens_from_usage and record.finish_reason == "length"
                    and (extra_params or {}).get("min_tokens", 0) >= max_tokens):
                forced.append(record.output_tokens)
                record.output_tokens = max_tokens

        result = asyncio.run(run_level(url, model=None, concurrency=concurrency, num_requests=num_requests,
                                       max_tokens=max_tokens, api="openai", ignore_eos=ignore_eos,
                                       prompts=list(prompts), temperature=0.0, extra_params=extra_params,
                                       timeout=args.request_timeout, on_request_done=count_forced))
        if forced:
            result["tokens_counted_from"] = "forced length (finish_reason length, min_tokens = max_tokens)"
            result["chunks_per_request"] = forced
        return result

    warm = min(4, max(levels))
    log(f"{label}: warm-up ({warm} streams x {min(8, args.max_tokens)} tokens, warm-up prompts only)")
    level(warm, warm, min(8, args.max_tokens), WARMUP_PROMPTS)
    out: dict = {"levels": {}}
    for c in levels:
        n = max(args.min_requests, c * args.rounds)
        log(f"{label}: {c} streams, {n} requests x {args.max_tokens} tokens")
        r = level(c, n, args.max_tokens, measured_prompts(n, c, distinct=not args.repeat_prompts))
        log(f"{label}: {c} streams: {fmt(r['output_token_throughput'])} tok/s, "
            f"TTFT p50 {fmt(r['ttft_ms']['p50'], 0)} ms, "
            f"ITL p50 {fmt(r['itl_ms']['p50'], 1)} ms, failed {r['failed']}, "
            f"{r['mean_output_tokens']} tokens/request ({r.get('tokens_counted_from')})")
        out["levels"][str(c)] = r
    if args.sample_tokens:
        out["sample"] = asyncio.run(sample_answer(url, args.sample_tokens, {"ignore_eos": True} if ignore_eos else {}))
    return out


def rillet_backend(url: str, log_path: Path) -> dict:
    """How rillet says it ran: the `engine ready` log line and /metrics' rillet:engine_backend_info labels."""
    import httpx

    out: dict = {}
    with contextlib.suppress(OSError):
        ready = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if "engine ready" in line]
        if ready:
            out["engine_ready"] = ready[-1][-400:]
    with contextlib.suppress(Exception):
        text = httpx.get(url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("rillet:engine_backend_info{"):
                out["backend_info"] = dict(re.findall(r'(\w+)="([^"]*)"', line))
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
    env = isa_env(args.rillet_isa)
    log(f"rillet serve: starting on port {port}" + (f" ({' '.join(f'{k}={v}' for k, v in env.items())})" if env else ""))
    log_path = args.log_dir / "peers_rillet.log"
    with serve(cmd, url, log_path, args.start_timeout, env=env) as (startup_s, pgid):
        log(f"rillet serve: ready after {startup_s} s")
        result = measure(args, url, "rillet", args.concurrency)
        backend = rillet_backend(url, log_path)
    from importlib.metadata import version

    result.update(system="rillet", version=version("rillet"), startup_s=startup_s, env=env,
                  command=" ".join(cmd[1:]), **backend)
    isa_seen = (backend.get("backend_info") or {}).get("cpu_isa")
    if args.rillet_isa and isa_seen and isa_seen != args.rillet_isa:
        result["warning"] = f"asked for --rillet-isa {args.rillet_isa}, the server reports cpu_isa={isa_seen}"
        log(f"rillet serve: warning: {result['warning']}")
    log(f"rillet serve: {backend.get('engine_ready') or 'no engine-ready line'}")
    return result


def bench_vllm(args: argparse.Namespace, python: Path, cores: str, model_dir: Path, dtype: str,
               peers_isa: str | None) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", SERVED_NAME, "--dtype", dtype, "--max-model-len", str(args.max_model_len),
           "--host", "127.0.0.1", "--port", str(port), *args.vllm_arg]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib), **vllm_cores_env(cores), **vllm_standin_env(peers_isa),
           **parse_env(args.vllm_env)}
    name = vllm_name(cores)
    log(f"{name}: starting on port {port} (python {python}, {dtype}, {' '.join(f'{k}={v}' for k, v in env.items())})")
    log_path = args.log_dir / f"peers_vllm_{cores}.log"
    with serve(cmd, url, log_path, args.start_timeout, env=env) as (startup_s, pgid):
        log(f"{name}: ready after {startup_s} s")
        result = measure(args, url, name, args.concurrency)
        kernels = vllm_kernels_loaded(pgid)
    log(f"{name}: its processes loaded {', '.join(kernels) or 'no vllm._C library (or /proc is unreadable)'}")
    result.update(system=name, version=python_version_of(python, "vllm-cpu") or python_version_of(python, "vllm"),
                  torch=python_version_of(python, "torch"), startup_s=startup_s, dtype=dtype, cores=cores,
                  isa=peers_isa or "native", kernels_loaded=kernels, env=env, command=" ".join(cmd[1:]), vllm_log_notes=vllm_log_notes(log_path))
    return result


def vllm_kernels_loaded(pgid: int) -> list[str]:
    """Which of vLLM's C++ kernel libraries (_C: AVX512-BF16, _C_AVX512, _C_AVX2) its processes mapped."""
    found: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            found.update(re.findall(r"vllm/(_C(?:_[A-Z0-9]+)?)\.abi3\.so", (proc / "maps").read_text()))
    return sorted(found)


def vllm_name(cores: str) -> str:
    return "vllm" if cores == "all" else f"vllm ({cores} cores)"


def vllm_log_notes(path: Path) -> list[str]:
    """The lines of vLLM's log that say how it ran: architecture, dtype, kernels, thread binding, KV cache."""
    keys = ("Resolved architecture", "OpenMP thread binding", "core ids=", "reserved_cpus", "Reducing Torch threads",
            "KV cache size", "Maximum concurrency", "init engine", "Supported tasks", "Failed to import", "dtype=")
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


def bench_llamacpp(args: argparse.Namespace, python: Path, gguf: Path, model_dir: Path, build: dict) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    threads = args.llamacpp_threads or len(cpu_list())
    cmd = [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED_NAME,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.max_model_len),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--interrupt_requests", "False",
           *args.llamacpp_arg]
    params = llamacpp_eog_params(args, model_dir)
    log(f"llama.cpp: starting on port {port} (python {python}, build {' '.join(build.get('simd', [])) or '?'}); "
        f"forcing length with {params}")
    with serve(cmd, url, args.log_dir / "peers_llamacpp.log", args.start_timeout) as (startup_s, _):
        log(f"llama.cpp: ready after {startup_s} s")
        result = measure(args, url, "llama.cpp", args.concurrency, extra_params=params, ignore_eos=False)
    result.update(system="llama.cpp", version=python_version_of(python, "llama_cpp_python"), startup_s=startup_s,
                  command=" ".join(cmd[1:]), forced_length=params, build=build, gguf=str(gguf))
    return result


def bench_seed(args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = seed_server_command(port, args.dtype, args.model)
    env = isa_env(args.rillet_isa) if args.rillet_isa in ISA_ENV else {}
    log(f"seed server: starting on port {port}")
    with serve(cmd, url, args.log_dir / "peers_seed.log", args.start_timeout, env=env) as (startup_s, _):
        log(f"seed server: ready after {startup_s} s")
        result = measure(args, url, "seed", args.seed_concurrency or args.concurrency)
    result.update(system="seed server", startup_s=startup_s, env=env, command=" ".join(cmd[1:]))
    return result


# ----------------------------------------------------------------------------- report


def best_peer(results: dict[str, dict], peer: str, c: int) -> tuple[str, dict] | None:
    """The peer's fastest variant at level c: ("vllm", level result), or None where it was not measured."""
    prefix = "vllm" if peer == "vLLM" else "llama.cpp"
    candidates = [(k, v["levels"][str(c)]) for k, v in results.items()
                  if k.startswith(prefix) and "levels" in v and str(c) in v["levels"]]
    if not candidates:
        return None
    return max(candidates, key=lambda kv: kv[1]["output_token_throughput"] or 0.0)


def comparisons(results: dict[str, dict], levels: list[int], kind: str | None) -> dict:
    """Ratios of rillet to the best vLLM and to llama.cpp at every level, and issue 13's bars for `kind`."""
    rillet = results.get("rillet")
    out: dict = {"bars_for": kind, "levels": {}, "bars": [], "meets_bars": None}
    if not rillet or "levels" not in rillet:
        return out
    for c in levels:
        r = rillet["levels"].get(str(c))
        if not r:
            continue
        entry = {}
        for peer in ("vLLM", "llama.cpp"):
            best = best_peer(results, peer, c)
            if best:
                name, p = best
                entry[peer] = {"vs": name, "throughput_ratio": ratio(r["output_token_throughput"],
                                                                     p["output_token_throughput"]),
                               "ttft_p50_ratio": ratio(r["ttft_ms"]["p50"], p["ttft_ms"]["p50"]),  # <= 1: no worse
                               "rillet": {"tok_s": r["output_token_throughput"], "ttft_p50_ms": r["ttft_ms"]["p50"]},
                               "peer": {"tok_s": p["output_token_throughput"], "ttft_p50_ms": p["ttft_ms"]["p50"]}}
        out["levels"][str(c)] = entry
    verdicts = []
    for c, peer, need, ttft_too in BARS.get(kind or "", []):
        text = (f"{c} stream{'s' if c > 1 else ''}: rillet >= {need:g}x {peer} output tok/s"
                + (f" with TTFT p50 no worse than {peer}'s" if ttft_too else ""))
        cmp_ = (out["levels"].get(str(c)) or {}).get(peer)
        met = None  # judged on the unrounded numbers: 1.496x does not meet a 1.5x bar
        if cmp_ and cmp_["rillet"]["tok_s"] is not None and cmp_["peer"]["tok_s"]:
            met = cmp_["rillet"]["tok_s"] >= need * cmp_["peer"]["tok_s"]
            if ttft_too:
                mine, theirs = cmp_["rillet"]["ttft_p50_ms"], cmp_["peer"]["ttft_p50_ms"]
                met = None if mine is None or theirs is None else met and mine <= theirs
        bar = {"level": c, "peer": peer, "min_throughput_ratio": need, "ttft_no_worse": ttft_too, "bar": text,
               "vs": cmp_["vs"] if cmp_ else None, "throughput_ratio": cmp_["throughput_ratio"] if cmp_ else None,
               "ttft_p50_ratio": cmp_["ttft_p50_ratio"] if cmp_ else None, "met": met}
        out["bars"].append(bar)
        if met is not None:
            verdicts.append(met)
    measured_all = out["bars"] and all(b["met"] is not None for b in out["bars"])
    out["meets_bars"] = (all(verdicts) if measured_all else (False if False in verdicts else None)) if out["bars"] else None
    return out


def render(results: dict[str, dict], comp: dict) -> tuple[str, str]:
    headers = ["system", "streams", "output tok/s", "vs vLLM", "vs llama.cpp", "TTFT p50 ms", "TTFT p99 ms",
               "TTFT vs vLLM", "ITL p50 ms", "ITL p99 ms", "failed"]
    rows = []
    for name, res in results.items():
        for c, r in res.get("levels", {}).items():
            vs_vllm = vs_llama = ttft_vs = "-"
            cmp_ = comp["levels"].get(c) or {}
            if name == "rillet":
                if "vLLM" in cmp_:
                    vs_vllm = fmt_ratio(cmp_["vLLM"]["throughput_ratio"])
                    ttft_vs = fmt_ratio(cmp_["vLLM"]["ttft_p50_ratio"])
                if "llama.cpp" in cmp_:
                    vs_llama = fmt_ratio(cmp_["llama.cpp"]["throughput_ratio"])
            rows.append([name, c, fmt(r["output_token_throughput"]), vs_vllm, vs_llama, fmt(r["ttft_ms"]["p50"], 0),
                         fmt(r["ttft_ms"]["p99"], 0), ttft_vs, fmt(r["itl_ms"]["p50"], 1), fmt(r["itl_ms"]["p99"], 1),
                         str(r["failed"])])
    return text_table(headers, rows, first_left=True), markdown_table(headers, rows)


def render_bars(comp: dict) -> str:
    if not comp["bars"]:
        return ("Bars (issue 13): none for this run (rillet's ISA is neither AVX2 nor AVX-512 with native bf16)"
                if comp["bars_for"] is None else "Bars (issue 13): none")
    lines = [f"Bars (issue 13, {comp['bars_for']} run; against each peer's fastest variant at the level):"]
    for b in comp["bars"]:
        verdict = "not measured" if b["met"] is None else ("met" if b["met"] else "MISSED")
        got = ("" if b["throughput_ratio"] is None else f": {fmt_ratio(b['throughput_ratio'])} vs {b['vs']}"
               + ("" if not b["ttft_no_worse"] else f", TTFT p50 {fmt_ratio(b['ttft_p50_ratio'])} of theirs"))
        lines.append(f"- {b['bar']}{got} -> {verdict}")
    overall = comp["meets_bars"]
    lines.append("- all bars: " + ("met" if overall else "MISSED" if overall is False else "not all measured"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=parse_levels, default=None, help="levels, e.g. 1,16,32 (the default)")
    parser.add_argument("--max-tokens", type=int, default=None, help="forced output tokens per request (default 128)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="requests per stream at each level (default 2; --quick 1)")
    parser.add_argument("--min-requests", type=int, default=None,
                        help="fewest requests measured at a level, 1 stream included (default 16; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1, 2 streams x 16 tokens, few requests")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="rillet's (and the seed's) --dtype (default auto: rillet's own best; with the default "
                             "GGUF its Q4_1 blocks run as they are with bf16 activations)")
    add_isa_argument(parser)
    add_prompt_argument(parser)
    parser.add_argument("--peers-isa", default="same", choices=("same", "native", "avx2"),
                        help="hold vLLM to this ISA: same (default): what --rillet-isa says (avx2: "
                             "ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, vLLM's AVX2 kernels, float32); "
                             "native: its best on this CPU whatever rillet runs. llama.cpp runs its build")
    parser.add_argument("--model", default=None,
                        help="model for rillet and the seed (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="context of vLLM and llama.cpp (default 2048)")
    parser.add_argument("--skip-rillet", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--vllm-python", type=Path, default=None,
                        help=f"interpreter of a venv with vllm-cpu (default {DEFAULT_VLLM_PYTHON} when it exists)")
    parser.add_argument("--vllm-model", type=Path, default=None,
                        help="Hugging Face directory for vLLM (default: rillet's converted directory of --model)")
    parser.add_argument("--vllm-dtype", default="best", choices=("best", "float32", "bfloat16", "float16"),
                        help="vLLM's --dtype, chosen apart from rillet's: best (default) = bfloat16 where the CPU "
                             "has native bf16 (AVX512-BF16/AMX) and the run is not an AVX2 stand-in, else float32")
    parser.add_argument("--vllm-cores", default="all",
                        help="comma list of vLLM thread bindings to run: all (default: compute threads on every "
                             "core, VLLM_CPU_OMP_THREADS_BIND=0-<n-1>, none reserved), auto (vLLM's own default: "
                             "on a small machine one core reserved for its frontend); with several, each level "
                             "is compared with the fastest")
    parser.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (default 2)")
    parser.add_argument("--vllm-env", action="append", default=[], help="KEY=VALUE for vLLM's environment (repeatable)")
    parser.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM server argument (repeatable)")
    parser.add_argument("--llamacpp-python", type=Path, default=None,
                        help="interpreter of a venv with llama-cpp-python[server] "
                             f"(default {DEFAULT_LLAMACPP_PYTHON} when it exists)")
    parser.add_argument("--llamacpp-gguf", type=Path, default=None,
                        help="GGUF for llama.cpp (default: the one rillet serves)")
    parser.add_argument("--llamacpp-threads", type=int, default=None,
                        help="llama.cpp --n_threads / --n_threads_batch (default: every core this process may use)")
    parser.add_argument("--llamacpp-arg", action="append", default=[], help="extra llama_cpp.server argument")
    parser.add_argument("--with-seed", action="store_true", help="also run benchmarks/baselines/seed_server.py")
    parser.add_argument("--seed-concurrency", type=parse_levels, default=None,
                        help="levels for the seed only (it is slow at 32 x 128)")
    parser.add_argument("--rillet-arg", action="append", default=[],
                        help="extra `rillet serve` argument (repeatable), e.g. --rillet-arg=--quantization=none")
    parser.add_argument("--sample-tokens", type=int, default=32, help="tokens of the greedy sample answer (0: none)")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to start")
    parser.add_argument("--request-timeout", type=float, default=900.0, help="seconds one request may take")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/bench_peers.json)")
    args = parser.parse_args(argv)

    args.concurrency = args.concurrency or ([1, 2] if args.quick else [1, 16, 32])
    args.max_tokens = args.max_tokens or (16 if args.quick else 128)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.min_requests = args.min_requests or (2 if args.quick else 16)
    args.log_dir = RESULTS_DIR / "logs"
    args.log_dir.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS_DIR / ("bench_peers.quick.json" if args.quick else "bench_peers.json")
    vllm_cores = [c.strip() for c in args.vllm_cores.split(",") if c.strip()]
    if unknown := [c for c in vllm_cores if c not in VLLM_CORE_CHOICES]:
        parser.error(f"--vllm-cores: unknown {unknown}; choose from {', '.join(VLLM_CORE_CHOICES)}")

    run = BenchRun.begin(parser, args.dtype, args.rillet_isa)
    info = run.info
    run_isa = info["rillet_cpu_isa"].get("selected")
    peers_isa = peers_isa_of(args)
    kind = bars_kind(run_isa)
    vllm_dtype = best_vllm_dtype(peers_isa) if args.vllm_dtype == "best" else args.vllm_dtype
    warnings = run.warnings
    if peers_isa != (args.rillet_isa if args.rillet_isa in ISA_ENV else None):
        warnings.append(f"rillet runs {run_isa} but vLLM is held to {peers_isa or 'its native best'}: "
                        "the two do not stand on the same instruction set")
        log(f"warning: {warnings[-1]}")
    resolved = resolve_model(args.model)
    model_dir, model_name = Path(resolved.path), resolved.name
    notes: list[str] = []
    results: dict[str, dict] = {}

    def attempt(name: str, fn, *fargs) -> None:
        try:
            results[name] = fn(*fargs)
        except Exception as exc:  # noqa: BLE001 - one failing peer should not lose the others' numbers
            log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            results[name] = {"system": name, "error": f"{type(exc).__name__}: {str(exc)[:3000]}"}

    if not args.skip_rillet:
        attempt("rillet", bench_rillet, args)

    vllm_python = peer_python("vLLM", args.vllm_python, DEFAULT_VLLM_PYTHON, "vllm", args.skip_vllm, notes,
                              "see benchmarks/README.md, 'bench_peers.py', for the separate venv")
    if vllm_python is not None:
        vllm_model = args.vllm_model or model_dir
        for cores in vllm_cores:
            attempt(vllm_name(cores), bench_vllm, args, vllm_python, cores, vllm_model, vllm_dtype, peers_isa)

    llamacpp_python = peer_python("llama.cpp", args.llamacpp_python, DEFAULT_LLAMACPP_PYTHON, "llama_cpp",
                                  args.skip_llamacpp, notes,
                                  "a venv with llama-cpp-python[server]; see benchmarks/README.md")
    llamacpp_build: dict = {}
    if llamacpp_python is not None:
        llamacpp_build = llamacpp_build_info(llamacpp_python)
        if mismatch := llamacpp_build_mismatch(llamacpp_build, run_isa):
            warnings.append(mismatch)
            log(f"warning: {mismatch}")
        gguf = args.llamacpp_gguf or (Path(args.model) if args.model and args.model.endswith(".gguf")
                                      else default_gguf_path())
        attempt("llama.cpp", bench_llamacpp, args, llamacpp_python, gguf, model_dir, llamacpp_build)

    if args.with_seed:
        attempt("seed server", bench_seed, args)
    for note in notes:
        log(note)

    measured = {k: v for k, v in results.items() if "levels" in v}
    comp = comparisons(measured, args.concurrency, kind)
    text, markdown = render(measured, comp)
    peers_note = (f"rillet {'forced' if args.rillet_isa else 'native'}"
                  + (", torch/oneDNN held to it" if args.rillet_isa in ISA_ENV else "")
                  + (f"; vLLM {peers_isa + ' stand-in' if peers_isa else 'native'} {vllm_dtype}"
                     if any(k.startswith("vllm") for k in results) else "")
                  + (f"; llama.cpp build {'/'.join(s for s in llamacpp_build.get('simd', []) if s.startswith('AVX'))}"
                     if llamacpp_build.get("simd") else ""))
    header = header_line(info, run_isa, peers_note)
    payload = {
        "benchmark": "bench_peers",
        "description": "Streaming chat over loopback HTTP, one server at a time, each peer in its best configuration "
                       "for the CPU: rillet serve vs vLLM (separate venv) and llama-cpp-python (separate venv), "
                       "optionally the seed server; forced-length greedy requests through rillet.bench.loadgen, "
                       "warm-up on prompts that are never measured.",
        "header": header,
        "settings": {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "rounds": args.rounds,
                     "min_requests": args.min_requests, "rillet_dtype": args.dtype, "vllm_dtype": vllm_dtype,
                     "rillet_isa": run_isa, "rillet_isa_forced": args.rillet_isa, "rillet_isa_env": isa_env(args.rillet_isa),
                     "peers_isa": peers_isa or "native", "vllm_isa_env": vllm_standin_env(peers_isa),
                     "bars_for": kind, "temperature": 0.0,
                     "model": args.model or f"default ({model_name})", "model_dir": str(model_dir),
                     "vllm_cores": vllm_cores, "vllm_python": str(vllm_python) if vllm_python else None,
                     "llamacpp_python": str(llamacpp_python) if llamacpp_python else None,
                     "llamacpp_build": llamacpp_build or None, "quick": args.quick,
                     "prompts": list(PROMPTS), "distinct_prompts": not args.repeat_prompts,
                     "warmup_prompts": list(WARMUP_PROMPTS)},
        "comparisons": comp,
        "results": results,
        "notes": notes,
    }
    run.finish(payload, out)

    print(f"\nbench_peers: {info['cpu_model']} ({info['cpu_cores']} cores), rillet --dtype {args.dtype}, "
          f"vLLM --dtype {vllm_dtype}, levels {','.join(map(str, args.concurrency))}, {args.max_tokens} forced "
          f"tokens, max({args.min_requests}, {args.rounds} x streams) requests per level\n")
    for name, res in results.items():
        if "levels" in res:
            print(f"- {name} {res.get('version') or ''}: ready after {res['startup_s']} s")
        else:
            print(f"- {name}: FAILED: {res['error'].splitlines()[0][:300]}")
    if results.get("rillet", {}).get("engine_ready"):
        print(f"- rillet: {results['rillet']['engine_ready'].split('engine ready: ', 1)[-1]}")
    if llamacpp_build.get("simd"):
        print(f"- llama.cpp build: {' '.join(llamacpp_build['simd'])}")
    for note in notes:
        print(f"- {note}")
    print()
    print(header)
    print(text)
    print()
    print(render_bars(comp))
    print("\nMarkdown:\n")
    print(header + "\n")
    print(markdown)
    print()
    print(render_bars(comp))
    samples = {k: v["sample"] for k, v in measured.items() if v.get("sample")}
    if samples:
        print("\nGreedy sample answers (same weights, so they should read alike):")
        for name, s in samples.items():
            print(f"- {name}: {s.get('text', s.get('error'))!r}")
    print(f"\nJSON: {out}")
    run.print_warnings()
    failed = sum(r["failed"] for v in measured.values() for r in v["levels"].values())
    broken = [k for k, v in results.items() if "error" in v]
    if failed or broken:
        print(f"warning: {failed} request(s) failed, systems failed: {broken or 'none'}; see the JSON and "
              f"{args.log_dir}", file=sys.stderr)
    return 1 if failed or broken else 0


if __name__ == "__main__":
    sys.exit(main())
