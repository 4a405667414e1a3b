"""Per-sequence grammar state and the token masks it puts on the logits.

A `Guide` follows one sequence's output through its grammar (an llguidance matcher). Each step
the engine asks `MaskFiller` for the masks of the constrained sequences that sample; it fills
them on a worker thread while the forward pass runs (llguidance releases the GIL, and the
tokens a mask depends on were all sampled in earlier steps), and the sampler adds them to the
logits (`apply_token_bias_`) after logit bias and penalties, before temperature and truncation.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from rillet.structured.grammar import CompiledGrammar

BITS = 32  # llguidance's masks: bit j of int32 word w allows token 32 * w + j


class Guide:
    """The grammar state of one sequence. `error` is set (and stays) once the matcher fails: the
    engine then ends the request with that error, never the engine."""

    def __init__(self, compiled: CompiledGrammar):
        self.matcher = compiled.new_matcher()
        self.error: str | None = None

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and allows nothing more (not even text before an EOS)."""
        return self.matcher.is_stopped()

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False (with `error` set) if the grammar rejects it."""
        if self.error is None and not self.matcher.consume_token(token):
            self.error = self.matcher.get_error() or f"token {token} is not allowed here"
        return self.error is None

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32, CPU, contiguous). A matcher
        that fails here gets an all-allowed row, so its logits stay finite until the engine ends it."""
        target = bitmask[row]
        if self.error is None:
            self.matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())
            if self.matcher.is_error():
                self.error = self.matcher.get_error()
        if self.error is not None:
            target.fill_(-1)


class MaskFiller:
    """Fills a step's masks on one worker thread, so the work overlaps the forward pass."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.num_words = -(-vocab_size // BITS)
        self.pin = device.type == "cuda"  # a pinned host buffer copies to the GPU asynchronously
        self._pool: ThreadPoolExecutor | None = None

    def start(self, guides: list[Guide]) -> Future[torch.Tensor]:
        """Begin computing the masks of `guides`, in that order, as an additive bias
        [len(guides), 32 * num_words] (see bitmask_to_bias). The guides must not be touched until
        the future is done."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rillet-mask")
        return self._pool.submit(self._fill, list(guides))

    def _fill(self, guides: list[Guide]) -> torch.Tensor:
        bitmask = torch.empty((len(guides), self.num_words), dtype=torch.int32)
        for row, guide in enumerate(guides):
            guide.fill(bitmask, row)
        bias = bitmask_to_bias(bitmask)  # here too, off the sampler's path
        return bias.pin_memory() if self.pin else bias

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


_BIAS_OF_BIT = np.array([-np.inf, 0.0], dtype=np.float32)


def bitmask_to_bias(bitmask: torch.Tensor) -> torch.Tensor:
    """An int32 bitmask [R, words] (on the host) as an additive bias [R, 32 * words]: 0 where a
    token is allowed, -inf where not. numpy unpacks it (~0.1 ms for 32 rows; torch's
    shift-and-mask over [R, words, 32] took 30-140 ms); bytes and bits are little-endian, as
    llguidance writes them on every host rillet runs on."""
    bits = np.unpackbits(bitmask.contiguous().numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(_BIAS_OF_BIT[bits])


@torch.inference_mode()
def apply_token_bias_(logits: torch.Tensor, rows: list[int], bias: torch.Tensor) -> torch.Tensor:
    """Add `bias` (from bitmask_to_bias) to the given `rows` of `logits` [B, V], in place, and
    return `logits`. Ids at or past the bias width (a model vocabulary wider than the
    tokenizer's) become -inf in those rows; other rows are not touched. In place under inference
    mode because the model's logits are inference tensors, and a copy of the whole batch would
    cost the free rows too. Works on any device."""
    V, width = logits.shape[1], bias.shape[1]
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    bias = bias.to(logits.device, non_blocking=True)
    logits[:, :width].index_add_(0, index, bias[:, :V])
    if V > width:
        logits[:, width:].index_fill_(0, index, -float("inf"))
    return logits


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """`apply_token_bias_` from an int32 bitmask [len(rows), words] (bit j of word w allows id
    32 * w + j)."""
    return apply_token_bias_(logits, rows, bitmask_to_bias(bitmask))
