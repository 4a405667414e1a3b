"""One rank's side of the tensor-parallel group: the collectives the sharded model calls.

The process group is torch.distributed's default one: NCCL between GPUs, gloo between CPU
processes (whose all-reduces and logits gather go through shared memory instead where
parallel/shm_allreduce.py runs and the tensor fits). A rank joins it through a file rendezvous
(engine/tp_executor.py makes the file), so there is no port to pick or collide on. NVLink
multicast (NVLS) stays off: on shared hosts it can take the GPUs out of service.

The driver (rank 0) also *mirrors* each forward pass and logits call to the other ranks before
running its own (`mirror`), so that every rank enters the same collectives in the same order;
the workers run the calls they are sent and set no mirror.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from rillet.parallel.shard import Shard
from rillet.parallel.shm_allreduce import ShmAllReduce

COLLECTIVE_TIMEOUT_S = 600  # a collective whose peers never come: raise rather than hang forever


def init_group(shard: Shard, device: torch.device, init_file: str) -> None:
    """Join the group as shard.rank (blocks until every rank has joined)."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process; rillet's "
                           "tensor parallelism needs its own (one tensor-parallel engine per process)")
    # RILLET_TP_BACKEND=gloo runs GPU ranks over gloo, several on one GPU (tests on a one-GPU machine).
    backend = os.environ.get("RILLET_TP_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
    options: dict[str, Any] = {}
    if device.type == "cuda":
        options["device_id"] = device  # binds NCCL's communicator to this rank's GPU at once
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=shard.rank, world_size=shard.size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S), **options)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def graph_capturable() -> bool:
    """Whether the group's collectives can be captured in CUDA graphs: NCCL's can, gloo's cannot."""
    return dist.is_initialized() and dist.get_backend() == "nccl"


class TensorParallelGroup:
    """The collectives of one rank's sharded model (models/llama.py calls them where set)."""

    def __init__(self, shard: Shard, vocab_size: int, shm: ShmAllReduce | None = None) -> None:
        self.shard = shard
        self.shm = shm  # CPU ranks: all-reduces through shared memory where they fit, not gloo
        self.vocab_size = vocab_size  # the model's; each rank holds shard.vocab_size(vocab_size) rows
        self.local_vocab = shard.vocab_size(vocab_size)
        self.vocab_start = shard.rank * self.local_vocab
        # The driver's: sends ("forward", ids, positions, meta) / ("logits", hidden) to the workers.
        self.mirror: Callable[..., None] | None = None

    @staticmethod
    def _staged(x: torch.Tensor) -> bool:
        """gloo with GPU tensors (RILLET_TP_BACKEND=gloo): collectives go through host memory."""
        return x.is_cuda and dist.get_backend() == "gloo"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's partial x (row-parallel outputs), in place."""
        if self.shm is not None and self.shm.fits(x):  # the same choice on every rank: it goes by shape
            return self.shm.all_reduce(x)
        if self._staged(x):
            host = x.cpu()
            dist.all_reduce(host)
            return x.copy_(host)
        dist.all_reduce(x)
        return x

    def all_gather(self, out: torch.Tensor, local: torch.Tensor) -> None:
        """out[r] = rank r's `local` (NCCL only: the decode graphs gather the head's slices)."""
        dist.all_gather_into_tensor(out, local.contiguous())

    def embed(self, embedding: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: each rank fills the rows of the ids it holds, zeros elsewhere, and
        the all-reduce assembles every row."""
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        x = embedding(local.masked_fill(outside, 0))
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return self.all_reduce(x)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's vocabulary slice of the logits [R, local_vocab], assembled on rank 0 as
        [R, vocab_size]; the other ranks get their own slice back (they do not sample)."""
        if self.shm is not None and self.shm.fits(local):
            parts = self.shm.gather(local)
            return local if parts is None else torch.cat(parts, dim=-1)[:, :self.vocab_size]
        mine = local.cpu() if self._staged(local) else local.contiguous()
        if self.shard.rank != 0:
            dist.gather(mine, None, dst=0)
            return local
        parts = [torch.empty_like(mine) for _ in range(self.shard.size)]
        dist.gather(mine, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, :self.vocab_size].to(local.device)
