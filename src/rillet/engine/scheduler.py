"""Continuous-batching scheduler: picks, each step, which sequences run and how many tokens each
feeds (no torch).

Every sequence is just "tokens not yet in the KV cache": a decode has one (the last sampled
token), a prefill has its prompt. Each step spends a token budget: decodes first, so running
streams keep flowing, then prefill chunks of running sequences, then new admissions. When the KV
cache runs out, the newest running sequence is preempted: its blocks are freed and it goes back
to the front of the waiting queue to be recomputed later.

Where decode steps replay CUDA graphs, a step that takes in a prompt runs eagerly and costs
several decode steps. Arrivals spread over time (streams ending and their clients sending the
next request) would make nearly every step such a step, so new prompts wait while others decode,
until the oldest has waited `admission_window_s` (set by the engine from the last prompt step's
duration, as vLLM's --scheduler-delay-factor), or enough wait to fill the batch; a step that takes
in prompts then takes them together.

A prompt whose rest would overflow the budget by at most an eighth is fed whole rather than
split: its first token comes a step sooner, and the step grows by a few percent (a burst of short
prompts otherwise leaves one of them a sliver for the next step, after every decode of the
others).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rillet.engine.block_manager import BlockManager
from rillet.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0
        self.admission_window_s = 0.0  # see the module doc; 0: admit at once

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the queues for good and give its blocks back."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions_total += 1

    def admits(self, now: float | None = None) -> bool:
        """Whether a step now would take in waiting prompts (see the module doc): always when
        nothing decodes, when the oldest has waited the window, or when enough wait to fill the
        batch."""
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return False
        if self.admission_window_s <= 0 or not self.running or \
                len(self.waiting) >= self.max_num_seqs - len(self.running):
            return True
        now = time.monotonic() if now is None else now
        return now - self.waiting[0].arrival_time >= self.admission_window_s

    def _chunk(self, remaining: int, budget: int, overrun: int) -> int:
        """Tokens of a prefill to feed this step: all of them if they fit in budget + overrun."""
        return remaining if remaining <= budget + overrun else min(remaining, budget)

    def schedule(self, now: float | None = None) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        overrun = self.max_num_batched_tokens // 8  # spent at most once a step, see the module doc
        # Decodes first, then chunked prefills; within each, oldest first.
        candidates = [s for s in self.running if s.num_uncomputed_tokens == 1]
        candidates += [s for s in self.running if s.num_uncomputed_tokens != 1]
        kept: list[Sequence] = []
        while candidates:
            seq = candidates.pop(0)
            n = self._chunk(seq.num_uncomputed_tokens, budget, overrun) if budget > 0 else 0
            if n <= 0:
                kept.append(seq)
                continue
            while not self.block_manager.can_grow(seq, seq.num_computed_tokens + n):
                victim = candidates.pop() if candidates else seq
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.WAITING:  # preempted itself: nothing else can run
                break
            self.block_manager.grow(seq, seq.num_computed_tokens + n)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            kept.append(seq)
            overrun -= max(0, n - budget)
            budget -= n
        # Keep arrival order in `running` so the newest is the first to be preempted.
        order = {id(s): i for i, s in enumerate(self.running)}
        self.running = sorted(kept, key=lambda s: order[id(s)])

        if batch.preempted or not self.admits(now):
            return batch
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            hits = self.block_manager.cached_prefix(seq)  # KV of a prefix computed before
            computed = len(hits) * self.block_manager.block_size
            n = self._chunk(seq.num_tokens - computed, budget, overrun)
            if not self.block_manager.can_attach_and_grow(hits, computed + n):
                break  # head of line waits for memory; later arrivals must not overtake it
            self.waiting.popleft()
            self.block_manager.attach(seq, hits)
            self.block_manager.grow(seq, seq.num_computed_tokens + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            overrun -= max(0, n - budget)
            budget -= n
        return batch
