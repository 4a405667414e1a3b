"""How a model splits across tensor-parallel ranks, Megatron-style (as vLLM does):

- column-parallel: the fused QKV projection (by heads) and gate/up projection (by rows of the
  intermediate), so each rank computes its own heads and its own slice of the MLP;
- row-parallel: the output and down projections take that slice as input, and their partial
  sums meet in one all-reduce each (parallel/group.py);
- vocab-parallel: the embedding and the output head hold a contiguous range of token ids each,
  the vocabulary padded up to a multiple of the ranks;
- KV heads: split across ranks, or, where there are fewer KV heads than ranks, each rank keeps
  the one its query heads attend to (a copy per rank, as vLLM replicates them).

Norms and rotary tables are replicated. Everything here is shape arithmetic, no collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of a tensor-parallel group of `size` ranks."""
    rank: int = 0
    size: int = 1

    def part(self, n: int) -> slice:
        """This rank's contiguous n / size of n (n divisible by size)."""
        local = n // self.size
        return slice(self.rank * local, (self.rank + 1) * local)

    def kv_heads(self, num_kv_heads: int) -> slice:
        """The KV heads this rank keeps: its part of them, or the one its query heads use."""
        if num_kv_heads >= self.size:
            return self.part(num_kv_heads)
        head = self.rank * num_kv_heads // self.size
        return slice(head, head + 1)

    def vocab_size(self, vocab: int) -> int:
        """Rows of the embedding and head on each rank: the vocabulary padded to a multiple of size."""
        return -(-vocab // self.size)


def check_shardable(config, size: int) -> None:
    """Raise ValueError naming what keeps this model from splitting over `size` ranks."""
    if size == 1:
        return
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    problems = []
    if heads % size:
        problems.append(f"{heads} attention heads are not divisible by {size}")
    if kv >= size and kv % size:
        problems.append(f"{kv} KV heads are not divisible by {size}")
    if kv < size and size % kv:
        problems.append(f"{size} ranks are not a multiple of the {kv} KV heads")
    if config.intermediate_size % size:
        problems.append(f"the MLP's {config.intermediate_size} rows are not divisible by {size}")
    if problems:
        raise ValueError(f"tensor_parallel_size {size} does not fit this model: {'; '.join(problems)}")


@dataclass(frozen=True)
class ShardPlan:
    """Cuts a checkpoint's full tensors to one rank's shard, by name (the loader's names, without
    'model.'): `take(name, tensor)`."""
    shard: Shard
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def of(cls, config, shard: Shard) -> ShardPlan:
        from rillet.models.llama import head_dim_of

        return cls(shard, head_dim_of(config), config.num_attention_heads, config.num_key_value_heads,
                   config.intermediate_size, config.vocab_size)

    def _heads(self, heads: slice) -> slice:
        return slice(heads.start * self.head_dim, heads.stop * self.head_dim)

    def take(self, name: str, source: Any) -> torch.Tensor:
        """This rank's piece of checkpoint tensor `name`, read from `source`: a tensor, or a
        safetensors slice (`safe_open(...).get_slice(key)`), of which only that piece is read."""
        shard = self.shard
        if shard.size == 1:
            return source[:]
        if ".self_attn.q_proj." in name:
            return source[self._heads(shard.part(self.num_heads))]
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            return source[self._heads(shard.kv_heads(self.num_kv_heads))]
        if ".self_attn.o_proj." in name:
            return source[:, self._heads(shard.part(self.num_heads))]
        if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
            return source[shard.part(self.intermediate_size)]
        if ".mlp.down_proj." in name:
            return source[:, shard.part(self.intermediate_size)]
        if name in ("embed_tokens.weight", "lm_head.weight"):
            local = shard.vocab_size(self.vocab_size)
            rows = source[shard.rank * local:(shard.rank + 1) * local]
            padded = rows.new_zeros((local, rows.shape[1]))  # the last rank's padding rows stay zero
            padded[:rows.shape[0]] = rows
            return padded
        return source[:]  # norms: replicated
