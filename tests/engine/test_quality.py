"""Each weight format's quality against float32 on the default model (issue 13's bar): perplexity
of a fixed text (tests/data/quality_text.txt) and greedy agreement with float32's tokens. The
tolerances are the ones the README publishes; benchmarks/bench_quality.py prints the figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from rillet import LLM, SamplingParams
from rillet.bench.quality import FORMATS, greedy_agreement, perplexity

TEXT = (Path(__file__).resolve().parent.parent / "data" / "quality_text.txt").read_text(encoding="utf-8")
PROMPTS = ["Write a short poem about a river.", "Why is the sky blue?", "List three uses of copper.",
           "How do I reverse a list in Python?"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# format -> (largest perplexity increase over float32, least mean greedy prefix equal to float32's)
TOLERANCE = {"bfloat16": (0.02, 4), "int8": (0.02, 4), "q4": (0.03, 2), "gguf blocks": (0.03, 2)}


def _measure(options: dict) -> tuple[float, list[list[int]]]:
    llm = LLM(max_model_len=1024, kv_cache_gib=0.1, **options)
    try:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], GREEDY)
        return perplexity(llm.engine, TEXT, window=512), [o.outputs[0].token_ids for o in outputs]
    finally:
        del llm


@pytest.fixture(scope="module")
def reference():
    return _measure(FORMATS["float32"])


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_format_stays_close_to_float32(reference, name):
    from rillet.models import cpu_kernels

    if name != "bfloat16" and cpu_kernels.load() is None:
        pytest.skip("quantized weights run on rillet's C kernels, which did not build here")
    ppl_reference, tokens_reference = reference
    ppl, tokens = _measure(FORMATS[name])
    max_increase, min_prefix = TOLERANCE[name]
    agreement = greedy_agreement(tokens_reference, tokens)
    assert ppl <= ppl_reference * (1 + max_increase), (name, ppl, ppl_reference)
    assert agreement["prefix_tokens_mean"] >= min_prefix, (name, agreement)
