"""Decode steps as CUDA graphs, captured once per padded batch size (as vLLM and nano-vllm do).

A decode step launches ~150 kernels, most of them tiny; launched from Python one by one they
cost more than the GPU's work at small batches. A graph replays them all with one launch. Its
tensors are fixed at capture, so each step writes its inputs into the same buffers:

    inputs [5, max_batch] int32: token ids, positions, KV slots, context lengths, query lengths
    block_tables [max_batch, max_blocks_per_seq] int32

A batch of B decodes replays the graph of the smallest captured size G >= B; rows B..G-1 are
padding (query length 0: attention skips them; slot -1: nothing is written to the cache), and
their logits are ignored. Logits land in one float32 buffer shared by every graph.

Under tensor parallelism every rank captures the same sizes in the same order, its all-reduces
inside the graphs, and the head's vocabulary slices meet in an all-gather captured with them.
Rank 0 hands each replay's host inputs to the other ranks (`mirror`), which copy them into
their own buffers and replay their graph of the same size (`replay_mirrored`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rillet.engine.block_manager import BlockManager
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
        self._inputs_np = self.host_inputs.numpy()
        self._tables_np = self.host_tables.numpy()
        # What each host table row holds: (the block table list written there, its length then).
        # Block tables only grow by appends or are replaced by a new list (BlockManager), so a row
        # still holding the same list needs only its new blocks: most steps none.
        self._table_rows: list[tuple[list[int] | None, int]] = [(None, 0)] * self.max_batch
        # the host buffers may be written again once this has passed
        self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
        model = runner.model
        vocab = model.config.vocab_size
        self.logits = torch.zeros((self.max_batch, vocab), dtype=torch.float32, device=device)
        self.tp = model.tp  # tensor parallelism: the head's slices are all-gathered inside the graph
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

    @torch.inference_mode()
    def _capture(self) -> None:
        self.inputs[SLOTS].fill_(-1)  # every row padding: nothing touches the cache
        # the prompt graphs' pool too: one graph runs at a time, and none leaves anything in it
        self.pool = capture(self.runner.device, self.sizes, self._body, self.graphs)

    def run(self, seqs: list[Sequence], block_manager: BlockManager, ahead: torch.Tensor | None = None
            ) -> torch.Tensor:
        """Logits [len(seqs), V] of one decode token per sequence (each feeds its last token).
        `ahead`: the token ids [B] just sampled on the GPU and not yet read back (their step's
        outputs are still to be processed): each sequence feeds that token instead, one
        position further (engine/overlap.py)."""
        B = len(seqs)
        size = next(s for s in self.sizes if s >= B)
        host, tables, rows = self._inputs_np, self._tables_np, self._table_rows
        self._copied.synchronize()
        shift = 0 if ahead is None else 1
        positions = [seq.num_computed_tokens + shift for seq in seqs]
        slots = [block_manager.slot(seq, position) for seq, position in zip(seqs, positions)]
        for row, seq in enumerate(seqs):
            table = seq.block_table
            held, written = rows[row]
            if held is not table or written != len(table):
                start = written if held is table else 0
                tables[row, start:len(table)] = table[start:]
                rows[row] = (table, len(table))
        if ahead is None:
            host[IDS, :B] = [seq.token_at(position) for seq, position in zip(seqs, positions)]
        host[POSITIONS, :B] = positions
        host[SLOTS, :B] = slots
        host[CONTEXT_LENS, :B] = host[POSITIONS, :B] + 1
        host[Q_LENS, :B] = 1
        host[Q_LENS, B:size] = 0
        host[SLOTS, B:size] = -1
        host[CONTEXT_LENS, B:size] = 0
        if self.tp is not None and self.tp.mirror is not None:
            assert ahead is None, "a tensor-parallel engine does not queue steps ahead"
            self.tp.mirror("graph", size, self.host_inputs[:, :size].clone(), self.host_tables[:size].clone())
        self._replay(size, ahead)
        return self.logits[:B]

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
        self._table_rows = [(None, 0)] * self.max_batch
        self._replay(size)
