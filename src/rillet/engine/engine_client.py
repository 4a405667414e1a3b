"""EngineClient: what the HTTP server needs from an engine, and nothing more.

`AsyncEngine` satisfies it (in-thread or with its core in another process), and so does the
fake engine of the server tests; the type checker holds both to it. The server imports this
module only: it never reaches into `LLMEngine`, whose loop may run in another process.

- `add_request` validates and queues a request and returns its stream of output deltas. It
  raises ValueError (bad prompt or parameters, a structured-output spec that does not compile),
  PromptTooLongError (the prompt, or the prompt plus max_tokens, does not fit in
  max_model_len), QueueFullError, EngineDeadError or EngineNotReadyError
  (rillet.engine.errors).
- `health` is "stopped", "loading", "ready" or "dead" (then `dead_reason` says why).
- `model_name`, `max_model_len` and `tokenizer` raise EngineNotReadyError before `start()`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from rillet.config import EngineConfig
from rillet.engine.outputs import RequestOutput
from rillet.engine.prompts import Prompt
from rillet.sampling_params import SamplingParams

__all__ = ["EngineClient", "EngineRequest", "EngineStatsView", "Prompt"]


class EngineRequest(Protocol):
    """One request's outputs: async-iterate the deltas (every choice ends with a finish_reason;
    an engine failure raises); `abort()` ends it early (its choices finish with "abort")."""

    request_id: str
    num_prompt_tokens: int

    @property
    def finished(self) -> bool: ...

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def __anext__(self) -> RequestOutput: ...

    async def abort(self) -> None: ...


class EngineStatsView(Protocol):
    """The scheduler counters /metrics exports (rillet.engine.llm_engine.EngineStats has them)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    num_preemptions_total: int
    num_aborted_total: int
    prefix_cache_queries_total: int
    prefix_cache_hits_total: int
    backend: dict[str, str]  # device, dtype, weights, cpu_isa


class EngineClient(Protocol):
    # ---- lifecycle
    @property
    def health(self) -> str: ...

    dead_reason: str | None

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    # ---- model configuration
    config: EngineConfig

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def tokenizer(self) -> Any: ...  # a Hugging Face tokenizer (its chat_template, for /api/show)

    @property
    def vocab_size(self) -> int: ...  # the model's: the token ids a prompt may hold (/tokenize checks them too)

    # ---- requests
    async def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                          *, tools: list[dict[str, Any]] | None = None) -> EngineRequest: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStatsView: ...
