"""One serial call into MKL's vector math before any parallel one.

torch's float32 cos, sin and friends on a CPU call MKL's VML (`vmsCos`...), which sets itself
up on its first call in a process. When that first call is one of torch's parallel loops, the
threads race through the set-up, and in about one start in ten (2 threads, torch 2.13) the
calling thread's share comes out at ~1e-4 relative error instead of 1 ulp. The rotary table
is the first such call in a model load: a table that far off changes greedy answers from one
start of the same server to the next. A one-element call runs on the calling thread alone and
leaves VML set up for every later call.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def init_vector_math() -> None:
    """Set MKL's vector math up on this thread alone (once a process)."""
    torch.zeros(1).sin()
