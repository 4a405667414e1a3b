"""linear_quant.c (the Q8 / Q4 linear kernels, rillet_kernels.h) in every instruction-set build
this CPU runs: activation quantization exactly as specified, outputs against a float64
reference of the same arithmetic, a row's result bit-identical alone or in any batch and on any
thread count, and every ISA's output equal to the plain-C build's up to rounding.

The libraries come from cpu_kernels (`available_isas()` / `load(isa)`) where it builds variants;
otherwise this module compiles linear_quant.c itself per variant (as cpu_kernels would). Either
way it also builds "avx512-novnni" (AVX-512 without VNNI: the AVX2 code path in an AVX-512
build) where the CPU has AVX-512."""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rillet.models import cpu_isa, cpu_kernels

KERNELS = Path(cpu_kernels.__file__).parent / "kernels"
Q8, Q4 = 1, 2
QBLOCK = 32
V = ctypes.c_void_p
I64 = ctypes.c_int64
I32 = ctypes.c_int32

SIGNATURES = {  # name: (restype, argtypes), as rillet_kernels.h declares them
    "rillet_quant_packed_bytes": (I64, [I32, I64, I64]),
    "rillet_quant_pack": (None, [I32, V, V, V, I64, I64, V]),
    "rillet_quantize_rows_part": (None, [V, I64, I64, I64, V, V, V]),
    "rillet_linear_quant_part": (None, [I32, V, V, V, V, V, V, I64, I64, I64]),
    "rillet_linear": (None, [V, V, I64, V, I64, I32]),
}


class Weight(ctypes.Structure):  # rillet_weight
    _fields_ = [("format", I32), ("reserved", I32), ("n", I64), ("k", I64), ("packed", V), ("bias", V)]


_OWN_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mavx2"],
    "avx512-novnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mavx2"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}


def _own_flags(isa: str) -> list[str]:
    if isa == "avx512":
        flags = cpu_isa.cpu_flags()
        return (_OWN_FLAGS[isa] + (["-mavx512bf16"] if "avx512_bf16" in flags else [])
                + (["-mavx512vnni"] if "avx512_vnni" in flags else []))
    if isa == "neon":
        return cpu_isa.compile_flags("neon")
    return _OWN_FLAGS[isa]


@functools.cache
def _build_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="rillet_qtest_"))


@functools.cache
def _own_build(isa: str) -> ctypes.CDLL:
    """linear_quant.c alone, or with linear.c + linear_bf16.c (rillet_linear, for the thread
    checks) when those compile in this variant too."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    base = [compiler, "-O3", "-fPIC", "-shared", "-fopenmp", *_own_flags(isa), f"-I{KERNELS}"]
    target = _build_dir() / f"q_{isa}.so"
    full = [KERNELS / "linear_quant.c", KERNELS / "linear.c", KERNELS / "linear_bf16.c"]
    for sources in (full, full[:1]):
        if all(s.exists() for s in sources):
            done = subprocess.run([*base, "-o", str(target), *map(str, sources), "-lm"], capture_output=True, text=True)
            if done.returncode == 0:
                return ctypes.CDLL(str(target))
    raise RuntimeError(f"linear_quant.c does not compile for {isa}: {done.stderr[-2000:]}")


def _isas() -> list:
    """pytest params: every variant, skipped with the hardware it lacks."""
    if hasattr(cpu_kernels, "available_isas"):
        names, source = list(cpu_isa.VARIANTS), "cpu_kernels"
    else:
        names, source = ["avx512", "avx2", "neon", "generic"], "own"
    params = []
    for isa in names + ["avx512-novnni"]:
        lacking = cpu_isa.missing("avx512" if isa == "avx512-novnni" else isa)
        marks = [pytest.mark.skip(reason=f"needs what this machine lacks: {', '.join(lacking)}")] if lacking else []
        params.append(pytest.param((isa, "own" if isa == "avx512-novnni" else source), id=isa, marks=marks))
    return params


class Lib:
    """The quant entry points of one build, with their own ctypes prototypes."""

    def __init__(self, cdll: ctypes.CDLL, isa: str):
        self.isa = isa
        for name, (restype, argtypes) in SIGNATURES.items():
            try:
                fn = cdll._FuncPtr((name, cdll))  # not the CDLL's cached object: no shared argtypes
            except AttributeError:
                fn = None
            if fn is not None:
                fn.restype, fn.argtypes = restype, argtypes
            setattr(self, "c_" + name.removeprefix("rillet_"), fn)

    def pack(self, fmt, values, scales, mins):
        n, k = values.shape
        size = self.c_quant_packed_bytes(fmt, n, k)
        assert size > 0
        packed = torch.zeros(size + 64, dtype=torch.uint8)
        packed = packed[(-packed.data_ptr()) % 64:][:size]  # 64-byte aligned, as torch usually gives
        self.c_quant_pack(fmt, values.data_ptr(), scales.data_ptr(), None if mins is None else mins.data_ptr(),
                        n, k, packed.data_ptr())
        return packed

    def quantize(self, x):
        m, k = x.shape
        xq = torch.empty((m, k), dtype=torch.int8)
        xs = torch.empty((m, k // QBLOCK), dtype=torch.float32)
        xsum = torch.empty((m, k // QBLOCK), dtype=torch.int32)
        self.c_quantize_rows_part(x.data_ptr(), x.stride(0), m, k, xq.data_ptr(), xs.data_ptr(), xsum.data_ptr())
        return xq, xs, xsum

    def linear(self, fmt, packed, bias, x, n):
        """Single thread: the `_part` functions called outside any parallel region."""
        xq, xs, xsum = self.quantize(x)
        m, k = x.shape
        y = torch.empty((m, n), dtype=torch.bfloat16)
        self.c_linear_quant_part(fmt, packed.data_ptr(), None if bias is None else bias.data_ptr(), xq.data_ptr(),
                               xs.data_ptr(), xsum.data_ptr(), y.data_ptr(), m, n, k)
        return y

    def linear_threads(self, fmt, packed, bias, x, n, threads):
        m, k = x.shape
        w = Weight(fmt, 0, n, k, packed.data_ptr(), None if bias is None else bias.data_ptr())
        y = torch.empty((m, n), dtype=torch.bfloat16)
        self.c_linear(ctypes.byref(w), x.data_ptr(), x.stride(0), y.data_ptr(), m, threads)
        return y


@functools.cache
def _lib(isa: str, source: str) -> Lib:
    if source == "cpu_kernels":
        loaded = cpu_kernels.load(isa)
        if loaded is not None:
            return Lib(loaded.lib, isa)
        # kernels disabled (RILLET_CPU_KERNELS=0) or another source does not build: test this file alone
    return Lib(_own_build(isa), isa)


@pytest.fixture(params=_isas())
def lib(request) -> Lib:
    return _lib(*request.param)


# ---- references ----

def quantize_ref(x: torch.Tensor):
    """The header's activation quantization in numpy float32: dx = max|x| / 127, xq = rint(x / dx)."""
    m, k = x.shape
    xf = x.float().numpy().reshape(m, k // QBLOCK, QBLOCK)
    amax = np.abs(xf).max(axis=2)
    dx = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(dx[..., None] > 0, np.rint(xf / dx[..., None]), 0).astype(np.float32)
    q = np.clip(q, -127, 127).astype(np.int8)
    return q.reshape(m, k), dx, q.astype(np.int32).sum(axis=2)


def make_weight(fmt, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    nb = k // QBLOCK
    scales = (torch.rand(n, nb, generator=g) + 0.5) * 0.02
    if fmt == Q8:
        values = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        return values, scales, None
    values = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    mins = -8 * scales * (torch.rand(n, nb, generator=g) * 0.4 + 0.8)
    return values, scales, mins


def reference(fmt, values, scales, mins, bias, x):
    """float64 y of the header's formula (scales and mins as the float16 they are stored as),
    and a bound on the float32 error of computing it in any order: (nb + 4) u sum|terms|."""
    n, k = values.shape
    nb = k // QBLOCK
    xq, dx, xsum = quantize_ref(x)
    q = values.numpy().astype(np.int64)
    if fmt == Q8:
        q = np.maximum(q, -127)
    dot = np.einsum("rbi,obi->rob", xq.astype(np.int64).reshape(-1, nb, QBLOCK), q.reshape(n, nb, QBLOCK))
    s = scales.numpy().astype(np.float16).astype(np.float64)
    mn = np.zeros_like(s) if mins is None else mins.numpy().astype(np.float16).astype(np.float64)
    term = dx.astype(np.float64)[:, None, :] * (s[None] * dot + mn[None] * xsum.astype(np.float64)[:, None, :])
    abs_term = np.abs(dx.astype(np.float64)[:, None, :]) * (np.abs(s[None] * dot) + np.abs(mn[None] * xsum[:, None, :]))
    y = term.sum(axis=2)
    mag = abs_term.sum(axis=2)
    if bias is not None:
        b = bias.float().numpy().astype(np.float64)
        y = y + b
        mag = mag + np.abs(b)
    return y, (nb + 4) * 2.0**-24 * mag


def assert_close(got: torch.Tensor, ref: np.ndarray, err: np.ndarray):
    g = got.float().numpy().astype(np.float64)
    tol = 2.0**-8 * (np.abs(ref) + err) + err + 1e-30
    bad = np.abs(g - ref) > tol
    assert not bad.any(), f"{bad.sum()} outputs off, first at {np.argwhere(bad)[0]}: got {g[bad][:4]}, ref {ref[bad][:4]}"


def activations(m, k, seed, stride_pad=0):
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(m, k + stride_pad, generator=g) * torch.exp(torch.randn(m, 1, generator=g))).bfloat16()
    x = full[:, :k]
    if k >= 2 * QBLOCK and m > 1:
        x[1, QBLOCK:2 * QBLOCK] = 0  # an all-zero block: dx = 0, xq = 0
    return x


# ---- tests ----

@pytest.mark.parametrize("m,k,pad", [(1, 32, 0), (5, 96, 16), (9, 576, 40)])
def test_quantize_rows_exactly_as_specified(lib, m, k, pad):
    x = activations(m, k, seed=k + m, stride_pad=pad)
    if m > 2:  # ties: max 127 -> dx = 1 exactly; 2.5 -> 2, 3.5 -> 4, -2.5 -> -2, -0.5 -> 0
        x[2, :QBLOCK] = torch.tensor([127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, -127.0] * 4, dtype=torch.bfloat16)
    xq, xs, xsum = lib.quantize(x)
    rq, rdx, rsum = quantize_ref(x)
    assert np.array_equal(xq.numpy(), rq)
    assert np.array_equal(xs.numpy(), rdx)
    assert np.array_equal(xsum.numpy(), rsum)
    if m > 2:
        assert xq[2, :8].tolist() == [127, 2, 4, -2, 0, 0, 2, -127]


SHAPES = [(1, 32), (7, 64), (16, 32), (23, 96), (40, 128), (100, 576), (200, 1536)]


@pytest.mark.parametrize("fmt", [Q8, Q4], ids=["q8", "q4"])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_linear_matches_reference(lib, fmt, n, k, with_bias):
    values, scales, mins = make_weight(fmt, n, k, seed=n * 7 + k)
    bias = torch.randn(n).bfloat16() if with_bias else None
    x = activations(6, k, seed=n + k, stride_pad=24)  # strided rows
    y = lib.linear(fmt, lib.pack(fmt, values, scales, mins), bias, x, n)
    ref, err = reference(fmt, values, scales, mins, bias, x)
    assert_close(y, ref, err)


@pytest.mark.parametrize("fmt", [Q8, Q4], ids=["q8", "q4"])
@pytest.mark.parametrize("n,k", [(40, 1536), (1000, 576), (61, 64), (23, 96), (8, 32)])
def test_row_does_not_depend_on_batch(lib, fmt, n, k):
    values, scales, mins = make_weight(fmt, n, k, seed=3)
    packed = lib.pack(fmt, values, scales, mins)
    x = activations(40, k, seed=5, stride_pad=8)
    together = lib.linear(fmt, packed, None, x[:33], n)
    for rows in (1, 2, 3, 4, 5, 7, 16, 33):
        assert torch.equal(lib.linear(fmt, packed, None, x[:rows], n), together[:rows]), rows
    for start in (1, 5, 6):  # the same row at other positions of a register block
        assert torch.equal(lib.linear(fmt, packed, None, x[start:start + 7], n), together[start:start + 7]), start


@pytest.mark.parametrize("fmt", [Q8, Q4], ids=["q8", "q4"])
def test_thread_count_does_not_change_results(lib, fmt):
    if lib.c_linear is None:
        pytest.skip("this build has no rillet_linear (linear.c)")
    n, k = 1000, 576
    values, scales, mins = make_weight(fmt, n, k, seed=11)
    packed = lib.pack(fmt, values, scales, mins)
    bias = torch.randn(n).bfloat16()
    x = activations(19, k, seed=2, stride_pad=32)
    one = lib.linear_threads(fmt, packed, bias, x, n, 1)
    for threads in (2, 3):
        assert torch.equal(lib.linear_threads(fmt, packed, bias, x, n, threads), one)
    assert torch.equal(lib.linear_threads(fmt, packed, bias, x[3:4], n, 2), one[3:4])


@pytest.mark.parametrize("fmt", [Q8, Q4], ids=["q8", "q4"])
def test_isa_agrees_with_plain_c(lib, fmt):
    generic = _lib("generic", "own")
    n, k = 300, 576
    values, scales, mins = make_weight(fmt, n, k, seed=17)
    bias = torch.randn(n).bfloat16()
    x = activations(9, k, seed=23)
    a = lib.linear(fmt, lib.pack(fmt, values, scales, mins), bias, x, n).float().numpy()
    b = generic.linear(fmt, generic.pack(fmt, values, scales, mins), bias, x, n).float().numpy()
    _, err = reference(fmt, values, scales, mins, bias, x)
    # the integer dots are exact; float order differs by build (fma contraction), then bf16 rounding
    assert np.all(np.abs(a - b) <= 2.0**-8 * (np.abs(a) + np.abs(b)) + 2 * err)
    assert (a == b).mean() > 0.9


def test_packed_bytes_and_bad_shapes(lib):
    assert lib.c_quant_packed_bytes(Q8, 16, 32) == 16 * 32 + 32
    assert lib.c_quant_packed_bytes(Q4, 17, 64) == 2 * 2 * (16 * 16 + 64)
    assert lib.c_quant_packed_bytes(Q4, 16, 48) == -1
    assert lib.c_quant_packed_bytes(0, 16, 32) == -1


_SIMD_CHECK_TARGETS = {  # name: (compiler, flags, runner prefix)
    "avx512-vnni": ("cc", _OWN_FLAGS["avx512"] + ["-mavx512vnni"], []),
    "avx2": ("cc", _OWN_FLAGS["avx2"], []),
    "neon-dotprod": ("aarch64-linux-gnu-gcc", ["-march=armv8.2-a+dotprod"], ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]),
    "neon": ("aarch64-linux-gnu-gcc", ["-march=armv8-a"], ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]),
}


@pytest.mark.parametrize("target", list(_SIMD_CHECK_TARGETS))
def test_simd_path_equals_plain_c_in_one_binary(target):
    """tests/kernels/check_quant_simd.c: the SIMD path against the plain C one, natively for x86
    and under qemu-user for aarch64 (NEON with and without sdot)."""
    compiler, flags, runner = _SIMD_CHECK_TARGETS[target]
    if shutil.which(compiler) is None or (runner and shutil.which(runner[0]) is None):
        pytest.skip(f"needs {compiler}{' and ' + runner[0] if runner else ''}")
    if not runner:
        lacking = cpu_isa.missing("avx512" if target.startswith("avx512") else target)
        if lacking or (target == "avx512-vnni" and "avx512_vnni" not in cpu_isa.cpu_flags()):
            pytest.skip(f"needs what this machine lacks: {', '.join(lacking) or 'avx512_vnni'}")
    binary = _build_dir() / f"check_quant_{target}"
    source = Path(__file__).parents[1] / "kernels" / "check_quant_simd.c"
    subprocess.run([compiler, "-O2", "-fopenmp", *flags, f"-I{KERNELS}", str(source), str(KERNELS / "linear_quant.c"),
                    "-lm", "-o", str(binary)], check=True, capture_output=True, text=True)
    done = subprocess.run([*runner, str(binary)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].endswith("0 failed")
