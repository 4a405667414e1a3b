"""Serving base: the request lifecycle every API shares.

`ServingBase.submit` hands a prompt and `SamplingParams` to the engine (admission, the engine's
refusals mapped to HTTP statuses) and returns a `RequestHandle`, which iterates the outputs,
records metrics and aborts the engine request if it is closed early. `respond` turns a stream of
protocol dicts into a framed streaming response (`rillet.server.streaming`) or runs a whole
answer, racing it against the client's disconnect. The API classes (`serving_chat`,
`serving_completion`, `serving_ollama`) build protocol objects from the outputs; a dict with an
"error" key is always the last object of a stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rillet.config import ServerConfig
from rillet.engine.engine_client import EngineClient, EngineRequest, Prompt
from rillet.engine.errors import EngineDeadError, EngineNotReadyError, PromptTooLongError, QueueFullError
from rillet.engine.outputs import RequestOutput
from rillet.engine.prompts import ChatPrompt
from rillet.protocol import openai as oa
from rillet.protocol.errors import ErrorInfo, ErrorResponse
from rillet.protocol.params import param_error
from rillet.sampling_params import SamplingParams
from rillet.server.errors import APIError, engine_refusal
from rillet.server.metrics import Metrics
from rillet.server.middleware import request_id_var
from rillet.server.streaming import (NDJSON_MEDIA_TYPE, SSE_KEEPALIVE, SSE_MEDIA_TYPE, EventTemplate,
                                     StreamingBody, ndjson_stream, sse_event, sse_stream)

__all__ = ["Collected", "OpenAIAnswer", "RequestHandle", "ServerState", "ServingBase", "arrival_of", "finite", "new_id", "ollama_timestamp", "openai_error_event",
           "run_until_disconnect", "usage_of"]

if TYPE_CHECKING:
    from rillet.server.handle_group import HandleGroup

logger = logging.getLogger("rillet.server")

T = TypeVar("T")
_REFUSAL_LABELS = {QueueFullError: "queue_full", EngineNotReadyError: "not_ready", EngineDeadError: "engine_dead"}


class ServerState:
    """Live requests and the draining flag; shared by routes, /health and the SIGTERM handler."""

    def __init__(self) -> None:
        self.draining = False
        self.shutting_down = False  # drain timed out: remaining requests are being aborted
        self.active: dict[str, RequestHandle] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.created = int(time.time())

    def add(self, handle: RequestHandle) -> None:
        self.active[handle.request_id] = handle
        self._idle.clear()

    def remove(self, handle: RequestHandle) -> None:
        self.active.pop(handle.request_id, None)
        if not self.active:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return not self.active

    async def drain(self, timeout_s: float, abort_grace_s: float = 10.0) -> None:
        """Refuse new requests, let live ones finish for `timeout_s`, then abort the rest.

        Aborted streams end with a terminal error event (the engine ends them with "abort").
        """
        self.draining = True
        if self.active:
            logger.info("draining: waiting up to %.1fs for %d request(s)", timeout_s, len(self.active))
        if await self.wait_idle(timeout_s):
            return
        self.shutting_down = True
        logger.warning("drain timeout: aborting %d request(s)", len(self.active))
        for handle in list(self.active.values()):
            await handle.abort()
        if not await self.wait_idle(abort_grace_s):
            logger.error("%d request(s) did not end after abort", len(self.active))

    def abort_message(self) -> str:
        if self.draining:
            return "the server is shutting down; the request was aborted before it finished"
        return "the request was aborted before it finished"


class RequestHandle:
    """One engine request: iterates its outputs, records metrics, aborts it if closed early."""

    def __init__(self, stream: EngineRequest, request_id: str, n: int, arrival: float, enqueued: float,
                 metrics: Metrics, state: ServerState) -> None:
        self.stream = stream
        self.request_id = request_id
        self.n = n
        self.arrival = arrival  # perf_counter at request arrival
        self.enqueued = enqueued  # perf_counter when add_request returned
        self.metrics = metrics
        self.state = state
        self.num_prompt_tokens = stream.num_prompt_tokens
        self.num_cached_tokens = 0
        self.finish_reasons: list[str | None] = [None] * n
        self.num_output_tokens = [0] * n
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._last_at = [0.0] * n
        self._iter = stream.__aiter__()
        self._num_finished = 0
        self._error = False
        self._closed = False

    @property
    def finished(self) -> bool:
        return self._num_finished >= self.n

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            out = await self._iter.__anext__()
        except StopAsyncIteration:
            raise
        except Exception:
            self._error = True
            raise
        now = time.perf_counter()
        if out.num_prompt_tokens:
            self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
                self.metrics.time_to_first_token.observe(now - self.arrival)
            elif self._last_at[out.index]:
                self.metrics.inter_token_latency.observe(now - self._last_at[out.index])
            self._last_at[out.index] = now
            self.last_token_at = now
        self.num_output_tokens[out.index] = out.num_output_tokens
        if out.finish_reason is not None and self.finish_reasons[out.index] is None:
            self.finish_reasons[out.index] = out.finish_reason
            self._num_finished += 1
            if out.finish_reason == "error":
                self._error = True
        return out

    @property
    def num_generated_tokens(self) -> int:
        return sum(self.num_output_tokens)

    def usage(self) -> oa.Usage:
        return usage_of(self.num_prompt_tokens, self.num_generated_tokens, self.num_cached_tokens)

    async def abort(self) -> None:
        if not self.finished:
            try:
                await self.stream.abort()
            except Exception:
                logger.exception("aborting %s failed", self.request_id)

    async def aclose(self) -> None:
        """Idempotent: abort if unfinished, record the outcome, forget the request."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.abort()
        finally:
            self.state.remove(self)
            self._record()

    def _record(self) -> None:
        metrics = self.metrics
        metrics.prompt_tokens.inc(self.num_prompt_tokens)
        metrics.generation_tokens.inc(self.num_generated_tokens)
        metrics.e2e_request_latency.observe(time.perf_counter() - self.arrival)
        reasons = self.finish_reasons
        if self._error:
            metrics.request_error.inc()
        elif self.finished and all(r in ("stop", "length") for r in reasons):
            metrics.request_success.labels("length" if "length" in reasons else "stop").inc()
        else:
            metrics.request_aborted.inc()
        logger.debug("%s done: prompt=%d generated=%d finish=%s", self.request_id, self.num_prompt_tokens,
                     self.num_generated_tokens, reasons)


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> oa.Usage:
    """An OpenAI answer's usage: the total, and the prompt tokens the prefix cache served."""
    return oa.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens,
                    prompt_tokens_details=oa.PromptTokensDetails(cached_tokens=cached_tokens))


@dataclass
class Collected:
    """A whole answer: per choice, its text pieces, formatted logprobs, finish and stop reasons."""

    texts: list[list[str]]
    logprobs: list[list[dict[str, Any]]]
    reasons: list[str | None]
    stop_reasons: list[str | int | None]


@dataclass
class OpenAIAnswer:
    """What an OpenAI answer's chunks and whole response carry besides the choices."""

    id: str
    model: str
    created: int
    n: int
    include_usage: bool  # stream_options.include_usage: usage null on each chunk, then a last chunk with it
    logprobs: bool
    _templates: dict[int, EventTemplate] = field(default_factory=dict, init=False, repr=False, compare=False)

    def dump(self, chunk: oa.ChatCompletionChunk | oa.CompletionChunk, usage: oa.Usage | None = None
             ) -> dict[str, Any]:
        if self.include_usage:
            chunk.usage = usage
        return chunk.model_dump(exclude_unset=True)

    def plain_chunk(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        """What `dump` makes of a chunk with one choice, without the pydantic models: the chunk of
        nearly every streamed token (~0.5 us instead of ~9; test_streaming_chunks holds the two equal)."""
        chunk: dict[str, Any] = {"id": self.id, "created": self.created, "model": self.model}
        if self.include_usage:
            chunk["usage"] = None
        chunk["object"] = obj
        chunk["choices"] = [choice]
        return chunk

    def text_chunk(self, index: int, text: str) -> dict[str, Any]:
        """The chunk of a streamed piece of text of choice `index` (the subclass's shape)."""
        raise NotImplementedError

    def text_event(self, index: int, text: str) -> bytes:
        """sse_event(self.text_chunk(index, text)), from a template encoded at the choice's first
        piece: a streamed token costs one string's JSON (~1 us) instead of the whole chunk's."""
        template = self._templates.get(index)
        if template is None:
            template = self._templates[index] = EventTemplate(lambda text: self.text_chunk(index, text), sse_event)
        return template(text)


LogprobFormat = Callable[[RequestOutput, int], dict[str, Any]]  # (output, text offset of its choice)


def finite(logprob: float) -> float:
    """-inf (a masked token) is not valid JSON: report it as -9999.0, like vLLM."""
    return logprob if logprob > -9999.0 else -9999.0


def openai_error_event(message: str, code: str) -> dict[str, Any]:
    """The terminal SSE event of a stream the engine could not finish."""
    return ErrorResponse(error=ErrorInfo(message=message, type="service_unavailable", param=None,
                                         code=code)).model_dump()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def ollama_timestamp(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def arrival_of(request: Request) -> float:
    """perf_counter when the request arrived (set by RequestContextMiddleware)."""
    arrival = request.scope.get("state", {}).get("arrival")
    return float(arrival) if arrival else time.perf_counter()


def check_unicode(prompt: Prompt, param: str) -> None:
    """JSON escapes can carry lone surrogates (\\ud800), which no tokenizer can encode: a clear 400."""
    texts: list[Any] = [prompt] if isinstance(prompt, str) else []
    if isinstance(prompt, ChatPrompt):
        prompt = prompt.messages
    if isinstance(prompt, list):
        texts = [m.get("content") for m in prompt if isinstance(m, dict)]
    for text in texts:
        if isinstance(text, str) and not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise APIError(400, f"{param} holds invalid Unicode: a lone surrogate "
                                    f"(U+{ord(text[exc.start]):04X}) at character {exc.start}", param=param) from None


class ServingBase:
    """What every API's serving class shares: the engine, metrics, live requests, config."""

    def __init__(self, engine: EngineClient, metrics: Metrics, state: ServerState, config: ServerConfig) -> None:
        self.engine = engine
        self.metrics = metrics
        self.state = state
        self.config = config

    def check_model(self, model: str | None, *, ollama: bool = False) -> str:
        served = self.engine.model_name
        if not model or model == served or (ollama and model == f"{served}:latest"):
            return served
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served}'.",
                       param="model", code="model_not_found")

    def check_num_messages(self, num_messages: int) -> None:
        """Every message costs at least one prompt token: refuse a conversation that cannot fit
        before spending seconds on its chat template (a 100k-message body is a few MB of JSON)."""
        max_model_len = self.engine.max_model_len
        if num_messages >= max_model_len:
            raise APIError(400, f"{num_messages} messages cannot fit in the context of {max_model_len} tokens "
                                "(max_model_len)", param="messages", code="context_length_exceeded")

    async def submit(self, prompt: Prompt, params: SamplingParams, *, prefix: str, arrival: float,
                     prompt_param: str = "messages", tools: list[dict[str, Any]] | None = None,
                     constraint_param: str | None = None) -> RequestHandle:
        """add_request; raises APIError: 400 for a prompt (or prompt plus max_tokens) that the
        engine finds too long for the context, or for a parameter or constraint it refuses
        (naming `constraint_param` for a schema, regex or grammar that does not compile);
        429/503 for its refusals."""
        if self.state.draining:
            self.metrics.request_rejected.labels("draining").inc()
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        check_unicode(prompt, prompt_param)
        request_id = new_id(prefix)
        try:
            stream = await self.engine.add_request(prompt, params, request_id, tools=tools)
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param=prompt_param, code="context_length_exceeded") from None
        except (QueueFullError, EngineNotReadyError, EngineDeadError) as exc:
            self.metrics.request_rejected.labels(_REFUSAL_LABELS[type(exc)]).inc()
            raise engine_refusal(exc) from None
        except ValueError as exc:  # a bad prompt, or a parameter only the engine can check (token ids)
            error = param_error(exc, default=prompt_param)
            message = str(exc)
            if params.structured is not None and constraint_param and (
                    error.param == "structured" or "does not compile" in message or "JSON schema" in message):
                error.param = constraint_param  # the engine could not compile the constraint
            raise APIError(400, message, param=error.param) from None
        handle = RequestHandle(stream, request_id, params.n, arrival, time.perf_counter(), self.metrics, self.state)
        self.state.add(handle)
        logger.debug("[%s] engine request %s: %d prompt tokens", request_id_var.get(), request_id,
                     handle.num_prompt_tokens)
        return handle

    async def collect(self, handle: RequestHandle | HandleGroup, logprobs: LogprobFormat | None = None,
                      offsets: list[int] | None = None) -> Collected:
        """Every output of a whole (non-streamed) answer; an engine failure or abort is an
        APIError 503. `offsets`: characters before each choice's text (an echoed prompt)."""
        n = handle.n
        result = Collected([[] for _ in range(n)], [[] for _ in range(n)], [None] * n, [None] * n)
        lengths = list(offsets) if offsets is not None else [0] * n
        try:
            async for out in handle:
                if out.finish_reason == "error":
                    raise APIError(503, out.error or "the engine failed this request", code="engine_error")
                if out.finish_reason == "abort":
                    raise APIError(503, self.state.abort_message(), code="aborted")
                if out.text:
                    result.texts[out.index].append(out.text)
                if out.logprobs and logprobs is not None:
                    result.logprobs[out.index].append(logprobs(out, lengths[out.index]))
                lengths[out.index] += len(out.text)
                if out.finish_reason is not None:
                    result.reasons[out.index] = out.finish_reason
                    result.stop_reasons[out.index] = out.stop_reason
        except APIError:
            raise
        except Exception as exc:
            logger.exception("[%s] %s failed", request_id_var.get(), handle.request_id)
            raise APIError(503, f"the engine failed this request: {exc}", code="engine_error") from None
        finally:
            await handle.aclose()
        return result

    def error_message(self, out: RequestOutput) -> tuple[str, str]:
        """(message, code) of a stream that ended with finish_reason "error" or "abort"."""
        if out.finish_reason == "abort":
            return self.state.abort_message(), "aborted"
        return out.error or "the engine failed this request", "engine_error"

    @staticmethod
    def exception_message(handle: RequestHandle | HandleGroup, exc: Exception) -> str:
        """An engine failure after the 200: logged, and told in a terminal error event."""
        logger.error("[%s] %s failed mid-stream: %r", request_id_var.get(), handle.request_id, exc, exc_info=exc)
        return f"the engine failed this request: {exc}"

    async def respond(self, request: Request, handle: RequestHandle | HandleGroup, stream: bool,
                      events: Callable[[], AsyncIterator[dict[str, Any] | bytes]],
                      whole: Callable[[], Coroutine[Any, Any, dict[str, Any]]], *, ollama: bool = False) -> Response:
        """A streamed answer (SSE for OpenAI, NDJSON for Ollama) of `events()`, or the JSON of
        `whole()`; the engine request ends with the response either way."""
        if stream:
            body = ndjson_stream(events()) if ollama else sse_stream(events())
            return StreamingBody(body, media_type=NDJSON_MEDIA_TYPE if ollama else SSE_MEDIA_TYPE,
                                 keepalive=None if ollama else SSE_KEEPALIVE, on_close=handle.aclose,
                                 stall_timeout_s=self.config.stream_stall_timeout_s)
        try:
            result = await run_until_disconnect(whole(), request.receive)
        finally:
            await handle.aclose()
        if result is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        return JSONResponse(result)


async def run_until_disconnect(coro: Awaitable[T], receive: Callable[[], Awaitable[Any]]) -> T | None:
    """Run a non-streaming request; if the client disconnects first, cancel it (which aborts the
    engine request through the handle's cleanup) and return None."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if task.done() and not task.cancelled():
        return task.result()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    return None
