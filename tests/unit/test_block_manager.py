import numpy as np
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
    assert bm.slots(seq, np.arange(2, 6)).tolist() == [bm.slot(seq, p) for p in range(2, 6)]


def computed(bm: BlockManager, seq: Sequence) -> Sequence:
    """Give `seq` blocks for all its tokens, mark them computed and register the full ones."""
    bm.grow(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_full_blocks(seq)
    return seq


def test_a_later_prompt_with_the_same_prefix_reuses_its_full_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = computed(bm, Sequence("a", 0, list(range(10)), SamplingParams()))  # 2 full blocks + 2 tokens
    first_blocks = list(first.block_table)
    bm.free(first)
    assert bm.num_used_blocks == 0  # cached blocks count as free
    second = Sequence("b", 0, list(range(8)) + [99, 98, 97], SamplingParams())
    hits = bm.cached_prefix(second)
    assert [b for b, _ in hits] == first_blocks[:2] and bm.can_attach_and_grow(hits, second.num_tokens)
    bm.attach(second, hits)
    assert second.num_computed_tokens == 8 and bm.num_used_blocks == 2
    other = Sequence("c", 0, [7, 7, 7, 7, 1], SamplingParams())
    assert bm.cached_prefix(other) == []  # a different first block shares nothing


def test_a_fully_cached_prompt_still_leaves_its_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.free(computed(bm, Sequence("a", 0, list(range(8)), SamplingParams())))
    again = Sequence("b", 0, list(range(8)), SamplingParams())
    assert len(bm.cached_prefix(again)) == 1  # 8 tokens: the second block holds the last one


def test_shared_blocks_are_counted_once_and_freed_last():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = computed(bm, Sequence("a", 0, list(range(9)), SamplingParams()))
    b = Sequence("b", 0, list(range(9)), SamplingParams())
    bm.attach(b, bm.cached_prefix(b))
    bm.grow(b, 9)
    assert b.block_table[:2] == a.block_table[:2] and bm.num_used_blocks == 4
    bm.free(a)
    assert bm.num_used_blocks == 3  # a's own last block only
    bm.free(b)
    assert bm.num_used_blocks == 0


def test_cached_blocks_are_evicted_oldest_first_when_space_runs_out():
    bm = BlockManager(num_blocks=4, block_size=4)
    old = computed(bm, Sequence("old", 0, list(range(8)), SamplingParams()))
    bm.free(old)
    new = computed(bm, Sequence("new", 0, list(range(100, 116)), SamplingParams()))  # needs all 4 blocks
    assert len(new.block_table) == 4
    bm.free(new)
    assert bm.cached_prefix(Sequence("x", 0, list(range(9)), SamplingParams())) == []


def test_prefix_caching_can_be_turned_off():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    bm.free(computed(bm, Sequence("a", 0, list(range(10)), SamplingParams())))
    assert bm.cached_prefix(Sequence("b", 0, list(range(10)), SamplingParams())) == []
