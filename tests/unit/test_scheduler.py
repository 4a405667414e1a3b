from rillet.engine.block_manager import BlockManager
from rillet.engine.scheduler import Scheduler
from rillet.engine.sequence import Sequence, SequenceStatus
from rillet.sampling_params import SamplingParams


def make_seq(rid: str, n_prompt: int) -> Sequence:
    return Sequence(rid, 0, list(range(n_prompt)), SamplingParams())


def run_step(sched: Scheduler, sample: bool = True):
    """What the engine does after a forward pass: mark tokens computed, append a sampled token."""
    batch = sched.schedule()
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        if sample and seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(1)
    return batch


def test_long_prompt_is_prefilled_in_chunks_while_decodes_keep_running():
    sched = Scheduler(BlockManager(1000, 4), max_num_seqs=8, max_num_batched_tokens=64)
    short = make_seq("short", 10)
    sched.add(short)
    run_step(sched)  # short prefilled, now decoding
    long = make_seq("long", 200)
    sched.add(long)
    chunks = []
    while long.num_computed_tokens < 200:
        batch = run_step(sched)
        assert batch.seqs[0] is short and batch.num_new_tokens[0] == 1  # the stream moves every step
        assert batch.num_tokens <= 64
        chunks.append(batch.num_new_tokens[1])
    assert chunks == [63, 63, 63, 11]
    assert long.num_output_tokens == 1


def test_a_prompt_just_over_the_budget_is_fed_whole_instead_of_leaving_a_sliver():
    sched = Scheduler(BlockManager(1000, 4), max_num_seqs=8, max_num_batched_tokens=64)  # overrun: 8 tokens
    for rid, n in (("a", 30), ("b", 40), ("c", 10)):
        sched.add(make_seq(rid, n))
    batch = run_step(sched)
    assert batch.num_new_tokens == [30, 40]  # b overflows by 6 <= 8: whole; then the step is full
    assert [s.num_output_tokens for s in batch.seqs] == [1, 1]
    long = make_seq("long", 73)  # 73 > 64 + 8: chunked as usual
    sched2 = Scheduler(BlockManager(1000, 4), max_num_seqs=8, max_num_batched_tokens=64)
    sched2.add(long)
    assert run_step(sched2).num_new_tokens == [64]
    assert run_step(sched2).num_new_tokens == [9]


def test_max_num_seqs_limits_running_and_the_rest_wait_in_order():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=512)
    seqs = [make_seq(str(i), 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = run_step(sched)
    assert batch.seqs == seqs[:2]
    assert [s.request_id for s in sched.waiting] == ["2", "3"]
    sched.finish(seqs[0], "stop")
    batch = run_step(sched)
    assert seqs[2] in batch.seqs and seqs[3] not in batch.seqs


def test_full_cache_preempts_the_newest_and_recomputes_it_later():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=512)
    old, new = make_seq("old", 7), make_seq("new", 7)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # both prefilled: 2 blocks each, cache full, each has 8 tokens now
    assert bm.num_free_blocks == 0
    assert run_step(sched).preempted == []  # position 7 still fits in the second block
    batch = run_step(sched)  # position 8 needs a third block each: the newest is preempted
    assert batch.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert sched.waiting[0] is new and sched.num_preemptions_total == 1
    sched.finish(old, "stop")
    batch = run_step(sched)
    assert batch.seqs == [new] and batch.num_new_tokens == [9]  # prompt + its 2 generated tokens again


def test_finish_and_abort_return_every_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    seqs = [make_seq(str(i), 9) for i in range(4)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    run_step(sched)
    for s in seqs:
        sched.finish(s, "abort")
    assert bm.num_free_blocks == 16 and not sched.has_work()
    assert all(s.status is SequenceStatus.FINISHED for s in seqs)


def test_an_admission_window_gathers_prompts_that_arrive_while_others_decode():
    sched = Scheduler(BlockManager(1000, 4), max_num_seqs=4, max_num_batched_tokens=512)
    sched.admission_window_s = 0.010
    first = make_seq("first", 5)
    sched.add(first)
    assert run_step(sched).seqs == [first]  # nothing decodes: no wait
    late = make_seq("late", 5)
    late.arrival_time = t0 = 100.0
    sched.add(late)
    assert sched.schedule(now=t0 + 0.004).seqs == [first]  # the decode goes on, the prompt waits
    later = make_seq("later", 5)
    later.arrival_time = t0 + 0.006
    sched.add(later)
    assert not sched.admits(now=t0 + 0.009)
    batch = sched.schedule(now=t0 + 0.010)  # the oldest has waited the window: both go in together
    assert batch.seqs == [first, late, later] and batch.num_new_tokens == [1, 5, 5]


def test_an_admission_window_never_holds_prompts_that_fill_the_batch():
    sched = Scheduler(BlockManager(1000, 4), max_num_seqs=3, max_num_batched_tokens=512)
    sched.admission_window_s = 10.0
    running = make_seq("running", 5)
    sched.add(running)
    run_step(sched)
    for rid in ("a", "b"):
        sched.add(make_seq(rid, 5))  # two waiting, two free slots: nothing to wait for
    assert [s.request_id for s in sched.schedule().seqs] == ["running", "a", "b"]
    sched.add(make_seq("c", 5))
    assert not sched.admits()  # no free slot: nothing would be taken in anyway
