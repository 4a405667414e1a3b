"""The shared-memory all-reduce and gather of CPU tensor-parallel ranks (parallel/shm_allreduce.py),
with the ranks as threads mapping the same file: every rank gets the sum in rank order (float32
exactly; bf16 summed in float32 and rounded once), slots reused across generations never mix
two steps, rank 0 gathers every rank's tensor, and a rank that never arrives ends the wait with
an error (its deadline, or rank 0's abort hook) instead of a hang."""

from __future__ import annotations

import threading

import pytest
import torch

from rillet.parallel import shm_allreduce
from rillet.parallel.shm_allreduce import ShmAllReduce

pytestmark = pytest.mark.skipif(not shm_allreduce.supported(),
                                reason="the shared-memory all-reduce runs on x86 only (other CPUs use gloo)")
SIZE = 3
CAPACITY = 64 * 1024


def ranks(tmp_path, timeout_s: float = 30.0) -> list[ShmAllReduce]:
    path = tmp_path / "allreduce"
    shm_allreduce.create(path, SIZE, CAPACITY)
    return [ShmAllReduce(path, rank, SIZE, CAPACITY, timeout_s) for rank in range(SIZE)]


def run_ranks(fn) -> list:
    results: list = [None] * SIZE
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(SIZE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_every_rank_gets_the_sum_in_rank_order_across_many_generations(tmp_path):
    group = ranks(tmp_path)
    shapes = [(1, 8), (7, 64), (3, 128), (1, 1), (16, 512)] * 8
    inputs = [[torch.randn(shape, generator=torch.Generator().manual_seed(100 * i + r)) for r in range(SIZE)]
              for i, shape in enumerate(shapes)]

    def work(rank: int) -> list[torch.Tensor]:
        return [group[rank].all_reduce(step[rank].clone()) for step in inputs]

    results = run_ranks(work)
    for i, step in enumerate(inputs):
        want = step[0] + step[1] + step[2]
        for rank in range(SIZE):
            assert torch.equal(results[rank][i], want), (i, rank)


def test_bfloat16_is_summed_in_float32_and_rounded_once(tmp_path):
    group = ranks(tmp_path)
    parts = [torch.randn(5, 96, generator=torch.Generator().manual_seed(r)).bfloat16() for r in range(SIZE)]
    results = run_ranks(lambda rank: group[rank].all_reduce(parts[rank].clone()))
    want = (parts[0].float() + parts[1].float() + parts[2].float()).bfloat16()
    assert all(torch.equal(r, want) for r in results)


def test_rank_0_gathers_every_ranks_tensor_between_all_reduces(tmp_path):
    group = ranks(tmp_path)

    def work(rank: int):
        out = []
        for step in range(20):
            out.append(group[rank].all_reduce(torch.full((2, 4), float(rank + step))))
            out.append(group[rank].gather(torch.full((3, 5), float(10 * rank + step))))
        return out

    results = run_ranks(work)
    for step in range(20):
        assert torch.equal(results[1][2 * step], torch.full((2, 4), float(3 + 3 * step)))
        parts = results[0][2 * step + 1]
        assert [float(p[0, 0]) for p in parts] == [float(10 * r + step) for r in range(SIZE)]
        assert results[1][2 * step + 1] is None and results[2][2 * step + 1] is None


def test_a_rank_that_never_arrives_ends_the_wait_with_an_error(tmp_path):
    (tmp_path / "deadline").mkdir()
    (tmp_path / "abort").mkdir()
    alone = ranks(tmp_path / "deadline", timeout_s=0.3)[0]
    with pytest.raises(RuntimeError, match="did not arrive"):
        alone.all_reduce(torch.ones(4))
    driver = ranks(tmp_path / "abort", timeout_s=60)[0]
    driver.abort_reason = lambda: "tensor-parallel worker rank 1 exited (status -9)"  # the watchdog's word
    with pytest.raises(RuntimeError, match="rank 1 exited"):
        driver.all_reduce(torch.ones(4))


def test_fits_takes_contiguous_cpu_tensors_up_to_the_capacity(tmp_path):
    rank = ranks(tmp_path)[0]
    assert rank.fits(torch.ones(CAPACITY // 4)) and not rank.fits(torch.ones(CAPACITY // 4 + 1))
    assert not rank.fits(torch.ones(8, 8).t())
