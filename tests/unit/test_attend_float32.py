"""attend_float32 (prompt attention where the CPU has no bf16 dot products): a row's result must
not depend on its batch mates or on masked padding, as for `attend`, on torch's AVX2 kernels too."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rillet.models.llama import attend, attend_float32

CASES = [(q, c) for q in (1, 5, 40, 100) for c in (17, 48, 100, 200, 333, 496, 700, 1100) if c >= q]


def _bias(contexts, width, queries, group, num_kv_heads):
    positions = torch.tensor(contexts)[:, None] - queries + torch.arange(queries)[None, :]
    hidden = torch.arange(width)[None, None, :] > positions[:, :, None]
    bias = torch.zeros(hidden.shape, dtype=torch.bfloat16).masked_fill_(hidden, -float("inf"))
    if queries > 1:
        bias = bias[:, :, None, :].expand(-1, -1, group, -1).reshape(len(contexts), queries * group, width)
    return bias.repeat(num_kv_heads, 1, 1)


def _alone_and_together(queries, context):
    torch.manual_seed(context + queries)
    nkv, group, d, mates = 3, 3, 64, 6
    contexts = [context] + torch.randint(queries, 1200, (mates,)).tolist()
    width = -(-max(contexts) // 16) * 16
    q = torch.randn(nkv, mates + 1, queries * group, d).bfloat16()
    k = torch.randn(nkv, mates + 1, width, d).bfloat16()
    v = torch.randn(nkv, mates + 1, width, d).bfloat16()
    together = attend_float32(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                              _bias(contexts, width, queries, group, nkv), 0.125).view(nkv, mates + 1, -1, d)
    own = -(-context // 16) * 16
    alone = attend_float32(q[:, 0], k[:, 0, :own].contiguous(), v[:, 0, :own].contiguous(),
                           _bias([context], own, queries, group, nkv), 0.125)
    return together[:, 0], alone, (q[:, 0], k[:, 0, :own], v[:, 0, :own], _bias([context], own, queries, group, nkv))


@pytest.mark.parametrize("queries,context", CASES)
def test_row_does_not_depend_on_batch_mates_or_padding(queries, context):
    together, alone, _ = _alone_and_together(queries, context)
    assert torch.equal(together, alone)


def test_matches_bf16_attend_up_to_rounding():
    _, alone, (q, k, v, bias) = _alone_and_together(40, 700)
    reference = attend(q.float(), k.float(), v.float(), bias.float(), 0.125)
    assert torch.allclose(alone.float(), reference, atol=2e-2, rtol=2e-2)


@pytest.mark.timeout(600)
def test_holds_on_torch_avx2_kernels():
    """The same invariance with torch and oneDNN held to AVX2, as on an AVX2-only CPU."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    code = ("import test_attend_float32 as t, torch\n"
            "bad = [c for c in t.CASES if not torch.equal(*t._alone_and_together(*c)[:2])]\n"
            "print(bad); raise SystemExit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
