"""Per-sequence grammar state and the token masks it puts on the logits.

A `Guide` follows one sequence's output through its grammar (an llguidance matcher). Each step
the engine asks `MaskFiller` for the masks of the constrained sequences that sample; it fills
them on a worker thread while the forward pass runs (llguidance releases the GIL, and the
tokens a mask depends on were all sampled in earlier steps), and the sampler applies them to
the logits (`apply_token_bitmask_`) after logit bias and penalties, before temperature and
truncation. Greedy constrained rows on the CPU take no mask: the sampler checks their best
tokens with `Guide.allows` (engine/sampler.py, `Sampler._grammar_picks`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np
import torch

from rillet.structured.grammar import CompiledGrammar

BITS = 32  # llguidance's masks: bit j of int32 word w allows token 32 * w + j


class Guide:
    """The grammar state of one sequence. `error` is set (and stays) once the matcher fails: the
    engine then ends the request with that error, never the engine."""

    def __init__(self, compiled: CompiledGrammar):
        self.matcher = compiled.new_matcher()
        self.vocab_size = compiled.vocab_size
        self.error: str | None = None

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts `token` next, without consuming it (under a microsecond;
        an id past the tokenizer's vocabulary is refused here: the matcher would fail on it).
        The same answer as the mask's only where no bytes are `forced`."""
        return 0 <= token < self.vocab_size and self.matcher.validate_tokens([token]) == 1

    def forced(self) -> bool:
        """Whether the grammar forces the next bytes (a JSON key, a separator). The mask then
        allows only the canonical tokens of those bytes (`{"` but not `{`), which `allows` does
        not know; such masks are cheap (~40 us)."""
        return bool(self.matcher.compute_ff_bytes())

    def allowed_ids(self) -> np.ndarray:
        """Every token the grammar accepts next, ascending: the whole mask, computed now."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.int32)
        return allowed_token_ids(words, self.vocab_size)

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and allows nothing more (not even text before an EOS)."""
        return self.matcher.is_stopped()

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False (with `error` set) if the grammar rejects it."""
        if self.error is None and not self.matcher.consume_token(token):
            self.error = self.matcher.get_error() or f"token {token} is not allowed here"
        return self.error is None

    def check_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """After its mask was filled into `bitmask[row]`: a matcher that failed there gets `error`
        and an all-allowed row, so its logits stay finite until the engine ends its request."""
        if self.failed():
            bitmask[row].fill_(-1)

    def failed(self) -> bool:
        """Whether the matcher has failed (`error` is then set, and the engine ends the request)."""
        if self.error is None and self.matcher.is_error():
            self.error = self.matcher.get_error()
        return self.error is not None


class PendingMasks:
    """A step's masks being filled; `result()` waits for them (the int32 bitmask [R, words])."""

    def __init__(self, future: Future[None], bitmask: torch.Tensor, guides: list[Guide]):
        self._future, self._bitmask, self._guides = future, bitmask, guides

    def result(self) -> torch.Tensor:
        self._future.result()
        for row, guide in enumerate(self._guides):
            guide.check_mask(self._bitmask, row)
        return self._bitmask


class MaskFiller:
    """Fills a step's masks on one worker thread, so the work overlaps the forward pass. The
    worker makes one call into llguidance for the whole batch, which runs without the GIL: it
    never holds up the engine thread, whose forward pass needs the GIL between kernels (a Python
    loop over the rows there cost ~2 ms a step in GIL hand-offs at 16 streams on 2 cores)."""

    def __init__(self, vocab_size: int):
        self.num_words = -(-vocab_size // BITS)
        self._pool: ThreadPoolExecutor | None = None
        self._executor = llguidance.LLExecutor(num_threads=1)  # one thread: the cores are the forward's

    def start(self, guides: list[Guide]) -> PendingMasks:
        """Begin filling the bitmasks [len(guides), num_words] of `guides`, in that order. The
        guides must not be touched until the result is taken."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rillet-mask")
        bitmask = torch.empty((len(guides), self.num_words), dtype=torch.int32)
        work = [(guide.matcher, row) for row, guide in enumerate(guides) if guide.error is None]
        future = self._pool.submit(self._fill, work, bitmask)
        return PendingMasks(future, bitmask, guides)

    def _fill(self, work: list, bitmask: torch.Tensor) -> None:
        if work:  # llguidance refuses an empty batch
            self._executor.unsafe_compute_mask_ptr(work, bitmask.data_ptr(), self.num_words * 4, bitmask.shape[0])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def forbidden_tokens(bitmask: torch.Tensor) -> torch.Tensor:
    """An int32 bitmask [R, words] (on the host; bit j of word w allows id 32 * w + j) as a bool
    tensor [R, 32 * words], True where a token is NOT allowed. numpy unpacks it (~0.1 ms for 32
    rows; torch's shift-and-mask over [R, words, 32] took 30-140 ms); bytes and bits are
    little-endian, as llguidance writes them on every host rillet runs on."""
    inverted = np.invert(bitmask.contiguous().numpy().view(np.uint8))
    bits = np.unpackbits(inverted, axis=1, bitorder="little")  # 0/1 bytes: reinterpreted as bool
    return torch.from_numpy(bits).view(torch.bool)


@torch.inference_mode()
def apply_token_bitmask_(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in place, every token the bitmask [len(rows), words] forbids in the given
    `rows` of `logits` [B, V], and return `logits`. Ids at or past 32 * words (a model
    vocabulary wider than the tokenizer's) are forbidden too; other rows are not touched. In
    place under inference mode because the model's logits are inference tensors, and a copy of
    the whole batch would cost the free rows too. Works on any device."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return _apply_bitmask_numpy(logits, rows, bitmask)
    return _apply_bitmask_torch(logits, rows, bitmask)


def _apply_bitmask_torch(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """apply_token_bitmask_ on any device: every bit unpacked, the rows masked by torch ops."""
    V = logits.shape[1]
    forbidden = forbidden_tokens(bitmask).to(logits.device, non_blocking=True)
    width = min(V, forbidden.shape[1])
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    view = logits[:, :width]
    view.index_copy_(0, index, view.index_select(0, index).masked_fill_(forbidden[:, :width], -float("inf")))
    if V > width:
        logits[:, width:].index_fill_(0, index, -float("inf"))
    return logits


_BIT = np.arange(BITS)


def allowed_token_ids(words: np.ndarray, width: int) -> np.ndarray:
    """The ids (ascending, below `width`) that one row's int32 mask words allow."""
    some = np.flatnonzero(words)  # words that allow any of their tokens
    bits = np.unpackbits(words[some].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    ids = (some[:, None] * BITS + _BIT)[bits == 1]
    return ids[ids < width]


def _apply_bitmask_numpy(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """apply_token_bitmask_ for float32 logits on the host, touching only the words that matter:
    inside a JSON string nearly every word allows all 32 of its tokens (-1), so only the others
    are unpacked; between JSON tokens a handful of tokens are allowed, so the row is set to -inf
    and those few put back. 0.1-0.15 ms for 8 of 16 rows of a 49k vocabulary, where unpacking
    every bit and masking through torch took ~0.5 ms, on the engine's critical path."""
    view = logits.numpy()  # shares the tensor's memory
    words = bitmask.contiguous().numpy()
    width = min(view.shape[1], BITS * words.shape[1])
    for i, r in enumerate(rows):
        row, row_words = view[r], words[i]
        row[width:] = -np.inf
        partial = np.flatnonzero(row_words != -1)  # words that forbid any of their tokens
        if partial.size * 4 <= row_words.size:
            bits = np.unpackbits(row_words[partial].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
            ids = (partial[:, None] * BITS + _BIT)[bits == 0]
            row[ids[ids < width]] = -np.inf
        else:
            allowed = allowed_token_ids(row_words, width)
            kept = row[allowed]
            row[:width] = -np.inf
            row[allowed] = kept
    return logits
