"""What the engine yields: one delta per choice per step, the last one with a finish_reason.

A consumer that falls behind gets the deltas that piled up meanwhile as one (`merged`), as vLLM's
output collector does: under load each chunk of a stream carries several tokens instead of the
event loop, the HTTP layer and the client paying per token for a backlog."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from operator import attrgetter


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

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # the engine process sends every step's outputs over a pipe: fields in order, without the
        # per-object dict a dataclass pickles by default (about half the bytes and the time)
        return (RequestOutput, _field_values(self))


_field_values = attrgetter(*(f.name for f in fields(RequestOutput)))  # every field, in __init__'s order


def output_rows(outputs: list[RequestOutput]) -> list[tuple[object, ...]]:
    """Each output as the tuple of its fields, in __init__'s order: a step's outputs pickle as
    plain tuples, in C, ~2x faster than through one __reduce__ call per object."""
    return [_field_values(out) for out in outputs]


def outputs_from_rows(rows: list[tuple[object, ...]]) -> list[RequestOutput]:
    return [RequestOutput(*row) for row in rows]  # type: ignore[arg-type]


def merged(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One delta for two successive deltas of the same choice (`first` not finished): texts,
    token ids and logprobs joined; counts, finish and stop reasons, error from `then`."""
    logprobs = None
    if first.logprobs is not None or then.logprobs is not None:
        logprobs = (first.logprobs or []) + (then.logprobs or [])
    return RequestOutput(
        request_id=then.request_id, index=then.index, text=first.text + then.text,
        token_ids=first.token_ids + then.token_ids, num_prompt_tokens=then.num_prompt_tokens or first.num_prompt_tokens,
        num_output_tokens=then.num_output_tokens, finish_reason=then.finish_reason, stop_reason=then.stop_reason,
        logprobs=logprobs, error=then.error, num_cached_tokens=max(first.num_cached_tokens, then.num_cached_tokens))
