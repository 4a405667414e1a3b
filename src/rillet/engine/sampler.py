"""Turn logits into tokens for a whole batch at once, each row with its own parameters.

Seeded rows draw from their own torch.Generator (seeded once per sequence and advanced one
draw per step), so their tokens depend only on their seed and step, never on batch mates.
Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) picks token i with
probability p_i, and needs one vector of noise per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rillet.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None  # per row: (chosen, top-k) or None rows


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0):
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._seq_generators: dict[int, torch.Generator] = {}

    def forget(self, seq: Sequence) -> None:
        self._seq_generators.pop(id(seq), None)

    def _generator_for(self, seq: Sequence) -> torch.Generator:
        gen = self._seq_generators.get(id(seq))
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seq.seed)
            self._seq_generators[id(seq)] = gen
        return gen

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: [B, V] float32, one row per sequence that samples this step."""
        logits = logits[:, : self.vocab_size]
        want_logprobs = [s.params.logprobs is not None for s in seqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        logits = self._apply_biases_and_penalties(logits, seqs)

        greedy = [s.params.is_greedy for s in seqs]
        if all(greedy):
            chosen = logits.argmax(dim=-1)
        else:
            chosen = self._sample(logits, seqs, greedy)
        token_ids = chosen.tolist()
        logprobs = None
        if raw_logprobs is not None:
            logprobs = []
            for row, seq in enumerate(seqs):
                k = seq.params.logprobs
                if k is None:
                    logprobs.append(None)
                    continue
                chosen_lp = float(raw_logprobs[row, token_ids[row]])
                top: list[tuple[int, float]] = []
                if k:
                    values, indices = raw_logprobs[row].topk(k)
                    top = list(zip(indices.tolist(), values.tolist()))
                logprobs.append((chosen_lp, top))
        return SampleResult(token_ids, logprobs)

    def _apply_biases_and_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows_bias = [i for i, s in enumerate(seqs) if s.params.logit_bias]
        rows_pen = [i for i, s in enumerate(seqs) if s.params.needs_penalties]
        if not rows_bias and not rows_pen:
            return logits
        logits = logits.clone()
        V = logits.shape[1]
        for i in rows_bias:
            ids = [t for t in seqs[i].params.logit_bias if t < V]
            if ids:
                bias = torch.tensor([seqs[i].params.logit_bias[t] for t in ids], dtype=logits.dtype,
                                    device=logits.device)
                logits[i, ids] += bias
        for i in rows_pen:
            p = seqs[i].params
            row = logits[i]
            if p.repetition_penalty != 1.0:  # transformers' rule, over prompt and output tokens
                seen = torch.tensor(sorted(set(seqs[i].all_token_ids())), device=logits.device)
                seen = seen[seen < V]
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.frequency_penalty or p.presence_penalty) and seqs[i].output_token_ids:
                out = torch.tensor(seqs[i].output_token_ids, device=logits.device)
                counts = torch.zeros(V, dtype=logits.dtype, device=logits.device)
                counts.scatter_add_(0, out.clamp(max=V - 1), torch.ones_like(out, dtype=logits.dtype))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        B, V = logits.shape
        temps = torch.tensor([s.params.temperature if not g else 1.0 for s, g in zip(seqs, greedy)],
                             dtype=logits.dtype, device=logits.device)
        scaled = logits / temps[:, None]
        top_ks = [s.params.top_k for s in seqs]
        if any(0 < k < V for k in top_ks):
            k_max = max(k if 0 < k < V else V for k in top_ks)
            kth = scaled.topk(min(k_max, V), dim=-1).values  # [B, k_max], sorted
            index = torch.tensor([(k if 0 < k < V else min(k_max, V)) - 1 for k in top_ks], device=logits.device)
            threshold = kth.gather(1, index[:, None])
            no_k = torch.tensor([not (0 < k < V) for k in top_ks], device=logits.device)
            threshold = torch.where(no_k[:, None], torch.full_like(threshold, -float("inf")), threshold)
            scaled = scaled.masked_fill(scaled < threshold, -float("inf"))
        probs = torch.softmax(scaled, dim=-1)
        top_ps = [s.params.top_p for s in seqs]
        if any(p < 1.0 for p in top_ps):
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            cumulative = sorted_probs.cumsum(dim=-1)
            top_p = torch.tensor(top_ps, dtype=probs.dtype, device=probs.device)[:, None]
            # Drop tokens whose preceding mass already reaches top_p (the top token always stays).
            drop_sorted = (cumulative - sorted_probs) >= top_p
            drop = torch.zeros_like(drop_sorted).scatter(1, sorted_idx, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        min_ps = [s.params.min_p for s in seqs]
        if any(p > 0.0 for p in min_ps):
            min_p = torch.tensor(min_ps, dtype=probs.dtype, device=probs.device)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)

        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.seed is None and not greedy[i]]
        if unseeded:
            noise[unseeded] = torch.empty((len(unseeded), V), dtype=probs.dtype,
                                          device=probs.device).exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.seed is not None and not greedy[i]:
                noise[i] = torch.empty(V, dtype=probs.dtype, device=probs.device).exponential_(
                    generator=self._generator_for(s))
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            greedy_mask = torch.tensor(greedy, device=logits.device)
            sampled = torch.where(greedy_mask, logits.argmax(dim=-1), sampled)
        return sampled
