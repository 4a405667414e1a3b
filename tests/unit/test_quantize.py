"""quantize(): per-32-block q8 (absmax, symmetric) and q4 (min/max, asymmetric) in rillet's
canonical QuantizedWeight form: error bounds, exact round trips, corner cases."""

import pytest
import torch

from rillet.models.quantize import QBLOCK, QuantizedWeight, quantize


def _weights(n=96, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    # blocks of very different magnitudes, one-sided blocks and outliers
    w = w * torch.logspace(-4, 2, n)[:, None]
    w[::7] = w[::7].abs()
    w[1::7] = -w[1::7].abs()
    w[2, 5] = 1e3
    return w


def _per_element(t: torch.Tensor) -> torch.Tensor:
    return t.repeat_interleave(QBLOCK, dim=1)


def test_q8_error_bound_and_range():
    w = _weights()
    q = quantize(w, "q8")
    assert q.format == "q8" and q.values.dtype == torch.int8 and q.mins is None
    assert q.values.shape == w.shape and q.scales.shape == (w.shape[0], w.shape[1] // QBLOCK)
    assert q.values.min() >= -127 and q.values.max() <= 127
    blocks = w.view(w.shape[0], -1, QBLOCK)
    torch.testing.assert_close(q.scales, blocks.abs().amax(-1) / 127, rtol=0, atol=0)
    # every block reaches +-127 (its absmax) and the error is at most half a step
    assert (q.values.view(blocks.shape).abs().amax(-1) == 127).all()
    err = (q.dequantize() - w).abs()
    assert (err <= _per_element(q.scales) * (0.5 + 1e-5) + 1e-7 * w.abs()).all()


def test_q4_error_bound_and_range():
    w = _weights(seed=1)
    q = quantize(w, "q4")
    assert q.format == "q4" and q.values.dtype == torch.uint8
    assert q.values.max() <= 15
    blocks = w.view(w.shape[0], -1, QBLOCK)
    assert torch.equal(q.mins, blocks.amin(-1))
    torch.testing.assert_close(q.scales, (blocks.amax(-1) - blocks.amin(-1)) / 15, rtol=0, atol=0)
    err = (q.dequantize() - w).abs()
    assert (err <= _per_element(q.scales) * (0.5 + 1e-5) + 1e-6 * w.abs()).all()
    # the block min is hit exactly (q = 0) and the max to within float rounding (q = 15)
    qv = q.values.view(blocks.shape)
    assert (qv.amin(-1) == 0).all() and (qv.amax(-1) == 15).all()


@pytest.mark.parametrize("format", ["q8", "q4"])
def test_bf16_and_float16_inputs(format):
    w = _weights(seed=2)
    for dtype in (torch.bfloat16, torch.float16):
        low = w.clamp(-60000, 60000).to(dtype)
        q = quantize(low, format)
        assert torch.equal(q.values, quantize(low.float(), format).values)


def test_exact_round_trip_q8():
    g = torch.Generator().manual_seed(3)
    n, k = 64, 128
    values = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    values[:, ::QBLOCK] = 127  # every block's absmax is 127 -> the same scale comes back
    values[1::2, 1::QBLOCK] = -127
    values[1::2, ::QBLOCK] = 3
    scales = torch.pow(2.0, torch.randint(-20, 5, (n, k // QBLOCK), generator=g).float())
    original = QuantizedWeight("q8", values, scales)
    again = quantize(original.dequantize(), "q8")
    assert torch.equal(again.values, values) and torch.equal(again.scales, scales)
    assert torch.equal(again.dequantize(), original.dequantize())


def test_exact_round_trip_q4():
    g = torch.Generator().manual_seed(4)
    n, k = 64, 128
    values = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    values[:, ::QBLOCK] = 0  # every block spans 0..15 -> the same scale and min come back
    values[:, 1::QBLOCK] = 15
    scales = torch.pow(2.0, torch.randint(-20, 5, (n, k // QBLOCK), generator=g).float())
    mins = torch.randint(-64, 64, (n, k // QBLOCK), generator=g).float() * scales
    original = QuantizedWeight("q4", values, scales, mins)
    again = quantize(original.dequantize(), "q4")
    assert torch.equal(again.values, values)
    assert torch.equal(again.scales, scales) and torch.equal(again.mins, mins)
    assert torch.equal(again.dequantize(), original.dequantize())


def test_constant_and_zero_blocks():
    w = torch.zeros(4, 64)
    w[1] = 0.25
    w[2, :32] = -3.0
    q8, q4 = quantize(w, "q8"), quantize(w, "q4")
    assert torch.equal(q4.dequantize(), w)  # q4: a constant block is its min, exactly
    assert (q4.scales == 0).sum() == 8 and (q4.values == 0).all()
    assert q8.scales[0].eq(0).all() and q8.values[0].eq(0).all()
    assert torch.equal(q8.dequantize()[0], w[0])
    assert torch.allclose(q8.dequantize(), w, rtol=1e-6, atol=0)


def test_fuses_with_cat():
    w = _weights(seed=5)
    parts = [quantize(w[:32], "q4"), quantize(w[32:], "q4")]
    assert torch.equal(QuantizedWeight.cat(parts).dequantize(), quantize(w, "q4").dequantize())


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        quantize(torch.zeros(4, 48), "q8")
    with pytest.raises(ValueError):
        quantize(torch.zeros(4, 64), "q5")
    with pytest.raises(ValueError):
        quantize(torch.zeros(64), "q8")


def test_large_matrix_is_vectorized():
    """The default model's embedding shape converts in one vectorized pass (no per-block loop)."""
    w = torch.randn(49152, 576, generator=torch.Generator().manual_seed(6))
    for format in ("q8", "q4"):
        q = quantize(w, format)
        assert q.values.shape == w.shape
        assert (q.dequantize() - w).abs().max() <= q.scales.max() * 0.5001
