"""AsyncEngine: the engine loop off the event loop, requests and outputs on it.

The forward pass never runs on the event loop. One loop (engine/core.py's EngineCore: add,
abort, step) runs over one of two transports:

- a thread of this process (the default for AsyncEngine in your program; engine/core_thread.py);
- a process of its own (`engine_process=True`, the default of `rillet serve`;
  engine/core_process.py): the core has every core and its own GIL.

Either way prompts are validated and tokenized here, and each cycle's outputs are routed to
per-request asyncio queues: from the core's thread in one `call_soon_threadsafe`, from a pipe
as the loop reads it. The core sends token ids; their text is decoded here, where stop strings
are looked for too (as vLLM v1's front end does: at hundreds of rows a step on a GPU that work
paced the core). A choice whose text hits a stop string ends here at once, and the core is told
to end it too; the tokens it made meanwhile are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, Protocol

from rillet.config import EngineConfig
from rillet.engine.core import AbortRequest, AddRequest, CoreClient, CoreOutputs, CoreSetup, Stop
from rillet.engine.core_process import CoreProcess
from rillet.engine.core_thread import CoreThread
from rillet.engine.detokenizer import ChoiceText, Detokenizer
from rillet.engine.errors import EngineDeadError, EngineNotReadyError, QueueFullError
from rillet.engine.llm_engine import EngineStats
from rillet.engine.outputs import RequestOutput, merged
from rillet.engine.prompts import ChatPrompt, Prompt, PromptEncoder
from rillet.sampling_params import SamplingParams
from rillet.structured.grammar import grammar_compiler, is_compiled
from rillet.structured.spec import StructuredOutputs

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "RequestStream", "EngineStats"]


INLINE_TOKENIZE_CHARS = 2048


def _prompt_chars(prompt: Prompt) -> int:
    """Rough size of a prompt, to decide whether tokenizing it could hold up the event loop."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, ChatPrompt):
        prompt = prompt.messages
    if not isinstance(prompt, list):
        return INLINE_TOKENIZE_CHARS
    total = 0
    for item in prompt:  # stops early: a 100k-message conversation must not be walked here
        total += len(str(item.get("content", ""))) + 16 if isinstance(item, dict) else 1
        if total >= INLINE_TOKENIZE_CHARS:
            break
    return total


CoreClientFactory = Callable[[EngineConfig, Callable[[CoreOutputs], None], Callable[[str], None], CoreSetup | None],
                            CoreClient]


class _StreamOwner(Protocol):
    def abort_nowait(self, request_id: str) -> None: ...

    def min_event_gap(self) -> float: ...


class RequestStream:
    """Async iterator over one request's output deltas; ends once every choice has finished.

    Deltas of a choice that arrive while the consumer is busy come out as one (outputs.merged):
    a consumer that keeps up sees one delta per engine step, one that lags is not left working
    through a backlog a token at a time. Under load a delta is also held until the engine's
    `min_event_gap` has passed since this stream's last one (running sequences /
    EngineConfig.max_stream_events_per_s),
    gathering the tokens made meanwhile; a choice's first and last deltas are never held."""

    def __init__(self, engine: _StreamOwner, request_id: str, num_prompt_tokens: int, n: int,
                 texts: list[ChoiceText] | None = None):
        self._engine = engine
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.texts = texts or []  # each choice's text, decoded by AsyncEngine from the core's token ids
        self._pending: deque[RequestOutput | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._unfinished = n  # choices the consumer has not seen finish
        self._undelivered = n  # choices whose final output has not been routed here yet
        self._last_at: dict[int, float] = {}  # loop time of each choice's last delta
        self._holding = False  # a delta waits out the gap: only its timer, a last delta or an error wake us

    @property
    def finished(self) -> bool:
        return self._unfinished == 0

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._pending.append(item)
        # a held stream sleeps through new deltas (at hundreds of streams, waking each one every
        # step would cost the event loop as much as sending them)
        if not self._holding or isinstance(item, BaseException) or item.finish_reason is not None:
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float | None = None) -> None:
        """Until the next _put (or `timeout` seconds)."""
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self._wake)
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._unfinished == 0:
            raise StopAsyncIteration
        pending = self._pending
        loop = asyncio.get_running_loop()
        while True:
            while not pending:
                await self._wait()
            item = pending.popleft()
            if isinstance(item, BaseException):
                self._unfinished = 0
                raise item
            while item.finish_reason is None and pending:
                following = pending[0]
                if isinstance(following, BaseException) or following.index != item.index:
                    break
                pending.popleft()
                item = merged(item, following)
            last = self._last_at.get(item.index)
            hold = 0.0 if last is None or item.finish_reason is not None else \
                last + self._engine.min_event_gap() - loop.time()
            if hold <= 0:
                break
            pending.appendleft(item)  # too soon after this choice's last delta: gather more
            self._holding = True
            try:
                await self._wait(hold)
            finally:
                self._holding = False
        self._last_at[item.index] = loop.time()
        if item.finish_reason is not None:
            self._unfinished -= 1
        return item

    async def abort(self) -> None:
        if not self.finished:
            self._engine.abort_nowait(self.request_id)

    async def aclose(self) -> None:
        await self.abort()


class AsyncEngine:
    """`core_setup`, if given, runs on the LLMEngine once it is built, in whichever thread or
    process runs it (test hooks); with `engine_process` it must be a picklable module-level
    function. `transport` builds the CoreClient (default: CoreProcess with `engine_process`, else
    CoreThread); rillet.engine.core_shared.AttachedCore joins a core another process started."""

    def __init__(self, config: EngineConfig | None = None, *, core_setup: CoreSetup | None = None,
                 transport: CoreClientFactory | None = None, **options: Any) -> None:
        config = config or EngineConfig(**options)
        if config.num_threads is None and not config.engine_process:
            # Leave a core to the event loop: when it runs beside a forward pass that uses every
            # core, each OpenMP region waits for a descheduled worker and the engine thread for
            # the GIL (measured on 2 cores, 16 streams over HTTP: 371 tok/s with 2 threads, 464
            # with 1). A core process has its own GIL and takes every core.
            config = replace(config, num_threads=max(1, (os.cpu_count() or 1) - 1))
        self.config = config
        self._core_setup = core_setup
        self._transport = transport or (CoreProcess if config.engine_process else CoreThread)
        self._core: CoreClient | None = None
        self._prompts: PromptEncoder | None = None
        self._detokenizer: Detokenizer | None = None
        self._model_name = ""
        self._eos_token_ids: list[int] = []
        self._eos: frozenset[int] = frozenset()
        self._lock = threading.Lock()  # guards the three below, written by the core's thread
        self._stats: EngineStats | None = None
        self._num_sent = 0  # adds sent to the core ...
        self._num_acknowledged = 0  # ... and adds the core has taken into its scheduler
        self._health = "stopped"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}
        self.dead_reason: str | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def health(self) -> str:
        """"loading", "ready", "dead" or "stopped"."""
        return self._health

    @property
    def prompts(self) -> PromptEncoder:
        if self._prompts is None:
            raise EngineNotReadyError("the engine is not started")
        return self._prompts

    @property
    def model_name(self) -> str:
        self.prompts  # noqa: B018 (raises before start)
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return self.prompts.max_model_len

    @property
    def tokenizer(self) -> Any:
        return self.prompts.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.prompts.vocab_size

    async def start(self) -> None:
        if self._health in ("loading", "ready"):
            return
        self._health = "loading"
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = False
        with self._lock:
            self._num_sent = self._num_acknowledged = 0
        core = self._transport(self.config, self._on_outputs, self._die, self._core_setup)
        try:
            info = await asyncio.to_thread(core.start)
        except BaseException as exc:
            self._health = "dead"
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            raise
        self._core = core
        self._prompts = PromptEncoder(info.tokenizer, info.vocab_size, info.max_model_len)
        self._detokenizer = Detokenizer(info.tokenizer)
        self._model_name, self._eos_token_ids = info.model_name, list(info.eos_token_ids)
        self._eos = frozenset(info.eos_token_ids)
        with self._lock:
            self._stats = info.stats
        self._health = "ready"

    async def shutdown(self) -> None:
        """Stop the loop; unfinished requests end with finish_reason "abort"."""
        core, self._core = self._core, None
        if core is not None:
            self._stopping = True
            core.send(Stop())
            await asyncio.to_thread(core.join, 60)
        if self._health != "dead":
            self._health = "stopped"

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # ---- requests -------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        with self._lock:
            stats = self._stats or EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0)
            in_transit = self._num_sent - self._num_acknowledged
        return replace(stats, num_waiting=stats.num_waiting + in_transit)

    def num_queued(self) -> int:
        """Requests that would have to wait for a slot (waiting beyond the free slots)."""
        stats = self.stats()
        free_slots = max(0, self.config.max_num_seqs - stats.num_running)
        return max(0, stats.num_waiting - free_slots)

    def _check_accepting(self) -> CoreClient:
        if self._health == "dead":
            raise EngineDeadError(f"the engine has died ({self.dead_reason})")
        if self._health != "ready" or self._stopping or self._core is None:
            raise EngineNotReadyError("the engine is " + ("shutting down" if self._stopping else self._health))
        return self._core

    def _check_queue(self) -> None:
        max_waiting = self.config.max_waiting
        if max_waiting is not None and self.num_queued() >= max_waiting:
            raise QueueFullError(f"{max_waiting} requests are already waiting for a slot; retry later")

    async def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                          *, tools: list[dict[str, Any]] | None = None) -> RequestStream:
        """Validate and queue a request (`tools`: function definitions for the chat template).
        Raises ValueError (bad prompt or parameters, token ids
        outside the vocabulary, a structured-output spec that does not compile), PromptTooLongError
        (the prompt, or the prompt plus max_tokens, does not fit in max_model_len), QueueFullError,
        EngineDeadError or EngineNotReadyError."""
        self._check_accepting()
        params.validate()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_queue()
        prompts = self.prompts
        prompts.check_token_ids(params)
        if params.structured is not None:
            await self._check_structured(params.structured)
        if not tools and _prompt_chars(prompt) < INLINE_TOKENIZE_CHARS:  # ~0.1 ms: cheaper than a thread hop
            token_ids = prompts.encode_prompt(prompt, tools)
        else:  # long prompts: keep the event loop free
            token_ids = await asyncio.to_thread(prompts.encode_prompt, prompt, tools)
        chat = isinstance(prompt, ChatPrompt) or (isinstance(prompt, list) and bool(prompt)
                                                  and isinstance(prompt[0], dict))
        prompts.check_prompt_length(len(token_ids), params.max_tokens, what="messages" if chat else "prompt")
        core = self._check_accepting()
        self._check_queue()  # again: other requests may have been queued while this one was tokenized
        texts = [ChoiceText(params, token_ids) for _ in range(params.n)]
        detokenizer = self._detokenizer
        assert detokenizer is not None
        for text in texts:
            detokenizer.start(text)
        stream = RequestStream(self, request_id, len(token_ids), params.n, texts)
        self._streams[request_id] = stream
        with self._lock:
            self._num_sent += 1
        core.send(AddRequest(request_id, token_ids, params))
        return stream

    async def _check_structured(self, spec: StructuredOutputs) -> None:
        """ValueError if the spec does not compile for this tokenizer. Compiling (and building the
        tokenizer's grammar tables, the first time) runs off the event loop; a spec compiled
        before is a cache lookup."""
        tokenizer = self.prompts.tokenizer
        if not is_compiled(tokenizer, self._eos_token_ids, spec):
            await asyncio.to_thread(lambda: grammar_compiler(tokenizer, self._eos_token_ids).compile(spec))

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                       *, tools: list[dict[str, Any]] | None = None) -> AsyncIterator[RequestOutput]:
        """Yield output deltas; closing or cancelling the iterator aborts the request."""
        stream = await self.add_request(prompt, params, request_id, tools=tools)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort_nowait(stream.request_id)

    async def abort(self, request_id: str) -> None:
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        if self._core is not None:
            self._core.send(AbortRequest(request_id))

    def min_event_gap(self) -> float:
        """Seconds a stream's deltas keep apart now: running sequences / max_stream_events_per_s
        (those waiting for a slot send nothing, so they take no share of the budget)."""
        budget = self.config.max_stream_events_per_s
        if budget <= 0:
            return 0.0
        stats = self._stats  # the core's, as of its last step
        return (stats.num_running if stats is not None else len(self._streams)) / budget

    # ---- from the core's thread (a pipe's: on the loop) ------------------------------------

    def _on_outputs(self, message: CoreOutputs) -> None:
        with self._lock:
            self._stats, self._num_acknowledged = message.stats, message.num_added
        if not message.outputs or self._loop is None or self._loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:  # a pipe's outputs are read on the loop
            self._dispatch(message.outputs)
        else:
            self._loop.call_soon_threadsafe(self._dispatch, message.outputs)

    def _die(self, reason: str) -> None:
        """The loop cannot go on: every stream gets a terminal error."""
        self.dead_reason = reason
        self._health = "dead"
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_streams, EngineDeadError(reason))

    # ---- on the event loop ----------------------------------------------------------------

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            last = out.finish_reason is not None  # the core's last output of this choice
            if self._decode(stream, out):
                stream._put(out)
            if last:
                stream._undelivered -= 1
                if stream._undelivered == 0:
                    del self._streams[out.request_id]

    def _decode(self, stream: RequestStream, out: RequestOutput) -> bool:
        """Fill `out.text` from its token ids, as LLMEngine does with `detokenize` on: a stop
        token's or EOS's text is not output, a stop string ends the choice here (the core is told
        to end it too). False: the choice already ended here, `out` is to be dropped."""
        text, detokenizer = stream.texts[out.index], self._detokenizer
        assert detokenizer is not None
        if text.stopped:
            return False
        params, eos = text.params, self._eos
        stop = None
        for i, token in enumerate(out.token_ids):
            text.num_tokens += 1
            held = text.num_tokens < params.min_tokens  # the core did not stop it on this token
            if not held and (token in params.stop_token_ids or (token in eos and not params.ignore_eos)):
                # the core ends the choice on it; its text is output only if asked for
                if params.include_stop_str_in_output:
                    detokenizer.append(text, token, False)
                continue
            stop = detokenizer.append(text, token, not held)
            if stop is not None:
                if i + 1 < len(out.token_ids):  # tokens past the stop string's (several gathered)
                    out.num_output_tokens -= len(out.token_ids) - i - 1
                    del out.token_ids[i + 1:]
                    if out.logprobs is not None:
                        del out.logprobs[i + 1:]
                break
        if stop is not None:
            if out.finish_reason is None:
                text.stopped = True
                core = self._core
                if core is not None:
                    core.send(AbortRequest(out.request_id, index=out.index, stop=stop))
            out.finish_reason, out.stop_reason = "stop", stop
        finished = out.finish_reason is not None
        out.text = detokenizer.take_delta(text, finished)
        if finished:
            detokenizer.forget(text)
        return True

    def _fail_streams(self, exc: BaseException) -> None:
        for stream in self._streams.values():
            stream._put(exc)
        self._streams.clear()
