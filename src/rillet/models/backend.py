"""Where and how the model runs, decided once: device, activation dtype, weight format, CPU kernels.

The engine above reads the decision (`Backend`) and never asks the hardware again.

Weight formats (`Backend.weights`):
- "float32" / "bfloat16" / "float16": every weight in that dtype;
- "q8": linear weights as int8 with a scale per 32 inputs (`--quantization int8`);
- "q4": linear weights as 4-bit with a scale and min per 32 inputs (`--quantization q4`);
- "gguf": a GGUF file's quantized blocks run as they are (Q4_0/Q4_1/Q4_K as q4, Q8_0/Q6_K as
  q8), without a detour through float.
The quantized formats run on rillet's C kernels with bfloat16 activations, on every CPU those
kernels build for (AVX-512, AVX2, NEON, plain C).

Two steps, both here: `select_backend()` decides from the options and the machine (the CPU's
instruction sets are read once, in models/cpu_isa.py); `prepare_model()` applies the decision
to the loaded model (quantized or packed projections, the C kernels for decode attention and the
fused norms, the whole decode step in C where every projection allows it) and returns the
`KernelPath` the model runner follows. Nothing else asks which kernels exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rillet.models.cpu_kernels import Kernels
    from rillet.models.llama import CausalLM

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("auto", "none", "int8", "q4")


@dataclass(frozen=True)
class Backend:
    device: torch.device
    dtype: torch.dtype  # activations, and the weights that stay in float
    weights: str  # "float32" | "bfloat16" | "float16" | "q8" | "q4" | "gguf"
    cpu_isa: str | None  # the C kernels' instruction-set variant; None: torch ops only
    pack_linears: bool = False  # projections pre-packed (rillet's kernel or oneDNN); float32 keeps torch's

    @property
    def quantized(self) -> bool:
        return self.weights in ("q8", "q4", "gguf")

    @property
    def quantize_to(self) -> str | None:
        """The format float checkpoints are quantized to at load (None: they are not)."""
        return self.weights if self.weights in ("q8", "q4") else None

    @property
    def cpu_kernels(self) -> Kernels | None:
        """The C kernels where they run this backend's activations (bf16 on the CPU), else None."""
        if self.cpu_isa is None or self.device.type != "cpu" or self.dtype != torch.bfloat16:
            return None
        from rillet.models import cpu_kernels

        return cpu_kernels.load(self.cpu_isa)

    def describe(self) -> dict[str, str]:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "weights": self.weights, "cpu_isa": self.cpu_isa or "none"}


@dataclass(frozen=True)
class KernelPath:
    """How one loaded model's step runs on its backend (prepare_model)."""
    backend: Backend
    kernels: Kernels | None  # decode attention and the fused add + norm in C; None: torch ops only
    decode_in_c: bool  # decode rows through every layer in one C call (models/cpu_decode.py)
    gpu_kernels: bool = False  # the Triton kernels of models/llama_cuda.py (engine/cuda_runner.py)


def prepare_model(model: CausalLM, backend: Backend, *, gguf: Path | None = None, batch_hint: int = 1) -> KernelPath:
    """Put the model on the backend's kernels, in place: quantized or pre-packed projections,
    and the C kernels where they run this model's attention."""
    from rillet.models import cpu_decode
    from rillet.models.quantized import quantize_model

    if backend.quantized:
        quantize_model(model, backend, gguf)
    if backend.pack_linears:
        model.pack_for_cpu(batch_hint, backend.cpu_kernels)
    if backend.device.type == "cuda":
        return KernelPath(backend, None, False, gpu_kernels=gpu_kernels_available(model))
    kernels = backend.cpu_kernels
    if kernels is not None and not kernels.supports_attention(model.num_heads, model.num_kv_heads, model.head_dim):
        kernels = None
    if kernels is None:
        return KernelPath(backend, None, False)
    # Without bf16 dot products (AVX2, NEON) oneDNN emulates bf16 matmuls at a fraction of
    # float32's speed: prompt attention runs in float32 there (its linears stay on the kernels).
    model.use_cpu_kernels(kernels, attention_float32=not kernels.features["bf16_dot"])
    return KernelPath(backend, kernels, cpu_decode.supported(model))


def gpu_kernels_available(model: CausalLM) -> bool:
    """Triton is importable and the model's shapes suit the kernels; otherwise the GPU runs the
    torch path (with a warning: several times slower)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.warning("Triton is not installed: the GPU runs the slow torch path without CUDA graphs")
        return False
    if model.num_heads % model.num_kv_heads or model.head_dim % 2 or model.head_dim > 256:
        logger.warning("head shape %d/%d x %d is outside the GPU kernels: the GPU runs the torch path",
                       model.num_heads, model.num_kv_heads, model.head_dim)
        return False
    return True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch sees no CUDA GPU")
    return device


def _cpu_kernel_isa() -> str | None:
    from rillet.models import cpu_kernels

    kernels = cpu_kernels.load()
    return None if kernels is None else kernels.isa


def select_backend(dtype: str = "auto", quantization: str = "auto", device: str = "auto",
                   gguf: bool = False) -> Backend:
    """The backend for these options on this machine. Raises ValueError for a combination that
    cannot run here (say, int8 weights on a GPU), naming the option to change."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    dev = resolve_device(device)
    if dev.type != "cpu":
        if quantization in ("int8", "q4"):
            raise ValueError(f"--quantization {quantization} runs on the CPU kernels only; use --device cpu "
                             "or --quantization none")
        if dtype == "auto":
            act = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            act = DTYPES[dtype]
        return Backend(dev, act, str(act).removeprefix("torch."), None)
    backend = _select_cpu(dev, dtype, quantization, gguf)
    from rillet.models.cpu_linear import onednn_packing_supported

    on_kernels = backend.cpu_isa is not None and backend.dtype == torch.bfloat16
    pack = on_kernels or onednn_packing_supported(backend.dtype, dev)
    return Backend(backend.device, backend.dtype, backend.weights, backend.cpu_isa, pack_linears=pack)


def _select_cpu(dev: torch.device, dtype: str, quantization: str, gguf: bool) -> Backend:
    isa = _cpu_kernel_isa()
    if dtype == "auto":
        # bf16 halves the bytes every decode step streams; with rillet's kernels it runs on any
        # ISA (widened to float32 in registers). Without them only native bf16 pays.
        from rillet.models.cpu_isa import has_native_bf16

        act = torch.bfloat16 if isa is not None or has_native_bf16() else torch.float32
    else:
        act = DTYPES[dtype]
    if quantization in ("int8", "q4"):
        if isa is None:
            raise ValueError(f"--quantization {quantization} needs rillet's CPU kernels, which did not build "
                             "here (a C compiler is needed; see the warning logged)")
        if act != torch.bfloat16:
            raise ValueError(f"--quantization {quantization} runs with bfloat16 activations; use --dtype auto "
                             f"or bfloat16, not {dtype}")
        return Backend(dev, act, "q8" if quantization == "int8" else "q4", isa)
    if quantization == "auto" and gguf and isa is not None and act == torch.bfloat16:
        return Backend(dev, act, "gguf", isa)
    return Backend(dev, act, str(act).removeprefix("torch."), isa)
