"""rillet's CUDA engine path: CUDA graphs against eager steps, preemption, abort, seeded sampling
and mixed prefill/decode steps, on a 4-layer cut of the Llama-3.2-1B shape (random weights).

    RILLET_GPU_TOKENIZER_DIR=DIR PYTHONPATH=src python -m pytest tests/gpu -q -rs

- bfloat16, greedy: the CUDA-graph engine gives the eager engine's tokens, 64 tokens for
  batches of 3, 5 and 17 sequences of different prompt lengths (sizes that are not captured
  graph sizes, so the graph runs padded), their prompts through the prompt-step graphs; where
  they part, it must be at a near-tie (BF16_TIE);
- float32, greedy (near-ties aside): prompt-step graphs give the eager engine's tokens for
  prompts prefilled in chunks, prefixes read from the cache and prompts that join running
  decodes;
- float32, greedy (near-ties aside, see conftest): each request gives the tokens it gives alone
  when 8 do not fit the KV cache and some are preempted; when 3 of 8 decoding sequences are
  aborted mid-run, with a decode step queued ahead (engine/overlap.py), and then every KV block
  is free again; and when a new prompt is prefilled in the same step as running decodes;
- float32, seeded sampling (temperature 0.8, top_p 0.9, seed 123): the same tokens twice alone,
  and the same batch of seeded requests twice gives the same tokens twice; greedy rows batched
  with sampled ones give their solo tokens. (Alone against
  batched is not promised on a GPU: cuBLAS may sum a row in another order at another row count,
  and a prompt graph pads the rows to its size, so a sampled token at a probability boundary
  can flip.)
"""

from __future__ import annotations

import random

import pytest

from rillet.sampling_params import SamplingParams


# A prompt graph pads its matmuls' rows to the captured token count, and cuBLAS may pick another
# kernel for another row count: the prompt's K/V can round differently by a bf16 ulp. Where graph
# and eager part, the float32 reference must see a near-tie (logits ~4 in size: a bf16 ulp there
# is 0.016-0.03).
BF16_TIE = 0.1


def random_ids(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(128256), k=n)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def solo(gpu, engine, ids: list[int], params: SamplingParams) -> list[int]:
    return gpu.generate(engine, {"solo": (ids, params)})["solo"]


@pytest.fixture(scope="module")
def bf16_graph_and_eager(model_dirs, make_module_engine):
    opts = dict(dtype="bfloat16", max_num_seqs=32)
    return make_module_engine(model_dirs("small"), **opts), make_module_engine(model_dirs("small"), enforce_eager=True,
                                                                                **opts)


@pytest.fixture(scope="module")
def engine32(model_dirs, make_module_engine):
    """float32 on the CUDA-graph path (the default), room for every test's requests."""
    return make_module_engine(model_dirs("small"))


@pytest.mark.parametrize("batch", [3, 5, 17])
def test_cuda_graphs_equal_eager_bfloat16(batch, bf16_graph_and_eager, reference, gpu):
    graphs, eager = bf16_graph_and_eager
    prompts = {f"r{i}": (random_ids(5 + (11 * i) % 90, 100 + i), greedy(64)) for i in range(batch)}
    replayed = graphs.runner.prompt_graphs.replays_total
    with_graphs = gpu.generate(graphs, prompts)
    eagerly = gpu.generate(eager, prompts)
    assert graphs.runner.prompt_graphs.replays_total > replayed and eager.runner.prompt_graphs is None
    ref = reference("small")  # only named in a failure message (float32 maths, weights before bf16 rounding)
    for rid, (ids, _) in prompts.items():
        gpu.assert_greedy_equal(with_graphs[rid], eagerly[rid], ids, ref, what=f"{rid} (batch {batch})",
                                tie=BF16_TIE)


def test_preempted_requests_give_their_solo_tokens_float32(model_dirs, reference, make_engine, engine32, gpu):
    from rillet.engine.model_runner import kv_bytes_per_token

    ref = reference("small")
    prompts = {f"r{i}": (random_ids(20 + 4 * i, 200 + i), greedy(64)) for i in range(8)}
    block_size = engine32.config.block_size
    per_seq = -(-(48 + 64) // block_size)  # blocks of the longest sequence
    per_token = kv_bytes_per_token(engine32.model, engine32.dtype)  # what the engine sizes its cache by
    budget_blocks = 3 * per_seq  # room for about 3 of the 8
    tiny = make_engine(model_dirs("small"), max_model_len=128, max_num_seqs=8,
                       kv_cache_gib=budget_blocks * block_size * per_token / (1 << 30))
    assert tiny.block_manager.num_blocks < 8 * per_seq, "the KV budget must not hold all 8 sequences"
    together = gpu.generate(tiny, prompts)
    assert tiny.stats().num_preemptions_total > 0
    for rid, (ids, params) in prompts.items():
        gpu.assert_greedy_equal(together[rid], solo(gpu, engine32, ids, params), ids, ref, what=rid)
    assert tiny.stats().num_kv_blocks_used == 0


def test_abort_in_a_graph_batch_leaves_the_others_unchanged_float32(engine32, reference, gpu):
    ref = reference("small")
    prompts = {f"r{i}": (random_ids(10 + 4 * i, 300 + i), greedy(48)) for i in range(8)}
    aborted = ["r1", "r4", "r6"]

    def abort_some(step, engine, outputs):
        if step == 10:
            assert engine.stats().num_running == 8
            for rid in aborted:
                engine.abort(rid)

    got = gpu.generate(engine32, prompts, on_step=abort_some)
    assert engine32.stats().num_kv_blocks_used == 0  # no prefix caching: every block is free again
    for rid, (ids, params) in prompts.items():
        want = solo(gpu, engine32, ids, params)
        if rid in aborted:
            assert 0 < len(got[rid]) < 48, (rid, len(got[rid]))
            want = want[:len(got[rid])]
        gpu.assert_greedy_equal(got[rid], want, ids, ref, what=rid)


def test_seeded_sampling_is_reproducible_alone_and_batched_float32(engine32, gpu):
    ids = random_ids(24, 400)

    def seeded(seed=123):
        return SamplingParams(max_tokens=48, temperature=0.8, top_p=0.9, seed=seed, ignore_eos=True)

    first = solo(gpu, engine32, ids, seeded())
    assert solo(gpu, engine32, ids, seeded()) == first
    seeded_others = {f"s{i}": (random_ids(8 + 9 * i, 410 + i), seeded(200 + i)) for i in range(5)}
    batched = gpu.generate(engine32, {"seeded": (ids, seeded()), **seeded_others})
    assert gpu.generate(engine32, {"seeded": (ids, seeded()), **seeded_others}) == batched
    assert solo(gpu, engine32, ids, seeded(124)) != first, "another seed should sample other tokens"


def test_greedy_rows_batched_with_sampled_rows_give_their_solo_tokens_float32(engine32, reference, gpu):
    # Greedy rows of a decode graph take the argmax the graph computed with the logits
    # (DecodeGraphs.greedy), alone and beside rows that sample.
    ref = reference("small")
    greedy_rows = {f"g{i}": (random_ids(9 + 5 * i, 600 + i), greedy(40)) for i in range(3)}
    sampled_rows = {f"s{i}": (random_ids(14 + 3 * i, 610 + i), SamplingParams(max_tokens=40, temperature=1.0,
                                                                              seed=9 + i, ignore_eos=True))
                    for i in range(3)}
    got = gpu.generate(engine32, {**greedy_rows, **sampled_rows})
    assert engine32.runner.greedy_ids(1) is not None  # the last step was a decode graph's
    for rid, (ids, params) in greedy_rows.items():
        gpu.assert_greedy_equal(got[rid], solo(gpu, engine32, ids, params), ids, ref, what=rid)
        assert len(got[rid]) == 40
    assert all(len(got[rid]) == 40 for rid in sampled_rows)


def test_prefill_in_a_step_with_running_decodes_gives_the_solo_tokens_float32(engine32, reference, gpu):
    ref = reference("small")
    prompts = {f"r{i}": (random_ids(12 + 6 * i, 500 + i), greedy(40)) for i in range(4)}
    late_ids, late_params = random_ids(100, 510), greedy(32)
    stepped = []  # the requests that got a token in each step

    def add_late(step, engine, outputs):
        stepped.append({out.request_id for out in outputs if out.token_ids})
        if step == 6:
            engine.add_request("late", None, late_params, prompt_token_ids=late_ids)

    got = gpu.generate(engine32, prompts, on_step=add_late)
    first = next(s for s in stepped if "late" in s)  # the step of its prompt: the 4 others decoded in it
    assert set(prompts) <= first, f"'late' was not prefilled beside the 4 decodes: {stepped}"
    for rid, (ids, params) in {**prompts, "late": (late_ids, late_params)}.items():
        gpu.assert_greedy_equal(got[rid], solo(gpu, engine32, ids, params), ids, ref, what=rid)


def test_prompt_graphs_with_chunks_cached_prefixes_and_joins_equal_eager_float32(model_dirs, reference, make_engine,
                                                                                 gpu):
    ref = reference("small")
    opts = dict(max_num_batched_tokens=48, enable_prefix_caching=True)  # 48-token chunks; the graphs top out there
    graphs, eager = make_engine(model_dirs("small"), **opts), make_engine(model_dirs("small"), enforce_eager=True, **opts)
    shared = random_ids(40, 600)  # a cached prefix for the later requests
    first = {"a": (shared + random_ids(30, 601), greedy(24))}
    then = {f"b{i}": (shared + random_ids(5 + 13 * i, 610 + i), greedy(24)) for i in range(4)}

    def join(step, engine, outputs):
        if step == 8:  # while "a" decodes
            for rid, (ids, params) in then.items():
                engine.add_request(rid, None, params, prompt_token_ids=ids)

    got = {engine: gpu.generate(engine, first, on_step=join) for engine in (graphs, eager)}
    assert graphs.runner.prompt_graphs.max_tokens == 48 and graphs.runner.prompt_graphs.replays_total >= 4
    assert graphs.stats().prefix_cache_hits_total >= 32  # the shared prefix came from the cache
    for rid, (ids, _) in {**first, **then}.items():
        gpu.assert_greedy_equal(got[graphs][rid], got[eager][rid], ids, ref, what=rid)
