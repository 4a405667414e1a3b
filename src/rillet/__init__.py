"""rillet: a streaming LLM inference server with a continuous-batching engine.

Public API: LLM, SamplingParams, ChatPrompt, AsyncEngine, EngineConfig, ServerConfig, Client, AsyncClient.
Heavy modules (torch, httpx) are imported on first use so `rillet --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# ideep (oneDNN under torch's CPU bf16 linears) caches one primitive per input shape (~0.8 MB
# each here), 1024 by default. The packed linears run at bucketed row counts
# (models/cpu_linear.bucket_rows), so the default model needs at most 4 x 64 + 32 = 288 shapes;
# 384 keeps them all hot and bounds the memory. It is read when torch loads, so it is set here,
# before rillet imports torch.
os.environ.setdefault("LRU_CACHE_CAPACITY", "384")


def _keep_onednn_off_amx() -> None:
    """oneDNN's AMX kernels sum a bf16 matmul's products in an order that depends on the
    matrix's width (on a Xeon with AMX, a prompt row's attention changed with its batch mates'
    masked padding), which would make a request's tokens depend on what else runs; its AVX-512
    kernels do not. rillet's projections run on its own kernels either way, so only the prompt
    attention's matmuls (and the no-compiler path) lose AMX. Read when oneDNN first runs, so it
    is set here, before rillet runs anything; a user's ONEDNN_MAX_CPU_ISA wins."""
    from rillet.models.cpu_isa import cpu_flags, machine

    if machine() == "x86_64" and "amx_bf16" in cpu_flags():  # elsewhere the flags may cost a subprocess (macOS)
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_FP16")


_keep_onednn_off_amx()

__version__ = "0.1.0"

_LAZY = {
    "LLM": "rillet.llm",
    "SamplingParams": "rillet.sampling_params",
    "ChatPrompt": "rillet.engine.prompts",
    "AsyncEngine": "rillet.engine.async_engine",
    "RequestOutput": "rillet.engine.outputs",
    "EngineConfig": "rillet.config",
    "ServerConfig": "rillet.config",
    "Client": "rillet.client",
    "AsyncClient": "rillet.client",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rillet' has no attribute {name!r}")
