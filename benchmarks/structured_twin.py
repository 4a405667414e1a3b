"""The engine-level cost of constrained rows, measured so that the machine's drift cancels:
two LLMEngines in one process, stepped alternately (B, A, A, B, ...).

Engine B runs 16 sequences, 8 free (forced long) and 8 greedy constrained to the JSON schemas
of rillet.bench.schemas, each replaced by the next schema's request when it ends. Engine A runs
the same requests with the constrained ones free, each forced to the length it had in a
recording pass of B: the same prompts, the same tokens, the same prefills, step for step, and
only the constraint differs. On a shared 2-core VM whose speed drifts by 10-30% within a minute,
an HTTP A/B of the free half (bench_structured's main measurement) is that noisy; this one is
not, because each B step has an A step beside it in time.
"""

from __future__ import annotations

import statistics
import time

from rillet.bench.schemas import SCHEMAS

SEQS = 16


class _Run:
    def __init__(self, constrained: bool, lengths: dict[str, int], dtype: str):
        from rillet.engine.llm_engine import LLMEngine

        self.constrained, self.lengths = constrained, lengths
        self.engine = LLMEngine(model=None, dtype=dtype, max_num_seqs=SEQS)
        self.next_id = SEQS
        self.counts: dict[str, int] = {}  # request id -> output tokens so far (A's lengths, from B)
        self.times: list[float] = []
        for i in range(SEQS):
            self._add(i, other=i % 2 == 0)

    def _add(self, i: int, other: bool) -> None:
        from rillet.sampling_params import SamplingParams
        from rillet.structured import StructuredOutputs

        name, schema = SCHEMAS[i % len(SCHEMAS)]
        ids = self.engine.encode_chat([{"role": "user", "content": f"[{i}] Reply with a short JSON example of {name}"}])
        if not other:
            params = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
        elif self.constrained:
            params = SamplingParams(max_tokens=2000, temperature=0.0, structured=StructuredOutputs.from_schema(schema))
        else:
            params = SamplingParams(max_tokens=self.lengths.get(f"r{i}", 32), temperature=0.0, ignore_eos=True)
        self.engine.add_request(f"r{i}", None, params, prompt_token_ids=ids)

    def step(self) -> None:
        start = time.perf_counter()
        outputs = self.engine.step()
        self.times.append(time.perf_counter() - start)
        for out in outputs:
            self.counts[out.request_id] = out.num_output_tokens
            if out.finished:
                self._add(self.next_id, other=True)
                self.next_id += 1


def twin_steps(steps: int = 200, dtype: str = "bfloat16") -> dict:
    """Mean and p50 step time of B and A over `steps` alternate steps each, and B's excess."""
    record = _Run(True, {}, dtype)
    for _ in range(3 * steps):  # B's lengths, for A's forced twins
        record.step()
    b, a = _Run(True, {}, dtype), _Run(False, record.counts, dtype)
    for _ in range(10):  # warm-up, not measured
        b.step()
        a.step()
    b.times.clear()
    a.times.clear()
    for s in range(steps):
        for run in (b, a) if s % 2 == 0 else (a, b):
            run.step()

    def ms(times: list[float]) -> dict:
        return {"mean": round(statistics.mean(times) * 1e3, 3), "p50": round(statistics.median(times) * 1e3, 3)}

    result = {"steps": steps, "B_constrained": ms(b.times), "A_free": ms(a.times),
              "requests_ended": {"B": b.next_id - SEQS, "A": a.next_id - SEQS}}
    result["B_over_A_mean"] = round(result["B_constrained"]["mean"] / result["A_free"]["mean"], 4)
    result["B_over_A_p50"] = round(result["B_constrained"]["p50"] / result["A_free"]["p50"], 4)
    return result
