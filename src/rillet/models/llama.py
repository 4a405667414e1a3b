"""Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

The forward pass takes a flat batch of tokens from many sequences (decode tokens and
prefill chunks mixed) and an `AttentionMetadata` saying where each token's keys go and
which cached keys each query may see, in groups of two kinds: `PaddedAttention` (queries
padded to the longest, keys gathered, batched matmuls: prompt chunks, and decodes off the C
kernel) and `PagedDecodeAttention` (one query per sequence, keys read in place by the C kernel). Shapes: T = tokens in the step, H = hidden size,
nh / nkv = query / key-value heads, d = head dim, S = KV slots (blocks * block_size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
import torch.nn.functional as F
from torch import nn

from rillet.models.vector_math import init_vector_math
from rillet.parallel.shard import Shard

if TYPE_CHECKING:
    from rillet.models.cpu_kernels import Kernels
    from rillet.parallel.group import TensorParallelGroup

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


PV_CHUNK = 512  # keys per probs @ V matmul; see attend
PV_CHUNK_FLOAT32 = 128  # the same for attend_float32


@dataclass
class PaddedAttention:
    """Sequences whose queries attend in one padded batched matmul over gathered keys: the step's
    prefill chunks (padded to the longest), or its decodes (one query each) where the C kernel
    is not in use. B sequences, L queries each, W key slots."""
    num_seqs: int  # B
    query_len: int  # L
    first_row: int  # the group's tokens are rows first_row.. of the flat batch, sequence by sequence
    query_rows: torch.Tensor | None  # [B * L] flat-batch row of each padded query; None: no padding
    real_rows: torch.Tensor | None  # [tokens] position of each real query in the padded [B * L]
    blocks: torch.Tensor  # [nkv * B * nb] per head, KV blocks to read (see gather_rows)
    bias: torch.Tensor  # [nkv * B, L * group or 1, W]: 0 where a query sees a key, -inf elsewhere


@dataclass
class PagedDecodeAttention:
    """The step's decodes on rillet's C kernel (models/cpu_kernels.py), which reads the paged
    cache in place: one query per sequence, rows first_row..first_row + B, no padding."""
    num_seqs: int  # B
    first_row: int
    block_tables: torch.Tensor  # [B, nb] int32
    context_lens: torch.Tensor  # [B] int32


AttentionGroup = Union[PaddedAttention, PagedDecodeAttention]


@dataclass
class CudaAttentionMetadata:
    """A step on the GPU kernels (models/llama_cuda.py): every sequence's tokens, decodes and prompt
    chunks alike, attend in one paged-attention launch that reads the cache in place. Sequence i
    owns rows q_starts[i]..q_starts[i] + q_lens[i] of the flat batch, the last q_lens[i] of its
    context_lens[i] tokens. All int32 on the GPU, so that a decode step can replay as a CUDA graph
    with new values in the same tensors."""
    slot_mapping: torch.Tensor  # [T]; a negative slot (a padded graph row) is not written
    block_tables: torch.Tensor  # [B, nb]
    q_starts: torch.Tensor  # [B]
    q_lens: torch.Tensor  # [B]; 0 for a padded graph row
    context_lens: torch.Tensor  # [B]
    max_q_len: int  # a bound on q_lens; sizes the attention grid
    block_size: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] slot each new token's K/V is written to
    groups: list[AttentionGroup]
    block_size: int


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # one fused kernel instead of six ops
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # float32: the exact arithmetic of transformers, for token-for-token parity.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    """This rank's query and KV heads (all of them without tensor parallelism; see parallel/shard.py)."""

    def __init__(self, config, family: str, shard: Shard):
        super().__init__()
        kv_heads = shard.kv_heads(config.num_key_value_heads)
        self.num_heads = config.num_attention_heads // shard.size
        self.num_kv_heads = kv_heads.stop - kv_heads.start
        self.head_dim = head_dim_of(config)
        bias = family == "qwen2" or bool(getattr(config, "attention_bias", False))
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        # q, k and v projections fused into one matmul (weights concatenated at load time).
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)
        if family == "qwen3":
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = self.head_dim ** -0.5
        self.kernels: Kernels | None = None  # rillet's CPU kernels, set by CausalLM.use_cpu_kernels
        self.tp: TensorParallelGroup | None = None  # sums o_proj's partial outputs (CausalLM.use_tensor_parallel)
        self.attention_float32 = False  # bf16 prompt attention as float32 matmuls (see attend_float32)

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata):
        T = x.shape[0]
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(T, nh + 2 * nkv, d)
        qk, v = qkv[:, :nh + nkv], qkv[:, nh + nkv:]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :nh]), self.k_norm(qk[:, nh:])), dim=1)
        # Rotary embedding of q and k at once; rotate_half(x) * sin == x.roll(d/2) * sin_signed.
        qk = torch.addcmul(qk * cos, qk.roll(d // 2, dims=-1), sin)
        q, k = qk[:, :nh], qk[:, nh:]
        # Caches are head-major, [nkv, S, d]: a gather of slots is then already laid out
        # [nkv, B, K, d] for batched matmuls, with no copy of the gathered keys.
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))

        only = meta.groups[0] if len(meta.groups) == 1 else None
        if only is not None and (isinstance(only, PagedDecodeAttention) or only.query_rows is None):
            out = self._attend_group(q, k_cache, v_cache, only, meta.block_size)
        else:
            out = torch.empty((T, nh * d), dtype=q.dtype, device=q.device)
            for group in meta.groups:
                o = self._attend_group(q, k_cache, v_cache, group, meta.block_size)
                if isinstance(group, PaddedAttention) and group.real_rows is not None:
                    o = o.index_select(0, group.real_rows)
                out[group.first_row:group.first_row + o.shape[0]] = o
        out = self.o_proj(out)
        return out if self.tp is None else self.tp.all_reduce(out)

    def _attend_group(self, q, k_cache, v_cache, group: AttentionGroup, block_size: int) -> torch.Tensor:
        """Attention of one group's queries over their cached keys: [B * L, nh * d]. Query heads are
        grouped by the KV head they share (GQA); the matmuls batch (KV head, sequence)."""
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if isinstance(group, PagedDecodeAttention):
            assert self.kernels is not None, "a PagedDecodeAttention group needs CausalLM.use_cpu_kernels"
            B = group.num_seqs
            return self.kernels.paged_decode_attention(q[group.first_row:group.first_row + B], k_cache, v_cache,
                                                       group.block_tables, group.context_lens, block_size,
                                                       self.scale)
        B, L = group.num_seqs, group.query_len
        if group.query_rows is None:
            qg = q[group.first_row:group.first_row + B * L]
        else:
            qg = q.index_select(0, group.query_rows)
        qg = qg.reshape(B, L, nkv, nh // nkv, d).permute(2, 0, 1, 3, 4).reshape(nkv * B, L * (nh // nkv), d)
        kg = gather_rows(k_cache, group.blocks, block_size).view(nkv * B, -1, d)  # [nkv*B, W, d]
        vg = gather_rows(v_cache, group.blocks, block_size).view(nkv * B, -1, d)
        if self.attention_float32 and qg.dtype == torch.bfloat16:  # decided by models/backend.py
            og = attend_float32(qg, kg, vg, group.bias, self.scale)
        else:
            og = attend(qg, kg, vg, group.bias, self.scale)
        return og.view(nkv, B, L, nh // nkv, d).permute(1, 2, 0, 3, 4).reshape(B * L, nh * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v for q [b, R, d], k and v [b, W, d].

    Every prompt row goes through these same matmuls (decode rows too, where rillet's C decode
    kernel is not in use), and on the CPU their result for a row does not depend on the other
    rows or on masked padding: a request's tokens are then the same whatever its batch mates,
    however its prompt is chunked, and whether its prefix came from the cache. The softmax runs
    in float32, as transformers does. probs @ V sums over keys in fixed 512-key chunks because
    oneDNN blocks longer reductions by their length (tested in tests/unit/test_invariant_kernels.py).
    """
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    width = k.shape[1]
    if width <= PV_CHUNK:
        return torch.bmm(probs, v)
    out = torch.bmm(probs[:, :, :PV_CHUNK], v[:, :PV_CHUNK]).float()
    for start in range(PV_CHUNK, width, PV_CHUNK):
        out += torch.bmm(probs[:, :, start:start + PV_CHUNK], v[:, start:start + PV_CHUNK])
    return out.to(v.dtype)


def attend_float32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
                   ) -> torch.Tensor:
    """`attend` for bf16 tensors on a CPU without bf16 dot products (AVX2, NEON), where oneDNN's
    emulated bf16 matmuls run at a fraction of float32's speed: the matmuls run in float32.

    Batch invariance holds as in `attend`, by other means: float32 softmax rows of different
    widths take different vectorised paths, so the scores are rounded to bf16 first (as `attend`
    computes them) and the bf16 softmax path normalises them; probs @ V sums over keys in fixed
    128-key chunks, below any K blocking of the float32 GEMM (tests/unit/test_attend_float32.py).
    """
    scores = torch.baddbmm(bias.float(), q.float(), k.float().transpose(1, 2), alpha=scale).to(torch.bfloat16)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    v = v.float()
    out = torch.bmm(probs[:, :, :PV_CHUNK_FLOAT32], v[:, :PV_CHUNK_FLOAT32])
    for start in range(PV_CHUNK_FLOAT32, k.shape[1], PV_CHUNK_FLOAT32):
        out += torch.bmm(probs[:, :, start:start + PV_CHUNK_FLOAT32], v[:, start:start + PV_CHUNK_FLOAT32])
    return out.to(q.dtype)


def gather_rows(cache: torch.Tensor, rows: torch.Tensor, row_size: int) -> torch.Tensor:
    """Copy rows of `row_size` consecutive slots out of a [nkv, S, d] cache. `rows` indexes the cache
    viewed as [nkv * S / row_size, row_size * d] (head h's rows offset by h * S / row_size), so one
    dim-0 index_select returns them head-major, [nkv, rows / nkv, row_size * d]. On the CPU this is
    several times faster than advanced indexing or index_select along the slot dimension."""
    nkv, _, d = cache.shape
    return cache.view(-1, row_size * d).index_select(0, rows).view(nkv, -1, row_size * d)


class MLP(nn.Module):
    def __init__(self, config, shard: Shard):
        super().__init__()
        self.intermediate = config.intermediate_size // shard.size  # this rank's rows
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate, bias=False)
        self.down_proj = nn.Linear(self.intermediate, config.hidden_size, bias=False)
        self.tp: TensorParallelGroup | None = None  # sums down_proj's partial outputs

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        out = self.down_proj(F.silu(gate) * up)
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, config, family: str, shard: Shard):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, family, shard)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, shard)
        self.kernels = None  # fuses each residual add with its norm where set (CausalLM.use_cpu_kernels)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm):
        """(norm(residual + x), residual + x); the first layer's residual is its input."""
        if residual is None:
            return norm(x), x
        if self.kernels is not None:
            return self.kernels.add_rms_norm(residual, x, norm.weight, norm.eps), residual  # residual updated in place
        residual = residual + x
        return norm(residual), residual

    def forward(self, x, residual, cos, sin, k_cache, v_cache, meta):
        """x: the previous layer's output (or the embeddings, with residual None). Returns this
        layer's output and the residual stream before it, as vLLM's layers do, so that each
        residual add can fuse with the norm after it."""
        h, residual = self.add_norm(x, residual, self.input_layernorm)
        h = self.self_attn(h, cos, sin, k_cache, v_cache, meta)
        h, residual = self.add_norm(h, residual, self.post_attention_layernorm)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    """The whole model, or one tensor-parallel rank's shard of it (`shard`; parallel/shard.py),
    whose collectives are set by use_tensor_parallel."""

    def __init__(self, config, family: str, shard: Shard = Shard()):
        super().__init__()
        self.config = config
        self.family = family
        self.shard = shard
        vocab = shard.vocab_size(config.vocab_size)  # this rank's token ids (all of them at size 1)
        self.embed_tokens = nn.Embedding(vocab, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, family, shard) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(config.hidden_size, vocab, bias=False)
        self.tp: TensorParallelGroup | None = None
        self.cos_table: torch.Tensor | None = None  # [P, d], filled by set_rope_positions
        self.signed_sin_table: torch.Tensor | None = None

    def set_rope_positions(self, max_positions: int) -> None:
        """Precompute rotary cos/sin for positions 0..max_positions-1 on the model's device."""
        with torch.device("cpu"):
            cos, sin = rope_tables(self.config, max_positions)
        device = self.embed_tokens.weight.device
        half = sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # pairs with roll, see Attention
        self.cos_table, self.signed_sin_table = cos.to(device), signed_sin.to(device)

    @property
    def num_heads(self) -> int:
        return self.layers[0].self_attn.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attn.head_dim

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata | CudaAttentionMetadata
                ) -> torch.Tensor:
        """input_ids, positions: [T]; kv_caches: per layer (k [nkv, S, d], v [nkv, S, d]). Returns [T, H]."""
        if self.tp is not None and self.tp.mirror is not None:
            self.tp.mirror("forward", input_ids, positions, meta)
        if isinstance(meta, CudaAttentionMetadata):
            from rillet.models import llama_cuda

            return llama_cuda.forward(self, input_ids, positions, kv_caches, meta)
        x = self.embed(input_ids)
        cos = self.cos_table[positions].to(x.dtype).unsqueeze(1)  # [T, 1, d]
        sin = self.signed_sin_table[positions].to(x.dtype).unsqueeze(1)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, k_cache, v_cache, meta)
        return self.layers[-1].add_norm(x, residual, self.norm)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embed_tokens(input_ids)
        return self.tp.embed(self.embed_tokens, input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [R, vocab] of hidden states [R, H] (on a tensor-parallel worker: its slice)."""
        if self.tp is not None and self.tp.mirror is not None:
            self.tp.mirror("logits", hidden)
        if self.lm_head is not None:
            logits = self.lm_head(hidden).float()
        else:
            logits = F.linear(hidden, self.embed_tokens.weight).float()
        return logits if self.tp is None else self.tp.gather_logits(logits)

    def use_tensor_parallel(self, group: TensorParallelGroup) -> None:
        """Sum the row-parallel outputs and assemble the embeddings and logits across the group."""
        self.tp = group
        for layer in self.layers:
            layer.self_attn.tp = layer.mlp.tp = group

    def use_cpu_kernels(self, kernels: Kernels, attention_float32: bool = False) -> None:
        """Decode attention and the residual add + RMSNorm on rillet's C kernels (bf16 on the
        CPU); `attention_float32`: padded attention as float32 matmuls (models/backend.py decides)."""
        for layer in self.layers:
            layer.kernels = layer.self_attn.kernels = kernels
            layer.self_attn.attention_float32 = attention_float32

    def pack_for_cpu(self, batch_hint: int, kernels: Kernels | None) -> None:
        """Pre-pack every projection (and the tied output head) on `kernels`, or oneDNN's where
        None; see cpu_linear."""
        from rillet.models.cpu_linear import pack_linears, packed_linear

        pack_linears(self, batch_hint, kernels)
        if self.lm_head is None:
            self.lm_head = packed_linear(self.embed_tokens.weight, None, batch_hint, kernels)


def rope_tables(config, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [P, d] in float32, computed as transformers does (all rope_types it knows)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    init_vector_math()  # else the parallel cos below may be MKL's first call: see vector_math.py
    rotary = LlamaRotaryEmbedding(config=config)
    inv_freq = rotary.inv_freq.float()
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = (inv_freq[:, None] @ positions[None, :]).T  # [P, d/2], same op order as transformers
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling


def head_dim_of(config) -> int:
    """Dimensions per attention head: the config's head_dim, else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def family_of(config) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    model_type = getattr(config, "model_type", "")
    if model_type in SUPPORTED_ARCHITECTURES.values():
        return model_type
    raise ValueError(
        f"unsupported model architecture {archs or model_type!r}; rillet supports "
        + ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    )
