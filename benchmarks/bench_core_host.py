"""The engine core's host work a decode step at N rows, without the forward pass (issue 16).

    .venv/bin/python -m benchmarks.bench_core_host [--rows 256] [--steps 100] [--out PATH]

On a GPU at 128-256 streams the core's Python, not the GPU, paced serving (README, "Where the
core's time goes"). This measures its parts on any machine, on the default model's tokenizer
(a step's tokens taken from a text, one per row; the warm-up uses another text), each against a
baseline measured in the same run, alternating A / B / A / B (medians of --steps steps a round):

1. the outputs' loop (`LLMEngine._process`: append, stops, build the outputs), decoding in the
   core (`detokenize` on: LLMEngine alone, and the core before 167e595) against without (the
   core under AsyncEngine, whose front ends decode: also timed, `ChoiceText` rows through the
   front end's Detokenizer, as one API server of 4 gets a quarter of them);
2. publishing a step's outputs to 4 API servers: CoreOutputs' pickle (outputs as tuples)
   against pickling the same RequestOutput objects one `__reduce__` each (before c98aeb3);
3. a decode graph's host inputs (`DecodeHostInputs.fill`, the slots looked up for all rows at
   once) against the per-row `BlockManager.slot` loop it replaced (before d9cc6ab); needs Triton
   (engine/cuda_graphs imports the kernels), skipped without it.

Writes JSON (machine, commit, per part the medians in ms and the ratio) to
benchmarks/results/bench_core_host.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rillet.bench.machine import machine_info
from rillet.bench.report import write_json
from rillet.engine.core import CoreOutputs
from rillet.engine.detokenizer import ChoiceText
from rillet.engine.llm_engine import LLMEngine
from rillet.sampling_params import SamplingParams

MEASURED = "the water rose to the third step of the stone stair, so the children counted the days until it fell. "
WARM_UP = "A lighthouse keeper writes a letter every evening; nobody has answered one in forty years. "
PIPES = 4


def median_ms(fn: Callable[[int], object], steps: int) -> float:
    times = []
    for step in range(steps):
        start = time.perf_counter()
        fn(step)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def alternate(a: Callable[[int], object], b: Callable[[int], object], steps: int) -> tuple[float, float]:
    """Medians of a and b over two rounds each, A / B / A / B."""
    runs: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(2):
        runs["a"].append(median_ms(a, steps))
        runs["b"].append(median_ms(b, steps))
    return statistics.median(runs["a"]), statistics.median(runs["b"])


def part(name: str, baseline: str, new: str, ms: tuple[float, float]) -> dict:
    print(f"{name}: {baseline} {ms[0]:.3f} ms, {new} {ms[1]:.3f} ms ({ms[0] / ms[1]:.2f}x less)")
    return {"baseline": baseline, "baseline_ms": round(ms[0], 4), "new": new, "new_ms": round(ms[1], 4),
            "ratio": round(ms[0] / ms[1], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="rows a step (sequences decoding)")
    parser.add_argument("--steps", type=int, default=100, help="steps a round")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_core_host.json"))
    args = parser.parse_args(argv)
    N = args.rows
    engine = LLMEngine(dtype="float32", max_num_seqs=N, max_model_len=4096, kv_cache_gib=0.5,
                       enable_prefix_caching=False)
    tok = engine.tokenizer
    measured, warm = tok.encode(MEASURED * 40), tok.encode(WARM_UP * 40)
    params = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)
    seqs = [s for i in range(N) for s in engine.add_request(f"chatcmpl-{i:032x}", None, params,
                                                            prompt_token_ids=measured[i % 7:64 + i % 7])]
    stats = engine.stats()

    def tokens(ids: list[int], step: int) -> list[int]:
        return [ids[64 + (step + i) % (len(ids) - 64)] for i in range(N)]

    for step in range(20):  # warm-up, on the other text
        engine._process(seqs, tokens(warm, step), None)

    def process(detokenize: bool) -> Callable[[int], object]:
        def run(step: int) -> object:
            engine.detokenize = detokenize
            return engine._process(seqs, tokens(measured, step), None)
        return run

    result: dict = {"machine": machine_info("float32"), "rows": N, "steps_a_round": args.steps, "parts": {}}
    parts = result["parts"]
    parts["outputs_loop"] = part("outputs' loop", "decoding in the core", "token ids only",
                                 alternate(process(True), process(False), args.steps))

    detokenizer = engine.detokenizer
    texts = [ChoiceText(params, seq.prompt_token_ids) for seq in seqs[:N // PIPES]]
    for text in texts:
        detokenizer.start(text)

    def front_end(step: int) -> None:
        for text, token in zip(texts, tokens(measured, step)):
            detokenizer.append(text, token)
            detokenizer.take_delta(text, False)
    front = median_ms(front_end, args.steps)
    print(f"one of {PIPES} front ends decoding its {len(texts)} rows: {front:.3f} ms a step")
    parts["front_end_decode"] = {"rows": len(texts), "ms": round(front, 4)}

    engine.detokenize = True
    outs = engine._process(seqs, tokens(measured, 0), None)
    shares = [outs[k::PIPES] for k in range(PIPES)]

    def objects(step: int) -> None:
        for share in shares:
            pickle.dumps((share, stats, 5, False))

    def tuples(step: int) -> None:
        for share in shares:
            pickle.dumps(CoreOutputs(share, stats, 5))
    parts["publish"] = part(f"publish to {PIPES} pipes", "RequestOutput objects", "CoreOutputs' tuples",
                            alternate(objects, tuples, args.steps))

    try:
        from rillet.engine.cuda_graphs import CONTEXT_LENS, POSITIONS, Q_LENS, SLOTS, DecodeHostInputs
    except ImportError as exc:
        print(f"decode graph inputs: skipped ({exc})")
        parts["decode_inputs"] = {"skipped": str(exc)}
    else:
        bs, nb = engine.block_manager.block_size, 64
        for i, seq in enumerate(seqs):
            seq.block_table = list(range(i * 12, i * 12 + 12))
            seq.num_computed_tokens = 150 + i % 9
        host = DecodeHostInputs(np.zeros((5, N), dtype=np.int32), np.zeros((N, nb), dtype=np.int32), bs)
        old = DecodeHostInputs(np.zeros((5, N), dtype=np.int32), np.zeros((N, nb), dtype=np.int32), bs)
        inputs, bm = old.inputs, engine.block_manager

        def per_row(step: int) -> None:  # DecodeGraphs.run's host part before d9cc6ab
            positions = [seq.num_computed_tokens + 1 for seq in seqs]
            slots = [bm.slot(seq, position) for seq, position in zip(seqs, positions)]
            old.write_tables(seqs)  # the table rows as fill writes them: only the slots differ
            inputs[POSITIONS] = positions
            inputs[SLOTS] = slots
            inputs[CONTEXT_LENS] = inputs[POSITIONS] + 1
            inputs[Q_LENS] = 1

        parts["decode_inputs"] = part("decode graph inputs", "per-row BlockManager.slot",
                                      "DecodeHostInputs.fill",
                                      alternate(per_row, lambda step: host.fill(seqs, N, feed_ids=False, shift=1),
                                                args.steps))
    write_json(result, args.out)
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
