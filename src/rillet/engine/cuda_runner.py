"""The model runner of the GPU path: one flat batch, one paged-attention launch per layer, decode
steps replayed as CUDA graphs.

Where ModelRunner (engine/model_runner.py) splits a step into padded groups for the CPU's
batched matmuls, this runner hands the GPU kernels (models/llama_cuda.py) every sequence's
tokens in batch order with `CudaAttentionMetadata`, prefill chunks and decodes alike. A step of
decodes only, no larger than the largest captured batch, replays the CUDA graph of the next
padded batch size (engine/cuda_graphs.py) with its inputs copied in by two host-to-device copies;
a step with prompt tokens, up to a couple of thousand tokens, replays the graph of its padded
token count (engine/prompt_graphs.py). Larger steps run eagerly on the same kernels, as does
every step under --enforce-eager.
"""

from __future__ import annotations

import logging

import torch

from rillet.engine.block_manager import BlockManager
from rillet.engine.cuda_graphs import DecodeGraphs
from rillet.engine.model_runner import ModelRunner
from rillet.engine.prompt_graphs import CONTEXT_LENS, IDS, POSITIONS, Q_LENS, Q_STARTS, SLOTS, PromptGraphs, \
    flat_batch
from rillet.engine.scheduler import ScheduledBatch
from rillet.engine.sequence import Sequence
from rillet.models.backend import KernelPath
from rillet.models.llama import CausalLM, CudaAttentionMetadata

logger = logging.getLogger(__name__)


class CudaModelRunner(ModelRunner):
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, path: KernelPath, *,
                 max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int | None = None,
                 enforce_eager: bool = False) -> None:
        super().__init__(model, num_blocks, block_size, path)
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.graphs: DecodeGraphs | None = None
        self.prompt_graphs: PromptGraphs | None = None
        self._replayed_decodes = False  # whether the last logits came from a decode graph
        if not enforce_eager and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self, max_num_seqs)
            logger.info("CUDA graphs captured for decode batch sizes %s in %.1f s",
                        self.graphs.sizes, self.graphs.capture_seconds)
            if model.tp is None:  # a tensor-parallel worker would have to replay them too
                self.prompt_graphs = PromptGraphs(self, max_num_batched_tokens or max_model_len, max_num_seqs,
                                                  pool=self.graphs.pool)
                logger.info("CUDA graphs captured for prompt steps of up to %d tokens (%d sizes) in %.1f s",
                            self.prompt_graphs.max_tokens, len(self.prompt_graphs.sizes),
                            self.prompt_graphs.capture_seconds)
        if self.device.type == "cuda" and self.prompt_graphs is None:  # their capture compiled these already
            self._compile_prompt_kernels()

    def describe_kernels(self) -> str:
        return "GPU kernels: Triton paged attention, fused norms, rotary and SiLU"

    def metadata(self, slots: torch.Tensor, block_tables: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor,
                 context_lens: torch.Tensor, max_q_len: int) -> CudaAttentionMetadata:
        return CudaAttentionMetadata(slot_mapping=slots, block_tables=block_tables, q_starts=q_starts, q_lens=q_lens,
                                     context_lens=context_lens, max_q_len=max_q_len, block_size=self.block_size)

    @torch.inference_mode()
    def _compile_prompt_kernels(self) -> None:
        """Run a dummy prompt step once, so that Triton compiles the prompt variant of the kernels
        now rather than in the first request's time to first token. Its slots are -1: the cache
        is not written."""
        n = 4
        ints = torch.zeros(n, dtype=torch.int32, device=self.device)
        meta = self.metadata(torch.full((n,), -1, dtype=torch.int32, device=self.device),
                             torch.zeros((1, 1), dtype=torch.int32, device=self.device), ints[:1],
                             torch.full((1,), n, dtype=torch.int32, device=self.device),
                             torch.full((1,), n, dtype=torch.int32, device=self.device), max_q_len=n)
        self.model.compute_logits(self.model(ints, torch.arange(n, device=self.device), self.kv_caches, meta))
        torch.cuda.synchronize(self.device)

    @property
    def replays_decodes(self) -> bool:
        return self.graphs is not None

    @property
    def replays_prompts(self) -> bool:
        return self.prompt_graphs is not None

    def replays(self, batch: ScheduledBatch) -> bool:
        """Whether this batch runs as a CUDA graph: decodes only (each sequence feeds its last
        token), no more than the largest captured batch."""
        return self.graphs is not None and len(batch.seqs) <= self.graphs.max_batch \
            and all(n == 1 for n in batch.num_new_tokens) \
            and all(seq.num_computed_tokens + 1 == seq.num_tokens for seq in batch.seqs)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, block_manager: BlockManager) -> tuple[torch.Tensor, list[int]]:
        """One forward pass over the batch. Returns logits [R, V] of the R sequences that feed
        their last token this step, in batch order, and their positions in `batch.seqs`."""
        self._replayed_decodes = self.graphs is not None and self.replays(batch)
        if self._replayed_decodes:
            assert self.graphs is not None
            return self.graphs.run(batch.seqs), list(range(len(batch.seqs)))
        if self.prompt_graphs is not None and self.prompt_graphs.fits(batch):
            return self.prompt_graphs.run(batch, block_manager)
        return self._execute_eager(batch, block_manager)

    @torch.inference_mode()
    def execute_ahead(self, seqs: list[Sequence], block_manager: BlockManager, tokens: torch.Tensor) -> torch.Tensor:
        """The decode step after the one just queued, fed its sampled ids [B] straight from the
        GPU (engine/overlap.py): logits [B, V]. Every sequence has a slot for that position."""
        assert self.graphs is not None
        self._replayed_decodes = True
        return self.graphs.run(seqs, ahead=tokens)

    def greedy_ids(self, rows: int) -> torch.Tensor | None:
        """The argmax each decode graph takes with its logits (DecodeGraphs.greedy)."""
        if not self._replayed_decodes or self.graphs is None or self.graphs.greedy is None:
            return None
        return self.graphs.greedy[:rows]

    def _execute_eager(self, batch: ScheduledBatch, block_manager: BlockManager) -> tuple[torch.Tensor, list[int]]:
        flat = flat_batch(batch, block_manager)
        num_blocks = max(-(-int(c) // self.block_size) for c in flat.seqs[CONTEXT_LENS])
        tables = self._padded_tables([seq.block_table for seq in batch.seqs], num_blocks)
        device = self.device
        host = torch.from_numpy(flat.tokens).to(device, non_blocking=True)
        per_seq = torch.from_numpy(flat.seqs).to(device, non_blocking=True)
        block_tables = torch.tensor(tables, dtype=torch.int32).view(len(batch.seqs), num_blocks).to(device,
                                                                                                  non_blocking=True)
        meta = self.metadata(host[SLOTS], block_tables, per_seq[Q_STARTS], per_seq[Q_LENS], per_seq[CONTEXT_LENS],
                             max(batch.num_new_tokens))
        hidden = self.model(host[IDS], host[POSITIONS], self.kv_caches, meta)
        if not flat.sampling:
            return torch.empty((0, 0), dtype=torch.float32, device=device), []
        rows = torch.tensor(flat.logit_rows, dtype=torch.long).to(device, non_blocking=True)
        return self.model.compute_logits(hidden.index_select(0, rows)), flat.sampling
