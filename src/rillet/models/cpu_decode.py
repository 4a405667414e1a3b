"""The decode rows of a step, all layers in one call to rillet's C kernel (kernels/decode_forward.c).

Used for bf16 activations wherever rillet's kernels built (any instruction set), once every
projection runs on rillet's linear kernel (any weight format). Prompt rows keep the torch path in
models/llama.py. The structures below mirror the C ones.
"""

from __future__ import annotations

import ctypes

import torch

from rillet.models import cpu_kernels
from rillet.models.cpu_linear import KernelLinear
from rillet.models.llama import CausalLM


LINEARS = ("qkv", "o", "gate_up", "down")


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "input_norm", "post_attention_norm", *LINEARS, "q_norm", "k_norm", "k_cache", "v_cache")]


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int32) for name in (
            "num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate", "block_size")),
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("num_slots", ctypes.c_int64),
        *((name, ctypes.c_void_p) for name in ("embed", "final_norm", "cos", "sin", "layers")),
    ]


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _linears(layer) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


def supported(model: CausalLM) -> bool:
    """Whether this model, as loaded and packed, can decode through the C forward: the kernels
    built, bf16 activations, and every projection a KernelLinear of the selected kernels. Not for
    a tensor-parallel shard: the C forward has no all-reduce between its layers."""
    kernels = cpu_kernels.load()
    if model.shard.size > 1 or kernels is None or model.embed_tokens.weight.dtype != torch.bfloat16:
        return False
    if not kernels.supports_attention(model.num_heads, model.num_kv_heads, model.head_dim):
        return False
    return all(isinstance(linear, KernelLinear) and linear.kernels is kernels
               for layer in model.layers for linear in _linears(layer))


class DecodeForward:
    """Runs decode rows through every layer and the final norm; returns their hidden states."""

    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int):
        config = model.config
        self._keep = []  # what the C structure points into
        layers = (_Layer * len(model.layers))()
        for entry, layer, (k_cache, v_cache) in zip(layers, model.layers, kv_caches):
            attn = layer.self_attn
            for name, linear in zip(LINEARS, _linears(layer)):
                self._keep.append(linear)  # owns its packed weight, bias and rillet_weight
                setattr(entry, name, ctypes.addressof(linear.weight_struct))
            tensors = dict(
                input_norm=layer.input_layernorm.weight, post_attention_norm=layer.post_attention_layernorm.weight,
                q_norm=attn.q_norm.weight if attn.q_norm is not None else None,
                k_norm=attn.k_norm.weight if attn.k_norm is not None else None,
                k_cache=k_cache, v_cache=v_cache,
            )
            for name, tensor in tensors.items():
                if tensor is not None:
                    tensor = tensor.detach()
                    assert tensor.dtype == torch.bfloat16 and tensor.is_contiguous(), name
                    self._keep.append(tensor)
                setattr(entry, name, _ptr(tensor))
        cos = model.cos_table.float().contiguous()
        sin = model.signed_sin_table.float().contiguous()
        self._keep += [cos, sin, model.embed_tokens.weight, model.norm.weight, layers]
        self.hidden = config.hidden_size
        self.max_positions = cos.shape[0]
        self._model = _Model(
            num_layers=len(model.layers), hidden=config.hidden_size, num_heads=model.num_heads,
            num_kv_heads=model.num_kv_heads, head_dim=model.head_dim, intermediate=config.intermediate_size,
            block_size=block_size, eps=config.rms_norm_eps, scale=model.layers[0].self_attn.scale,
            num_slots=kv_caches[0][0].shape[1], embed=_ptr(model.embed_tokens.weight.detach()),
            final_norm=_ptr(model.norm.weight.detach()), cos=_ptr(cos), sin=_ptr(sin),
            layers=ctypes.cast(layers, ctypes.c_void_p),
        )
        self._fn = _linears(model.layers[0])[0].kernels.lib.rillet_decode_forward

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """tokens, positions, slots: [R] int64; block_tables [R, nb] int32; context_lens [R] int32."""
        rows = tokens.shape[0]
        out = torch.empty((rows, self.hidden), dtype=torch.bfloat16)
        status = self._fn(ctypes.byref(self._model), tokens.data_ptr(), positions.data_ptr(), slots.data_ptr(),
                          block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(), rows,
                          out.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"rillet's decode kernel failed (status {status})")
        return out
