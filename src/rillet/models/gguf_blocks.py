"""Turn a GGUF tensor's raw blocks into rillet's weight forms without going through float.

`convert_tensor(reader_tensor)` (or `convert_blocks(data, type, shape)`) returns:

- Q4_0 -> q4 QuantizedWeight: s = d, m = -8 d                       (exact)
- Q4_1 -> q4: s = d, m = m                                           (exact)
- Q4_K -> q4: each 256-superblock's 8 sub-blocks of 32 with 6-bit scale sc and min mn:
  s = d * sc, m = -dmin * mn                                         (exact)
- Q8_0 -> q8: s = d                                                  (exact; a block holding -128,
  which llama.cpp's quantizer never writes, is requantized onto [-127, 127])
- Q6_K -> q8: 16 sub-blocks of 16, each w = d * sc_j * (q - 32) with an int8 sc_j and q in 0..63.
  rillet has one scale per 32 inputs, so each 32-block (two sub-blocks) is put on one scale. With
  v = sc_j * (q - 32) the block's integers, M = max|v| and g = gcd(|sc_1|, |sc_2|):
    * M / g <= 127: scale = d * g, q8 = v / g                         (exact)
    * otherwise:    scale = d * M / 127, q8 = round(v * 127 / M)      (|error| <= scale / 2,
      i.e. at most max|w| / 254 over the 32-block, about a quarter of Q6_K's own step)
- F32 / F16 / BF16 -> a float torch tensor of that dtype
- any other type (Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ*, TQ*, MXFP4 ...) -> float32 through
  `gguf.quants.dequantize` (logged); the caller quantizes it or keeps it in float.

"Exact" means QuantizedWeight.dequantize() equals gguf.quants.dequantize bit for bit (s * q and
s * q + m round the same way in float32). Everything is vectorized numpy over all blocks.

A 2-D GGUF tensor of ggml shape [k, n] is the [n, k] weight numpy already sees (`.data` rows are
outputs); quantized tensors of other ranks are returned dequantized.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from rillet.models.quantize import QBLOCK, QuantizedWeight

logger = logging.getLogger(__name__)

FLOAT_TYPES = (T.F32, T.F16, T.BF16)
DIRECT_TYPES = {T.Q4_0: "q4", T.Q4_1: "q4", T.Q4_K: "q4", T.Q8_0: "q8", T.Q6_K: "q8"}


def rillet_format(qtype: T) -> str:
    """The form a tensor of this GGML type converts to: "q4", "q8" or "float"."""
    return DIRECT_TYPES.get(T(qtype), "float")


def logical_shape(tensor) -> tuple[int, ...]:
    """A gguf ReaderTensor's shape in numpy/torch order ([n, k] for a linear weight)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist() if hasattr(tensor.shape, "tolist")
                                         else tensor.shape))


def convert_tensor(tensor) -> torch.Tensor | QuantizedWeight:
    """Convert one `gguf.GGUFReader` tensor (see the module docstring)."""
    return convert_blocks(tensor.data, tensor.tensor_type, logical_shape(tensor), name=tensor.name)


def convert_blocks(data: np.ndarray, qtype: T, shape: tuple[int, ...], name: str = "?"
                   ) -> torch.Tensor | QuantizedWeight:
    """Convert raw GGUF data of GGML type `qtype` holding a tensor of (numpy-order) `shape`."""
    qtype = T(qtype)
    shape = tuple(int(d) for d in shape)
    if qtype == T.F32:
        return torch.from_numpy(np.array(np.asarray(data).view(np.float32)).reshape(shape))
    if qtype == T.F16:
        return torch.from_numpy(np.array(np.asarray(data).view(np.float16)).reshape(shape))
    if qtype == T.BF16:
        return torch.from_numpy(np.array(np.asarray(data).view(np.int16)).reshape(shape)).view(torch.bfloat16)
    if qtype in DIRECT_TYPES and len(shape) == 2:
        n, k = shape
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if k % block_size == 0 and k % QBLOCK == 0:
            raw = np.asarray(data).view(np.uint8).reshape(n, k // block_size, type_size)
            return _CONVERTERS[qtype](raw)
    logger.info("GGUF tensor %s: type %s has no direct rillet form; dequantizing it to float32",
                name, qtype.name)
    raw = np.asarray(data)
    if raw.dtype == np.uint8:  # one row of blocks per output, as gguf.GGUFReader hands them out
        raw = raw.reshape(int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1, -1)
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, qtype)).reshape(shape))


def _f16(raw: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte `offset` of every block, as float32 [n, blocks]."""
    return np.ascontiguousarray(raw[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: the low nibbles are elements 0..15, the high 16..31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _q4(values: np.ndarray, scales: np.ndarray, mins: np.ndarray) -> QuantizedWeight:
    n = values.shape[0]
    return QuantizedWeight("q4", torch.from_numpy(np.ascontiguousarray(values).reshape(n, -1)),
                           torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(n, -1)),
                           torch.from_numpy(np.ascontiguousarray(mins, dtype=np.float32).reshape(n, -1)))


def _q8(values: np.ndarray, scales: np.ndarray) -> QuantizedWeight:
    """Scales made non-negative (as quantize() makes them): (-s) * (-q) is the same float."""
    n = values.shape[0]
    negative = scales < 0
    if negative.any():
        scales = np.abs(scales)
        values = np.where(negative[..., None], -values.astype(np.int16), values).astype(np.int8)
    return QuantizedWeight("q8", torch.from_numpy(np.ascontiguousarray(values, dtype=np.int8).reshape(n, -1)),
                           torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(n, -1)))


def _from_q4_0(raw: np.ndarray) -> QuantizedWeight:  # block: d f16, 16 bytes of nibbles
    d = _f16(raw, 0)
    return _q4(_nibbles(raw[..., 2:18]), d, -8 * d)


def _from_q4_1(raw: np.ndarray) -> QuantizedWeight:  # block: d f16, m f16, 16 bytes of nibbles
    return _q4(_nibbles(raw[..., 4:20]), _f16(raw, 0), _f16(raw, 2))


def _from_q8_0(raw: np.ndarray) -> QuantizedWeight:  # block: d f16, 32 int8
    d = _f16(raw, 0)
    q = raw[..., 2:34].view(np.int8)
    bad = (q == -128).any(axis=-1)
    if bad.any():  # rillet's q8 is symmetric: requantize these blocks as quantize() would
        logger.warning("Q8_0 tensor has %d block(s) holding -128; requantizing them", int(bad.sum()))
        q, d = q.copy(), d.copy()
        w = q[bad].astype(np.float32) * d[bad][:, None]
        scale = np.abs(w).max(axis=-1) / np.float32(127)
        q[bad] = np.clip(np.rint(w / np.where(scale > 0, scale, 1)[:, None]), -127, 127).astype(np.int8)
        d[bad] = scale
    return _q8(q, d)


def _q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of a Q4_K superblock -> 8 six-bit scales and 8 six-bit mins."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _from_q4_k(raw: np.ndarray) -> QuantizedWeight:  # d f16, dmin f16, 12 bytes scales, 128 qs
    n, nb, _ = raw.shape
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, mn = _q4_k_scale_min(raw[..., 4:16])
    # 4 chunks of 32 bytes: the low nibbles are sub-block 2c, the high ones 2c + 1
    qs = raw[..., 16:144].reshape(n, nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    values = (qs & np.uint8(0x0F)).reshape(n, nb * 8 * 32)
    scales = d[..., None] * sc.astype(np.float32)
    mins = -(dmin[..., None] * mn.astype(np.float32))
    return _q4(values, scales, mins)


def _from_q6_k(raw: np.ndarray) -> QuantizedWeight:  # ql 128, qh 64, 16 int8 scales, d f16
    n, nb, _ = raw.shape
    ql = raw[..., 0:128].reshape(n, nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(n, nb, 8, 32)
    qh = raw[..., 128:192].reshape(n, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)
    qh = (qh & np.uint8(0x03)).reshape(n, nb, 8, 32)
    q = (ql | (qh << np.uint8(4))).astype(np.int32) - 32  # [n, nb, 8, 32] in -32..31
    sc = raw[..., 192:208].view(np.int8).astype(np.int32).reshape(n, nb, 8, 2)  # per 16 values
    d = _f16(raw, 208)
    v = (q.reshape(n, nb, 8, 2, 16) * sc[..., None]).reshape(n, nb, 8, 32)  # w = d * v exactly
    big = np.abs(v).max(axis=-1)  # [n, nb, 8]: M of each 32-block
    g = np.gcd(np.abs(sc[..., 0]), np.abs(sc[..., 1]))
    exact = (g > 0) & (big <= 127 * g)  # v / g is an integer in [-127, 127]
    g = np.where(exact, g, 1)
    big = np.maximum(big, 1).astype(np.float64)
    values = np.where(exact[..., None], v // g[..., None], np.rint(v * 127.0 / big[..., None]))
    d64 = d.astype(np.float64)[..., None]
    scales = np.where(exact, d64 * g, d64 * big / 127.0)
    return _q8(values.astype(np.int8), scales.astype(np.float32))


_CONVERTERS = {T.Q4_0: _from_q4_0, T.Q4_1: _from_q4_1, T.Q8_0: _from_q8_0, T.Q4_K: _from_q4_k,
               T.Q6_K: _from_q6_k}
