"""Quality of each weight format against float32 (issue 13): perplexity and greedy agreement.

For every format the engine can run here — float32 (the reference), bfloat16, int8 and q4
quantized at load, and the GGUF file's own blocks — on the default model:

- perplexity of tests/data/quality_text.txt (fixed, shipped with the tests), scored in one
  prompt pass per window of --window tokens;
- greedy agreement with float32: for each prompt, how many of the first --max-tokens greedy
  tokens equal float32's before the first difference, and the share of prompts equal in full.

    .venv/bin/python -m benchmarks.bench_quality
    RILLET_CPU_ISA=avx2 .venv/bin/python -m benchmarks.bench_quality   # another kernel variant

Writes benchmarks/results/bench_quality[.<isa>].json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rillet import LLM, SamplingParams
from rillet.bench.quality import FORMATS, greedy_agreement, perplexity

from rillet.bench.machine import machine_info
from rillet.bench.report import log, markdown_table, write_json

from benchmarks import RESULTS_DIR

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "quality_text.txt"
PROMPTS = (
    "Write a short poem about a river.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "What is the capital of France, and why is it famous?",
    "Give me a recipe for pancakes.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Describe a cat to someone who has never seen one.",
    "What are prime numbers? Give five examples.",
    "Summarize the plot of Romeo and Juliet.",
    "How do I reverse a list in Python?",
    "Name the planets of the solar system in order.",
    "What does a compiler do?",
    "Suggest a name for a coffee shop by the sea.",
    "How many minutes are there in a week? Show the steps.",
    "Tell me a fun fact about octopuses.",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    text = TEXT.read_text(encoding="utf-8")
    results, reference = {}, None
    for name, options in FORMATS.items():
        log(f"{name}: loading")
        try:
            llm = LLM(model=args.model, max_model_len=2048, kv_cache_gib=0.25, **options)
        except ValueError as exc:  # a format this machine cannot run
            results[name] = {"skipped": str(exc)}
            continue
        chats = [[{"role": "user", "content": p}] for p in PROMPTS]
        outputs = llm.chat(chats, SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True))
        tokens = [o.outputs[0].token_ids for o in outputs]
        entry = {"backend": llm.engine.backend.describe(), "perplexity": perplexity(llm.engine, text, args.window)}
        if reference is None:
            reference = (tokens, entry["perplexity"])
        entry.update(greedy_agreement(reference[0], tokens))
        entry["perplexity_change"] = entry["perplexity"] / reference[1] - 1
        results[name] = entry
        log(f"{name}: ppl {entry['perplexity']:.3f} ({entry['perplexity_change']:+.2%}), "
            f"{entry['prefix_tokens_mean']:.1f} of {args.max_tokens} tokens equal before a difference")
        del llm
    rows = []
    for name, r in results.items():
        if "skipped" in r:
            rows.append([name, "skipped: " + r["skipped"], "", "", ""])
            continue
        rows.append([name, r["backend"]["weights"], f"{r['perplexity']:.3f}", f"{r['perplexity_change']:+.2%}",
                     f"{r['prefix_tokens_mean']:.1f} / {args.max_tokens}, {r['exact_share']:.0%} equal"])
    table = markdown_table(["format", "weights", "perplexity", "vs float32", "greedy tokens equal to float32"], rows)
    print(table)
    info = machine_info()
    isa = next((r["backend"]["cpu_isa"] for r in results.values() if "backend" in r), "none")
    write_json({"machine": info, "window": args.window, "max_tokens": args.max_tokens, "prompts": len(PROMPTS),
                "text": str(TEXT.name), "results": results, "markdown": table},
               RESULTS_DIR / f"bench_quality.{isa}.json")


if __name__ == "__main__":
    main()
