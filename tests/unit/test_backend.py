"""select_backend: the one place that decides device, activation dtype, weight format and kernels."""

import pytest
import torch

from rillet.models import backend as backend_module
from rillet.models.backend import select_backend


@pytest.fixture
def kernels(monkeypatch):
    """Pretend the C kernels built for `isa` (None: they did not)."""
    def set_isa(isa):
        monkeypatch.setattr(backend_module, "_cpu_kernel_isa", lambda: isa)
    return set_isa


def test_auto_runs_a_gguf_in_its_own_blocks_where_kernels_built(kernels):
    kernels("avx2")
    b = select_backend("auto", "auto", "cpu", gguf=True)
    assert (b.dtype, b.weights, b.cpu_isa) == (torch.bfloat16, "gguf", "avx2")
    assert b.describe() == {"device": "cpu", "dtype": "bfloat16", "weights": "gguf", "cpu_isa": "avx2"}


def test_auto_keeps_a_hugging_face_checkpoint_in_bf16(kernels):
    kernels("generic")
    b = select_backend("auto", "auto", "cpu", gguf=False)
    assert (b.dtype, b.weights, b.quantized) == (torch.bfloat16, "bfloat16", False)


def test_float32_never_runs_quantized_blocks_unasked(kernels):
    kernels("avx512")
    b = select_backend("float32", "auto", "cpu", gguf=True)
    assert (b.dtype, b.weights) == (torch.float32, "float32")


@pytest.mark.parametrize("quantization,weights", [("int8", "q8"), ("q4", "q4")])
def test_quantization_at_load(kernels, quantization, weights):
    kernels("avx2")
    b = select_backend("auto", quantization, "cpu")
    assert (b.weights, b.quantize_to, b.dtype) == (weights, weights, torch.bfloat16)


def test_quantization_with_float32_activations_is_refused(kernels):
    kernels("avx2")
    with pytest.raises(ValueError, match="bfloat16 activations"):
        select_backend("float32", "int8", "cpu")


def test_quantization_without_kernels_is_refused(kernels):
    kernels(None)
    with pytest.raises(ValueError, match="CPU kernels"):
        select_backend("auto", "q4", "cpu")


def test_without_kernels_auto_takes_bf16_only_where_native(kernels, monkeypatch):
    kernels(None)
    from rillet.models import cpu_isa

    monkeypatch.setattr(cpu_isa, "has_native_bf16", lambda: False)
    assert select_backend("auto", "auto", "cpu", gguf=True).weights == "float32"
    monkeypatch.setattr(cpu_isa, "has_native_bf16", lambda: True)
    assert select_backend("auto", "auto", "cpu", gguf=True).weights == "bfloat16"


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization must be one of"):
        select_backend("auto", "q3", "cpu")
