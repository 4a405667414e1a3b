"""All-reduce (and gather) between the CPU ranks of one host through shared memory, as vLLM's CPU
backend does.

gloo's all-reduce goes through loopback TCP: ~1.3 ms for a few KB on a 2-core VM, twice per
layer. Here each rank copies its partial sum into its own slot of a file mapped by every rank,
publishes a generation number, waits until every rank has published the same one, and sums
the slots in rank order (bf16 and fp16 in float32, rounded once): every rank gets the same bits,
as it would from gloo.

Layout of the file: [size] int64 generation flags, then for each rank two slots of `capacity`
bytes. Slots alternate by generation, and a rank writes generation g's slot only once every rank
has published g - 1, which each does only after reading g - 2, the slot's last contents: no rank
writes over a slot another is still reading. The flags are plain stores after plain stores,
which x86's memory order keeps in order: other CPUs use gloo.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

HEADER_ALIGN = 64
SPINS_BEFORE_YIELD = 64
CHECK_EVERY = 4096  # spins between checks of the deadline and the abort flag


def supported() -> bool:
    """x86's total store order makes a slot's bytes visible before its flag."""
    return platform.machine().lower() in ("x86_64", "amd64")


def file_size(size: int, capacity: int) -> int:
    return HEADER_ALIGN + 2 * size * capacity


def create(path: Path, size: int, capacity: int) -> None:
    """The zeroed file every rank maps (rank 0 makes it before the others start)."""
    with open(path, "wb") as f:
        f.truncate(file_size(size, capacity))


class ShmAllReduce:
    def __init__(self, path: Path, rank: int, size: int, capacity: int, timeout_s: float) -> None:
        self.rank, self.size, self.capacity, self.timeout_s = rank, size, capacity, timeout_s
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, file_size(size, capacity))
        finally:
            os.close(fd)
        self.flags = np.frombuffer(self._map, dtype=np.int64, count=size)
        self._slots = torch.frombuffer(self._map, dtype=torch.uint8, offset=HEADER_ALIGN,
                                       count=2 * size * capacity).view(size, 2, capacity)
        self.generation = 0
        self.abort_reason: Callable[[], str | None] | None = None  # rank 0's: a worker died

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.is_contiguous() and x.numel() * x.element_size() <= self.capacity

    def _slot(self, rank: int, slot: int, x: torch.Tensor) -> torch.Tensor:
        nbytes = x.numel() * x.element_size()
        return self._slots[rank, slot, :nbytes].view(x.dtype).view(x.shape)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place (x fits)."""
        generation, slot = self._publish(x)
        self._wait(generation)
        if x.dtype == torch.float32:
            torch.add(self._slot(0, slot, x), self._slot(1, slot, x), out=x)
            for rank in range(2, self.size):
                x.add_(self._slot(rank, slot, x))
            return x
        total = self._slot(0, slot, x).float()  # bf16/fp16 partials summed in float32, rounded once
        for rank in range(1, self.size):
            total.add_(self._slot(rank, slot, x))
        return x.copy_(total)

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's x, in rank order, on rank 0 (None elsewhere; the others do not wait for it
        here, but before they next write, see _publish)."""
        generation, slot = self._publish(x)
        if self.rank != 0:
            return None
        self._wait(generation)
        return [self._slot(rank, slot, x).clone() for rank in range(self.size)]

    def _publish(self, x: torch.Tensor) -> tuple[int, int]:
        """Write x into this rank's slot of the next generation and say so. That slot last held
        generation - 2, which every rank has read once it has published generation - 1."""
        self.generation += 1
        generation, slot = self.generation, self.generation % 2
        self._wait(generation - 1)
        self._slot(self.rank, slot, x).copy_(x)
        self.flags[self.rank] = generation
        return generation, slot

    def _wait(self, generation: int) -> None:
        flags = self.flags
        spins = 0
        deadline = None
        while int(flags.min()) < generation:
            spins += 1
            if spins > SPINS_BEFORE_YIELD:
                os.sched_yield()  # the cores may be shared with the other ranks and the server
            if spins % CHECK_EVERY == 0:
                reason = self.abort_reason() if self.abort_reason is not None else None
                if reason:
                    raise RuntimeError(reason)
                now = time.monotonic()
                deadline = deadline or now + self.timeout_s
                if now > deadline:
                    raise RuntimeError(f"all-reduce: a rank did not arrive within {self.timeout_s:.0f} s "
                                       f"(generations {flags.tolist()}, waiting for {generation})")

    def close(self) -> None:
        del self.flags, self._slots
        try:
            self._map.close()
        except BufferError:  # a view of it is still alive somewhere: the mapping goes with it
            pass
