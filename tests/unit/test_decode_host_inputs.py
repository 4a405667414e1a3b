"""A decode graph's host inputs (engine/cuda_graphs.DecodeHostInputs) on any machine: the slots
looked up for all rows at once are BlockManager.slot's, table rows are rewritten exactly when
their block table grew or was replaced, padding rows touch nothing, and a position past a
sequence's blocks is an error, not a stale slot."""

from __future__ import annotations

import numpy as np
import pytest
from support.triton_kernels import require_triton

require_triton()  # cuda_graphs imports the Triton kernels

from rillet.engine.block_manager import BlockManager  # noqa: E402
from rillet.engine.cuda_graphs import CONTEXT_LENS, IDS, POSITIONS, Q_LENS, SLOTS, DecodeHostInputs  # noqa: E402
from rillet.engine.sequence import Sequence  # noqa: E402
from rillet.sampling_params import SamplingParams  # noqa: E402

BLOCK = 4


def seq(i: int, tokens: int, table: list[int]) -> Sequence:
    s = Sequence(f"r{i}", 0, list(range(100 + i, 100 + i + tokens)), SamplingParams())
    s.block_table = table
    s.num_computed_tokens = tokens - 1  # feeds its last token
    return s


def expect(host: DecodeHostInputs, seqs: list[Sequence], size: int, shift: int) -> None:
    bm = BlockManager(64, BLOCK, False)
    B = len(seqs)
    positions = [s.num_computed_tokens + shift for s in seqs]
    assert host.inputs[POSITIONS, :B].tolist() == positions
    assert host.inputs[SLOTS, :B].tolist() == [bm.slot(s, p) for s, p in zip(seqs, positions)]
    assert host.inputs[CONTEXT_LENS, :B].tolist() == [p + 1 for p in positions]
    assert host.inputs[Q_LENS, :size].tolist() == [1] * B + [0] * (size - B)
    assert host.inputs[SLOTS, B:size].tolist() == [-1] * (size - B)
    assert host.inputs[CONTEXT_LENS, B:size].tolist() == [0] * (size - B)
    for row, s in enumerate(seqs):
        assert host.tables[row, :len(s.block_table)].tolist() == s.block_table


def test_slots_tables_and_padding_as_the_block_manager_has_them():
    host = DecodeHostInputs(np.zeros((5, 8), dtype=np.int32), np.zeros((8, 6), dtype=np.int32), BLOCK)
    seqs = [seq(0, 3, [7]), seq(1, 9, [2, 5, 11]), seq(2, 4, [9])]
    host.fill(seqs, 4, feed_ids=True)
    expect(host, seqs, 4, shift=0)
    assert host.inputs[IDS, :3].tolist() == [s.token_at(s.num_computed_tokens) for s in seqs]

    # the step after, queued ahead: ids come from the GPU (left as they are), one position on;
    # row 2's position 4 needs its grown table (an append to the same list), row 0 a new list
    for s in seqs:
        s.num_computed_tokens += 1
    host.inputs[IDS, :3] = -7
    seqs[2].block_table.append(13)
    seqs[0].block_table = [20, 21]
    host.fill(seqs, 8, feed_ids=False, shift=0)
    expect(host, seqs, 8, shift=0)
    assert host.inputs[IDS, :3].tolist() == [-7, -7, -7]
    host.fill(seqs[:2], 2, feed_ids=False, shift=1)  # fewer rows, shifted
    expect(host, seqs[:2], 2, shift=1)


def test_a_position_past_the_table_is_an_error_and_rows_written_elsewhere_are_rewritten():
    host = DecodeHostInputs(np.zeros((5, 4), dtype=np.int32), np.zeros((4, 3), dtype=np.int32), BLOCK)
    s = seq(0, 4, [3])
    host.fill([s], 1, feed_ids=True)
    with pytest.raises(IndexError, match="position 4 is past its 1 blocks"):
        host.fill([s], 1, feed_ids=False, shift=1)  # block 1 not allocated yet
    host.tables[:] = 0  # a tensor-parallel worker's replay wrote the rows
    host.forget_tables()
    host.fill([s], 1, feed_ids=True)
    expect(host, [s], 1, shift=0)
