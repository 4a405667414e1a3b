"""Keeping the GPU busy between decode steps: the next step is queued before the last one's
tokens are read back (what vLLM calls async scheduling).

A synchronous engine leaves the GPU idle while the host schedules, builds inputs, detokenizes,
checks stops and hands outputs over: for a 1B model on an H200 that host work is as long as the
step itself. When every row of a CUDA-graph decode batch samples without reading anything back
(no logprobs, penalties, bias or grammar: `Sampler.defers`), LLMEngine leaves its sampled ids on
the GPU (`InFlight`). The next call queues the following decode step first, fed those ids
device to device, and only then reads them back and does the host work while the GPU runs.

A sequence that turns out to have finished (a stop token, a stop string, its length) or that
was aborted meanwhile wastes one row of the step queued after it, whose token is dropped; the KV
slot that row wrote lies in a block the sequence no longer holds, which is only reused by work
queued later on the same stream. The engine queues ahead only when nothing else is waiting: a
new request, a preempted one or a prompt chunk goes through the scheduler as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rillet.engine.scheduler import ScheduledBatch


@dataclass
class InFlight:
    """A decode step queued on the GPU whose sampled ids have not been read back yet."""

    batch: ScheduledBatch  # decodes only; every row samples
    ids: torch.Tensor  # [B] sampled ids, on the GPU
    host: torch.Tensor  # [B] pinned: their copy, filled without blocking
    copied: torch.cuda.Event

    @classmethod
    def start(cls, batch: ScheduledBatch, ids: torch.Tensor) -> InFlight:
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
        copied.record()
        return cls(batch, ids, host, copied)

    def token_ids(self) -> list[int]:
        """The sampled ids, once the step has run (blocks until then)."""
        self.copied.synchronize()
        ids: list[int] = self.host.tolist()
        return ids
