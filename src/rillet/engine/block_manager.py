"""KV-cache block bookkeeping: which fixed-size blocks each sequence owns (no torch).

With prefix caching, every full block is also known by a hash of its tokens and of all the
tokens before it. A new sequence whose prompt starts with blocks already in the cache (a shared
system prompt, the history of a multi-turn chat) attaches them instead of recomputing them.
Blocks nobody references any more keep their contents and stay findable until the space is
needed; they are then reused least-recently-freed first. Only full blocks are shared, and a
sequence only ever writes past its computed tokens, so a shared block is never written.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np

from rillet.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # blocks holding nothing reusable
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> prefix hash of its contents
        self._block_of: dict[int, int] = {}  # prefix hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with no reference
        self.num_cached_tokens_total = 0  # prompt tokens served from the cache
        self.num_queried_tokens_total = 0  # prompt tokens of every admitted sequence

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its first `num_tokens` positions have a slot."""
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError("out of KV cache blocks; call can_grow first")
        for _ in range(needed):
            seq.block_table.append(self._take_block())

    def _take_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # reuse the cached block freed longest ago; it can no longer be found
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.block_hashes = []

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, seq: Sequence, positions: np.ndarray) -> np.ndarray:
        """`slot` of each of `positions` at once."""
        blocks = np.asarray(seq.block_table)[positions // self.block_size]
        slots: np.ndarray = blocks * self.block_size + positions % self.block_size
        return slots

    # ---- prefix caching -------------------------------------------------------------------

    def _block_tokens(self, tokens: list[int], index: int) -> tuple[int, ...]:
        return tuple(tokens[index * self.block_size:(index + 1) * self.block_size])

    def cached_prefix(self, seq: Sequence) -> list[tuple[int, int]]:
        """(block, hash) of the cached full blocks that `seq`'s tokens start with. At least one
        token is always left to compute, so the step that finishes the prompt has logits."""
        if not self.enable_prefix_caching or seq.block_table:
            return []
        tokens = seq.all_token_ids()
        hits: list[tuple[int, int]] = []
        prefix_hash: int | None = None
        for index in range((len(tokens) - 1) // self.block_size):
            prefix_hash = hash((prefix_hash, self._block_tokens(tokens, index)))
            block = self._block_of.get(prefix_hash)
            if block is None:
                break
            hits.append((block, prefix_hash))
        return hits

    def can_attach_and_grow(self, hits: list[tuple[int, int]], num_tokens: int) -> bool:
        """Whether a sequence holding no blocks can attach `hits` and then cover `num_tokens`."""
        new_blocks = -(-num_tokens // self.block_size) - len(hits)
        revived = sum(1 for block, _ in hits if self._refs[block] == 0)  # leave the evictable pool
        return new_blocks <= self.num_free_blocks - revived

    def attach(self, seq: Sequence, hits: list[tuple[int, int]]) -> None:
        for block, prefix_hash in hits:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(prefix_hash)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.num_cached_tokens_total += seq.num_computed_tokens
        self.num_queried_tokens_total += seq.num_tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make the prompt blocks `seq` has completely computed findable by later sequences. Blocks
        of generated tokens are not shared: decodes run other kernels than prompts, so their KV
        differs in the last bits from what a prompt holding those tokens would compute."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, seq.num_prompt_tokens) // self.block_size
        if len(seq.block_hashes) >= num_full:
            return
        tokens = seq.all_token_ids()
        prefix_hash = seq.block_hashes[-1] if seq.block_hashes else None
        for index in range(len(seq.block_hashes), num_full):
            prefix_hash = hash((prefix_hash, self._block_tokens(tokens, index)))
            seq.block_hashes.append(prefix_hash)
            block = seq.block_table[index]
            if prefix_hash not in self._block_of and block not in self._hash_of:
                self._block_of[prefix_hash] = block
                self._hash_of[block] = prefix_hash
