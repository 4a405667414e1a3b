"""Configuration, declared once.

Each field carries its help text and bounds in `metadata`; `rillet.cli` derives the
command-line flags (`--max-num-seqs`) and environment variables (`RILLET_MAX_NUM_SEQS`)
from these declarations, so flags, env vars and `--help` never drift apart.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           choices: tuple[str, ...] | None = None, factory: Any = None) -> Any:
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_bounds(config: Any) -> None:
    """Raise ValueError naming the first field outside its declared bounds or choices."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        lo, hi, choices = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
            if lo is not None and value < lo:
                raise ValueError(f"{f.name} must be >= {lo}, got {value!r}")
            if hi is not None and value > hi:
                raise ValueError(f"{f.name} must be <= {hi}, got {value!r}")


@dataclass
class EngineConfig:
    model: str | None = option(None, "Model: a local Hugging Face directory, a .gguf file, or a hub id. "
                               "Default: the embedded SmolLM2-135M-Instruct.")
    served_model_name: str | None = option(None, "Name the APIs report for the model (default: derived from --model).")
    dtype: str = option("auto", "Activation (and unquantized weight) dtype. auto: bfloat16 on a GPU that "
                        "supports it and on any CPU where rillet's C kernels build, else float32.",
                        choices=("auto", "float32", "bfloat16", "float16"))
    quantization: str = option("auto", "Weight format on the CPU. auto: a GGUF file's quantized blocks run as they "
                               "are (Q4_0/Q4_1/Q4_K as 4-bit, Q8_0/Q6_K as int8) with bfloat16 activations, "
                               "other checkpoints in --dtype. int8 / q4: quantize the linear weights at load "
                               "(int8 per 32 inputs; 4-bit with a scale and min per 32, the output head in "
                               "int8). none: every weight in --dtype.",
                               choices=("auto", "none", "int8", "q4"))
    device: str = option("auto", "Where to run: auto (cuda when available), cpu, cuda or cuda:N.")
    tensor_parallel_size: int = option(1, "Split the model across this many GPUs (or CPU processes), Megatron-style: "
                                       "each holds a slice of every layer's heads and MLP and of the "
                                       "vocabulary; one worker process per extra rank, NCCL between GPUs, "
                                       "shared memory (x86) or gloo between CPU processes. Needs float weights "
                                       "and heads divisible by it.", min=1, max=64)
    max_model_len: int | None = option(None, "Longest prompt + output in tokens (default: the model's, capped at 8192).",
                                       min=16, max=1_048_576)
    max_num_seqs: int = option(32, "Most requests generating at once (batch size of a decode step).", min=1, max=1024)
    max_num_batched_tokens: int = option(512, "Token budget of one engine step; long prompts are prefilled in "
                                         "chunks of at most this size so running streams keep flowing.",
                                         min=16, max=65536)
    kv_cache_gib: float | None = option(None, "KV cache size in GiB (default: room for max_num_seqs full-length "
                                        "sequences, capped at 4 GiB on CPU).", min=0.001, max=4096)
    block_size: int = option(16, "Tokens per KV cache block.", min=1, max=1024)
    enforce_eager: bool = option(False, "On a CUDA GPU, run every step eagerly instead of replaying CUDA graphs "
                                 "(captured at start: decode steps for padded batch sizes up to max_num_seqs, "
                                 "steps with prompts for padded token counts up to max_num_batched_tokens, "
                                 "2048 at most). Slower; for debugging, or to start faster.")
    scheduler_delay_factor: float | None = option(
        None, "While others decode, new prompts wait until the oldest has waited this many times the last "
        "prompt step's duration (or enough wait to fill the batch), so that prompts arriving one by one "
        "are taken in together (as vLLM's --scheduler-delay-factor). Default: 1 where decode steps replay "
        "CUDA graphs (a step that takes in a prompt runs eagerly and costs several decode steps), else 0.",
        min=0, max=100)
    enable_prefix_caching: bool = option(True, "Reuse the KV cache of prompt prefixes seen before (shared system "
                                         "prompts, multi-turn chats) instead of recomputing them: a much "
                                         "lower TTFT for long shared prefixes. On the CPU in bfloat16 the "
                                         "answer is the same token for token as without it (see "
                                         "models/llama.attend).")
    max_waiting: int | None = option(256, "Most requests queued for a slot; beyond it new requests are refused "
                                     "at once (HTTP 429).", min=0, max=1_000_000)
    queue_timeout_s: float = option(120.0, "A request that waits longer than this for a slot ends with an error.",
                                    min=0.001, max=86400)
    max_stream_events_per_s: float = option(
        8000.0, "Streamed deltas per second that all streams together get at most, under load: a stream's "
        "next delta waits until (running streams / this) seconds after its last one and carries every token "
        "made meanwhile; the first and the last never wait. A client parses every event, and at hundreds of "
        "streams a token each outruns most clients; a lone stream still gets a delta every engine step. "
        "0: a delta every step whatever the load.", min=0, max=1e9)
    seed: int = option(0, "Seed of the global generator used by unseeded sampling requests.")
    num_threads: int | None = option(None, "Torch CPU threads (default: all cores for offline LLM and an engine "
                                     "process; all but one for an engine thread, leaving a core to the event "
                                     "loop).", min=1, max=1024)
    engine_process: bool | None = option(None, "Run the engine loop in its own process, with every CPU core and its "
                                         "own GIL, apart from the HTTP event loop (as vLLM does); otherwise in "
                                         "a thread. Default: on for `rillet serve`, off for AsyncEngine in a "
                                         "program.")

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class ServerConfig:
    host: str = option("127.0.0.1", "Address to listen on.")
    port: int = option(8000, "Port to listen on.", min=0, max=65535)
    api_key: str | None = option(None, "If set, every /v1 and /api route (and /tokenize, /detokenize) needs "
                                 "'Authorization: Bearer KEY'.")
    allowed_origins: list[str] = option(None, "Origins allowed by CORS (comma-separated; '*' for any).",
                                        factory=list)
    max_request_bytes: int = option(4 * 1024 * 1024, "Largest request body accepted (HTTP 413 beyond).",
                                    min=1024, max=1 << 31)
    drain_timeout_s: float = option(30.0, "On SIGTERM, how long running streams may finish before they are "
                                    "ended with an error event.", min=0, max=3600)
    stream_stall_timeout_s: float = option(30.0, "A stream whose client stops reading (its socket stays full) "
                                           "is ended after this many seconds of blocked sending and its "
                                           "request aborted; 0 turns this off.", min=0, max=86400)
    send_buffer_bytes: int | None = option(None, "Kernel send buffer of each client connection (SO_SNDBUF; default: "
                                           "the OS's autotuning). Smaller bounds the memory a client that stops "
                                           "reading pins before --stream-stall-timeout-s starts counting.",
                                           min=4096, max=1 << 28)
    api_servers: int | None = option(None, "HTTP server processes sharing the one engine core, on one listening "
                                     "socket (as vLLM's --api-server-count): each takes its connections' "
                                     "tokenizing, routing of outputs and SSE framing, which one Python process "
                                     "cannot keep up with at hundreds of streams on a GPU. Default: 1 on a CPU; "
                                     "on a GPU one per 4 CPU cores, 4 at most.", min=1, max=64)
    log_level: str = option("info", "Log level.", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        if isinstance(self.allowed_origins, str):
            self.allowed_origins = [o.strip() for o in self.allowed_origins.split(",") if o.strip()]
        check_bounds(self)
