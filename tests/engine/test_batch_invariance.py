"""On the CPU in bfloat16, a request's tokens do not depend on what else the engine is doing:
its batch mates, how its prompt is chunked, or whether its prefix came from the cache. Token for
token, greedy."""

import pytest

from rillet import LLM, SamplingParams

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "写一篇关于秋天的短文",
    "List ten uses for an old bicycle.",
    "Describe the water cycle step by step.",
    "Why is the sky blue?",
    "Tell me a joke about cats. " * 40,  # a prompt longer than the small step budget below
]
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
HEAD = 16  # generated tokens fed back as part of a continuation prompt


@pytest.fixture(scope="module", params=["c-kernels", "torch-only"])
def kernels(request):
    """rillet's C kernels, or the torch path used where no C compiler is available."""
    if request.param == "torch-only":
        from rillet.models import cpu_kernels

        patch = pytest.MonkeyPatch()
        patch.setattr(cpu_kernels, "load", lambda: None)
        yield request.param
        patch.undo()
    else:
        yield request.param


@pytest.fixture(scope="module")
def reference(kernels):
    """Each prompt alone on an engine with no prefix cache and the default step budget."""
    llm = LLM(dtype="bfloat16", enable_prefix_caching=False)
    assert llm.engine.runner.paged_decode_kernel == (kernels == "c-kernels")
    return [llm.generate(prompt, GREEDY) for prompt in PROMPTS]


def test_tokens_do_not_depend_on_batch_chunking_or_the_prefix_cache(reference):
    llm = LLM(dtype="bfloat16", enable_prefix_caching=True, max_num_batched_tokens=48)
    expected = [r.token_ids for r in reference]

    cold = llm.generate(PROMPTS, GREEDY)  # all at once, long prompts split over several steps
    assert [r.token_ids for r in cold] == expected
    warm = llm.generate(PROMPTS[::-1], GREEDY)[::-1]  # prefixes now cached, other batch order
    assert llm.engine.block_manager.num_cached_tokens_total > 0
    assert [r.token_ids for r in warm] == expected

    # Prompt + the first generated tokens as a new prompt (a multi-turn chat's shape): the cached
    # prompt blocks are reused and the answer is the one an engine with an empty cache gives.
    continuations = [r.prompt_token_ids + r.token_ids[:HEAD] for r in reference]
    fresh = LLM(dtype="bfloat16", enable_prefix_caching=False).generate(continuations, GREEDY)
    reused_before = llm.engine.block_manager.num_cached_tokens_total
    assert [r.token_ids for r in llm.generate(continuations, GREEDY)] == [r.token_ids for r in fresh]
    assert llm.engine.block_manager.num_cached_tokens_total > reused_before
    assert llm.engine.block_manager.num_used_blocks == 0
