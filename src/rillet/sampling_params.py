"""Per-request sampling parameters (plain dataclass; the engine never sees HTTP schemas)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rillet.structured.spec import StructuredOutputs

MAX_LOGPROBS = 20
MAX_N = 16
MAX_STOP_STRINGS = 64
MAX_STOP_LENGTH = 1024
# A seed is a signed 64-bit integer, as OpenAI's and vLLM's APIs take it (torch.long); the
# sampler seeds choice i with seed + i, which torch generators accept (they take 64 bits unsigned).
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1


@dataclass
class SamplingParams:
    """How to pick tokens for one request. `validate()` raises ValueError naming the bad field."""

    max_tokens: int | None = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # vLLM's: no EOS or stop token is sampled, and no stop string ends the output, before this many
    # output tokens (the context's end still does)
    min_tokens: int = 0
    include_stop_str_in_output: bool = False  # vLLM's: the stop string (or stop token's text) ends the text
    n: int = 1
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus top-k alternatives
    skip_special_tokens: bool = True
    structured: StructuredOutputs | None = None  # constrain the output (JSON schema, regex, ...)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def holds_ends(self, num_output_tokens: int) -> bool:
        """Whether the next token may not end the output yet (min_tokens not reached)."""
        return num_output_tokens < self.min_tokens

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        def finite(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
            return float(value)

        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", "must be an integer >= 1")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be at most max_tokens ({self.max_tokens})")
        if not 0.0 <= finite("temperature") <= 100.0:
            raise bad("temperature", "must be in [0, 100]")
        if not 0.0 < finite("top_p") <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (or -1 for off)")
        if not 0.0 <= finite("min_p") <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise bad("seed", f"must be a 64-bit integer (from {SEED_MIN} to {SEED_MAX})")
        if not 0.0 < finite("repetition_penalty") <= 10.0:
            raise bad("repetition_penalty", "must be in (0, 10]")
        if not -2.0 <= finite("frequency_penalty") <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not -2.0 <= finite("presence_penalty") <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        for token_id, bias in self.logit_bias.items():
            if token_id < 0 or not math.isfinite(bias) or abs(bias) > 100:
                raise ValueError(f"logit_bias entries must map token ids >= 0 to values in [-100, 100], got {token_id}: {bias}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"stop strings must be non-empty strings of at most {MAX_STOP_LENGTH} characters")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be integers >= 0")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be an integer in [1, {MAX_N}]")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutputs):
                raise ValueError("structured must be a rillet.structured.StructuredOutputs")
            self.structured.validate()
            if self.min_tokens:  # a finished grammar allows only EOS, which min_tokens would forbid
                raise ValueError("min_tokens cannot be combined with structured output")
