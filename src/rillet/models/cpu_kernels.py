"""rillet's own C kernels for the CPU, built per instruction set with the system's C compiler.

Decode attention reads the paged KV cache in place (PyTorch has no op for that: the torch path
copies every sequence's K and V out first); add_rms_norm fuses the residual add with the norm
after it; the linear kernels (bf16, and q8/q4 where linear_quant.c is built) replace oneDNN for
every projection, and a row's result never depends on its batch mates; decode_forward runs a
whole decode step in one call (models/cpu_decode.py).

The same sources build into one library per variant (models/cpu_isa.py: avx512, avx2, neon,
generic), each with explicit ISA flags rather than -march=native, cached under
cache_root()/kernels keyed by the sources, the compiler, the flags and the torch version. The
best variant this CPU runs is used unless RILLET_CPU_ISA names another; several variants can be
loaded side by side (`load(isa)`). Without a working compiler, or with RILLET_CPU_KERNELS=0,
rillet falls back to the torch path and says so once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from rillet.models import cpu_isa

logger = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"
SOURCES = ("linear.c", "linear_bf16.c", "linear_quant.c", "paged_attention.c", "decode_forward.c", "sampling.c")
HEADERS = ("rillet_kernels.h",)
# Sources another change brings; until present the build leaves their formats out.
OPTIONAL = {"linear_quant.c": "-DRILLET_NO_QUANT"}
FORMATS = {"bf16": 0, "q8": 1, "q4": 2}  # RILLET_WEIGHT_*
FEATURE_BITS = {"bf16_dot": 1, "vnni": 2, "dotprod": 4, "openmp": 8}  # rillet_kernel_features
HEAD_DIM_MULTIPLE = 8  # paged attention's head_dim granularity


class RilletWeight(ctypes.Structure):
    """rillet_weight (rillet_kernels.h)."""
    _fields_ = [("format", ctypes.c_int32), ("reserved", ctypes.c_int32), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("packed", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


_P, _I32, _I64, _F32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {  # name: (restype, argtypes), every function the library exports
    "rillet_bf16_packed_bytes": (_I64, [_I64, _I64]),
    "rillet_bf16_pack": (None, [_P, _P, _I64, _I64]),
    "rillet_linear_bf16_part": (None, [_P, _I64, _P, _P, _P, _I64, _I64, _I64]),
    "rillet_quant_packed_bytes": (_I64, [_I32, _I64, _I64]),
    "rillet_quant_pack": (None, [_I32, _P, _P, _P, _I64, _I64, _P]),
    "rillet_quantize_rows_part": (None, [_P, _I64, _I64, _I64, _P, _P, _P]),
    "rillet_linear_quant_part": (None, [_I32, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64]),
    "rillet_weight_packed_bytes": (_I64, [_I32, _I64, _I64]),
    "rillet_weight_pack": (ctypes.c_int, [_I32, _P, _P, _P, _I64, _I64, _P]),
    "rillet_linear_scratch_bytes": (_I64, [_P, _I64]),
    "rillet_linear_part": (None, [_P, _P, _I64, _P, _I64, _P]),
    "rillet_linear_prepare": (None, [_P, _P, _I64, _I64, _I64, _I64, _P]),
    "rillet_linear_run_part": (None, [_P, _P, _I64, _P, _I64, _P]),
    "rillet_quantize_blocks": (None, [_P, _I64, _P, _P, _P]),
    "rillet_linear": (None, [_P, _P, _I64, _P, _I64, _I32]),
    "rillet_kernel_features": (_I32, []),
    "rillet_max_head_dim": (ctypes.c_int, []),
    "rillet_max_group": (ctypes.c_int, []),
    "rillet_paged_attention_part": (None, [_P, _I64, _P, _P, _I64, _P, _I32, _P, _I32, _I32, _I32, _I32, _I32,
                                           _F32, _P]),
    "rillet_paged_decode_attention_bf16": (None, [_P, _I64, _P, _P, _I64, _P, _I32, _P, _I32, _I32, _I32, _I32,
                                                  _I32, _F32, _P, _I32]),
    "rillet_paged_attention_task": (None, [_P, _P, _P, _P, _I32, _I32, _I32, _I32, _F32, _P, _P, _P]),
    "rillet_add_rms_norm_row": (None, [_P, _P, _P, _P, _I32, _F32]),
    "rillet_add_rms_norm_bf16": (None, [_P, _P, _P, _P, _I64, _I32, _F32, _I32]),
    "rillet_decode_forward": (ctypes.c_int, [_P, _P, _P, _P, _P, _I32, _P, _I32, _P, _I32]),
    "rillet_argmax_rows": (None, [_P, _I64, _I64, _I64, _P, _I32]),
}


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class Kernels:
    """One built variant: `lib` (ctypes, argtypes set) and wrappers taking torch tensors."""

    def __init__(self, isa: str, lib: ctypes.CDLL, flags: list[str]):
        self.isa, self.lib, self.flags = isa, lib, flags
        for name, (restype, argtypes) in _SIGNATURES.items():
            if hasattr(lib, name):
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        bits = lib.rillet_kernel_features()
        self.features = {name: bool(bits & bit) for name, bit in FEATURE_BITS.items()}
        self.max_head_dim, self.max_group = lib.rillet_max_head_dim(), lib.rillet_max_group()
        self.formats = tuple(f for f, code in FORMATS.items() if lib.rillet_weight_packed_bytes(code, 16, 64) > 0)

    def __repr__(self) -> str:
        return f"Kernels({self.isa!r}, features={self.features})"

    def supports_attention(self, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        return (num_heads % num_kv_heads == 0 and head_dim % HEAD_DIM_MULTIPLE == 0
                and head_dim <= self.max_head_dim and num_heads // num_kv_heads <= self.max_group)

    def pack(self, fmt: str, values: torch.Tensor, scales: torch.Tensor | None = None,
             mins: torch.Tensor | None = None) -> torch.Tensor:
        """An [n, k] weight (bf16; or q8/q4 values with float scales and mins) in this build's
        packed layout, as a uint8 tensor."""
        if fmt not in self.formats:
            raise ValueError(f"weight format {fmt!r} is not built into the {self.isa} kernels (have {self.formats})")
        n, k = values.shape
        values = values.detach().to(torch.bfloat16 if fmt == "bf16" else values.dtype).contiguous()
        scales = None if scales is None else scales.detach().float().contiguous()
        mins = None if mins is None else mins.detach().float().contiguous()
        code = FORMATS[fmt]
        packed = torch.empty(self.lib.rillet_weight_packed_bytes(code, n, k), dtype=torch.uint8)
        if self.lib.rillet_weight_pack(code, values.data_ptr(), _ptr(scales), _ptr(mins), n, k, packed.data_ptr()):
            raise ValueError(f"cannot pack a {fmt} weight of shape {(n, k)}")
        return packed

    def linear(self, weight: RilletWeight, x: torch.Tensor) -> torch.Tensor:
        """x [rows, k] bf16 (rows may be strided) @ W^T (+ bias) -> [rows, n] bf16."""
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)
        if x.stride(-1) != 1:
            x = x.contiguous()
        out = torch.empty((x.shape[0], weight.n), dtype=torch.bfloat16)
        self.lib.rillet_linear(ctypes.byref(weight), x.data_ptr(), x.stride(0), out.data_ptr(), x.shape[0],
                               torch.get_num_threads())
        return out

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """logits.argmax(dim=-1) for float32 [B, V] rows (a row's first maximum, a NaN counting as
        the maximum, as torch's), spread over torch's threads; other dtypes go to torch."""
        if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(-1) != 1 or logits.shape[1] == 0:
            return logits.argmax(dim=-1)
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        self.lib.rillet_argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0),
                                    out.data_ptr(), torch.get_num_threads())
        return out

    def add_rms_norm(self, residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """residual += x in place (bf16), then returns RMSNorm(residual) * weight. [rows, dim] bf16."""
        assert residual.is_contiguous() and x.is_contiguous() and residual.shape == x.shape
        out = torch.empty_like(residual)
        self.lib.rillet_add_rms_norm_bf16(residual.data_ptr(), x.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                          residual.shape[0], residual.shape[1], eps, torch.get_num_threads())
        return out

    def paged_decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                               scale: float) -> torch.Tensor:
        """q: [B, nh, d] (rows may be strided, heads contiguous); caches [nkv, S, d]; block_tables
        [B, nb] int32; context_lens [B] int32. Returns [B, nh * d]."""
        B, nh, d = q.shape
        nkv, num_slots, _ = k_cache.shape
        assert q.stride(2) == 1 and q.stride(1) == d and block_tables.is_contiguous() and context_lens.is_contiguous()
        out = torch.empty((B, nh * d), dtype=q.dtype)
        self.lib.rillet_paged_decode_attention_bf16(
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), num_slots,
            block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(), B, nh, nkv, d, block_size,
            scale, out.data_ptr(), torch.get_num_threads(),
        )
        return out


_loaded: dict[str, Kernels | None] = {}
_warned: set[str] = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def disabled() -> bool:
    return os.environ.get("RILLET_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def available_isas() -> list[str]:
    """Variants this CPU can run, best first (always ending in 'generic')."""
    return cpu_isa.supported_isas()


def selected_isa() -> str:
    """The variant `load()` uses: RILLET_CPU_ISA, else the best this CPU runs."""
    return cpu_isa.selected()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@functools.cache
def _compiler_id(compiler: str) -> str:
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    return f"{compiler}\n{version.strip()}"


def _sources() -> tuple[list[Path], list[str]]:
    """The sources present, and the defines standing in for optional ones that are not."""
    paths, defines = [], []
    for name in SOURCES:
        path = KERNELS / name
        if path.exists():
            paths.append(path)
        elif name in OPTIONAL:
            defines.append(OPTIONAL[name])
        else:
            raise FileNotFoundError(path)
    return paths, defines


def _build(target: Path, compiler: str, flags: list[str], sources: list[Path]) -> bool:
    """Compile into target atomically; returns whether OpenMP was available."""
    target.parent.mkdir(parents=True, exist_ok=True)
    link = ["-Wl,-Bsymbolic"] if platform.system() == "Linux" else []  # calls stay within this variant
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, "-O3", *flags, "-fPIC", "-shared", *link, "-o", str(built), *map(str, sources), "-lm"]
        try:
            subprocess.run([*command[:2], "-fopenmp", *command[2:]], check=True, capture_output=True, text=True,
                           timeout=300)
            openmp = True
        except subprocess.CalledProcessError:  # e.g. Apple clang: no -fopenmp
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
            openmp = False
        os.replace(built, target)  # atomic: a concurrent start never loads half a file
    return openmp


def load(isa: str | None = None) -> Kernels | None:
    """The kernels of one variant (None: the selected one), built if needed; None where they
    cannot be (then use the torch path). ValueError for a variant this CPU cannot run."""
    if disabled():
        return None
    if isa is None:
        isa = selected_isa()
    else:
        lacking = cpu_isa.missing(isa)
        if lacking:
            raise ValueError(f"this CPU cannot run the {isa} kernels: it lacks {' '.join(lacking)}")
    if isa in _loaded:
        return _loaded[isa]
    _loaded[isa] = None
    compiler = _compiler()
    if compiler is None:
        _warn_once("compiler", "no C compiler found: rillet's CPU kernels are off and the torch path (slower) runs")
        return None
    from rillet.models.resolve import cache_root

    sources, defines = _sources()
    flags = [*cpu_isa.compile_flags(isa), *defines]
    text = b"".join(path.read_bytes() for path in sources) + b"".join((KERNELS / h).read_bytes() for h in HEADERS)
    key = hashlib.sha256(b"\0".join([text, _compiler_id(compiler).encode(), " ".join(flags).encode(),
                                     torch.__version__.encode()])).hexdigest()[:16]
    target = cache_root() / "kernels" / f"rillet_cpu_{isa}_{key}.so"
    try:
        if not target.exists():
            _build(target, compiler, flags, sources)
        library = ctypes.CDLL(str(target))  # after torch: its libgomp (same soname) is reused
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        _warn_once(f"build-{isa}", "could not build rillet's %s CPU kernels (%s): the torch path (slower) runs",
                   isa, str(detail).strip()[:500])
        return None
    kernels = Kernels(isa, library, flags)
    if not kernels.features["openmp"]:
        _warn_once(f"openmp-{isa}", "the C compiler has no OpenMP: rillet's CPU kernels run single-threaded")
    _loaded[isa] = kernels
    return kernels


def describe() -> dict:
    """The selected kernels, for logs and the metrics info gauge: {"isa": ..., "features": {...}}."""
    kernels = load()
    if kernels is None:
        return {"isa": "none", "features": {}}
    return {"isa": kernels.isa, "features": dict(kernels.features)}


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The selected kernels' Kernels.add_rms_norm."""
    return load().add_rms_norm(residual, x, weight, eps)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           scale: float) -> torch.Tensor:
    """The selected kernels' Kernels.paged_decode_attention."""
    return load().paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)
