"""The CPU kernel variants a test runs on: every one this CPU executes (e.g. avx512, avx2 and
generic on an AVX-512 machine), skipped where no kernels can be built."""

from __future__ import annotations

import pytest

from rillet.models import cpu_kernels


def load_variant(isa: str) -> cpu_kernels.Kernels:
    """The built `isa` variant; skips without kernels or a compiler, fails if the build fails."""
    if cpu_kernels.disabled():
        pytest.skip("RILLET_CPU_KERNELS=0")
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler: rillet's CPU kernels cannot be built here")
    built = cpu_kernels.load(isa)
    if built is None:
        pytest.fail(f"the {isa} CPU kernels did not build; see the warning logged")
    return built
