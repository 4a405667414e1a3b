"""The synchronous engine: wires tokenizer, scheduler, model runner, sampler and detokenizer.

`add_request` validates and queues; each `step()` runs one batched forward pass over every
live sequence and returns the new output deltas. `EngineCore` (engine/core.py) drives `step()`
for AsyncEngine, in a thread or a process of its own; `LLM` drives it inline.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rillet.config import EngineConfig
from rillet.engine.block_manager import BlockManager
from rillet.engine.detokenizer import Detokenizer
from rillet.engine.errors import EngineDeadError
from rillet.engine.model_runner import kv_bytes_per_token
from rillet.engine.outputs import RequestOutput, TokenLogprob
from rillet.engine.overlap import InFlight
from rillet.engine.prompts import Prompt, PromptEncoder
from rillet.engine.runners import make_runner
from rillet.engine.sampler import Sampler
from rillet.engine.scheduler import ScheduledBatch, Scheduler
from rillet.engine.sequence import Sequence
from rillet.engine.tp_executor import RankSpec, TensorParallelWorkers, check_devices, rank_device, shm_group
from rillet.models.backend import prepare_model, select_backend
from rillet.models.loader import load_model
from rillet.models.resolve import ResolvedModel, resolve_model
from rillet.parallel import shm_allreduce
from rillet.parallel.shard import Shard, check_shardable
from rillet.sampling_params import SamplingParams
from rillet.structured.grammar import GrammarCompiler, grammar_compiler
from rillet.structured.matcher import Guide, MaskFiller

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN_CAP = 8192
CPU_KV_CACHE_CAP_BYTES = 2 << 30
MAX_CONSECUTIVE_STEP_FAILURES = 3


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_preemptions_total: int
    num_aborted_total: int
    num_failed_total: int
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of those, tokens whose KV came from the cache
    backend: dict[str, str] = field(default_factory=dict)  # device, dtype, weights, cpu_isa (Backend.describe)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **options: Any):
        config = config or EngineConfig(**options)
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        resolved = resolve_model(config.model)
        # GGUF blocks run whole-tensor kernels: a tensor-parallel engine loads the converted float weights.
        self.backend = select_backend(config.dtype, config.quantization, config.device,
                                      gguf=resolved.gguf is not None and config.tensor_parallel_size == 1)
        self.device, self.dtype = self.backend.device, self.backend.dtype
        self.model_path = resolved.path
        self.model_name = config.served_model_name or resolved.name

        probe_len = config.max_model_len or DEFAULT_MAX_MODEL_LEN_CAP
        # Tensor parallelism: ranks 1.. start loading their shards now, beside ours (engine/tp_executor.py).
        self.workers: TensorParallelWorkers | None = None
        shard = Shard(0, config.tensor_parallel_size)
        if shard.size > 1:
            self.workers = self._start_workers(resolved, shard, probe_len)
        try:
            self._load(resolved, shard, probe_len)
        except BaseException:
            self.close()
            raise

    def _start_workers(self, resolved: ResolvedModel, shard: Shard, probe_len: int) -> TensorParallelWorkers:
        """Check the split, spawn ranks 1.. and join their process group as rank 0."""
        from transformers import AutoConfig

        from rillet.parallel.group import init_group

        if self.backend.quantized:
            raise ValueError(f"tensor_parallel_size > 1 runs float weights, not --quantization {self.config.quantization}; "
                             "use --quantization none or auto")
        check_devices(self.device, shard.size)
        model_config = AutoConfig.from_pretrained(resolved.path, local_files_only=True)
        check_shardable(model_config, shard.size)
        threads = self.config.num_threads or max(1, (os.cpu_count() or 1) // shard.size)
        shm_capacity = 0
        if self.device.type == "cpu":  # the ranks share this machine's cores, and its memory
            self.config = dataclasses.replace(self.config, num_threads=threads)
            torch.set_num_threads(threads)
            if shm_allreduce.supported():  # a step's activations [tokens, hidden] or logits slices, float32
                shm_capacity = 4 * max(self.config.max_num_batched_tokens * model_config.hidden_size,
                                       self.config.max_num_seqs * shard.vocab_size(model_config.vocab_size))
        spec = RankSpec(str(resolved.path), self.backend, probe_len, shard, "", threads, self.config.block_size,
                        self.config.max_num_seqs, self.config.enforce_eager, shm_capacity)
        workers = TensorParallelWorkers(spec)
        try:
            workers.wait_joining()
            init_group(shard, rank_device(self.device, 0), workers.init_file)
        except BaseException:
            workers.close()
            raise
        return workers

    def _load(self, resolved: ResolvedModel, shard: Shard, probe_len: int) -> None:
        config = self.config
        loaded = load_model(resolved.path, self.dtype, self.device, max_positions=probe_len, shard=shard)
        model_max = loaded.max_position_embeddings
        self.max_model_len = config.max_model_len or min(model_max, DEFAULT_MAX_MODEL_LEN_CAP)
        if self.max_model_len > model_max:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's {model_max} positions")
        if self.max_model_len > probe_len:  # rope tables must cover every position
            loaded.model.set_rope_positions(self.max_model_len)
        self.model = loaded.model
        if self.workers is not None:
            from rillet.parallel.group import TensorParallelGroup

            shm = shm_group(self.workers.spec)
            if shm is not None:  # a worker's death ends rank 0's wait for it
                workers = self.workers
                shm.abort_reason = lambda: workers.dead_reason
            self.model.use_tensor_parallel(TensorParallelGroup(shard, loaded.config.vocab_size, shm))
        kernel_path = prepare_model(self.model, self.backend, gguf=resolved.gguf, batch_hint=config.max_num_seqs)
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = set(loaded.eos_token_ids)
        self.vocab_size = loaded.config.vocab_size

        num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        if self.workers is not None:
            self.workers.send("runner", num_blocks, self.max_model_len)
        self.runner, argmax = make_runner(self.model, kernel_path, num_blocks, block_size=config.block_size,
                                          max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
                                          max_num_batched_tokens=config.max_num_batched_tokens,
                                          enforce_eager=config.enforce_eager,
                                          tensor_parallel=self.workers is not None)
        if self.workers is not None:
            self.workers.wait_ready()
            assert self.model.tp is not None
            self.model.tp.mirror = self.workers.send  # from now on every forward pass runs on every rank
        self.sampler = Sampler(self.vocab_size, self.device, seed=config.seed, argmax=argmax,
                               eos_token_ids=self.eos_token_ids)
        delay = config.scheduler_delay_factor
        self._delay_factor = delay if delay is not None else (1.0 if self.runner.replays_decodes else 0.0)
        self.detokenizer = Detokenizer(self.tokenizer)
        # False: outputs carry token ids and no text, and stop strings are not looked for here;
        # the front end does both (EngineCore under AsyncEngine, as vLLM's engine core: at
        # hundreds of rows a step that work would pace a GPU's steps), and ends a choice whose
        # text hit a stop string with abort(..., index=, stop=).
        self.detokenize = True
        self.prompts = PromptEncoder(self.tokenizer, self.vocab_size, self.max_model_len)
        self.requests: dict[str, list[Sequence]] = {}
        self._masks: MaskFiller | None = None  # built with the first constrained request's grammar
        self._in_flight: InFlight | None = None  # a decode step queued, its tokens not read back yet
        self.num_aborted_total = 0
        self.num_failed_total = 0
        self._consecutive_failures = 0
        # Test hook: called with the scheduled batch before each forward pass; may raise.
        self.before_forward: Callable[[ScheduledBatch], None] | None = None
        backend = self.describe_backend()
        logger.info("engine ready: model %s on %s (activations %s, weights %s, CPU kernels %s, tensor parallel %s), "
                    "max_model_len %d, %d KV blocks of %d tokens", self.model_name, backend["device"], backend["dtype"],
                    backend["weights"], backend["cpu_isa"], backend["tensor_parallel_size"], self.max_model_len,
                    num_blocks, config.block_size)

    def describe_backend(self) -> dict[str, str]:
        """The backend's facts (device, dtype, weights, cpu_isa) and the tensor-parallel size."""
        return {**self.backend.describe(), "tensor_parallel_size": str(self.model.shard.size)}

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any, and leave their process group."""
        workers, self.workers = self.workers, None
        if workers is not None:
            from rillet.parallel.group import leave_group

            workers.close()
            leave_group()

    def _num_kv_blocks(self) -> int:
        c = self.config
        per_token = kv_bytes_per_token(self.model, self.dtype)
        if c.kv_cache_gib:
            budget = int(c.kv_cache_gib * (1 << 30))
        else:
            budget = c.max_num_seqs * self.max_model_len * per_token
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = min(budget, int(free * 0.8))
            else:
                budget = min(budget, CPU_KV_CACHE_CAP_BYTES)
        num_blocks = budget // (per_token * c.block_size)
        min_blocks = -(-self.max_model_len // c.block_size)
        if num_blocks < min_blocks:
            if c.kv_cache_gib:
                raise ValueError(f"kv_cache_gib {c.kv_cache_gib} holds fewer than max_model_len "
                                 f"({self.max_model_len}) tokens; raise it or lower max_model_len")
            num_blocks = min_blocks
        return int(num_blocks)

    # ---- requests -------------------------------------------------------------------------

    @property
    def grammars(self) -> GrammarCompiler:
        """Structured-output grammars for this tokenizer (built on first use: ~0.4 s; shared with
        an AsyncEngine front end in the same process, so its admission check warms this cache)."""
        return grammar_compiler(self.tokenizer, sorted(self.eos_token_ids))

    def _mask_filler(self) -> MaskFiller:
        if self._masks is None:
            self._masks = MaskFiller(self.grammars.vocab_size)  # masks as wide as the tokenizer's vocabulary
        return self._masks

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return self.prompts.encode_prompt(prompt)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.prompts.encode_chat(messages)

    def add_request(self, request_id: str | None, prompt: Prompt | None, params: SamplingParams,
                    prompt_token_ids: list[int] | None = None) -> list[Sequence]:
        params.validate()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is not None:
            ids = prompt_token_ids
        elif prompt is not None:
            ids = self.encode_prompt(prompt)
        else:
            raise ValueError("add_request needs a prompt or prompt_token_ids")
        self.prompts.check_token_ids(params)
        self.check_prompt_length(len(ids))  # max_tokens past the context stops there (the server refuses it)
        compiled = self.grammars.compile(params.structured) if params.structured is not None else None
        seqs = []
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            seq = Sequence(request_id, index, ids, params, seed=seed)
            if compiled is not None:
                seq.guide = Guide(compiled)  # one matcher per choice
            if self.detokenize:
                self.detokenizer.start(seq)
            seqs.append(seq)
        self.requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        return seqs

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Log-probabilities [len - 1] of each token after the first given the ones before it, in one
        prompt pass (perplexity; see rillet.bench.quality). Only while no request is running."""
        if self.has_unfinished():
            raise RuntimeError("score() needs an idle engine")
        if not 2 <= len(token_ids) <= self.max_model_len:
            raise ValueError(f"score() takes 2 to {self.max_model_len} tokens, got {len(token_ids)}")
        seq = Sequence("score", 0, list(token_ids), SamplingParams(max_tokens=1))
        if not self.block_manager.can_grow(seq, len(token_ids)):
            raise ValueError("score(): the KV cache has no room for these tokens")
        self.block_manager.grow(seq, len(token_ids))  # fresh blocks, never registered in the prefix cache
        try:
            return self.runner.score(token_ids, seq.block_table)
        finally:
            self.block_manager.free(seq)

    def check_prompt_length(self, num_tokens: int) -> None:
        self.prompts.check_prompt_length(num_tokens)

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None, *, index: int | None = None,
              stop: str | None = None) -> list[RequestOutput]:
        """End a request's unfinished choices (only choice `index` if given) with `reason`.
        `stop`: the stop string a front end found in that choice's text; the choice ends as
        "stop" with it, and is not counted as aborted."""
        seqs = self.requests.get(request_id)
        if not seqs:
            return []
        if stop is not None:
            reason = "stop"
        outputs = []
        for seq in seqs:
            if seq.is_finished or (index is not None and seq.index != index):
                continue
            seq.stop_reason = stop
            self.scheduler.finish(seq, reason)
            seq.error = error
            outputs.append(self._output(seq, [], "", None))
            self._forget(seq)  # the last unfinished choice takes the request with it
        if reason == "abort" and outputs:
            self.num_aborted_total += 1
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        waiting_requests = {s.request_id for s in self.scheduler.waiting}
        running_requests = {s.request_id for s in self.scheduler.running} - waiting_requests
        return EngineStats(len(running_requests), len(waiting_requests), bm.usage, bm.num_used_blocks,
                           bm.num_blocks, self.scheduler.num_preemptions_total, self.num_aborted_total,
                           self.num_failed_total, bm.num_queried_tokens_total, bm.num_cached_tokens_total,
                           self.describe_backend())

    # ---- the step -------------------------------------------------------------------------

    def expire_waiting(self, now: float | None = None) -> list[RequestOutput]:
        """End requests that waited longer than queue_timeout_s without ever being scheduled."""
        now = time.monotonic() if now is None else now
        limit = self.config.queue_timeout_s
        expired = {s.request_id for s in self.scheduler.waiting
                   if s.first_scheduled_time is None and now - s.arrival_time > limit}
        outputs = []
        for request_id in expired:
            msg = f"request waited more than {limit:g} s for a free slot; the server is overloaded, retry later"
            outputs += self.abort(request_id, reason="error", error=msg)
            self.num_failed_total += 1
        return outputs

    def step(self) -> list[RequestOutput]:
        if self._in_flight is not None:
            return self._step_overlapped(self._in_flight)
        outputs = self.expire_waiting() if self.scheduler.waiting else []
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return outputs
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        # Constrained sequences that sample this step (all their tokens fed): their masks depend
        # only on tokens sampled before, so they are filled while the forward pass runs. On the
        # host, greedy ones need none: the sampler checks their top tokens against the grammar.
        guided = [i for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                  if seq.guide is not None and seq.num_computed_tokens + n == seq.num_tokens
                  and not self.sampler.picks_by_grammar(seq)]
        masks = self._mask_filler().start([batch.seqs[i].guide for i in guided]) if guided else None
        try:
            try:
                if self.before_forward is not None:
                    self.before_forward(batch)
                logits, sampling = self.runner.execute(batch, self.block_manager)
            finally:
                bitmask = masks.result() if masks is not None else None  # joined before anything else
            if self._defers(batch):  # read back in the next step, behind the step it queues
                greedy = self.runner.greedy_ids(len(batch.seqs))
                self._in_flight = InFlight.start(batch, self.sampler.sample_ids(logits, batch.seqs, greedy))
                return outputs
            sampling_seqs = [batch.seqs[i] for i in sampling]
            allowed = None
            if bitmask is not None:
                row_of = {b: row for row, b in enumerate(sampling)}
                allowed = ([row_of[i] for i in guided], bitmask)
            result = self.sampler(logits, sampling_seqs, allowed) if sampling_seqs else None
        except Exception as exc:
            return outputs + self._fail_batch(batch, exc)
        if self._delay_factor and not self.runner.replays(batch):  # an eager step (prompts in it): its time
            self.scheduler.admission_window_s = self._delay_factor * (time.monotonic() - now)
        self._consecutive_failures = 0
        self._commit(batch)
        if result is None:
            return outputs
        return outputs + self._process(sampling_seqs, result.token_ids, result.logprobs)

    # ---- overlapped decode steps (engine/overlap.py) ---------------------------------------

    def _defers(self, batch: ScheduledBatch) -> bool:
        # Not under tensor parallelism: the next step's ids would have to reach every rank's GPU.
        return self.before_forward is None and self.workers is None and self.runner.replays(batch) \
            and all(Sampler.defers(seq) for seq in batch.seqs)

    def _growing(self, flight: InFlight) -> list[Sequence] | None:
        """None unless the step after `flight` can be queued before its tokens are read back: the
        same sequences, all still running, nobody else running nor to be admitted now
        (Scheduler.admits), room for one more token each. Else the sequences that need a new
        block for it (most steps none: a block holds block_size tokens)."""
        seqs = flight.batch.seqs
        max_len = self.max_model_len
        if self.scheduler.admits() or len(self.scheduler.running) != len(seqs) \
                or any(seq.is_finished or seq.num_computed_tokens + 2 > max_len for seq in seqs):
            return None
        bm = self.block_manager
        growing, needed = [], 0
        for seq in seqs:
            blocks = bm.blocks_needed(seq, seq.num_computed_tokens + 2)
            if blocks:
                growing.append(seq)
                needed += blocks
        return growing if needed <= bm.num_free_blocks else None

    def _step_overlapped(self, flight: InFlight) -> list[RequestOutput]:
        """Queue the next decode step if it can go, then read back and process `flight`'s tokens."""
        self._in_flight = None
        seqs = flight.batch.seqs
        try:
            growing = self._growing(flight)
            if growing is not None:
                for seq in growing:
                    self.block_manager.grow(seq, seq.num_computed_tokens + 2)
                logits = self.runner.execute_ahead(seqs, self.block_manager, flight.ids)
                ids = self.sampler.sample_ids(logits, seqs, self.runner.greedy_ids(len(seqs)))
                self._in_flight = InFlight.start(ScheduledBatch(list(seqs), [1] * len(seqs)), ids)
            token_ids = flight.token_ids()
        except Exception as exc:
            queued, self._in_flight = self._in_flight, None
            outputs = self._fail_batch(flight.batch, exc)
            return outputs + (self._fail_batch(queued.batch, exc) if queued is not None else [])
        self._consecutive_failures = 0
        live = [row for row, seq in enumerate(seqs) if not seq.is_finished]  # aborted meanwhile: dropped
        live_seqs = [seqs[row] for row in live]
        self._commit(ScheduledBatch(live_seqs, [1] * len(live)))
        return self._process(live_seqs, [token_ids[row] for row in live], None)

    # ---- after the forward pass -------------------------------------------------------------

    def _commit(self, batch: ScheduledBatch) -> None:
        """The batch's tokens are in the KV cache now."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)

    def _process(self, seqs: list[Sequence], token_ids: list[int],
                 logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None) -> list[RequestOutput]:
        """Append each sequence's sampled token; detokenize, check stops, build the outputs."""
        outputs: list[RequestOutput] = []
        grammar_errors: dict[str, str] = {}
        # Once per row of every step (hundreds of rows a step on a GPU, where this loop paces the
        # engine): bound methods and constants are looked up once, the stop checks are inline.
        append_text, take_delta, max_len = self.detokenizer.append, self.detokenizer.take_delta, self.max_model_len
        eos, detokenize = self.eos_token_ids, self.detokenize
        for row, seq in enumerate(seqs):
            token = token_ids[row]
            guide = seq.guide
            if guide is not None and not guide.accept(token):
                grammar_errors[seq.request_id] = guide.error  # ends only this request, below
                continue
            params = seq.params
            seq.output_token_ids.append(token)
            reason: str | None = None
            stop_reason: str | int | None = None
            # below min_tokens nothing but the context's end stops it (its end tokens were masked)
            held = params.min_tokens and seq.num_output_tokens < params.min_tokens
            if token in params.stop_token_ids and not held:
                reason, stop_reason = "stop", token
            elif token in eos and not params.ignore_eos and not held:
                reason = "stop"
            if reason is not None:
                if params.include_stop_str_in_output and detokenize:  # the stop token's text too
                    append_text(seq, token, False)
            else:
                stop = append_text(seq, token, not held) if detokenize else None
                if stop is not None:
                    reason, stop_reason = "stop", stop
                elif guide is not None and guide.is_stopped:  # the grammar is complete
                    reason = "stop"
                elif seq.num_output_tokens >= (params.max_tokens or max_len) or seq.num_tokens >= max_len:
                    reason = "length"
            token_logprobs = None
            if logprobs is not None and (row_logprobs := logprobs[row]) is not None:
                token_logprobs = [self._token_logprob(token, *row_logprobs)]
            delta = take_delta(seq, reason is not None) if detokenize else ""
            if reason is not None:
                seq.finish_reason, seq.stop_reason = reason, stop_reason
                self.scheduler.finish(seq, reason)
                self._forget(seq)
            outputs.append(self._output(seq, [token], delta, token_logprobs))
        for request_id, error in grammar_errors.items():
            logger.warning("request %s: structured output failed: %s", request_id, error)
            outputs += self.abort(request_id, reason="error", error=f"structured output failed: {error}")
            self.num_failed_total += 1
        return outputs

    def _fail_batch(self, batch: ScheduledBatch, exc: Exception) -> list[RequestOutput]:
        if self.workers is not None:  # the ranks' collectives are out of step: no next step
            raise self.workers.failure(exc) from exc
        self._consecutive_failures += 1
        logger.exception("engine step failed; ending the %d requests in the batch", len(batch.seqs))
        if self._consecutive_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise EngineDeadError(f"{self._consecutive_failures} engine steps failed in a row: {exc}") from exc
        outputs = []
        for request_id in {s.request_id for s in batch.seqs}:
            outputs += self.abort(request_id, reason="error",
                                  error=f"the engine failed while generating this request ({type(exc).__name__})")
            self.num_failed_total += 1
        return outputs

    def _forget(self, seq: Sequence) -> None:
        self.detokenizer.forget(seq)
        seq.guide = None  # frees the matcher
        self.sampler.forget(seq)
        seqs = self.requests.get(seq.request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self.requests[seq.request_id]

    def _token_logprob(self, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        def text(t: int) -> str:
            return self.detokenizer.decode_token(t)
        return TokenLogprob(token, text(token), logprob, [(t, text(t), lp) for t, lp in top])

    @staticmethod
    def _output(seq: Sequence, token_ids: list[int], text: str,
                logprobs: list[TokenLogprob] | None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, index=seq.index, text=text, token_ids=token_ids,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, logprobs=logprobs, error=seq.error,
            num_cached_tokens=seq.num_cached_tokens,
        )
