"""Steps with prompt tokens as CUDA graphs too, captured once per padded token count.

A step that takes in prompts (alone or beside decodes) launches the same ~150 kernels as a decode
step. Launched one by one from Python they take ~9 ms of host time for a 1B model, while the GPU
needs ~1.3 ms for a 64-token prompt: a lone request's first token waited on the launches, and
so did every stream whenever a new request joined a running batch. Up to a few thousand tokens
the GPU's work is shorter than the launches, so such steps replay a graph of the next padded
token count T (engine/cuda_graphs.py does the same for decodes, per padded batch size):

    tokens [3, T] int32: token ids, positions, KV slots
    seqs [4, S] int32: query starts, query lengths, context lengths, the row each one samples from
    block_tables [S, max_blocks_per_seq] int32

S = min(T, max_num_seqs): every sequence brings at least one token. Rows past the batch's tokens
are padding (slot -1: nothing is written to the cache); sequences past its last have query
length 0 and start where the tokens end, so paged attention's flat tiles (models/cuda_kernels.py)
skip them. The graph ends with the logits of each sequence's sampling row; the rows of
sequences that do not sample this step (a prompt chunk with more to come) are not read.

Not under tensor parallelism (its workers would have to replay the same graphs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from rillet.engine.block_manager import BlockManager
from rillet.engine.cuda_graphs import capture
from rillet.engine.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

    from rillet.engine.cuda_runner import CudaModelRunner

IDS, POSITIONS, SLOTS = range(3)
Q_STARTS, Q_LENS, CONTEXT_LENS, LOGIT_ROWS = range(4)
LARGEST = 2048  # beyond this many tokens the GPU's work outlasts the launches: eager costs nothing


@dataclass
class FlatBatch:
    """A step's sequences laid end to end, as the GPU kernels take them (host arrays, int32)."""

    tokens: np.ndarray  # [3, T]: token ids, positions, KV slots
    seqs: np.ndarray  # [3, B]: query starts, query lengths, context lengths
    logit_rows: list[int]  # the row of each sequence that samples this step ...
    sampling: list[int]  # ... and its index in the batch


def flat_batch(batch: ScheduledBatch, block_manager: BlockManager) -> FlatBatch:
    """The eager step's inputs, and what a prompt graph copies into its buffers."""
    counts = batch.num_new_tokens
    tokens = np.empty((3, sum(counts)), dtype=np.int32)
    seqs = np.empty((3, len(counts)), dtype=np.int32)
    logit_rows: list[int] = []
    sampling: list[int] = []
    at = 0
    for i, (seq, n) in enumerate(zip(batch.seqs, counts)):
        start = seq.num_computed_tokens
        positions = np.arange(start, start + n)
        prompt = seq.prompt_token_ids
        tokens[IDS, at:at + n] = prompt[start:start + n] if start + n <= len(prompt) \
            else seq.all_token_ids()[start:start + n]
        tokens[POSITIONS, at:at + n] = positions
        tokens[SLOTS, at:at + n] = block_manager.slots(seq, positions)
        seqs[Q_STARTS, i], seqs[Q_LENS, i], seqs[CONTEXT_LENS, i] = at, n, start + n
        at += n
        if start + n == seq.num_tokens:  # everything fed: this sequence samples now
            logit_rows.append(at - 1)
            sampling.append(i)
    return FlatBatch(tokens, seqs, logit_rows, sampling)


def prompt_sizes(max_tokens: int) -> list[int]:
    """Padded token counts: powers of two to 256, then steps of a quarter (a few rows of padding
    cost nothing while weight reads dominate; past that, at most a fifth of the work)."""
    top = min(max_tokens, LARGEST)
    sizes = [s for s in (16, 32, 64, 128, 256) if s < top]
    sizes += [s for s in (320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048) if s < top]
    return sizes + [top]


class PromptGraphs:
    def __init__(self, runner: CudaModelRunner, max_tokens: int, max_seqs: int,
                 pool: _POOL_HANDLE | None = None) -> None:
        self.runner = runner
        self.sizes = prompt_sizes(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.max_seqs = min(max_seqs, self.max_tokens)
        device = runner.device
        T, S, nb = self.max_tokens, self.max_seqs, runner.max_blocks_per_seq
        self.tokens = torch.zeros((3, T), dtype=torch.int32, device=device)
        self.seqs = torch.zeros((4, S), dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((S, nb), dtype=torch.int32, device=device)
        self.host_tokens = torch.zeros((3, T), dtype=torch.int32).pin_memory()
        self.host_seqs = torch.zeros((4, S), dtype=torch.int32).pin_memory()
        self.host_tables = torch.zeros((S, nb), dtype=torch.int32).pin_memory()
        self._tokens_np, self._seqs_np = self.host_tokens.numpy(), self.host_seqs.numpy()
        self._tables_np = self.host_tables.numpy()
        self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
        self.logits = torch.zeros((S, runner.model.config.vocab_size), dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays_total = 0
        start = time.perf_counter()
        self._capture(pool)
        self.capture_seconds = time.perf_counter() - start

    def fits(self, batch: ScheduledBatch) -> bool:
        return sum(batch.num_new_tokens) <= self.max_tokens and len(batch.seqs) <= self.max_seqs

    def _rows(self, size: int) -> int:
        return min(size, self.max_seqs)

    @torch.inference_mode()
    def _body(self, size: int) -> None:
        runner, tokens, seqs, s = self.runner, self.tokens, self.seqs, self._rows(size)
        meta = runner.metadata(tokens[SLOTS, :size], self.block_tables[:s], seqs[Q_STARTS, :s], seqs[Q_LENS, :s],
                               seqs[CONTEXT_LENS, :s], max_q_len=size)
        hidden = runner.model(tokens[IDS, :size], tokens[POSITIONS, :size], runner.kv_caches, meta)
        self.logits[:s].copy_(runner.model.compute_logits(hidden.index_select(0, seqs[LOGIT_ROWS, :s])))

    @torch.inference_mode()
    def _capture(self, pool: _POOL_HANDLE | None) -> None:
        self.tokens[SLOTS].fill_(-1)  # every row padding: nothing touches the cache
        capture(self.runner.device, self.sizes, self._body, self.graphs, pool)

    def run(self, batch: ScheduledBatch, block_manager: BlockManager) -> tuple[torch.Tensor, list[int]]:
        """As CudaModelRunner.execute: logits [R, V] of the R sequences that feed their last token
        this step, and their positions in `batch.seqs`."""
        flat = flat_batch(batch, block_manager)
        at, B, R = flat.tokens.shape[1], len(batch.seqs), len(flat.sampling)
        size = next(s for s in self.sizes if s >= at)
        rows = self._rows(size)
        tokens, seqs, tables = self._tokens_np, self._seqs_np, self._tables_np
        self._copied.synchronize()
        tokens[:, :at] = flat.tokens
        tokens[:, at:size] = 0
        tokens[SLOTS, at:size] = -1
        seqs[:LOGIT_ROWS, :B] = flat.seqs
        seqs[Q_STARTS, B:rows], seqs[Q_LENS, B:rows], seqs[CONTEXT_LENS, B:rows] = at, 0, 0
        seqs[LOGIT_ROWS, :R] = flat.logit_rows
        seqs[LOGIT_ROWS, R:rows] = 0
        for i, seq in enumerate(batch.seqs):
            tables[i, :len(seq.block_table)] = seq.block_table
        self.tokens.copy_(self.host_tokens, non_blocking=True)  # whole: a column slice is not contiguous
        self.seqs.copy_(self.host_seqs, non_blocking=True)
        self.block_tables[:B].copy_(self.host_tables[:B], non_blocking=True)
        self._copied.record()
        self.graphs[size].replay()
        self.replays_total += 1
        return self.logits[:R], flat.sampling
