"""Which model runner a loaded model gets: the GPU kernels' (CUDA graphs unless eager), or the
CPU/torch one. The same choice on every tensor-parallel rank."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from rillet.engine.model_runner import ModelRunner
from rillet.models.backend import KernelPath
from rillet.models.llama import CausalLM

logger = logging.getLogger(__name__)

Argmax = Callable[[torch.Tensor], torch.Tensor]


def make_runner(model: CausalLM, path: KernelPath, num_blocks: int, *, block_size: int, max_num_seqs: int,
                max_model_len: int, max_num_batched_tokens: int | None = None, enforce_eager: bool = False,
                tensor_parallel: bool = False) -> tuple[ModelRunner, Argmax | None]:
    """The runner, and the argmax the sampler uses with it: the GPU kernels' or the CPU kernels'
    (None: torch's)."""
    if not path.gpu_kernels:
        argmax = path.kernels.argmax_rows if path.kernels is not None else None
        return ModelRunner(model, num_blocks, block_size, path), argmax
    from rillet.engine.cuda_runner import CudaModelRunner
    from rillet.models.cuda_kernels import argmax_rows

    if tensor_parallel and not enforce_eager:
        from rillet.parallel.group import graph_capturable

        if not graph_capturable():  # gloo between GPU ranks (RILLET_TP_BACKEND=gloo, tests)
            logger.info("tensor parallel over gloo: decode steps run eagerly (gloo cannot be captured in a graph)")
            enforce_eager = True
    runner = CudaModelRunner(model, num_blocks, block_size, path, max_num_seqs=max_num_seqs,
                             max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                             enforce_eager=enforce_eager)
    return runner, argmax_rows
