"""Put a loaded model's projections and output head on quantized kernel linears.

Decode on a CPU streams every weight once per step, so its speed follows the bytes per weight:
bf16 2, int8 ~1.06, 4-bit ~0.63 (scales and mins included). Two sources:

- `--quantization int8|q4`: the float weights are quantized here, at load (models/quantize.py).
  With q4 the output head stays int8, as llama.cpp's Q4_K_M keeps it in Q6_K: the head decides
  every token, and 4 bits there cost more quality than they save time.
- a GGUF file's own blocks (backend "gguf"): read as they are (models/gguf_model.py), so the
  default model's Q4_1 weights run without a detour through bf16.

A projection whose input width is not a multiple of the 32-input block (or a GGUF tensor kept in
float) stays on the bf16 kernel, and a log line says so: nothing is refused silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from rillet.models.backend import Backend
from rillet.models.cpu_linear import KernelLinear
from rillet.models.llama import CausalLM
from rillet.models.quantize import QBLOCK, QuantizedWeight, quantize

logger = logging.getLogger(__name__)

HEAD_FORMAT = "q8"  # the output head's format under either --quantization (see above)


def _projections(model: CausalLM):
    """(parent module, attribute, checkpoint-style name) of every projection."""
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}"
        yield layer.self_attn, "qkv_proj", f"{prefix}.self_attn.qkv_proj.weight"
        yield layer.self_attn, "o_proj", f"{prefix}.self_attn.o_proj.weight"
        yield layer.mlp, "gate_up_proj", f"{prefix}.mlp.gate_up_proj.weight"
        yield layer.mlp, "down_proj", f"{prefix}.mlp.down_proj.weight"


def _kernel_linear(weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None) -> nn.Module:
    if isinstance(weight, QuantizedWeight):
        return KernelLinear.from_quantized(weight, bias)
    return KernelLinear(weight.to(torch.bfloat16), bias)


def quantize_model(model: CausalLM, backend: Backend, gguf: Path | None = None) -> dict[str, int]:
    """Replace the projections and the output head in place; returns the count of linears per format."""
    if backend.weights == "gguf":
        if gguf is None:
            raise ValueError("the gguf weight format needs the model's .gguf file")
        from rillet.models.gguf_model import gguf_weights, read_gguf_header

        tensors = gguf_weights(read_gguf_header(gguf), model.config)  # the config is loaded already
        source = lambda name, linear: tensors.get(name, linear.weight)  # noqa: E731
        head_source = tensors.get("lm_head.weight", tensors.get("embed_tokens.weight"))
    else:
        fmt = backend.quantize_to
        source = lambda name, linear: _quantized_or_float(linear.weight, fmt, name)  # noqa: E731
        head_weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        head_source = _quantized_or_float(head_weight, HEAD_FORMAT, "lm_head")

    formats: Counter[str] = Counter()
    for parent, attribute, name in _projections(model):
        linear = getattr(parent, attribute)
        weight = source(name, linear)
        setattr(parent, attribute, _kernel_linear(weight, linear.bias))
        formats[weight.format if isinstance(weight, QuantizedWeight) else "bf16"] += 1
    if head_source is None:
        head_source = model.embed_tokens.weight
    model.lm_head = _kernel_linear(head_source, None)
    formats[head_source.format if isinstance(head_source, QuantizedWeight) else "bf16"] += 1
    logger.info("weights: %s", ", ".join(f"{count} linears {fmt}" for fmt, count in sorted(formats.items())))
    return dict(formats)


def _quantized_or_float(weight: torch.Tensor, fmt: str, name: str) -> torch.Tensor | QuantizedWeight:
    if weight.shape[1] % QBLOCK:
        logger.warning("%s: %d inputs are not a multiple of %d; it stays bf16", name, weight.shape[1], QBLOCK)
        return weight
    return quantize(weight.detach().float(), fmt)
