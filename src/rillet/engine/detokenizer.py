"""Incremental detokenisation and stop strings.

Text is decoded over a short window of recent tokens (the prefix/read offsets of vLLM's
incremental detokenizer), so a character split across tokens (Chinese, emoji) is held back
until it is complete: no delta ever carries U+FFFD for half a character. Where the tokenizer is
a plain `tokenizers` one, its own `DecodeStream` (the same algorithm, in Rust) does this: ~0.7 us
a token against ~1.7 for two window decodes from Python, at hundreds of rows a step on a GPU
(as vLLM's fast incremental detokenizer does). Stop strings are
matched on the full output text; the last `max(len(stop)) - 1` characters are held back, so a
stop string is cut exactly and never half-streamed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tokenizers.decoders import DecodeStream  # tokenizers >= 0.21
from transformers import PreTrainedTokenizerBase

from rillet.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # earlier tokens decoded with new ones, for spacing rules of the tokenizer


class Decoded(Protocol):
    """What the detokenizer reads and writes of a choice: an engine Sequence (LLMEngine), or a
    front end's ChoiceText (AsyncEngine, which detokenizes for the core)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_text: str  # the full text so far (cut at a stop string)
    num_emitted_chars: int  # how much of it was handed out


@dataclass
class ChoiceText:
    """A front end's text of one choice, built from the token ids the core sends."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_text: str = ""
    num_emitted_chars: int = 0
    stopped: bool = False  # ended here at a stop string: the core's later outputs are dropped
    num_tokens: int = 0  # output tokens decoded so far (stop strings count from params.min_tokens)


@dataclass
class DecodeState:
    token_ids: list[int]  # prompt tail + outputs
    prefix_offset: int
    read_offset: int
    stop_holdback: int
    stream: DecodeStream | None = None  # the fast path: token_ids and the offsets unused


def _backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The `tokenizers.Tokenizer` behind `tokenizer` where transformers' decode (without clean-up)
    is exactly its decode; else None."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase as Base
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    kind = type(tokenizer)
    if not isinstance(tokenizer, TokenizersBackend) or kind._decode is not TokenizersBackend._decode \
            or kind.decode is not Base.decode:
        return None
    return tokenizer.backend_tokenizer


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, use_stream: bool = True) -> None:
        """use_stream=False: the window decodes even where DecodeStream could be used."""
        self.tokenizer = tokenizer
        self._states: dict[int, DecodeState] = {}
        # The `tokenizers` library's own decode (ids, skip_special_tokens): two decodes a token
        # through transformers' wrapper cost ~11 us each, the bound method itself ~1-2.
        self._backend = _backend(tokenizer)
        self._decode_ids: Callable[[list[int], bool], str] = \
            self._decode if self._backend is None else self._backend.decode
        self._streams = use_stream and self._backend is not None

    def start(self, seq: Decoded) -> None:
        tail = seq.prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]
        holdback = max((len(s) for s in seq.params.stop), default=1) - 1
        state = DecodeState(list(tail), 0, len(tail), holdback)
        if self._streams:
            state.stream = stream = DecodeStream(skip_special_tokens=seq.params.skip_special_tokens)
            for token_id in tail:  # context only: the prompt's text is not output
                stream.step(self._backend, token_id)
            state.token_ids = []
        self._states[id(seq)] = state

    def forget(self, seq: Decoded) -> None:
        self._states.pop(id(seq), None)

    def _decode(self, ids: list[int], skip: bool) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        if not isinstance(text, str):  # a list is the answer to a batch, never asked for here
            raise TypeError(f"the tokenizer decoded one sequence to {type(text).__name__}")
        return text

    def decode_token(self, token_id: int) -> str:
        """One token's text as the tokenizer's plain decode gives it (for logprobs)."""
        text = self.tokenizer.decode([token_id])
        if not isinstance(text, str):
            raise TypeError(f"the tokenizer decoded one token to {type(text).__name__}")
        return text

    def append(self, seq: Decoded, token_id: int | None, find_stops: bool = True) -> str | None:
        """Feed one new output token (None: none, only flush). Returns the stop string hit, if any
        (none looked for without `find_stops`: before min_tokens, or a stop token's own text)."""
        state = self._states[id(seq)]
        stream = state.stream
        if stream is not None:
            if token_id is not None and (text := stream.step(self._backend, token_id)) is not None:
                seq.output_text += text
        elif token_id is not None:
            state.token_ids.append(token_id)
            skip = seq.params.skip_special_tokens
            decode = self._decode_ids
            prefix = decode(state.token_ids[state.prefix_offset:state.read_offset], skip)
            full = decode(state.token_ids[state.prefix_offset:], skip)
            if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
                seq.output_text += full[len(prefix):]
                state.prefix_offset = state.read_offset
                state.read_offset = len(state.token_ids)
        if seq.params.stop and find_stops:
            return self._find_stop(seq, state)
        return None

    def _find_stop(self, seq: Decoded, state: DecodeState) -> str | None:
        # Only text not yet emitted (plus the held-back tail) can contain a new match.
        start = max(0, seq.num_emitted_chars - state.stop_holdback)
        best: tuple[int, str] | None = None
        for stop in seq.params.stop:
            pos = seq.output_text.find(stop, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        if best is None:
            return None
        pos, stop = best
        seq.output_text = seq.output_text[:pos + len(stop) if seq.params.include_stop_str_in_output else pos]
        return stop

    def take_delta(self, seq: Decoded, finished: bool) -> str:
        """Text that can be handed out now: all of it when finished, else all but the stop hold-back."""
        state = self._states.get(id(seq))
        end = len(seq.output_text)
        if not finished and state is not None and state.stop_holdback and seq.params.stop:
            end = max(seq.num_emitted_chars, end - state.stop_holdback)
        delta = seq.output_text[seq.num_emitted_chars:end]
        seq.num_emitted_chars = end
        return delta
