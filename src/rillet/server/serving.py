"""Serving: protocol requests -> SamplingParams -> engine; engine outputs -> protocol objects.

Knows nothing of SSE or NDJSON bytes: streaming functions yield plain dicts with the shapes of
`rillet.protocol` (json.dumps of a small dict per token is the cheap path); a dict with an
"error" key is always the last object of a stream.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from rillet.engine.errors import EngineDeadError, EngineNotReadyError, PromptTooLongError, QueueFullError
from rillet.engine.outputs import RequestOutput, TokenLogprob
from rillet.protocol import ollama as ol
from rillet.protocol import openai as oa
from rillet.sampling_params import SamplingParams
from rillet.server.errors import APIError
from rillet.server.metrics import Metrics
from rillet.server.tool_calls import ToolSession, openai_tool_message
from rillet.structured.spec import StructuredOutputs

__all__ = ["RequestHandle", "ServerState", "Serving", "check_num_messages", "request_id_var"]

logger = logging.getLogger("rillet.server")

# The X-Request-Id of the request being handled (set by the app's request-context middleware).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("rillet_request_id", default="-")

QUEUE_FULL_RETRY_AFTER_S = 1
NOT_READY_RETRY_AFTER_S = 5
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


# ------------------------------------------------------------------ state and request handles


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


class RequestHandle:
    """One engine request: iterates its outputs, records metrics, aborts it if closed early."""

    def __init__(self, serving: Serving, stream: Any, request_id: str, n: int, arrival: float,
                 enqueued: float) -> None:
        self.serving = serving
        self.stream = stream
        self.request_id = request_id
        self.n = n
        self.arrival = arrival  # perf_counter at request arrival
        self.enqueued = enqueued  # perf_counter when add_request returned
        self.num_prompt_tokens = int(getattr(stream, "num_prompt_tokens", 0) or 0)
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
            out: RequestOutput = await self._iter.__anext__()
        except StopAsyncIteration:
            raise
        except Exception:
            self._error = True
            raise
        now = time.perf_counter()
        metrics = self.serving.metrics
        if out.num_prompt_tokens:
            self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        num_new = len(out.token_ids)
        if num_new:
            if self.first_token_at is None:
                self.first_token_at = now
                metrics.time_to_first_token.observe(now - self.arrival)
            elif self._last_at[out.index]:
                metrics.inter_token_latency.observe(now - self._last_at[out.index])
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

    def usage(self) -> dict:
        completion = self.num_generated_tokens
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.num_prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}

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
            self.serving.state.remove(self)
            self._record()

    def _record(self) -> None:
        metrics = self.serving.metrics
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


# ------------------------------------------------------------------ helpers


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def ollama_timestamp(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # int64, as torch.Generator.manual_seed takes (after + choice index)


def make_sampling_params(openai_names: dict[str, str] | None = None, **values: Any) -> SamplingParams:
    """SamplingParams from the values that were given; ValueError -> 400 naming the API's field."""
    values = {k: v for k, v in values.items() if v is not None or k == "max_tokens"}  # None: up to the context
    seed = values.get("seed")
    if isinstance(seed, int) and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        # out of int64 the sampler's generator would raise inside the forward step (failing the batch)
        raise APIError(400, f"seed must be a 64-bit integer (from {SEED_RANGE[0]} to {SEED_RANGE[1]}), got {seed}",
                       param="seed")
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        first = message.split(" ", 1)[0]
        param = first if first in _SAMPLING_FIELDS else None
        if param and openai_names and param in openai_names:
            param = openai_names[param]  # the API's name for the field, in the message too
            message = param + message[len(first):]
        raise APIError(400, message, param=param) from None


def _check_unicode(prompt: Any, param: str) -> None:
    """JSON escapes can carry lone surrogates (\\ud800), which no tokenizer can encode: a clear 400."""
    texts = [prompt] if isinstance(prompt, str) else []
    if isinstance(prompt, list):
        texts = [m.get("content") for m in prompt if isinstance(m, dict)]
    for text in texts:
        if isinstance(text, str) and not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise APIError(400, f"{param} holds invalid Unicode: a lone surrogate "
                                    f"(U+{ord(text[exc.start]):04X}) at character {exc.start}", param=param) from None


def _abort_message(state: ServerState) -> str:
    if state.draining:
        return "the server is shutting down; the request was aborted before it finished"
    return "the request was aborted before it finished"


def _finite(logprob: float) -> float:
    """-inf (a masked token) is not valid JSON: report it as -9999.0, like vLLM."""
    return logprob if logprob > -9999.0 else -9999.0


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [
        {"token": lp.token, "logprob": _finite(lp.logprob), "bytes": list(lp.token.encode("utf-8")),
         "top_logprobs": [{"token": t, "logprob": _finite(v), "bytes": list(t.encode("utf-8"))}
                          for _, t, v in lp.top]}
        for lp in entries]}


def _completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for lp in entries:
        tokens.append(lp.token)
        token_logprobs.append(_finite(lp.logprob))
        top.append({t: _finite(v) for _, t, v in lp.top} if lp.top else None)
        text_offset.append(offset)
        offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset}


def _merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not parts:
        return None
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for k in merged:
            merged[k].extend(p[k])
    return merged


def _content_text(message: oa.ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"unsupported content part type {part.type!r}: only text parts are supported",
                           param="messages")
        texts.append(part.text)
    return "".join(texts)


_ROLES = {"system", "user", "assistant", "developer", "tool"}


def check_num_messages(num_messages: int, max_model_len: int) -> None:
    """Every message costs at least one prompt token: refuse a conversation that cannot fit before
    spending seconds on its chat template (a 100k-message body is a few MB of JSON)."""
    if num_messages >= max_model_len:
        raise APIError(400, f"{num_messages} messages cannot fit in the context of {max_model_len} tokens "
                            "(max_model_len)", param="messages", code="context_length_exceeded")


def openai_messages(messages: list[oa.ChatMessage], max_model_len: int | None = None) -> list[dict[str, Any]]:
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if max_model_len is not None:
        check_num_messages(len(messages), max_model_len)
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for the tool messages that answer them
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise APIError(400, f"unsupported message role {m.role!r}", param="messages")
        if m.role == "tool" or (m.role == "assistant" and m.tool_calls):
            out.append(openai_tool_message(i, m.role, _content_text(m), m.model_dump(), call_names))
            continue
        out.append({"role": "system" if m.role == "developer" else m.role, "content": _content_text(m)})
    return out


# ------------------------------------------------------------------ serving


@dataclass
class OpenAIMeta:
    id: str
    model: str
    created: int
    n: int
    include_usage: bool = False
    logprobs: bool = False
    echo: str | None = None
    tools: ToolSession | None = None  # tool calls are parsed out of the text
    extra: dict[str, Any] = field(default_factory=dict)


class Serving:
    def __init__(self, engine: Any, metrics: Metrics, state: ServerState) -> None:
        self.engine = engine
        self.metrics = metrics
        self.state = state

    # ---- model names

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def check_model(self, model: str | None, *, ollama: bool = False) -> str:
        served = self.model_name
        if not model or model == served or (ollama and model == f"{served}:latest"):
            return served
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served}'.",
                       param="model", code="model_not_found")

    # ---- submission

    async def submit(self, prompt: Any, params: SamplingParams, *, prefix: str, arrival: float,
                     prompt_param: str = "messages", tools: list[dict[str, Any]] | None = None,
                     constraint_param: str | None = None) -> RequestHandle:
        """add_request with admission control; raises APIError (400 for a prompt, or prompt plus
        max_tokens, that does not fit in the context, stating the numbers; 400 naming
        `constraint_param` for a schema, regex or grammar the engine cannot compile)."""
        if self.state.draining:
            self.metrics.request_rejected.labels("draining").inc()
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        _check_unicode(prompt, prompt_param)
        request_id = _new_id(prefix)
        try:
            # prompt + max_tokens beyond the context is refused (400 with the numbers), as OpenAI and
            # vLLM do: clamping it answered 200 and held a slot for a length nobody asked for.
            stream = await self.engine.add_request(prompt, params, request_id, tools=tools)
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param=prompt_param, code="context_length_exceeded") from None
        except QueueFullError as exc:
            self.metrics.request_rejected.labels("queue_full").inc()
            raise APIError(429, str(exc) or "too many requests are waiting; retry later", code="queue_full",
                           headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}) from None
        except EngineNotReadyError as exc:
            self.metrics.request_rejected.labels("not_ready").inc()
            raise APIError(503, str(exc) or "the model is still loading", code="not_ready",
                           headers={"Retry-After": str(NOT_READY_RETRY_AFTER_S)}) from None
        except EngineDeadError as exc:
            self.metrics.request_rejected.labels("engine_dead").inc()
            raise APIError(503, str(exc) or "the engine has stopped", code="engine_dead") from None
        except ValueError as exc:  # a bad prompt, or a parameter only the engine can check (token ids)
            message = str(exc)
            first = message.split(" ", 1)[0]
            param = first if first in _SAMPLING_FIELDS else prompt_param
            if params.structured is not None and constraint_param and (
                    first == "structured" or "does not compile" in message or "JSON schema" in message):
                param = constraint_param  # the engine could not compile the constraint
            raise APIError(400, message, param=param) from None
        handle = RequestHandle(self, stream, request_id, params.n, arrival, time.perf_counter())
        self.state.add(handle)
        logger.debug("[%s] engine request %s: %d prompt tokens", request_id_var.get(), request_id,
                     handle.num_prompt_tokens)
        return handle

    # ---- OpenAI: sampling params

    @staticmethod
    def openai_params(req: oa.ChatCompletionRequest | oa.CompletionRequest,
                      structured: StructuredOutputs | None = None) -> SamplingParams:
        chat = isinstance(req, oa.ChatCompletionRequest)
        names = {}
        if chat:
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            if req.max_completion_tokens is not None:
                names["max_tokens"] = "max_completion_tokens"
            if req.top_logprobs is not None and not req.logprobs:
                raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            names["logprobs"] = "top_logprobs"
        else:
            max_tokens = req.max_tokens
            logprobs = req.logprobs
            if req.best_of is not None and req.best_of != (req.n or 1):
                raise APIError(400, "best_of is not supported (it must equal n)", param="best_of")
            if req.suffix:
                raise APIError(400, "suffix is not supported", param="suffix")
        logit_bias = None
        if req.logit_bias:
            try:
                logit_bias = {int(k): float(v) for k, v in req.logit_bias.items()}
            except ValueError:
                raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        return make_sampling_params(
            names,
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            min_p=req.min_p, seed=req.seed, repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
            logit_bias=logit_bias, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos or None, n=req.n, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens, structured=structured,
        )

    @staticmethod
    def completion_prompt(req: oa.CompletionRequest) -> str | list[int]:
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            elif prompt and all(isinstance(p, int) for p in prompt):
                pass
            else:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return prompt  # type: ignore[return-value]

    # ---- OpenAI: chat completions

    async def chat_stream(self, handle: RequestHandle, meta: OpenAIMeta) -> AsyncIterator[dict[str, Any]]:
        base = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model}
        if meta.include_usage:
            base["usage"] = None
        try:
            for i in range(meta.n):
                yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
            async for out in handle:
                reason = out.finish_reason
                if reason == "error" or reason == "abort":
                    if out.text:
                        yield {**base, "choices": [{"index": out.index, "delta": {"content": out.text},
                                                    "logprobs": None, "finish_reason": None}]}
                    yield self._error_event(out)
                    return
                if not out.text and reason is None and not out.logprobs:
                    continue
                if meta.tools is not None:  # content and tool_calls parsed out of the text
                    deltas = meta.tools.openai_deltas(out.index, out.text, reason is not None) or [{}]
                    reason = meta.tools.finish_reason(out.index, reason)
                else:
                    deltas = [{"content": out.text} if out.text else {}]
                for delta in deltas[:-1]:
                    yield {**base, "choices": [{"index": out.index, "delta": delta, "logprobs": None,
                                                "finish_reason": None}]}
                choice = {"index": out.index, "delta": deltas[-1],
                          "logprobs": _chat_logprobs(out.logprobs) if meta.logprobs and out.logprobs else None,
                          "finish_reason": reason}
                if reason is not None:
                    choice["stop_reason"] = out.stop_reason
                elif not deltas[-1] and choice["logprobs"] is None:
                    continue  # held back (it may be tool-call markup): nothing to send yet
                yield {**base, "choices": [choice]}
            if meta.include_usage:
                yield {**base, "choices": [], "usage": handle.usage()}
        except Exception as exc:  # engine failure after the 200: a terminal error event, never a silent cut
            yield self._exception_event(handle, exc)
        finally:
            await handle.aclose()

    async def chat_full(self, handle: RequestHandle, meta: OpenAIMeta) -> dict[str, Any]:
        texts, logprobs, reasons, stop_reasons = await self._collect(handle, meta.n)
        choices = []
        for i in range(meta.n):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(texts[i])}
            reason = reasons[i]
            if meta.tools is not None:
                message = meta.tools.openai_message(i, message["content"])
                reason = meta.tools.finish_reason(i, reason)
            choices.append({
                "index": i, "message": message,
                "logprobs": {"content": [e for part in logprobs[i] for e in part["content"]]}
                if meta.logprobs else None,
                "finish_reason": reason, "stop_reason": stop_reasons[i]})
        return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
                "choices": choices, "usage": handle.usage(), "system_fingerprint": None}

    # ---- OpenAI: completions

    async def completion_stream(self, handle: RequestHandle, meta: OpenAIMeta) -> AsyncIterator[dict[str, Any]]:
        base = {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model}
        if meta.include_usage:
            base["usage"] = None
        offsets = [0] * meta.n
        try:
            if meta.echo:
                for i in range(meta.n):
                    offsets[i] = len(meta.echo)
                    yield {**base, "choices": [{"index": i, "text": meta.echo, "logprobs": None,
                                                "finish_reason": None}]}
            async for out in handle:
                reason = out.finish_reason
                if reason == "error" or reason == "abort":
                    if out.text:
                        yield {**base, "choices": [{"index": out.index, "text": out.text, "logprobs": None,
                                                    "finish_reason": None}]}
                    yield self._error_event(out)
                    return
                if not out.text and reason is None and not out.logprobs:
                    continue
                lp = None
                if meta.logprobs and out.logprobs:
                    lp = _completion_logprobs(out.logprobs, offsets[out.index])
                offsets[out.index] += len(out.text)
                choice = {"index": out.index, "text": out.text, "logprobs": lp, "finish_reason": reason}
                if reason is not None:
                    choice["stop_reason"] = out.stop_reason
                yield {**base, "choices": [choice]}
            if meta.include_usage:
                yield {**base, "choices": [], "usage": handle.usage()}
        except Exception as exc:
            yield self._exception_event(handle, exc)
        finally:
            await handle.aclose()

    async def completion_full(self, handle: RequestHandle, meta: OpenAIMeta) -> dict[str, Any]:
        texts, logprobs, reasons, stop_reasons = await self._collect(handle, meta.n, completion=True,
                                                                      offset=len(meta.echo or ""))
        choices = []
        for i in range(meta.n):
            choices.append({
                "index": i, "text": (meta.echo or "") + "".join(texts[i]),
                "logprobs": _merge_completion_logprobs(logprobs[i]) if meta.logprobs else None,
                "finish_reason": reasons[i], "stop_reason": stop_reasons[i]})
        return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                "choices": choices, "usage": handle.usage()}

    async def _collect(self, handle: RequestHandle, n: int, *, completion: bool = False, offset: int = 0):
        texts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        lengths = [offset] * n
        reasons: list[str | None] = [None] * n
        stop_reasons: list[Any] = [None] * n
        try:
            async for out in handle:
                if out.finish_reason == "error":
                    raise APIError(503, out.error or "the engine failed this request", code="engine_error")
                if out.finish_reason == "abort":
                    raise APIError(503, _abort_message(self.state), code="aborted")
                if out.text:
                    texts[out.index].append(out.text)
                if out.logprobs:
                    if completion:
                        logprobs[out.index].append(_completion_logprobs(out.logprobs, lengths[out.index]))
                    else:
                        logprobs[out.index].append(_chat_logprobs(out.logprobs))
                lengths[out.index] += len(out.text)
                if out.finish_reason is not None:
                    reasons[out.index] = out.finish_reason
                    stop_reasons[out.index] = out.stop_reason
        except APIError:
            raise
        except Exception as exc:
            logger.exception("[%s] %s failed", request_id_var.get(), handle.request_id)
            raise APIError(503, f"the engine failed this request: {exc}", code="engine_error") from None
        finally:
            await handle.aclose()
        return texts, logprobs, reasons, stop_reasons

    def _error_event(self, out: RequestOutput) -> dict[str, Any]:
        if out.finish_reason == "abort":
            message, code = _abort_message(self.state), "aborted"
        else:
            message, code = out.error or "the engine failed this request", "engine_error"
        return {"error": {"message": message, "type": "service_unavailable", "param": None, "code": code}}

    def _exception_event(self, handle: RequestHandle, exc: Exception) -> dict[str, Any]:
        logger.error("[%s] %s failed mid-stream: %r", request_id_var.get(), handle.request_id, exc, exc_info=exc)
        return {"error": {"message": f"the engine failed this request: {exc}", "type": "service_unavailable",
                          "param": None, "code": "engine_error"}}

    # ---- Ollama

    @staticmethod
    def ollama_params(options: ol.Options | None) -> SamplingParams:
        o = options or ol.Options()
        num_predict = o.num_predict
        if num_predict is not None and num_predict < 0:
            num_predict = None  # -1 (and -2): up to the context
        if num_predict == 0:
            raise APIError(400, "num_predict must be >= 1 (or -1 for up to the context)", param="num_predict")
        if o.num_ctx is not None and o.num_ctx < 0:
            # Ollama caps a num_ctx above the model's context to it; rillet serves within max_model_len
            raise APIError(400, f"num_ctx must be >= 0, got {o.num_ctx}", param="num_ctx")
        seed = None if o.seed == -1 else o.seed  # Ollama's -1: a random seed
        # Ollama's runtime defaults: temperature 0.8, top_k 40, top_p 0.9
        return make_sampling_params(
            {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"},
            max_tokens=num_predict,
            temperature=0.8 if o.temperature is None else o.temperature,
            top_p=0.9 if o.top_p is None else o.top_p,
            top_k=40 if o.top_k is None else o.top_k,
            min_p=o.min_p, seed=seed, stop=o.stop, repetition_penalty=o.repeat_penalty,
            frequency_penalty=o.frequency_penalty, presence_penalty=o.presence_penalty,
        )

    def _ollama_final(self, handle: RequestHandle, model: str, reason: str | None, *, chat: bool,
                      text: str = "", tools: ToolSession | None = None) -> dict[str, Any]:
        end = time.perf_counter()
        first = handle.first_token_at or end
        last = handle.last_token_at or end
        final: dict[str, Any] = {"model": model, "created_at": ollama_timestamp()}
        if chat:
            final["message"] = tools.ollama_message(0, text) if tools else {"role": "assistant", "content": text}
        else:
            final["response"] = text
        final.update({
            "done": True, "done_reason": reason or "stop",
            "total_duration": int((end - handle.arrival) * 1e9),
            "load_duration": int((handle.enqueued - handle.arrival) * 1e9),
            "prompt_eval_count": handle.num_prompt_tokens,
            "prompt_eval_duration": int((first - handle.enqueued) * 1e9),
            "eval_count": handle.num_generated_tokens,
            "eval_duration": int((last - first) * 1e9),
        })
        return final

    async def ollama_stream(self, handle: RequestHandle, model: str, *, chat: bool,
                            tools: ToolSession | None = None) -> AsyncIterator[dict[str, Any]]:
        reason = None
        try:
            async for out in handle:
                if tools is not None and out.finish_reason not in ("error", "abort"):
                    # tool calls are sent whole, in a message of their own, as Ollama does
                    content, calls = tools.ollama_events(0, out.text, out.finish_reason is not None)
                    if content or calls:
                        message: dict[str, Any] = {"role": "assistant", "content": content}
                        if calls:
                            message["tool_calls"] = calls
                        yield {"model": model, "created_at": ollama_timestamp(), "message": message, "done": False}
                elif out.text:
                    if chat:
                        yield {"model": model, "created_at": ollama_timestamp(),
                               "message": {"role": "assistant", "content": out.text}, "done": False}
                    else:
                        yield {"model": model, "created_at": ollama_timestamp(), "response": out.text,
                               "done": False}
                if out.finish_reason == "error" or out.finish_reason == "abort":
                    yield {"error": self._error_event(out)["error"]["message"], "done": True}
                    return
                if out.finish_reason is not None:
                    reason = out.finish_reason
            yield self._ollama_final(handle, model, reason, chat=chat)
        except Exception as exc:
            yield {"error": self._exception_event(handle, exc)["error"]["message"], "done": True}
        finally:
            await handle.aclose()

    async def ollama_full(self, handle: RequestHandle, model: str, *, chat: bool,
                          tools: ToolSession | None = None) -> dict[str, Any]:
        texts, _, reasons, _ = await self._collect(handle, 1)
        return self._ollama_final(handle, model, reasons[0], chat=chat, text="".join(texts[0]), tools=tools)


async def run_until_disconnect(coro: Any, receive: Any) -> Any:
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
