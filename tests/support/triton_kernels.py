"""Skip rules for tests of the GPU path's Triton kernels on a machine that may have no GPU."""

from __future__ import annotations

import os

import pytest


def require_triton() -> None:
    """Skip the calling test module unless Triton can run its kernels here: compiled on a GPU, or
    under the interpreter (tests/conftest.py turns it on without a GPU), whose Triton releases
    before 3.9 fail under numpy 2.4 (a loop bound that is a tensor cannot become an int)."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (it ships with CUDA builds of torch)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        major, minor = (int(part) for part in triton.__version__.split(".")[:2])
        if (major, minor) < (3, 9):
            pytest.skip(f"no GPU, and Triton {triton.__version__}'s interpreter fails under numpy 2.4: "
                        "needs Triton >= 3.9", allow_module_level=True)
