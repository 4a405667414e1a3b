"""The one place with tensors: the model, its paged KV cache, and the step's input tensors."""

from __future__ import annotations

import logging

import torch

from rillet.engine.block_manager import BlockManager
from rillet.engine.scheduler import ScheduledBatch
from rillet.models.llama import AttentionMetadata, CausalLM, PrefillSpan

logger = logging.getLogger(__name__)

SMALL_DECODE_ATTENTION = 512  # decode rows x context width up to which attention runs in float32


def kv_bytes_per_token(model: CausalLM, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * len(model.layers) * model.num_kv_heads * model.head_dim * element


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        num_slots = num_blocks * block_size
        shape = (model.num_kv_heads, num_slots, model.head_dim)  # head-major, see Attention
        # Zeroed so that padded (masked) reads never meet NaN garbage.
        self.num_slots = num_slots
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)) for _ in model.layers]

    def _context_slots(self, block_table: list[int], context: int) -> torch.Tensor:
        """Cache slot of each of the first `context` positions of one sequence, for every head
        (see gather_rows)."""
        pos = torch.arange(context)
        table = torch.tensor(block_table[:-(-context // self.block_size)], dtype=torch.long)
        slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
        return self._per_head(slots, self.num_slots)

    def _blocks(self, block_tables: list[list[int]], lengths: list[int]) -> tuple[torch.Tensor, int]:
        """Flat [B * nb] block ids covering max(lengths) positions per row (padding: block 0, masked),
        and the width nb * block_size they cover."""
        num_blocks = -(-max(lengths) // self.block_size)
        flat = []
        for bt in block_tables:
            row = bt[:num_blocks]
            flat.extend(row)
            flat.extend([0] * (num_blocks - len(row)))
        return self._per_head(torch.tensor(flat, dtype=torch.long), self.num_slots // self.block_size), \
            num_blocks * self.block_size

    def _per_head(self, rows: torch.Tensor, rows_per_head: int) -> torch.Tensor:
        """Row ids of one head -> the same rows of every head in the cache's [nkv * rows, ...] view."""
        offsets = torch.arange(self.model.num_kv_heads)[:, None] * rows_per_head
        return (offsets + rows[None, :]).flatten().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, block_manager: BlockManager) -> tuple[torch.Tensor, list[int]]:
        """Run one forward pass. Returns logits [R, V] for the R sequences that finish feeding all their
        tokens this step (in batch order) and their positions in `batch.seqs`."""
        # Decodes (one new token) first, then prefill chunks.
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] != 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        decode_tables, decode_lengths = [], []
        prefill_specs = []  # (start, end, seq, context_len)
        logits_rows, sampling = [], []
        for i in order:
            seq, n = batch.seqs[i], batch.num_new_tokens[i]
            start = seq.num_computed_tokens
            row0 = len(input_ids)
            for p in range(start, start + n):
                input_ids.append(seq.token_at(p))
                positions.append(p)
                slot_mapping.append(block_manager.slot(seq, p))
            if n == 1:
                decode_tables.append(seq.block_table)
                decode_lengths.append(start + 1)
            else:
                prefill_specs.append((row0, row0 + n, seq, start + n))
            if start + n == seq.num_tokens:  # everything fed: this sequence samples now
                logits_rows.append(len(input_ids) - 1)
                sampling.append(i)

        num_decode = len(decode_tables)
        decode_blocks = decode_bias = None
        if num_decode:
            decode_blocks, width = self._blocks(decode_tables, decode_lengths)
            lengths = torch.tensor(decode_lengths, device=self.device)
            padding = torch.arange(width, device=self.device)[None, :] >= lengths[:, None]
            # oneDNN's bf16 batched matmul has a high fixed cost: for a few short rows, casting the
            # gathered K/V to float32 and using float32 matmuls is about twice as fast.
            small = self.device.type == "cpu" and num_decode * width <= SMALL_DECODE_ATTENTION
            attn_dtype = torch.float32 if small else self.dtype
            decode_bias = torch.zeros(padding.shape, dtype=attn_dtype, device=self.device)
            decode_bias = decode_bias.masked_fill_(padding, -float("inf")).repeat(self.model.num_kv_heads, 1)
            decode_bias = decode_bias.unsqueeze(1)  # [nkv * Bd, 1, K], head-major like the gathered rows
        prefills = []
        for row0, row1, seq, context in prefill_specs:
            slots = self._context_slots(seq.block_table, context)
            L = row1 - row0
            mask = None
            if context != L:  # earlier chunks are cached: query i sees keys up to context - L + i
                q_pos = torch.arange(context - L, context, device=self.device)
                mask = torch.arange(context, device=self.device)[None, :] <= q_pos[:, None]
            prefills.append(PrefillSpan(row0, row1, slots, mask))

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
            num_decode=num_decode, decode_blocks=decode_blocks, decode_bias=decode_bias, prefills=prefills,
            block_size=self.block_size,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        if not logits_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32), []
        rows = torch.tensor(logits_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden[rows]), sampling
