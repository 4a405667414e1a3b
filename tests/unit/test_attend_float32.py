"""attend_float32 (prompt attention where the CPU has no bf16 dot products): a row's result must
not depend on its batch mates or on masked padding, as for `attend`, on torch's AVX2 kernels too."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rillet.models.llama import attend, attend_float32
from test_invariant_kernels import attention_alone_and_together

CASES = [(q, c) for q in (1, 5, 40, 100) for c in (17, 48, 100, 200, 333, 496, 700, 1100) if c >= q]


@pytest.mark.parametrize("queries,context", CASES)
def test_row_does_not_depend_on_batch_mates_or_padding(queries, context):
    assert torch.equal(*attention_alone_and_together(attend_float32, queries, context))


def test_matches_bf16_attend_up_to_rounding():
    torch.manual_seed(0)
    q, k, v = (torch.randn(9, n, 64).bfloat16() for n in (40, 700, 700))
    bias = torch.zeros(9, 40, 700, dtype=torch.bfloat16)
    reference = attend(q.float(), k.float(), v.float(), bias.float(), 0.125)
    assert torch.allclose(attend_float32(q, k, v, bias, 0.125).float(), reference, atol=2e-2, rtol=2e-2)


@pytest.mark.timeout(600)
def test_holds_on_torch_avx2_kernels():
    """The same invariance with torch and oneDNN held to AVX2, as on an AVX2-only CPU."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1]),  # + support/
                                           os.environ.get("PYTHONPATH", "")])}
    code = ("import torch, test_attend_float32 as t\n"
            "bad = [c for c in t.CASES\n"
            "       if not torch.equal(*t.attention_alone_and_together(t.attend_float32, *c))]\n"
            "print(bad); raise SystemExit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
