"""Which instruction sets this CPU runs, read from /proc/cpuinfo (the one place that reads it).

rillet's C kernels are built once per variant (models/cpu_kernels.py) with explicit ISA flags,
never -march=native, so a build cache shared between machines (or a container image built
elsewhere) cannot load code the CPU it runs on lacks.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess

VARIANTS = ("avx512", "avx2", "neon", "generic")

# Variant -> cpuinfo flags it needs.
REQUIRED = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c", "bmi2"),
    "avx2": ("avx2", "fma", "f16c"),
    "neon": ("asimd",),
    "generic": (),
}


@functools.cache
def machine() -> str:
    """'x86_64', 'aarch64' or what platform says otherwise."""
    name = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(name, name)


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    if fields:  # a blank line ends the first processor
                        break
                    continue
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """E.g. 'AMD EPYC 9B45' ('model name' on x86; aarch64 kernels often report none)."""
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: x86 `flags`, aarch64 `Features` (empty where unknown)."""
    info = _cpuinfo()
    for key in ("flags", "Features"):
        if key in info:
            return frozenset(info[key].split())
    if platform.system() == "Darwin" and machine() == "aarch64":  # Apple silicon: no /proc
        return frozenset(("asimd", *(("asimddp",) if _sysctl("hw.optional.arm.FEAT_DotProd") == "1" else ())))
    return frozenset()


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def missing(isa: str) -> list[str]:
    """What this CPU lacks to run `isa` (empty: it can)."""
    if isa not in VARIANTS:
        raise ValueError(f"unknown CPU kernel variant {isa!r}; expected one of {', '.join(VARIANTS)}")
    arch = {"avx512": "x86_64", "avx2": "x86_64", "neon": "aarch64"}.get(isa)
    if arch is not None and machine() != arch:
        return [f"an {arch} CPU (this is {machine()})"]
    if isa == "neon" and not cpu_flags():  # aarch64 always has Advanced SIMD
        return []
    return [flag for flag in REQUIRED[isa] if flag not in cpu_flags()]


def supported_isas() -> list[str]:
    """Variants this CPU can run, best first, ending in 'generic'."""
    return [isa for isa in VARIANTS if not missing(isa)]


def compile_flags(isa: str) -> list[str]:
    """The compiler's ISA flags for a variant, given this CPU's optional extensions."""
    flags = cpu_flags()
    if isa == "avx512":
        extra = ((["-mavx512bf16"] if "avx512_bf16" in flags else [])
                 + (["-mavx512vnni"] if "avx512_vnni" in flags else []))
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mavx2", "-mbmi2", *extra]
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c"]
    if isa == "neon":
        return ["-march=armv8.2-a+dotprod"] if "asimddp" in flags else ["-march=armv8-a"]
    return []


def selected() -> str:
    """RILLET_CPU_ISA if set (ValueError where this CPU cannot run it), else the best variant."""
    forced = os.environ.get("RILLET_CPU_ISA", "").strip().lower()
    if forced:
        lacking = missing(forced)
        if lacking:
            raise ValueError(f"RILLET_CPU_ISA={forced}: this CPU cannot run it, it lacks {' '.join(lacking)}")
        return forced
    return supported_isas()[0]


def has_native_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
