"""rillet's own C kernels for the CPU, built once with the system's C compiler and cached.

Decode attention is the main one: PyTorch has no op that reads a paged KV cache in place, so the
torch path first copies every sequence's K and V out of the cache (at batch 32 that copy alone
took as long as the attention matmuls). The kernel reads them where they are. Another fuses
the residual add with the RMSNorm that follows it (ten small torch ops, ~20 us each call at
decode batch sizes, into one). The bf16 linear (kernels/linear_bf16.c, where the CPU has
AVX512-BF16) replaces oneDNN for every projection: faster at every batch size, and a row's
result never depends on its batch mates.

The library is compiled on first use (`cc -O3 -march=native -fopenmp`, about a second) into
rillet's cache directory, keyed by the sources, the compiler and the CPU. Without a working
compiler, or with RILLET_CPU_KERNELS=0, rillet falls back to the torch path and says so once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"
SOURCES = (KERNELS / "paged_attention.c", KERNELS / "linear_bf16.c", KERNELS / "decode_forward.c")
HEADERS = (KERNELS / "rillet_kernels.h",)
_library: ctypes.CDLL | None = None
_tried = False


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-o", str(built),
             *map(str, SOURCES), "-lm"],
            check=True, capture_output=True, text=True, timeout=120,
        )
        os.replace(built, target)  # atomic: a concurrent start never loads half a file


def load() -> ctypes.CDLL | None:
    """The kernel library, built if needed; None where it cannot be (then use the torch path)."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("RILLET_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: decode attention and norms use the slower torch path")
        return None
    from rillet.models.resolve import cache_root

    text = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(text + compiler.encode() + _cpu_signature().encode()
                         + torch.__version__.encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"rillet_cpu_{key}.so"
    try:
        if not target.exists():
            _build(target, compiler)
        library = ctypes.CDLL(str(target))  # after torch: its libgomp (same soname) is reused
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("could not build rillet's CPU kernels (%s): decode attention and norms use the "
                       "slower torch path", str(detail).strip()[:500])
        return None
    fn = library.rillet_paged_decode_attention_bf16
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
                   ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p,
                   ctypes.c_int32]
    fn = library.rillet_add_rms_norm_bf16
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int32, ctypes.c_float, ctypes.c_int32]
    library.rillet_linear_packed_size.restype = ctypes.c_int64
    library.rillet_linear_packed_size.argtypes = [ctypes.c_int64, ctypes.c_int64]
    library.rillet_linear_pack_bf16.restype = None
    library.rillet_linear_pack_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    if library.rillet_linear_bf16_available():
        fn = library.rillet_linear_bf16
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32]
        fn = library.rillet_decode_forward_bf16
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]
    _library = library
    return library


def supports(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the paged decode kernel can run this model here."""
    if device.type != "cpu" or dtype != torch.bfloat16 or num_heads % num_kv_heads:
        return False
    library = load()
    return (library is not None and head_dim % 16 == 0 and head_dim <= library.rillet_max_head_dim()
            and num_heads // num_kv_heads <= library.rillet_max_group())


def linear_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether rillet's bf16 linear kernel (AVX512-BF16) can run here."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    library = load()
    return library is not None and bool(library.rillet_linear_bf16_available())


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's [out, in] bf16 weight in the kernel's tiled layout (see linear_bf16.c)."""
    library = load()
    if library is None or not library.rillet_linear_bf16_available():
        raise RuntimeError("rillet's bf16 linear kernel is unavailable here (see linear_supported)")
    weight = weight.detach().contiguous()
    n, k = weight.shape
    packed = torch.empty(library.rillet_linear_packed_size(n, k), dtype=torch.bfloat16)
    library.rillet_linear_pack_bf16(weight.data_ptr(), packed.data_ptr(), n, k)
    return packed


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [rows, in] bf16 (rows may be strided) @ the packed weight^T (+ bias) -> [rows, out] bf16."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, in_features = x.shape
    out = torch.empty((rows, out_features), dtype=torch.bfloat16)
    _library.rillet_linear_bf16(x.data_ptr(), x.stride(0), packed.data_ptr(),
                                None if bias is None else bias.data_ptr(), out.data_ptr(),
                                rows, out_features, in_features, torch.get_num_threads())
    return out


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x in place (bf16), then returns RMSNorm(residual) * weight. [rows, dim] bf16."""
    assert residual.is_contiguous() and x.is_contiguous() and residual.shape == x.shape
    out = torch.empty_like(residual)
    _library.rillet_add_rms_norm_bf16(residual.data_ptr(), x.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                      residual.shape[0], residual.shape[1], eps, torch.get_num_threads())
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           scale: float) -> torch.Tensor:
    """q: [B, nh, d] (rows may be strided, heads contiguous); caches [nkv, S, d]; block_tables
    [B, nb] int32; context_lens [B] int32. Returns [B, nh * d]."""
    B, nh, d = q.shape
    nkv, num_slots, _ = k_cache.shape
    assert q.stride(2) == 1 and q.stride(1) == d and block_tables.is_contiguous() and context_lens.is_contiguous()
    out = torch.empty((B, nh * d), dtype=q.dtype)
    _library.rillet_paged_decode_attention_bf16(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), num_slots,
        block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(), B, nh, nkv, d, block_size,
        scale, out.data_ptr(), torch.get_num_threads(),
    )
    return out
