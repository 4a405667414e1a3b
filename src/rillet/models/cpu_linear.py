"""Pre-packed linear layers for bfloat16/float16 (and quantized weights) on the CPU.

In bfloat16, wherever rillet's C kernels built (any instruction set), the projections run on
rillet's own kernel (`KernelLinear`, kernels/linear.c): faster than oneDNN at every batch size
measured here, and its result for a row never depends on the other rows. Quantized weights
(q8/q4, models/quantize.py) run there too. float16, or no kernels, runs on oneDNN
(`PackedLinear`), for the reason below.

PyTorch's default CPU path for a low-precision `F.linear` re-orders the weight into oneDNN's
blocked layout on every call, which costs more than the matmul itself at decode batch sizes
(measured here: 0.8 ms vs 0.1 ms for a 576x3072 layer at batch 1). Packing each weight once at
load time removes that.
"""

from __future__ import annotations

import torch
from torch import nn

from rillet.models import cpu_kernels
from rillet.models.quantize import QuantizedWeight

# ideep's primitive-cache bound (LRU_CACHE_CAPACITY) is set in rillet/__init__.py: it is read
# when torch loads, before this module runs.

EXACT_ROWS = 32  # decode batches: every row count kept exact (padding a decode costs compute)
BUCKETS_PER_OCTAVE = 8


def bucket_rows(rows: int) -> int:
    """Row count a linear runs at: exact up to EXACT_ROWS, above it rounded up to one of
    BUCKETS_PER_OCTAVE steps per power of two (at most 12.5% padding).

    ideep keeps one primitive, with its own buffers (~0.8 MB here), per input shape. Prefill
    steps come in every token count up to the step budget, so unbucketed they made a new shape
    almost every step and resident memory crept up until the primitive cache filled; bucketed,
    a 512-token budget needs at most 32 + 32 shapes per layer shape, all hot after a warm-up.
    """
    if rows <= EXACT_ROWS:
        return rows
    step = max(1, (1 << ((rows - 1).bit_length() - 1)) // BUCKETS_PER_OCTAVE)
    return -(-rows // step) * step


_packing_probes: dict[torch.dtype, bool] = {}


def onednn_packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN can pre-pack linears of this dtype here. Probed once per dtype: float16
    packing needs AVX512-FP16 or AVX-NE-CONVERT, which many CPUs lack (plain nn.Linear then)."""
    if not (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype not in _packing_probes:
        try:
            torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), 1)
            _packing_probes[dtype] = True
        except RuntimeError:
            _packing_probes[dtype] = False
    return _packing_probes[dtype]


_single_row_probes: dict[tuple, bool] = {}


def order_sensitive_rows(rows: int, width: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[rows, width] of ones with +-2^25 at six random places per row. Against ones weights each
    output counts the ones that survive being added next to 2^25, so it changes with the order of
    the additions, where random inputs would differ in the last bit only rarely."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.ones(rows, width)
    for row in x:
        row[torch.randperm(width, generator=generator)[:6]] = torch.tensor([2.0 ** 25, -2.0 ** 25] * 3)
    return x.to(dtype)


def single_row_sums_differ(out_features: int, in_features: int, dtype: torch.dtype, batch_hint: int) -> bool:
    """Whether oneDNN sums a one-row product in another order than a many-row one (for some shapes
    it splits a single row's reduction across threads). A row's output must not depend on how many
    rows share the matmul, or a request's tokens would depend on its batch mates.

    Probed once per shape, on ones weights and `order_sensitive_rows`.
    """
    key = (out_features, in_features, dtype, batch_hint, torch.get_num_threads())
    if key not in _single_row_probes:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(out_features, in_features, dtype=dtype),
                                                         batch_hint)
        x = order_sensitive_rows(4, in_features, dtype)
        one = torch.cat([torch.ops.mkldnn._linear_pointwise(r[None], weight, None, "none", [], "") for r in x])
        many = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        _single_row_probes[key] = not torch.equal(one, many)
    return _single_row_probes[key]


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)
        self.bias = None if bias is None else bias.detach()
        self.min_rows = 2 if single_row_sums_differ(self.out_features, self.in_features, weight.dtype,
                                                    batch_hint) else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padded = max(bucket_rows(rows), self.min_rows) if x.dim() == 2 else rows
        if padded == rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - rows))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")[:rows]


class KernelLinear(nn.Module):
    """A linear on rillet's C kernel, its weight packed once: bf16 (from a bf16 or float weight)
    or a QuantizedWeight. `weight_struct` (a rillet_weight pointing into `packed` and `bias`) is
    what models/cpu_decode.py hands to the C decode step."""

    def __init__(self, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None,
                 kernels: cpu_kernels.Kernels | None = None):
        super().__init__()
        kernels = kernels or cpu_kernels.load()
        if kernels is None:
            raise RuntimeError("rillet's CPU kernels are unavailable here (see models/backend.py)")
        self.kernels = kernels
        self.out_features, self.in_features = weight.shape
        if isinstance(weight, QuantizedWeight):
            self.format = weight.format
            self.packed = kernels.pack(weight.format, weight.values, weight.scales, weight.mins)
        else:
            self.format = "bf16"
            self.packed = kernels.pack("bf16", weight)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16).contiguous()
        self.weight_struct = cpu_kernels.RilletWeight(
            format=cpu_kernels.FORMATS[self.format], n=self.out_features, k=self.in_features,
            packed=self.packed.data_ptr(), bias=None if self.bias is None else self.bias.data_ptr())

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight, bias: torch.Tensor | None,
                       kernels: cpu_kernels.Kernels | None = None) -> "KernelLinear":
        return cls(weight, bias, kernels)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.format}, isa={self.kernels.isa}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.kernels.linear(self.weight_struct, x)
        return self.kernels.linear(self.weight_struct, x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int,
                  kernels: cpu_kernels.Kernels | None) -> nn.Module:
    """A pre-packed linear: on `kernels` (rillet's, for bf16 on any ISA where they built; the
    backend's choice, models/backend.py) or oneDNN's (float16, or no kernels)."""
    if kernels is not None and weight.dtype == torch.bfloat16:
        return KernelLinear(weight, bias, kernels)
    return PackedLinear(weight, bias, batch_hint)


def pack_linears(model: nn.Module, batch_hint: int, kernels: cpu_kernels.Kernels | None) -> None:
    """Replace every nn.Linear inside `model` by a pre-packed one (see packed_linear), in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, packed_linear(child.weight, child.bias, batch_hint, kernels))
