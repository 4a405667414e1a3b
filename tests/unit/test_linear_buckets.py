"""Row bucketing of the pre-packed CPU linears (it bounds oneDNN's per-shape primitive cache)."""

import pytest
import torch

from rillet.models.cpu_linear import EXACT_ROWS, PackedLinear, bucket_rows, onednn_packing_supported


def test_decode_sizes_stay_exact_and_larger_ones_pad_by_at_most_an_eighth():
    assert [bucket_rows(n) for n in range(1, EXACT_ROWS + 1)] == list(range(1, EXACT_ROWS + 1))
    for n in range(EXACT_ROWS + 1, 5000):
        b = bucket_rows(n)
        assert n <= b <= n * 1.125, (n, b)
        assert bucket_rows(b) == b  # a bucket is its own bucket
    assert bucket_rows(33) == 36 and bucket_rows(512) == 512 and bucket_rows(513) == 576


def test_a_512_token_budget_needs_few_shapes():
    assert len({bucket_rows(n) for n in range(1, 513)}) == EXACT_ROWS + 32


def test_padded_rows_do_not_change_the_real_rows():
    if not onednn_packing_supported(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this CPU build has no oneDNN packing: the model uses plain nn.Linear there")
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64, dtype=torch.bfloat16), torch.randn(96, dtype=torch.bfloat16)
    linear = PackedLinear(weight, bias, batch_hint=32)
    x = torch.randn(45, 64, dtype=torch.bfloat16)  # runs padded to 48 rows
    out = linear(x)
    assert out.shape == (45, 96)
    expected = torch.stack([linear(x[i:i + 1])[0] for i in range(45)])  # one row at a time: no padding
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
