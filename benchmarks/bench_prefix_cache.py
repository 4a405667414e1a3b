"""Prefix caching: a 10-turn conversation's time to first token, turn by turn.

Each turn sends the whole history plus a new question, as chat clients do. Without prefix
caching every turn recomputes the history, so TTFT grows with it; with caching only the last
answer (decoded, so its blocks are not shared) and the new question are computed and TTFT stays
flat. Both runs use the same engine settings, greedy, in one process, one after the other, and
the script checks that they give the same answers (`answers_equal` in the JSON).

    .venv/bin/python -m benchmarks.bench_prefix_cache [--turns 10] [--answer-tokens 48]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rillet.bench.machine import machine_info
from rillet.bench.report import write_json

RESULTS = Path(__file__).parent / "results"
SYSTEM = ("You are a patient tutor. You explain things step by step, with short examples, and you "
          "always check what the student already knows before adding something new. ") * 4
QUESTIONS = [
    "What is a prime number?", "Is 51 prime?", "How do I test whether a number is prime?",
    "What is the sieve of Eratosthenes?", "Can you show it for numbers up to 30?",
    "Why do we only check divisors up to the square root?", "What is a composite number?",
    "Are there infinitely many primes?", "What is a twin prime?", "Give me a practice exercise.",
    "What is a Mersenne prime?", "What is the largest known prime?",
]


def run_conversation(engine, turns: int, answer_tokens: int, system: str = SYSTEM) -> list[dict]:
    from rillet.sampling_params import SamplingParams

    messages = [{"role": "system", "content": system}]
    rows = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        prompt = engine.encode_prompt(messages)
        cached_before = engine.block_manager.num_cached_tokens_total
        start = time.perf_counter()
        engine.add_request(f"turn{turn}", None, SamplingParams(max_tokens=answer_tokens, temperature=0,
                                                               ignore_eos=True), prompt_token_ids=prompt)
        ttft, text = None, ""
        while engine.has_unfinished():
            for out in engine.step():
                if ttft is None and out.token_ids:
                    ttft = time.perf_counter() - start
                text += out.text
        rows.append({"turn": turn + 1, "prompt_tokens": len(prompt), "ttft_ms": ttft * 1e3,
                     "cached_tokens": engine.block_manager.num_cached_tokens_total - cached_before,
                     "answer": text})
        messages.append({"role": "assistant", "content": text})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_prefix_cache.json")
    args = parser.parse_args()

    from rillet.engine.llm_engine import LLMEngine

    result = {"turns": args.turns, "answer_tokens": args.answer_tokens}
    for caching in (False, True):
        engine = LLMEngine(dtype=args.dtype, max_model_len=4096, enable_prefix_caching=caching)
        run_conversation(engine, 2, 4, system="Warm-up.")  # shares no block with the timed conversation
        result["with_cache" if caching else "without_cache"] = run_conversation(engine, args.turns,
                                                                               args.answer_tokens)
        result["backend"] = engine.backend.describe()
        del engine
    result["machine"] = machine_info(result["backend"]["dtype"])
    info = result["machine"]
    print(f"{info['cpu_model']} ({info['cpu_cores']} cores), commit {info['git_commit']}, rillet {result['backend']}")
    result["answers_equal"] = [a["answer"] == b["answer"] for a, b in zip(result["without_cache"],
                                                                         result["with_cache"])]
    print("| turn | prompt tokens | TTFT without cache (ms) | TTFT with cache (ms) | tokens reused |")
    print("|---:|---:|---:|---:|---:|")
    for a, b in zip(result["without_cache"], result["with_cache"]):
        print(f"| {a['turn']} | {a['prompt_tokens']} | {a['ttft_ms']:.0f} | {b['ttft_ms']:.0f} | {b['cached_tokens']} |")
    print(f"answers equal with and without the cache: {sum(result['answers_equal'])} of {args.turns} turns")
    write_json(result, args.out)


if __name__ == "__main__":
    main()
