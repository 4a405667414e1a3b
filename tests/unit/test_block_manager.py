import pytest

from rillet.engine.block_manager import BlockManager
from rillet.engine.sequence import Sequence
from rillet.sampling_params import SamplingParams


def make_seq(n_prompt: int, rid: str = "r") -> Sequence:
    return Sequence(rid, 0, list(range(n_prompt)), SamplingParams())


def test_grow_allocates_whole_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(5)
    assert bm.blocks_needed(seq, 5) == 2
    bm.grow(seq, 5)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    assert bm.blocks_needed(seq, 8) == 0 and bm.blocks_needed(seq, 9) == 1
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 4 and bm.usage == 0.0


def test_cannot_grow_past_capacity():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(1)
    assert not bm.can_grow(seq, 9)
    with pytest.raises(RuntimeError):
        bm.grow(seq, 9)
    assert bm.num_free_blocks == 2


def test_slot_maps_positions_through_the_block_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    other, seq = make_seq(4, "a"), make_seq(6, "b")
    bm.grow(other, 4)
    bm.grow(seq, 6)
    b0, b1 = seq.block_table
    assert [bm.slot(seq, p) for p in range(6)] == [b0 * 4, b0 * 4 + 1, b0 * 4 + 2, b0 * 4 + 3, b1 * 4, b1 * 4 + 1]
