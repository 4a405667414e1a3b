"""The one place with tensors: the model, its paged KV cache, and the step's input tensors.

Which kernels run was decided at load (models/backend.py: `KernelPath`); the runner only builds
the inputs they take: `PagedDecodeAttention` for decodes on the C kernel, `PaddedAttention` for
everything else, or the whole decode step in C."""

from __future__ import annotations

import logging

import torch

from rillet.engine.block_manager import BlockManager
from rillet.engine.scheduler import ScheduledBatch
from rillet.engine.sequence import Sequence
from rillet.models import cpu_decode
from rillet.models.backend import KernelPath
from rillet.models.llama import AttentionGroup, AttentionMetadata, CausalLM, PaddedAttention, PagedDecodeAttention

logger = logging.getLogger(__name__)

MIN_ATTENTION_WIDTH = 16  # narrower softmax rows take a scalar path whose sums differ (see attend)


def kv_bytes_per_token(model: CausalLM, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * len(model.layers) * model.num_kv_heads * model.head_dim * element


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, path: KernelPath) -> None:
        self.model = model
        self.block_size = block_size
        self.path = path
        self.device = device = path.backend.device
        self.dtype = dtype = path.backend.dtype
        num_slots = num_blocks * block_size
        shape = (model.num_kv_heads, num_slots, model.head_dim)  # head-major, see Attention
        # Zeroed so that padded (masked) reads never meet NaN garbage.
        self.num_slots = num_slots
        self.paged_decode_kernel = path.kernels is not None
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)) for _ in model.layers]
        # Decode rows through every layer in one C call where the model allows (models/cpu_decode.py).
        self.decode_forward: cpu_decode.DecodeForward | None = None
        if path.decode_in_c:
            self.decode_forward = cpu_decode.DecodeForward(model, self.kv_caches, block_size)
        if device.type == "cpu":
            logger.info("%s", self.describe_kernels())

    def describe_kernels(self) -> str:
        """E.g. 'CPU kernels: avx2 (avx2 fma f16c), weights bf16, decode step in C'."""
        kernels = self.path.kernels
        if kernels is None:
            why = "disabled or not built" if self.dtype == torch.bfloat16 else str(self.dtype).removeprefix("torch.")
            return f"CPU kernels: off ({why}), torch path"
        flags = " ".join(flag.removeprefix("-m") for flag in kernels.flags if flag.startswith("-m"))
        formats = sorted({str(m.format) for m in self.model.modules() if getattr(m, "format", None)}) or ["torch"]
        step = "decode step in C" if self.decode_forward is not None else "decode attention in C"
        return f"CPU kernels: {kernels.isa} ({flags or 'no ISA flags'}), weights {'/'.join(formats)}, {step}"

    def replays(self, batch: ScheduledBatch) -> bool:
        """Whether the batch runs as a captured graph (engine/cuda_runner.py); never here."""
        return False

    @property
    def replays_decodes(self) -> bool:
        """Whether decode-only batches run as captured graphs (engine/cuda_runner.py); not here."""
        return False

    @property
    def replays_prompts(self) -> bool:
        """Whether steps with prompt tokens run as captured graphs (engine/prompt_graphs.py): then
        a lone prompt's step is short; not here."""
        return False

    def execute_ahead(self, seqs: list[Sequence], block_manager: BlockManager, tokens: torch.Tensor) -> torch.Tensor:
        """Queue the decode step after one whose ids are still on the GPU (engine/overlap.py):
        only a runner that `replays` batches does."""
        raise RuntimeError("this runner does not queue decode steps ahead (replays() is False)")

    def greedy_ids(self, rows: int) -> torch.Tensor | None:
        """Each row's argmax [rows] of the logits the last `execute` or `execute_ahead` returned,
        when the forward pass computed it with them (a decode graph); else None."""
        return None

    @staticmethod
    def _padded_tables(block_tables: list[list[int]], num_blocks: int) -> list[int]:
        """The first num_blocks blocks of each table, flat, padded with block 0 (masked or unread)."""
        flat = []
        for table in block_tables:
            row = table[:num_blocks]
            flat.extend(row)
            flat.extend([0] * (num_blocks - len(row)))
        return flat

    def _blocks(self, block_tables: list[list[int]], width: int) -> torch.Tensor:
        """Flat per-head block ids, nb = width / block_size per sequence."""
        flat = self._padded_tables(block_tables, width // self.block_size)
        return self._per_head(torch.tensor(flat, dtype=torch.long), self.num_slots // self.block_size)

    def _decode_tables(self, block_tables: list[list[int]], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The C decode kernels' inputs: block tables [B, nb] and context lengths [B], int32."""
        num_blocks = -(-max(lengths) // self.block_size)
        flat = self._padded_tables(block_tables, num_blocks)
        return (torch.tensor(flat, dtype=torch.int32).view(len(lengths), num_blocks),
                torch.tensor(lengths, dtype=torch.int32))

    def _kernel_decode_group(self, block_tables: list[list[int]], lengths: list[int]) -> PagedDecodeAttention:
        tables, context_lens = self._decode_tables(block_tables, lengths)
        return PagedDecodeAttention(num_seqs=len(lengths), first_row=0, block_tables=tables, context_lens=context_lens)

    def _group(self, first_row: int, lengths: list[int], contexts: list[int],
               block_tables: list[list[int]]) -> PaddedAttention:
        """Attention inputs of sequences feeding lengths[i] tokens that end at position contexts[i]."""
        B, L = len(lengths), max(lengths)
        width = max(max(contexts), MIN_ATTENTION_WIDTH)
        width = -(-width // self.block_size) * self.block_size
        # Position of each padded query; a padding query repeats its sequence's last real one.
        offsets = torch.arange(L)
        lens = torch.tensor(lengths)
        ends = torch.tensor(contexts)
        q_pos = ends[:, None] - lens[:, None] + torch.minimum(offsets[None, :], lens[:, None] - 1)  # [B, L]
        query_rows = real_rows = None
        if any(n != L for n in lengths):
            starts = torch.tensor([0] + lengths[:-1]).cumsum(0) + first_row
            query_rows = (starts[:, None] + q_pos - (ends[:, None] - lens[:, None])).flatten()
            real_rows = (torch.arange(B)[:, None] * L + offsets[None, :])[offsets[None, :] < lens[:, None]]
            query_rows, real_rows = query_rows.to(self.device), real_rows.to(self.device)
        hidden = torch.arange(width)[None, None, :] > q_pos[:, :, None]  # [B, L, W]
        bias = torch.zeros(hidden.shape, dtype=self.dtype).masked_fill_(hidden, -float("inf"))
        if L > 1:  # one row per (query, head of the GQA group), like the queries in Attention
            group_size = self.model.num_heads // self.model.num_kv_heads
            bias = bias[:, :, None, :].expand(B, L, group_size, width).reshape(B, L * group_size, width)
        # else [B, 1, W], broadcast over the group
        bias = bias.repeat(self.model.num_kv_heads, 1, 1)  # head-major, like the gathered keys
        return PaddedAttention(
            num_seqs=B, query_len=L, first_row=first_row, query_rows=query_rows, real_rows=real_rows,
            blocks=self._blocks(block_tables, width), bias=bias.to(self.device, non_blocking=True),
        )

    def _per_head(self, rows: torch.Tensor, rows_per_head: int) -> torch.Tensor:
        """Row ids of one head -> the same rows of every head in the cache's [nkv * rows, ...] view."""
        offsets = torch.arange(self.model.num_kv_heads)[:, None] * rows_per_head
        return (offsets + rows[None, :]).flatten().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, block_manager: BlockManager) -> tuple[torch.Tensor, list[int]]:
        """Run one forward pass. Returns logits [R, V] for the R sequences that finish feeding all their
        tokens this step (decodes first, then prompts, each in batch order) and their positions in
        `batch.seqs`."""
        # A decode feeds its one sampled token. A one-token chunk of a prompt is a prefill: a prompt's
        # KV is then computed the same way however it is chunked or cached.
        is_decode = [n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens
                     for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        decodes = [i for i, decode in enumerate(is_decode) if decode]
        prefills = [i for i, decode in enumerate(is_decode) if not decode]
        hidden_parts: list[torch.Tensor] = []
        sampling: list[int] = []
        if decodes and self.decode_forward is not None:
            hidden_parts.append(self._decode_in_c(self.decode_forward, [batch.seqs[i] for i in decodes],
                                                  block_manager))
            sampling += decodes
            rest = prefills
        else:
            rest = decodes + prefills
        if rest:
            hidden, sampled = self._forward_torch(batch, rest, is_decode, block_manager)
            hidden_parts.append(hidden)
            sampling += sampled
        if not sampling:
            return torch.empty((0, 0), dtype=torch.float32, device=self.device), []
        hidden = hidden_parts[0] if len(hidden_parts) == 1 else torch.cat(hidden_parts)
        return self.model.compute_logits(hidden), sampling

    def _decode_in_c(self, decode_forward: cpu_decode.DecodeForward, seqs: list[Sequence],
                     block_manager: BlockManager) -> torch.Tensor:
        """Hidden states [len(seqs), H] of decode rows, all layers in rillet's C kernel."""
        positions = [seq.num_computed_tokens for seq in seqs]
        tokens = [seq.token_at(p) for seq, p in zip(seqs, positions)]
        slots = [block_manager.slot(seq, p) for seq, p in zip(seqs, positions)]
        tables, context_lens = self._decode_tables([seq.block_table for seq in seqs], [p + 1 for p in positions])
        return decode_forward(torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                                   torch.tensor(slots, dtype=torch.long), tables, context_lens)

    def _forward_torch(self, batch: ScheduledBatch, indices: list[int], is_decode: list[bool],
                       block_manager: BlockManager) -> tuple[torch.Tensor, list[int]]:
        """The torch model over the sequences batch.seqs[i] for i in `indices` (decodes first). Returns the
        hidden states of the rows that sample and those sequences' positions in `batch.seqs`."""
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lengths: list[int] = []
        prefill_specs: list[tuple[int, int, Sequence, int]] = []  # (start, end, seq, context_len)
        logits_rows: list[int] = []
        sampling: list[int] = []
        for i in indices:
            seq, n = batch.seqs[i], batch.num_new_tokens[i]
            start = seq.num_computed_tokens
            row0 = len(input_ids)
            for p in range(start, start + n):
                input_ids.append(seq.token_at(p))
                positions.append(p)
                slot_mapping.append(block_manager.slot(seq, p))
            if is_decode[i]:
                decode_tables.append(seq.block_table)
                decode_lengths.append(start + 1)
            else:
                prefill_specs.append((row0, row0 + n, seq, start + n))
            if start + n == seq.num_tokens:  # everything fed: this sequence samples now
                logits_rows.append(len(input_ids) - 1)
                sampling.append(i)

        groups: list[AttentionGroup] = []
        if decode_tables and self.paged_decode_kernel:
            groups.append(self._kernel_decode_group(decode_tables, decode_lengths))
        elif decode_tables:
            groups.append(self._group(0, [1] * len(decode_tables), decode_lengths, decode_tables))
        if prefill_specs:
            groups.append(self._group(
                prefill_specs[0][0], [row1 - row0 for row0, row1, _, _ in prefill_specs],
                [context for _, _, _, context in prefill_specs], [seq.block_table for _, _, seq, _ in prefill_specs],
            ))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
            groups=groups, block_size=self.block_size,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        if not logits_rows:
            return hidden[:0], []
        return hidden[torch.tensor(logits_rows, dtype=torch.long, device=self.device)], sampling

    @torch.inference_mode()
    def score(self, token_ids: list[int], block_table: list[int]) -> torch.Tensor:
        """Log-probabilities [T - 1] of token_ids[1:] given their prefixes: one prompt pass of the
        torch path over the blocks in `block_table` (the caller allocates and frees them)."""
        T = len(token_ids)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(T, device=self.device)
        slots = [block_table[p // self.block_size] * self.block_size + p % self.block_size for p in range(T)]
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
                                 groups=[self._group(0, [T], [T], [block_table])], block_size=self.block_size)
        logits = self.model.compute_logits(self.model(ids, positions, self.kv_caches, meta)[:-1])
        return torch.log_softmax(logits, dim=-1).gather(1, ids[1:, None]).squeeze(1).cpu()

