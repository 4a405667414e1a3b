"""Greedy generation equals transformers' `generate` on the same weights, token for token."""

import pytest
import torch

from rillet.sampling_params import SamplingParams

PROMPTS = [
    "Tell me a story about a dragon.",
    "Explain photosynthesis briefly.",
    "List three prime numbers and explain why they are prime.",
    "写一首关于春天的诗。",
    "用中文介绍一下北京。",
    "What is 2+2?",
]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def reference(engine_fp32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine_fp32.model_path, dtype=torch.float32)
    model.eval()
    prompts = [engine_fp32.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            expected.append(out[0, len(ids):].tolist())
    return prompts, expected


def greedy():
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0)


def collect(engine, prompts):
    for i, ids in enumerate(prompts):
        engine.add_request(f"p{i}", None, greedy(), prompt_token_ids=ids)
    tokens = {f"p{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[f"p{i}"] for i in range(len(prompts))]


def test_one_at_a_time_matches_transformers(engine_fp32, reference):
    prompts, expected = reference
    for ids, want in zip(prompts, expected):
        assert collect(engine_fp32, [ids]) == [want]


def test_all_six_batched_match_transformers(engine_fp32, reference):
    prompts, expected = reference
    assert collect(engine_fp32, prompts) == expected
