"""Quantized weights in the canonical form rillet's CPU linear kernels pack (kernels/rillet_kernels.h).

A `QuantizedWeight` is an [n, k] linear weight as integer values plus float scales (and mins)
per QBLOCK inputs of each output:

- "q8": values int8 in [-127, 127]; w = scale * q          (llama.cpp's Q8_0)
- "q4": values uint8 in [0, 15];   w = scale * q + min     (Q4_1; Q4_0 and Q4_K map onto it)

Rows are independent, so the q, k and v projections (or gate and up) fuse by concatenating
along n, as the float weights do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QBLOCK = 32
FORMATS = ("q8", "q4")


@dataclass
class QuantizedWeight:
    format: str  # "q8" | "q4"
    values: torch.Tensor  # [n, k] int8 (q8) or uint8 (q4)
    scales: torch.Tensor  # [n, k // QBLOCK] float32
    mins: torch.Tensor | None = None  # [n, k // QBLOCK] float32, q4 only

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown quantized format {self.format!r}; expected one of {FORMATS}")
        n, k = self.values.shape
        if k % QBLOCK:
            raise ValueError(f"a quantized weight needs in_features divisible by {QBLOCK}, got {k}")
        if tuple(self.scales.shape) != (n, k // QBLOCK):
            raise ValueError(f"scales shape {tuple(self.scales.shape)} != {(n, k // QBLOCK)}")
        if (self.format == "q4") != (self.mins is not None):
            raise ValueError("q4 weights need mins; q8 weights have none")

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [n, k] these values stand for."""
        n, k = self.values.shape
        q = self.values.to(torch.float32).view(n, k // QBLOCK, QBLOCK)
        w = q * self.scales[:, :, None]
        if self.mins is not None:
            w = w + self.mins[:, :, None]
        return w.view(n, k).to(dtype)

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Fuse weights of the same format along the output dimension."""
        formats = {p.format for p in parts}
        if len(formats) != 1:
            raise ValueError(f"cannot fuse weights of formats {sorted(formats)}")
        mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
        return QuantizedWeight(parts[0].format, torch.cat([p.values for p in parts]),
                               torch.cat([p.scales for p in parts]), mins)


def quantize(weight: torch.Tensor, format: str) -> QuantizedWeight:
    """Quantize a float [n, k] weight (k a multiple of QBLOCK) per QBLOCK inputs of each output.

    - "q8": symmetric absmax: scale = max|w| / 127, q = round(w / scale) (ties to even), so
      |w - scale * q| <= scale / 2 and q lies in [-127, 127];
    - "q4": asymmetric min/max: scale = (max - min) / 15, min = min(w), q = round((w - min) / scale)
      clamped to 0..15, so |w - (scale * q + min)| <= scale / 2.

    A block of equal values (scale 0) quantizes to q = 0 and reproduces exactly (q4: the min;
    q8: only a block of zeros). Computed in float32 whatever the input dtype.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown quantized format {format!r}; expected one of {FORMATS}")
    if weight.dim() != 2:
        raise ValueError(f"quantize takes an [n, k] weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % QBLOCK:
        raise ValueError(f"a quantized weight needs in_features divisible by {QBLOCK}, got {k}")
    blocks = weight.detach().to(torch.float32).reshape(n, k // QBLOCK, QBLOCK)
    if format == "q8":
        scales = blocks.abs().amax(dim=-1) / 127
        divisor = torch.where(scales > 0, scales, torch.ones_like(scales))  # scale 0: all zeros
        q = torch.round(blocks / divisor[:, :, None]).clamp_(-127, 127)
        return QuantizedWeight("q8", q.to(torch.int8).reshape(n, k), scales.contiguous())
    lo = blocks.amin(dim=-1)
    scales = (blocks.amax(dim=-1) - lo) / 15
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))  # scale 0: all equal the min
    q = torch.round((blocks - lo[:, :, None]) / divisor[:, :, None]).clamp_(0, 15)
    return QuantizedWeight("q4", q.to(torch.uint8).reshape(n, k), scales.contiguous(), lo.contiguous())
