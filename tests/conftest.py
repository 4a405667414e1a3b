"""Session-wide test setup.

Without a GPU, Triton kernels (the GPU path's, models/cuda_kernels.py) can still be tested: under
Triton's interpreter they run on the CPU through numpy. The interpreter is chosen when Triton
is first imported, so it is set here, before any test module imports anything.

MKL's vector math is set up on this thread before any test runs: transformers' references
compute their rotary tables with a parallel cos, which must not be MKL's racy first call
(models/vector_math.py).
"""

import os

import torch

from rillet.models.vector_math import init_vector_math

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

init_vector_math()
