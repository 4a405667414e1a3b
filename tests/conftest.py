"""Session-wide test setup.

Without a GPU, Triton kernels (the GPU path's, models/cuda_kernels.py) can still be tested: under
Triton's interpreter they run on the CPU through numpy. The interpreter is chosen when Triton
is first imported, so it is set here, before any test module imports anything.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
