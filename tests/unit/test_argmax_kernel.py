"""rillet_argmax_rows (kernels/sampling.c), the CPU sampler's greedy pick: equal to torch's argmax
on every kernel variant this CPU runs, ties, NaNs, infinities and signed zeros included."""

import pytest
import torch

from rillet.models import cpu_kernels
from support.cpu_variants import load_variant


@pytest.fixture(scope="module", params=cpu_kernels.available_isas())
def kernels(request):
    """Every kernel variant this CPU runs (support/cpu_variants.py)."""
    return load_variant(request.param)


def awkward_rows(width: int) -> torch.Tensor:
    x = torch.randn(9, width, generator=torch.Generator().manual_seed(width))
    x[0, width // 3] = x[0, width // 2] = 50.0  # a tie: the first wins
    x[1] = float("-inf")  # all -inf: index 0
    x[2, 5 % width] = float("nan")  # a NaN beats everything, the first NaN wins
    x[2, width - 1] = float("nan")
    x[2, 0] = float("inf")
    x[3] = 0.0  # +0 and -0 are equal
    x[3, width // 2] = -0.0
    x[4, width - 1] = float("inf")  # the last element
    x[5] = -1e30
    x[6, 0] = 1e30  # the first element
    return x


@pytest.mark.parametrize("width", [1, 7, 49152, 151936])
def test_argmax_rows_equals_torch(kernels, width):
    x = awkward_rows(width)
    assert torch.equal(kernels.argmax_rows(x), x.argmax(-1))


def test_argmax_rows_of_a_strided_view_and_of_no_rows(kernels):
    x = awkward_rows(4096)
    view = x[:, 100:3000]  # rows with a stride wider than their width
    assert torch.equal(kernels.argmax_rows(view), view.argmax(-1))
    assert kernels.argmax_rows(x[:0]).shape == (0,)


def test_argmax_rows_leaves_other_dtypes_to_torch(kernels):
    x = awkward_rows(300).bfloat16()
    assert torch.equal(kernels.argmax_rows(x), x.argmax(-1))
