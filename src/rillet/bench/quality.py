"""How close a weight format stays to float32: perplexity on a fixed text and greedy agreement.

Used by benchmarks/bench_quality.py (the published table) and tests/engine/test_quality.py
(the bars). Perplexity scores the text in prompt passes of `window` tokens through the engine's
own model runner, so it measures the weights and kernels the server runs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

# Engine options of each format, float32 first (the reference the others are compared with).
FORMATS: dict[str, dict[str, str]] = {
    "float32": {"dtype": "float32", "quantization": "none"},
    "bfloat16": {"dtype": "bfloat16", "quantization": "none"},
    "int8": {"dtype": "bfloat16", "quantization": "int8"},
    "q4": {"dtype": "bfloat16", "quantization": "q4"},
    "gguf blocks": {"dtype": "bfloat16", "quantization": "auto"},
}


def perplexity(engine: Any, text: str, window: int = 512) -> float:
    """exp(mean negative log-likelihood) of `text`'s tokens, each window scored from its start."""
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        logprobs = engine.score(chunk)
        total -= float(logprobs.sum())
        count += len(chunk) - 1
    return math.exp(total / count)


def greedy_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> dict[str, float]:
    """Per prompt, the tokens equal to the reference's before the first difference: their mean, and
    the share of prompts equal in full."""
    prefixes = []
    for ref, got in zip(reference, candidate):
        n = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        prefixes.append(n)
    full = [n == len(ref) == len(got) for n, ref, got in zip(prefixes, reference, candidate)]
    return {"prefix_tokens_mean": sum(prefixes) / len(prefixes), "exact_share": sum(full) / len(full)}
