"""rillet on CUDA against transformers' generate on the same random Llama-3.2-1B-shaped weights.

    RILLET_GPU_TOKENIZER_DIR=DIR PYTHONPATH=src python -m pytest tests/gpu -q -rs

- float32, greedy: token for token (near-ties aside, see conftest), 3 prompts x 32 new tokens, on
  the CUDA-graph path and with enforce_eager; and an 8,000-token prompt (max_model_len 8192,
  chunked prefill) x 64 new tokens.
- bfloat16, greedy: rillet and transformers both round, so their greedy paths can part at any
  near-tie and then differ; the bar is on each token rillet picks instead. The float32 forward
  pass on the same bf16 weights, given the tokens rillet chose so far, must rank rillet's token
  within BF16_MAX_GAP of its best logit at every position and pick it at >= BF16_MIN_ARGMAX of
  them (bf16 rounding of activations moves logits by a few hundredths here), and rillet must
  follow transformers' bf16 greedy path for its first BF16_PREFIX tokens on every prompt.
"""

from __future__ import annotations

import random

import pytest
import torch

from rillet.sampling_params import SamplingParams

NEW_TOKENS = 32
BF16_MAX_GAP = 0.25  # logit units; the random model's top-1/top-2 gap averages ~0.2
BF16_MIN_ARGMAX = 0.90
BF16_PREFIX = 8


def random_ids(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(128256), k=n)


PROMPTS = [random_ids(32, 1), random_ids(10, 2), random_ids(50, 3)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_float32_greedy_equals_transformers(enforce_eager, model_dirs, reference, make_engine, gpu):
    ref = reference("1b")
    engine = make_engine(model_dirs("1b"), enforce_eager=enforce_eager, max_num_seqs=8)
    got = gpu.generate(engine, {f"p{i}": (ids, greedy(NEW_TOKENS)) for i, ids in enumerate(PROMPTS)})
    for i, ids in enumerate(PROMPTS):
        gpu.assert_greedy_equal(got[f"p{i}"], ref.greedy(ids, NEW_TOKENS), ids, ref, what=f"prompt {i}")


def test_bfloat16_greedy_agrees_with_transformers(model_dirs, reference, make_engine, gpu):
    ref16 = reference("1b", torch.bfloat16)
    ref32 = reference("1b", torch.float32, weights=torch.bfloat16)  # float32 maths, the same bf16 weights
    engine = make_engine(model_dirs("1b", torch.bfloat16), dtype="bfloat16", max_num_seqs=8)
    got = gpu.generate(engine, {f"p{i}": (ids, greedy(NEW_TOKENS)) for i, ids in enumerate(PROMPTS)})
    argmax_hits, report = 0, []
    for i, ids in enumerate(PROMPTS):
        tokens = got[f"p{i}"]
        assert len(tokens) == NEW_TOKENS
        logits = ref32.forced_logits(ids, tokens)
        chosen = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
        gaps = (logits.max(dim=1).values - chosen).tolist()
        argmax_hits += sum(g == 0 for g in gaps)
        want16 = ref16.greedy(ids, NEW_TOKENS)
        prefix = gpu.first_divergence(tokens, want16)
        prefix = NEW_TOKENS if prefix is None else prefix
        report.append(f"prompt {i}: max gap {max(gaps):.3f}, same as transformers bf16 for {prefix} tokens")
        assert max(gaps) <= BF16_MAX_GAP, report[-1] + f"; gaps {[round(g, 3) for g in gaps]}"
        assert prefix >= BF16_PREFIX, report[-1] + f"\n got  {tokens}\n want {want16}"
    rate = argmax_hits / (NEW_TOKENS * len(PROMPTS))
    assert rate >= BF16_MIN_ARGMAX, f"float32 argmax picked at {rate:.0%} of positions; " + "; ".join(report)


def test_8k_context_float32_equals_transformers(model_dirs, reference, make_engine, gpu):
    ref = reference("1b")
    ids = random_ids(8000, 8)
    engine = make_engine(model_dirs("1b"), max_model_len=8192, max_num_seqs=4, kv_cache_gib=1.0)
    got = gpu.generate(engine, {"long": (ids, greedy(64))})["long"]
    gpu.assert_greedy_equal(got, ref.greedy(ids, 64), ids, ref, what="8,000-token prompt")
