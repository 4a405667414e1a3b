"""Decode steps as CUDA graphs, captured once per padded batch size (as vLLM and nano-vllm do).

A decode step launches ~150 kernels, most of them tiny; launched from Python one by one they
cost more than the GPU's work at small batches. A graph replays them all with one launch. Its
tensors are fixed at capture, so each step writes its inputs into the same buffers:

    inputs [5, max_batch] int32: token ids, positions, KV slots, context lengths, query lengths
    block_tables [max_batch, max_blocks_per_seq] int32

A batch of B decodes replays the graph of the smallest captured size G >= B; rows B..G-1 are
padding (query length 0: attention skips them; slot -1: nothing is written to the cache), and
their logits are ignored. Logits land in one float32 buffer shared by every graph, and each
row's argmax in an int64 one beside it (`greedy`): a batch whose rows are all greedy takes its
tokens from there, with no launch of its own after the replay (the sampler's two argmax
launches and their buffers cost the host ~170 us a step from Python, more than the GPU's work
at batch 1). A batch that samples ignores them (a few microseconds of GPU time wasted).

Under tensor parallelism every rank captures the same sizes in the same order, its all-reduces
inside the graphs, and the head's vocabulary slices meet in an all-gather captured with them.
Rank 0 hands each replay's host inputs to the other ranks (`mirror`), which copy them into
their own buffers and replay their graph of the same size (`replay_mirrored`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from rillet.engine.sequence import Sequence
from rillet.models import cuda_kernels

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

    from rillet.engine.cuda_runner import CudaModelRunner

IDS, POSITIONS, SLOTS, CONTEXT_LENS, Q_LENS = range(5)


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 to 64, every 16 to 256, every 32 beyond: padding wastes at most
    a few rows' weight reads, which at these sizes cost almost nothing."""
    sizes = [s for s in (1, 2, 4) if s < max_batch]
    sizes += list(range(8, min(max_batch, 64) + 1, 8)) + list(range(80, min(max_batch, 256) + 1, 16))
    sizes += list(range(288, max_batch + 1, 32))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sorted(set(sizes))


def capture(device: torch.device, sizes: list[int], body: Callable[[int], None], graphs: dict[int, torch.cuda.CUDAGraph],
            pool: _POOL_HANDLE | None = None) -> _POOL_HANDLE | None:
    """Capture `body(size)` as graphs[size] for each size, largest first so that the smaller ones
    reuse its memory, all in one memory pool (`pool`, or a new one): returned."""
    stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for size in sorted(sizes, reverse=True):
            body(size)  # warm-up: Triton compiles, cuBLAS picks its kernels
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                body(size)
            pool = graph.pool()
            graphs[size] = graph
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    return pool


class DecodeHostInputs:
    """The host side of a decode graph's inputs: `inputs` [5, max_batch] and `tables` [max_batch,
    blocks a sequence] int32 (numpy views of pinned tensors on a GPU), filled for a batch of
    decodes. Each row's KV slot is looked up in the table row just written, for all rows at once:
    per row from Python it cost ~20 us more a step at 256 rows on a Xeon."""

    def __init__(self, inputs: np.ndarray, tables: np.ndarray, block_size: int) -> None:
        self.inputs, self.tables, self.block_size = inputs, tables, block_size
        self.forget_tables()

    def forget_tables(self) -> None:
        """The table rows were written by someone else: write every row again next time."""
        # What each table row holds: (the block table list written there, its length then). Block
        # tables only grow by appends or are replaced by a new list (BlockManager), so a row still
        # holding the same list needs only its new blocks: most steps none.
        self._rows: list[tuple[list[int] | None, int]] = [(None, 0)] * self.tables.shape[0]
        self._lengths = np.zeros(self.tables.shape[0], dtype=np.int64)

    def write_tables(self, seqs: list[Sequence]) -> None:
        """Row i of `tables` holds seqs[i]'s block table (the blocks it did not hold yet)."""
        tables, rows, lengths = self.tables, self._rows, self._lengths
        for row, seq in enumerate(seqs):
            table = seq.block_table
            held, written = rows[row]
            if held is not table or written != len(table):
                start = written if held is table else 0
                tables[row, start:len(table)] = table[start:]
                rows[row] = (table, len(table))
                lengths[row] = len(table)

    def fill(self, seqs: list[Sequence], size: int, feed_ids: bool, shift: int = 0) -> None:
        """Rows 0..B-1: each sequence decoding the token at its position num_computed_tokens +
        `shift` (that token's id only with `feed_ids`: else it comes from the GPU); rows B..size-1
        padding (query length 0, no KV slot)."""
        B = len(seqs)
        host, tables, lengths = self.inputs, self.tables, self._lengths
        self.write_tables(seqs)
        positions = host[POSITIONS, :B]
        positions[:] = [seq.num_computed_tokens for seq in seqs]
        positions += shift
        blocks = positions // self.block_size
        if B and not (blocks < lengths[:B]).all():
            row = int(np.argmin(blocks < lengths[:B]))
            raise IndexError(f"decode row {row}: position {int(positions[row])} is past its "
                             f"{int(lengths[row])} blocks")
        host[SLOTS, :B] = tables[np.arange(B), blocks] * self.block_size + positions % self.block_size
        if feed_ids:
            host[IDS, :B] = [seq.token_at(int(position)) for seq, position in zip(seqs, positions)]
        host[CONTEXT_LENS, :B] = positions + 1
        host[Q_LENS, :B] = 1
        host[Q_LENS, B:size] = 0
        host[SLOTS, B:size] = -1
        host[CONTEXT_LENS, B:size] = 0


class DecodeGraphs:
    def __init__(self, runner: CudaModelRunner, max_batch: int) -> None:
        self.runner = runner
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        device = runner.device
        nb = runner.max_blocks_per_seq
        self.inputs = torch.zeros((5, self.max_batch), dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((self.max_batch, nb), dtype=torch.int32, device=device)
        self.q_starts = torch.arange(self.max_batch, dtype=torch.int32, device=device)
        # Pinned host copies, written through numpy views: one contiguous copy each per step.
        self.host_inputs = torch.zeros((5, self.max_batch), dtype=torch.int32).pin_memory()
        self.host_tables = torch.zeros((self.max_batch, nb), dtype=torch.int32).pin_memory()
        self.host = DecodeHostInputs(self.host_inputs.numpy(), self.host_tables.numpy(), runner.block_size)
        # the host buffers may be written again once this has passed
        self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
        model = runner.model
        vocab = model.config.vocab_size
        self.logits = torch.zeros((self.max_batch, vocab), dtype=torch.float32, device=device)
        self.tp = model.tp  # tensor parallelism: the head's slices are all-gathered inside the graph
        # None under tensor parallelism, whose engine samples step by step (LLMEngine._defers)
        self.greedy = None if self.tp is not None else torch.zeros(self.max_batch, dtype=torch.int64, device=device)
        if self.tp is not None:  # flat, so that each size's [ranks, size, local vocab] view is contiguous
            self.gathered = torch.zeros(model.shard.size * self.max_batch * self.tp.local_vocab,
                                        dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        start = time.perf_counter()
        self._capture()
        self.capture_seconds = time.perf_counter() - start

    @torch.inference_mode()
    def _body(self, size: int) -> None:
        runner, inputs = self.runner, self.inputs
        meta = runner.metadata(inputs[SLOTS, :size], self.block_tables[:size], self.q_starts[:size],
                               inputs[Q_LENS, :size], inputs[CONTEXT_LENS, :size], max_q_len=1)
        hidden = runner.model(inputs[IDS, :size], inputs[POSITIONS, :size], runner.kv_caches, meta)
        model = runner.model
        weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        bias = None if model.lm_head is None else model.lm_head.bias
        if self.tp is not None:
            local = torch.nn.functional.linear(hidden, weight, bias).float()
            ranks = self.tp.shard.size
            gathered = self.gathered[:ranks * local.numel()].view(ranks, size, -1)
            self.tp.all_gather(gathered, local)
            full = gathered.permute(1, 0, 2).reshape(size, -1)
            self.logits[:size].copy_(full[:, :self.logits.shape[1]])
        elif size == 1 and cuda_kernels.gemv_takes(weight):
            cuda_kernels.gemv(hidden, weight, bias, out=self.logits[:1])  # float32 logits from the kernel
        else:
            self.logits[:size].copy_(torch.nn.functional.linear(hidden, weight, bias))
        if self.greedy is not None:
            cuda_kernels.argmax_rows(self.logits[:size], out=self.greedy[:size])

    @torch.inference_mode()
    def _capture(self) -> None:
        self.inputs[SLOTS].fill_(-1)  # every row padding: nothing touches the cache
        # the prompt graphs' pool too: one graph runs at a time, and none leaves anything in it
        self.pool = capture(self.runner.device, self.sizes, self._body, self.graphs)

    def run(self, seqs: list[Sequence], ahead: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(seqs), V] of one decode token per sequence (each feeds its last token).
        `ahead`: the token ids [B] just sampled on the GPU and not yet read back (their step's
        outputs are still to be processed): each sequence feeds that token instead, one
        position further (engine/overlap.py)."""
        size = next(s for s in self.sizes if s >= len(seqs))
        self._copied.synchronize()
        self.host.fill(seqs, size, feed_ids=ahead is None, shift=0 if ahead is None else 1)
        if self.tp is not None and self.tp.mirror is not None:
            assert ahead is None, "a tensor-parallel engine does not queue steps ahead"
            self.tp.mirror("graph", size, self.host_inputs[:, :size].clone(), self.host_tables[:size].clone())
        self._replay(size, ahead)
        return self.logits[:len(seqs)]

    def _replay(self, size: int, ahead: torch.Tensor | None = None) -> None:
        self.inputs.copy_(self.host_inputs, non_blocking=True)
        self.block_tables[:size].copy_(self.host_tables[:size], non_blocking=True)
        self._copied.record()
        if ahead is not None:  # after the host copy, on the same stream
            self.inputs[IDS, :ahead.shape[0]].copy_(ahead)
        self.graphs[size].replay()

    def replay_mirrored(self, size: int, inputs: torch.Tensor, tables: torch.Tensor) -> None:
        """A worker rank's replay of the step rank 0 replays: its host inputs [5, size] and block
        tables [size, nb], copied in as they came."""
        self._copied.synchronize()
        self.host_inputs[:, :size].copy_(inputs)
        self.host_tables[:size].copy_(tables)
        self.host.forget_tables()
        self._replay(size)
