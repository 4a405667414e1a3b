"""The Llama-family forward pass on the GPU kernels (models/cuda_kernels.py).

The same weights and the same arithmetic as `CausalLM`'s torch path (models/llama.py), with
fewer launches per layer and no gather of the KV context:

    add + RMSNorm -> QKV matmul -> rotary + cache write -> paged attention -> O matmul
    -> add + RMSNorm -> gate/up matmul -> SiLU * up -> down matmul

Nine launches a layer, none of which asks the host for a shape that changes between decode
steps, so engine/cuda_graphs.py can capture a whole decode step as one CUDA graph. A step of
decodes only (max_q_len 1) rotates q and k and writes the cache inside the attention launch:
eight. At one row (a lone stream's decode step) in bf16/fp16 the matmuls are Triton GEMVs
instead of cuBLAS, the down projection reads SiLU * up on the fly and the QKV and gate/up GEMVs
read add + RMSNorm on the fly: five launches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from rillet.models import cuda_kernels

if TYPE_CHECKING:
    from rillet.models.llama import CausalLM, CudaAttentionMetadata, RMSNorm


def _add_norm(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    return cuda_kernels.add_rms_norm(x, residual, norm.weight, norm.eps)


def _gemv_fits(x: torch.Tensor, layer: nn.Module) -> bool:
    """A lone row through a plain nn.Linear whose weight the GEMV takes."""
    return x.shape[0] == 1 and type(layer) is nn.Linear and cuda_kernels.gemv_takes(layer.weight)


def _linear(layer: nn.Module, x: torch.Tensor, after_small_launch: bool = False) -> torch.Tensor:
    if _gemv_fits(x, layer):
        return cuda_kernels.gemv(x, layer.weight, layer.bias, after_small_launch=after_small_launch)
    return layer(x)


def _norm_linear(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer(h), new residual) for h, new residual = _add_norm(x, residual, norm): at one row,
    one launch (the GEMV reads rms_norm(x + residual) itself)."""
    if residual is not None and _gemv_fits(x, layer):
        return cuda_kernels.add_rms_norm_gemv(x, residual, norm.weight, norm.eps, layer.weight, layer.bias)
    h, residual = _add_norm(x, residual, norm)
    return _linear(layer, h), residual


def _down(mlp: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    if _gemv_fits(gate_up, mlp.down_proj):
        out = cuda_kernels.gemv(gate_up, mlp.down_proj.weight, mlp.down_proj.bias, silu_mul_input=True)
    else:
        out = mlp.down_proj(cuda_kernels.silu_mul(gate_up))
    return out if mlp.tp is None else mlp.tp.all_reduce(out)


def forward(model: CausalLM, input_ids: torch.Tensor, positions: torch.Tensor,
            kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: CudaAttentionMetadata) -> torch.Tensor:
    """Hidden states [T, H] after the final norm, for input_ids and positions [T]."""
    assert model.cos_table is not None and model.signed_sin_table is not None
    x = model.embed(input_ids)
    residual: torch.Tensor | None = None
    T = x.shape[0]
    for layer, (k_cache, v_cache) in zip(model.layers, kv_caches):
        attn = layer.self_attn
        nh, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        qkv, residual = _norm_linear(attn.qkv_proj, x, residual, layer.input_layernorm)
        if attn.q_norm is not None:  # Qwen3: per-head norms of q and k before the rotation
            heads = qkv.view(T, nh + 2 * nkv, d)
            heads[:, :nh] = attn.q_norm(heads[:, :nh])
            heads[:, nh:nh + nkv] = attn.k_norm(heads[:, nh:nh + nkv])
        if meta.max_q_len == 1:  # decodes only: rotary and the cache write inside the attention launch
            o = cuda_kernels.rope_cache_decode_attention(
                qkv, positions, model.cos_table, model.signed_sin_table, k_cache, v_cache, meta.slot_mapping, nh, d,
                meta.block_tables, meta.q_starts, meta.q_lens, meta.context_lens, meta.block_size, attn.scale)
        else:
            q = cuda_kernels.rope_and_cache(qkv, positions, model.cos_table, model.signed_sin_table, k_cache,
                                            v_cache, meta.slot_mapping, nh, nkv, d)
            o = cuda_kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.q_starts, meta.q_lens,
                                             meta.context_lens, meta.max_q_len, meta.block_size, attn.scale)
        o = _linear(attn.o_proj, o, after_small_launch=True)  # a lone row's attention: 8 programs
        if attn.tp is not None:  # row-parallel: every rank's partial sum
            attn.tp.all_reduce(o)
        gate_up, residual = _norm_linear(layer.mlp.gate_up_proj, o, residual, layer.post_attention_layernorm)
        x = _down(layer.mlp, gate_up)
    return _add_norm(x, residual, model.norm)[0]
