"""A fake engine with the real one's interface (`EngineClient`, checked by mypy below):
deterministic text, configurable delays and failures, no model. For fast server tests (the real
engine is tested against a real process too)."""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

from rillet.config import EngineConfig
from rillet.engine.engine_client import EngineClient
from rillet.engine.async_engine import RequestStream
from rillet.engine.errors import EngineDeadError, EngineNotReadyError, QueueFullError
from rillet.engine.outputs import RequestOutput, TokenLogprob
from rillet.engine.prompts import ChatPrompt, PromptEncoder
from rillet.sampling_params import SamplingParams

__all__ = ["FakeEngine", "FakeStats", "FakeTokenizer", "split_tokens"]


@dataclass
class FakeStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    num_aborted_total: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    backend: dict[str, str] = field(default_factory=dict)  # how the model runs, as EngineStats says (metrics skip {})


FAKE_VOCAB_SIZE = 1000  # FakeTokenizer's ids are hashes mod 1000


class FakeTokenizer:
    chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [hash(t) % 1000 for t in split_tokens(text)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(f"t{i}" for i in ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"t{i}" for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: Any = None, tokenize: bool = False,
                            add_generation_prompt: bool = True, continue_final_message: bool = False,
                            **variables: Any) -> str:
        text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)
        if continue_final_message:
            return text[:-1]
        return text + ("assistant: " if add_generation_prompt else "")


def split_tokens(text: str) -> list[str]:
    """Words with their trailing spaces; CJK characters one by one."""
    return re.findall(r"[\u3000-\u9fff\uff00-\uffef]|[^\s\u3000-\u9fff\uff00-\uffef]+\s*|\s+", text)


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], dict):
        return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in prompt)
    return " ".join(str(t) for t in prompt)


class FakeStream(RequestStream):
    """The real engine's request stream, fed by FakeEngine's producer task."""

    def __init__(self, engine: FakeEngine, request_id: str, num_prompt_tokens: int, n: int) -> None:
        super().__init__(engine, request_id, num_prompt_tokens, n)
        self.finished_choices: set[int] = set()
        self.task: asyncio.Task[None] | None = None

    def push(self, item: RequestOutput | BaseException) -> None:
        self._put(item)


@dataclass(kw_only=True)
class FakeBehaviour:
    """How a FakeEngine answers: `reply` (a string, or a callable of the prompt text) token by token.

    token_delay_s: pause before each token. fail_after: after that many tokens the request ends with
    finish_reason "error". raise_after: after that many tokens the stream raises EngineDeadError.
    max_waiting / queue_timeout_s: admission like the real engine (with FakeEngine's max_num_seqs).
    """

    reply: Any = "Hello from the fake engine, one token at a time."
    token_delay_s: float = 0.0
    start_delay_s: float = 0.0
    start_error: BaseException | None = None
    fail_after: int | None = None
    raise_after: int | None = None
    max_waiting: int | None = 256
    queue_timeout_s: float = 120.0


class FakeEngine:
    """The engine's interface (EngineClient) over canned replies; `FakeBehaviour`'s fields are its
    keyword options. gate: if set, an asyncio.Event every token waits on."""

    def __init__(self, *, model_name: str = "fake-model", max_model_len: int = 512, max_num_seqs: int = 64,
                 **behaviour: Any) -> None:
        self._model_name = model_name
        self._max_model_len = max_model_len
        self.behaviour = FakeBehaviour(**behaviour)
        self.gate: asyncio.Event | None = None
        self._health = "stopped"
        self._slots: asyncio.Semaphore | None = None
        self._max_num_seqs = max_num_seqs
        self.streams: dict[str, FakeStream] = {}
        self.params: dict[str, SamplingParams] = {}
        self.prompts: dict[str, Any] = {}
        self.tools: dict[str, list[dict[str, Any]] | None] = {}  # the tools each request passed to add_request
        self.running = 0
        self.waiting = 0
        self.aborted_total = 0
        self.tokenizer = FakeTokenizer()
        self.vocab_size = FAKE_VOCAB_SIZE
        self.dead_reason: str | None = None
        self.config = EngineConfig(served_model_name=model_name, max_model_len=max_model_len)

    # ---- lifecycle
    @property
    def health(self) -> str:
        return self._health

    @property
    def model_name(self) -> str:
        if self._health == "stopped":
            raise EngineNotReadyError("the engine is not started")
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def start(self) -> None:
        self._health = "loading"
        if self.behaviour.start_delay_s:
            await asyncio.sleep(self.behaviour.start_delay_s)
        if self.behaviour.start_error is not None:
            self._health = "dead"
            raise self.behaviour.start_error
        self._slots = asyncio.Semaphore(self._max_num_seqs)
        self._health = "ready"

    async def shutdown(self) -> None:
        for request_id in list(self.streams):
            await self.abort(request_id)
        if self._health != "dead":
            self._health = "stopped"

    def stats(self) -> FakeStats:
        return FakeStats(num_running=self.running, num_waiting=self.waiting,
                         kv_cache_usage=min(1.0, self.running / 64), num_aborted_total=self.aborted_total)

    def kill(self, reason: str = "simulated crash") -> None:
        """The engine loop dies: every live stream raises EngineDeadError."""
        self._health = "dead"
        self.dead_reason = reason
        for stream in list(self.streams.values()):
            if stream.task:
                stream.task.cancel()
            stream.push(EngineDeadError(reason))
        self.streams.clear()

    # ---- requests
    def num_tokens(self, prompt: Any) -> int:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return len(prompt)
        return len(split_tokens(prompt_text(prompt))) + (3 * len(prompt) if isinstance(prompt, list) else 0)

    async def add_request(self, prompt: Any, params: SamplingParams, request_id: str | None = None,
                          *, tools: list[dict[str, Any]] | None = None) -> FakeStream:
        if self._health == "dead":
            raise EngineDeadError("the engine has died")
        if self._health != "ready":
            raise EngineNotReadyError(f"the engine is {self._health}")
        params.validate()
        submitted = prompt  # recorded as given; a ChatPrompt's messages are what the fake reads
        if isinstance(prompt, ChatPrompt):
            prompt = prompt.messages
        if not prompt:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            for m in prompt:
                if m.get("role") not in ("system", "user", "assistant", "tool"):
                    raise ValueError(f"bad message {m!r}")
                if not isinstance(m.get("content"), str) and not (m.get("tool_calls") and m.get("content") is None):
                    raise ValueError(f"bad message {m!r}")
        elif tools:
            raise ValueError("tools need a chat (messages) prompt")
        # the real engine's checks (engine/prompts.py): token ids in the vocabulary, prompt + max_tokens
        # within max_model_len
        checks = PromptEncoder(cast(Any, self.tokenizer), self.vocab_size, self._max_model_len)
        checks.check_token_ids(params)
        num_prompt = self.num_tokens(prompt)
        chat = isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)
        checks.check_prompt_length(num_prompt, params.max_tokens, what="messages" if chat else "prompt")
        if self.behaviour.max_waiting is not None and self.waiting >= self.behaviour.max_waiting and self.running >= self._max_num_seqs:
            raise QueueFullError(f"{self.behaviour.max_waiting} requests are already waiting; retry later")
        request_id = request_id or uuid.uuid4().hex
        stream = FakeStream(self, request_id, num_prompt, params.n)
        self.streams[request_id] = stream
        self.params[request_id] = params
        self.prompts[request_id] = submitted
        self.tools[request_id] = tools
        stream.task = asyncio.get_running_loop().create_task(self._produce(stream, prompt, params))
        return stream

    async def abort(self, request_id: str) -> None:
        self.abort_nowait(request_id)

    def min_event_gap(self) -> float:
        return 0.0  # a delta per token: the tests on fakes count them

    def abort_nowait(self, request_id: str) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return
        self.aborted_total += 1
        if stream.task is not None:
            stream.task.cancel()
        n = self.params[request_id].n
        for i in range(n):
            if i not in stream.finished_choices:
                stream.finished_choices.add(i)
                stream.push(RequestOutput(request_id, i, "", [], stream.num_prompt_tokens, 0,
                                                      finish_reason="abort"))

    # ---- production
    def reply_tokens(self, prompt: Any) -> list[str]:
        text = self.behaviour.reply(prompt_text(prompt)) if callable(self.behaviour.reply) else self.behaviour.reply
        return split_tokens(text)

    async def _produce(self, stream: FakeStream, prompt: Any, params: SamplingParams) -> None:
        request_id = stream.request_id
        assert self._slots is not None
        self.waiting += 1
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), self.behaviour.queue_timeout_s)
            except asyncio.TimeoutError:
                self._finish_all(stream, params, "error",
                                 error=f"the request waited more than {self.behaviour.queue_timeout_s}s for a slot")
                return
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            await self._emit_tokens(stream, prompt, params)
        finally:
            self.running -= 1
            self._slots.release()
            self.streams.pop(request_id, None)

    def _finish_all(self, stream: FakeStream, params: SamplingParams, reason: str, error: str | None = None) -> None:
        for i in range(params.n):
            if i not in stream.finished_choices:
                stream.finished_choices.add(i)
                stream.push(RequestOutput(stream.request_id, i, "", [], stream.num_prompt_tokens, 0,
                                                      finish_reason=reason, error=error))
        self.streams.pop(stream.request_id, None)

    async def _emit_tokens(self, stream: FakeStream, prompt: Any, params: SamplingParams) -> None:
        tokens = self.reply_tokens(prompt)
        room = self._max_model_len - stream.num_prompt_tokens
        limit = min(params.max_tokens or room, room)
        full = "".join(tokens)
        stop_at, stop_reason = len(full), None
        for s in params.stop:
            at = full.find(s)
            if 0 <= at < stop_at:
                stop_at, stop_reason = at, s
        counts = [0] * params.n
        texts = [0] * params.n  # characters emitted
        step = 0
        while len(stream.finished_choices) < params.n:
            if self.gate is not None:
                await self.gate.wait()
            if self.behaviour.token_delay_s:
                await asyncio.sleep(self.behaviour.token_delay_s)
            else:
                await asyncio.sleep(0)
            if self.behaviour.raise_after is not None and step >= self.behaviour.raise_after:
                stream.push(EngineDeadError("simulated engine crash"))
                self.streams.pop(stream.request_id, None)
                return
            if self.behaviour.fail_after is not None and step >= self.behaviour.fail_after:
                self._finish_all(stream, params, "error", error="simulated engine failure")
                return
            for i in range(params.n):
                if i in stream.finished_choices:
                    continue
                token = tokens[step % len(tokens)]  # cycles past the end only with ignore_eos
                text = token
                reason = None
                if stop_reason is not None and texts[i] + len(text) >= stop_at:
                    text = text[: max(0, stop_at - texts[i])]
                    reason = "stop"
                counts[i] += 1
                texts[i] += len(text)
                if reason is None:
                    if counts[i] >= limit:
                        reason = "length"
                    elif step + 1 >= len(tokens) and not params.ignore_eos:
                        reason = "stop"
                logprobs = None
                if params.logprobs is not None:
                    logprobs = [TokenLogprob(step, token, -0.25,
                                             top=[(step + k, f"{token}#{k}", -0.25 - k) for k in range(params.logprobs)])]
                out = RequestOutput(stream.request_id, i, text, [step], stream.num_prompt_tokens, counts[i],
                                    finish_reason=reason, stop_reason=stop_reason if reason == "stop" else None,
                                    logprobs=logprobs)
                if reason is not None:
                    stream.finished_choices.add(i)
                stream.push(out)
            step += 1


_check: type[EngineClient] = FakeEngine  # mypy: the fake keeps the interface the server is typed against
