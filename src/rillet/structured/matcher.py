"""Per-sequence grammar state and the token masks it puts on the logits.

A `Guide` follows one sequence's output through its grammar (an llguidance matcher). Each step
the engine asks `MaskFiller` for the masks of the constrained sequences that sample; it fills
them on a worker thread while the forward pass runs (llguidance releases the GIL, and the
tokens a mask depends on were all sampled in earlier steps), and the sampler applies them with
`apply_token_bitmask` after logit bias and penalties, before temperature and truncation.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

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
        """Begin filling the masks [len(guides), num_words] of `guides`, in that order. The guides
        must not be touched until the future is done."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rillet-mask")
        return self._pool.submit(self._fill, list(guides))

    def _fill(self, guides: list[Guide]) -> torch.Tensor:
        bitmask = torch.empty((len(guides), self.num_words), dtype=torch.int32, pin_memory=self.pin)
        for row, guide in enumerate(guides):
            guide.fill(bitmask, row)
        return bitmask

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` [B, V] with the tokens each `bitmask` row forbids set to -inf in the matching
    `rows` of the batch; other rows are copied unchanged. Ids at or past 32 * bitmask width (a
    model vocabulary wider than the tokenizer's) are forbidden too. Works on any device; returns
    a new tensor (the model's logits may be inference tensors, which cannot change in place)."""
    V = logits.shape[1]
    mask = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(BITS, dtype=torch.int32, device=logits.device)
    allowed = ((mask[:, :, None] >> shifts) & 1).bool().flatten(1)  # [R, 32 * words]
    if allowed.shape[1] < V:
        allowed = torch.nn.functional.pad(allowed, (0, V - allowed.shape[1]), value=False)
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    masked = logits.index_select(0, index).masked_fill_(~allowed[:, :V], -float("inf"))
    return logits.index_copy(0, index, masked)
