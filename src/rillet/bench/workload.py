"""The benchmark scripts' prompts: what is measured, what warms up, and how each measured prompt
is made new (see `rillet.bench.loadgen.tagged`), so a prefix cache never flatters TTFT."""

from __future__ import annotations

from typing import Any, Sequence

from rillet.bench.loadgen import Prompt, tagged

__all__ = ["PROMPTS", "WARMUP_PROMPTS", "add_prompt_argument", "chat_messages", "measured_prompts", "prompt_cycle",
           "warmup_cycle"]

# The article's own prompt first ("write an 800-character essay"), then a few English ones.
PROMPTS: tuple[str, ...] = (
    "写一篇800字的作文",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List ten creative uses for an old bicycle and explain each one briefly.",
    "Describe the water cycle, step by step.",
    "Write a poem about autumn leaves falling in a quiet city park.",
    "Give me a recipe for a simple vegetable soup with instructions.",
    "Explain why the sky is blue in a few paragraphs.",
)

# Warm-up prompts: none of them is, or starts like, a measured prompt (PROMPTS above, or
# rillet.bench.loadgen's defaults), so a warm-up leaves no prompt prefix in a server's prefix
# cache that the measured requests could reuse (beyond the chat template's shared system part,
# which every real request shares too): TTFT measures a cold prompt (issue 14 item 3).
WARMUP_PROMPTS: tuple[str, ...] = (
    "Name three rivers in South America and one fact about each.",
    "How do bees make honey? Answer in two sentences.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "What is the difference between weather and climate?",
)

assert not {w[:16] for w in WARMUP_PROMPTS} & {m[:16] for m in PROMPTS}, "warm-up prompts must not prefix measured ones"


def chat_messages(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def prompt_cycle(n: int, prompts: Sequence[Prompt] | None = None) -> list[list[dict]]:
    """n chat message lists, cycling through the prompts."""
    source = list(prompts or PROMPTS)
    return [chat_messages(source[i % len(source)]) for i in range(n)]


def warmup_cycle(n: int) -> list[list[dict]]:
    """n chat message lists from WARMUP_PROMPTS, never a measured prompt."""
    return prompt_cycle(n, WARMUP_PROMPTS)


def measured_prompts(n: int, level: int | str, *, distinct: bool = True) -> list[str]:
    """The n prompts one level measures: PROMPTS cycled. With `distinct` (the default of every
    script) each opens with its own tag, "[16.3] ...", so no measured prompt is one a prefix cache
    has already seen (not an earlier level's, not an earlier request's of this level: only eight
    prompts cycle), and TTFT is that of a new prompt. The chat template's shared system part
    still hits the cache, as it does for real traffic. Every system gets the same prompts."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    return [str(tagged(p, f"{level}.{i}")) for i, p in enumerate(prompts)] if distinct else prompts


def add_prompt_argument(parser: Any) -> None:
    parser.add_argument("--repeat-prompts", action="store_true",
                        help="measure the same eight prompts verbatim at every level (a prefix cache then serves "
                             "repeats and flatters TTFT); default: each measured prompt opens with its own tag")
