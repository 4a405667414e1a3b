"""Turn logits into tokens for a whole batch at once, each row with its own parameters.

Seeded rows draw from their own torch.Generator (seeded once per sequence and advanced one
draw per step), so their draws depend only on their seed and step, never on batch mates. Their
tokens also depend on the logits, which are batch-invariant only where the forward pass is (the
CPU in bfloat16; not float32, not CUDA: see README, "Batch invariance").
Sampling inverts each row's cumulative distribution at one uniform draw, so a step costs one
random number per row, not one per vocabulary entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from rillet.engine.sequence import Sequence
from rillet.structured.matcher import Guide, apply_token_bitmask_


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None  # per row: (chosen, top-k) or None rows


TOP_P_CANDIDATES = (256, 4096)  # nucleus search widths before a full sort, see Sampler._top_p
GRAMMAR_CANDIDATES = 32  # a constrained greedy row's best tokens checked against its grammar, see _grammar_picks


class Sampler:
    """`argmax`: the greedy rows' pick, [B, V] -> [B] ids (first maximum): the GPU path passes
    its Triton kernel (models/cuda_kernels.argmax_rows), the CPU path its C kernels' one
    (models/cpu_kernels.Kernels.argmax_rows); None: torch's."""

    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0,
                 argmax: Callable[[torch.Tensor], torch.Tensor] | None = None, eos_token_ids: Iterable[int] = ()):
        self.vocab_size = vocab_size
        self.device = device
        self.eos_token_ids = sorted(eos_token_ids)  # masked, with stop_token_ids, before min_tokens
        self._argmax = argmax or (lambda logits: logits.argmax(dim=-1))
        # Uniform draws are made on the CPU (a handful a step), so the same seed gives the same
        # tokens on any device.
        self._cpu_generator = torch.Generator()
        self._cpu_generator.manual_seed(seed)
        self._seq_generators: dict[int, torch.Generator] = {}

    def forget(self, seq: Sequence) -> None:
        self._seq_generators.pop(id(seq), None)

    def _generator_for(self, seq: Sequence, seed: int) -> torch.Generator:
        gen = self._seq_generators.get(id(seq))
        if gen is None:
            gen = torch.Generator()  # CPU: see __init__
            gen.manual_seed(seed)
            self._seq_generators[id(seq)] = gen
        return gen

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 allowed: tuple[list[int], torch.Tensor] | None = None) -> SampleResult:
        """logits: [B, V] float32, one row per sequence that samples this step. `allowed`: the
        structured-output masks of the constrained rows, as (rows, int32 bitmask
        [len(rows), words]; see rillet.structured.matcher); applied after logit bias and penalties,
        before temperature and truncation (as vLLM does), and to those rows only."""
        logits = logits[:, : self.vocab_size]
        want_logprobs = [s.params.logprobs is not None for s in seqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        logits = self._apply_biases_and_penalties(logits, seqs)
        if allowed is not None and allowed[0]:
            logits = apply_token_bitmask_(logits, *allowed)

        token_ids = self._choose(logits, seqs).tolist()
        self._grammar_picks(logits, seqs, token_ids)
        logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
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

    def picks_by_grammar(self, seq: Sequence) -> bool:
        """A constrained greedy row on the host: `_grammar_picks` chooses its token, unmasked, so
        the engine fills no mask for it."""
        return self.device.type == "cpu" and seq.guide is not None and seq.guide.error is None \
            and seq.params.is_greedy

    def _grammar_picks(self, logits: torch.Tensor, seqs: list[Sequence], token_ids: list[int]) -> None:
        """Set the picks of the constrained greedy rows (`picks_by_grammar`) of host logits, in
        `token_ids`, which hold each row's unmasked argmax: the first maximum among the tokens
        the grammar allows, found without a mask. The argmax stays when the matcher accepts it
        (well under a microsecond); else the row's GRAMMAR_CANDIDATES best tokens are checked
        in order, and the first accepted is the pick, unless a token outside the candidates
        could tie with it, when the whole mask decides (as it does when none is accepted, and
        where the grammar forces the next bytes: see Guide.forced). Masking every constrained
        row cost ~0.1 ms of llguidance's time and ~60 us to apply to its 49k logits, every
        step, on the cores the forward pass needs: 10-15% of the free rows' speed on 2 cores
        with half the batch constrained."""
        rows = [row for row, seq in enumerate(seqs) if self.picks_by_grammar(seq)]
        if not rows:
            return
        k = min(GRAMMAR_CANDIDATES, logits.shape[1])
        for row in rows:
            guide = seqs[row].guide
            assert guide is not None
            if guide.failed():  # its logits stay as they are until the engine ends its request
                continue
            pick = None
            if not guide.forced():
                if guide.allows(token_ids[row]):  # the first maximum: also the first allowed one
                    continue
                values, ids = logits[row].topk(k)
                pick = Sampler._first_allowed(guide, values.tolist(), ids.tolist(), complete=k == logits.shape[1])
            if pick is None:
                allowed = guide.allowed_ids()
                allowed = allowed[allowed < logits.shape[1]]
                if allowed.size:  # else the matcher has failed: the engine ends the request
                    pick = int(allowed[int(logits[row, torch.from_numpy(allowed)].argmax())])
            if pick is not None:
                token_ids[row] = pick

    @staticmethod
    def _first_allowed(guide: Guide, values: list[float], ids: list[int], complete: bool) -> int | None:
        """The best candidate the grammar allows (ties: the lowest id), or None when none is, or
        when it ties with the weakest candidate and a token outside the candidates could too."""
        order = sorted(range(len(ids)), key=lambda j: (-values[j], ids[j]))
        weakest = values[order[-1]]
        for j in order:
            if values[j] == weakest and not complete:
                return None
            if guide.allows(ids[j]):
                return ids[j]
        return None

    @staticmethod
    def defers(seq: Sequence) -> bool:
        """Whether `sample_ids` can take this row: nothing read back from its logits (logprobs)
        and nothing that depends on its latest token on the host (penalties, bias, a grammar)."""
        p = seq.params
        return seq.guide is None and p.logprobs is None and not p.logit_bias and not p.needs_penalties \
            and not (p.min_tokens and p.holds_ends(len(seq.output_token_ids)))  # a cheap test first: rows a step

    def sample_ids(self, logits: torch.Tensor, seqs: list[Sequence], argmax: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """The sampled ids [B] left on the logits' device, for rows that `defers`: the engine reads
        them back after it has queued the next step (engine/overlap.py). `argmax`: each row's
        argmax, when the forward pass took it already (ModelRunner.greedy_ids)."""
        if argmax is not None and logits.shape[1] != self.vocab_size:
            argmax = None  # taken over a wider row than the sampler's vocabulary
        return self._choose(logits[:, : self.vocab_size], seqs, argmax)

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence], argmax: torch.Tensor | None = None
                ) -> torch.Tensor:
        greedy = [s.params.is_greedy for s in seqs]
        if all(greedy):
            return argmax if argmax is not None else self._argmax(logits)
        return self._sample(logits, seqs, greedy, argmax)

    def _tensor(self, values: list[Any], dtype: torch.dtype) -> torch.Tensor:
        """A small per-row tensor on the logits' device without waiting for the GPU: a blocking
        copy would wait for every step queued before it (engine/overlap.py queues one ahead)."""
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    @staticmethod
    def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Zero every token outside each row's nucleus: the most likely tokens whose mass reaches
        top_p (the top token always stays; tokens tied with the least likely kept one stay too).
        A full sort of the vocabulary costs ~25 ms at batch 16 on this CPU, so the nucleus is
        looked for among the 256 most likely tokens first, then 4,096, and only rows whose
        nucleus is wider still are sorted in full."""
        V = probs.shape[1]
        thresholds = torch.zeros((probs.shape[0], 1), dtype=probs.dtype, device=probs.device)
        rows = (top_p < 1.0).nonzero().flatten()
        for k in TOP_P_CANDIDATES + (V,):
            if rows.numel() == 0:
                break
            k = min(k, V)
            values, _ = probs[rows].topk(k, dim=-1)  # sorted, descending
            mass_before = values.cumsum(dim=-1) - values  # mass of the tokens ranked above each one
            row_p = top_p[rows]
            covered = (mass_before[:, -1] + values[:, -1] >= row_p) | (k == V)
            kept = (mass_before < row_p[:, None]).sum(dim=-1).clamp(min=1)
            thresholds[rows[covered]] = values.gather(1, (kept - 1)[:, None])[covered]
            rows = rows[~covered]
        return probs.masked_fill(probs < thresholds, 0.0)

    def _apply_biases_and_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows_bias = [i for i, s in enumerate(seqs) if s.params.logit_bias]
        rows_pen = [i for i, s in enumerate(seqs) if s.params.needs_penalties]
        rows_held = [i for i, s in enumerate(seqs)
                     if s.params.min_tokens and s.params.holds_ends(len(s.output_token_ids))]
        if not rows_bias and not rows_pen and not rows_held:
            return logits
        logits = logits.clone()
        V = logits.shape[1]
        for i in rows_held:  # min_tokens not reached: no token that would end the output (as vLLM)
            p = seqs[i].params
            ends = [t for t in (*p.stop_token_ids, *(() if p.ignore_eos else self.eos_token_ids)) if t < V]
            if ends:
                logits[i, ends] = -math.inf
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

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool],
                argmax: torch.Tensor | None = None) -> torch.Tensor:
        B, V = logits.shape
        temps = self._tensor([s.params.temperature if not g else 1.0 for s, g in zip(seqs, greedy)], logits.dtype)
        scaled = logits / temps[:, None]
        top_ks = [s.params.top_k for s in seqs]
        if any(0 < k < V for k in top_ks):
            k_max = max(k if 0 < k < V else V for k in top_ks)
            kth = scaled.topk(min(k_max, V), dim=-1).values  # [B, k_max], sorted
            index = self._tensor([(k if 0 < k < V else min(k_max, V)) - 1 for k in top_ks], torch.long)
            threshold = kth.gather(1, index[:, None])
            no_k = self._tensor([not (0 < k < V) for k in top_ks], torch.bool)
            threshold = torch.where(no_k[:, None], torch.full_like(threshold, -float("inf")), threshold)
            scaled = scaled.masked_fill(scaled < threshold, -float("inf"))
        probs = torch.softmax(scaled, dim=-1)
        top_ps = [s.params.top_p for s in seqs]
        if any(p < 1.0 for p in top_ps):
            probs = self._top_p(probs, self._tensor(top_ps, probs.dtype))
        min_ps = [s.params.min_p for s in seqs]
        if any(p > 0.0 for p in min_ps):
            min_p = self._tensor(min_ps, probs.dtype)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)

        # Inverse-CDF sampling: one uniform draw per row (from the row's own generator when the
        # request is seeded), not a random number per vocabulary entry: drawing 16 x 49k
        # exponentials cost 25 ms a step on this CPU, this costs well under one.
        uniforms = torch.empty(B, dtype=torch.float64)
        unseeded = [i for i, s in enumerate(seqs) if s.seed is None and not greedy[i]]
        if unseeded:
            uniforms[unseeded] = torch.rand(len(unseeded), dtype=torch.float64, generator=self._cpu_generator)
        for i, s in enumerate(seqs):
            if s.seed is not None and not greedy[i]:
                uniforms[i] = torch.rand(1, dtype=torch.float64, generator=self._generator_for(s, s.seed))
        if self.device.type == "cuda":
            uniforms = uniforms.pin_memory().to(self.device, non_blocking=True)
        cdf = probs.double().cumsum_(dim=-1)
        targets = (uniforms * cdf[:, -1])[:, None]
        # The first token whose cumulative mass exceeds the target: never a zero-probability one.
        sampled = torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp_(max=V - 1)
        if any(greedy):
            greedy_mask = self._tensor(greedy, torch.bool)
            sampled = torch.where(greedy_mask, argmax if argmax is not None else self._argmax(logits), sampled)
        return sampled
