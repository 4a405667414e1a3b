"""Choosing the CPU kernel variant: detection from /proc/cpuinfo, RILLET_CPU_ISA, clear errors."""

import os
import subprocess
import sys

import pytest

from rillet.models import cpu_isa, cpu_kernels


def test_available_variants_end_in_generic_best_first():
    isas = cpu_kernels.available_isas()
    assert isas[-1] == "generic"
    assert isas == [isa for isa in cpu_isa.VARIANTS if isa in isas]
    if cpu_isa.machine() == "x86_64":
        assert "neon" not in isas


def test_rillet_cpu_isa_forces_a_variant(monkeypatch):
    monkeypatch.setenv("RILLET_CPU_ISA", "generic")
    assert cpu_kernels.selected_isa() == "generic"
    monkeypatch.delenv("RILLET_CPU_ISA")
    assert cpu_kernels.selected_isa() == cpu_kernels.available_isas()[0]


def test_an_unknown_or_unrunnable_variant_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RILLET_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="unknown CPU kernel variant 'sse9'"):
        cpu_kernels.selected_isa()
    other = "neon" if cpu_isa.machine() == "x86_64" else "avx2"
    monkeypatch.setenv("RILLET_CPU_ISA", other)
    with pytest.raises(ValueError, match="lacks an (x86_64|aarch64) CPU"):
        cpu_kernels.load()
    # An x86 CPU without AVX-512BW: the message names what is missing.
    monkeypatch.setattr(cpu_isa, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: frozenset("avx2 fma f16c avx512f avx512dq bmi2".split()))
    monkeypatch.setenv("RILLET_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="lacks avx512bw avx512vl"):
        cpu_kernels.selected_isa()
    with pytest.raises(ValueError, match="avx512bw avx512vl"):
        cpu_kernels.load("avx512")
    monkeypatch.delenv("RILLET_CPU_ISA")
    assert cpu_kernels.available_isas() == ["avx2", "generic"]


def test_compile_flags_follow_the_cpu(monkeypatch):
    flags = frozenset("avx512f avx512bw avx512vl avx512dq avx512_vnni".split())
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: flags)
    flags = cpu_isa.compile_flags("avx512")
    assert "-mavx512vnni" in flags and "-mavx512bf16" not in flags and "-march=native" not in flags
    assert cpu_isa.compile_flags("avx2") == ["-mavx2", "-mfma", "-mf16c"]
    assert cpu_isa.compile_flags("generic") == []
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: frozenset("fp asimd asimddp".split()))
    assert cpu_isa.compile_flags("neon") == ["-march=armv8.2-a+dotprod"]
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: frozenset("fp asimd".split()))
    assert cpu_isa.compile_flags("neon") == ["-march=armv8-a"]


@pytest.mark.skipif(cpu_isa.missing("avx2") != [], reason="needs an x86 CPU with AVX2")
def test_rillet_cpu_isa_avx2_selects_the_avx2_build_in_a_fresh_process():
    code = ("from rillet.models import cpu_kernels; k = cpu_kernels.load(); "
            "print(k.isa if k else 'none', cpu_kernels.describe()['isa'], k.features['bf16_dot'] if k else '')")
    env = {**os.environ, "RILLET_CPU_ISA": "avx2"}
    env.pop("RILLET_CPU_KERNELS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["avx2", "avx2", "False"]
