"""What the engine yields: one delta per choice per step, the last one with a finish_reason."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, token, logprob)


@dataclass
class RequestOutput:
    """New tokens of one choice since the previous output of that choice.

    `text` is the new text only: concatenating every delta of a choice gives its full text.
    `finish_reason` is set on the last delta of a choice: "stop", "length", "abort" or "error".
    """

    request_id: str
    index: int  # choice index, 0..n-1
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int  # cumulative for this choice
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
