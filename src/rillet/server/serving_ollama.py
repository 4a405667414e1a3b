"""POST /api/chat and /api/generate: Ollama requests in; NDJSON lines (or one JSON object) out,
the last one with `done: true`, the done reason and the durations in nanoseconds."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rillet.engine.engine_client import Prompt
from rillet.protocol import ollama as ol
from rillet.protocol.errors import OllamaErrorResponse
from rillet.server.errors import APIError
from rillet.server.serving import RequestHandle, ServingBase, arrival_of, ollama_timestamp
from rillet.server.structured_request import ollama_structured
from rillet.server.tool_calls import ToolSession, ollama_message, plan_tools

__all__ = ["ServingOllama"]


def _error_line(message: str) -> dict[str, Any]:
    return OllamaErrorResponse(error=message, done=True).model_dump()


def _load_response(model: str, chat: bool) -> dict[str, Any]:
    """What Ollama answers to an empty request: the model is loaded, nothing generated."""
    if chat:
        return ol.ChatResponse(model=model, created_at=ollama_timestamp(), done=True, done_reason="load",
                               message=ol.AssistantMessage(role="assistant", content="")
                               ).model_dump(exclude_unset=True)
    return ol.GenerateResponse(model=model, created_at=ollama_timestamp(), done=True, done_reason="load",
                               response="").model_dump(exclude_unset=True)


def _delta(model: str, chat: bool, text: str, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One streamed line: new text (and, in a chat, the tool calls completed by it)."""
    # Built directly, without the models (~0.5 us instead of ~9 a token; test_streaming_chunks
    # holds them equal), except where tool calls need validating.
    if not chat:
        return {"model": model, "created_at": ollama_timestamp(), "response": text, "done": False}
    if not tool_calls:
        return {"model": model, "created_at": ollama_timestamp(), "message": {"role": "assistant", "content": text},
                "done": False}
    message = ol.AssistantMessage(role="assistant", content=text)
    if tool_calls:
        message.tool_calls = [ol.ToolCall.model_validate(c) for c in tool_calls]
    return ol.ChatResponse(model=model, created_at=ollama_timestamp(), message=message,
                           done=False).model_dump(exclude_unset=True)


class ServingOllama(ServingBase):
    async def chat(self, body: ol.ChatRequest, request: Request) -> Response:
        model = self.check_model(body.model, ollama=True)
        if (body.model_extra or {}).get("images"):
            raise APIError(400, "images are not supported by this server", param="images")
        if not body.messages:
            return JSONResponse(_load_response(model, chat=True))
        self.check_num_messages(len(body.messages))
        for m in body.messages:
            if m.images:
                raise APIError(400, "images are not supported by this server", param="messages")
        messages = [ollama_message(i, m) for i, m in enumerate(body.messages)]
        return await self._run(request, messages, body, model, chat=True)

    async def generate(self, body: ol.GenerateRequest, request: Request) -> Response:
        model = self.check_model(body.model, ollama=True)
        if body.images:
            raise APIError(400, "images are not supported by this server", param="images")
        extra = body.model_extra or {}
        if extra.get("suffix"):  # Ollama's answer for a model without fill-in-the-middle
            raise APIError(400, f'"{model}" does not support insert', param="suffix")
        if extra.get("template"):  # ignored, it would change the prompt silently
            raise APIError(400, "template is not supported: the model's chat template formats the prompt (or send "
                                "raw: true with the prompt formatted)", param="template")
        if not body.prompt and not (body.system and not body.raw):
            return JSONResponse(_load_response(model, chat=False))
        prompt: Prompt
        if body.raw:
            prompt = body.prompt or ""
        else:
            prompt = [{"role": "system", "content": body.system}] if body.system else []
            prompt.append({"role": "user", "content": body.prompt or ""})
        return await self._run(request, prompt, body, model, chat=False)

    async def _run(self, request: Request, prompt: Prompt, body: ol.ChatRequest | ol.GenerateRequest, model: str,
                   chat: bool) -> Response:
        params = body.to_sampling_params(ollama_structured(body.format))
        plan = plan_tools(getattr(body, "tools", None))  # Ollama has no tool_choice: "auto"
        tools = ToolSession(plan, 1) if plan else None
        handle = await self.submit(prompt, params, prefix="ollama", arrival=arrival_of(request),
                                   prompt_param="messages" if chat else "prompt",
                                   tools=plan.tools if plan else None, constraint_param="format")
        return await self.respond(request, handle, body.stream is not False,  # default (and null): stream
                                  lambda: self._events(handle, model, chat, tools),
                                  lambda: self._whole(handle, model, chat, tools), ollama=True)

    def _final(self, handle: RequestHandle, model: str, reason: str | None, *, chat: bool,
               text: str = "", tools: ToolSession | None = None) -> dict[str, Any]:
        end = time.perf_counter()
        first = handle.first_token_at or end
        last = handle.last_token_at or end
        timings: dict[str, Any] = dict(
            model=model, created_at=ollama_timestamp(), done=True, done_reason=reason or "stop",
            total_duration=int((end - handle.arrival) * 1e9),
            load_duration=int((handle.enqueued - handle.arrival) * 1e9),
            prompt_eval_count=handle.num_prompt_tokens,
            prompt_eval_duration=int((first - handle.enqueued) * 1e9),
            eval_count=handle.num_generated_tokens,
            eval_duration=int((last - first) * 1e9))
        if not chat:
            return ol.GenerateResponse(response=text, **timings).model_dump(exclude_unset=True)
        message = tools.ollama_message(0, text) if tools else {"role": "assistant", "content": text}
        return ol.ChatResponse(message=ol.AssistantMessage.model_validate(message),
                               **timings).model_dump(exclude_unset=True)

    async def _events(self, handle: RequestHandle, model: str, chat: bool,
                      tools: ToolSession | None) -> AsyncIterator[dict[str, Any]]:
        reason = None
        try:
            async for out in handle:
                if tools is not None and out.finish_reason not in ("error", "abort"):
                    # tool calls are sent whole, in a message of their own, as Ollama does
                    content, calls = tools.ollama_events(0, out.text, out.finish_reason is not None)
                    if content or calls:
                        yield _delta(model, True, content, calls)
                elif out.text:
                    yield _delta(model, chat, out.text)
                if out.finish_reason == "error" or out.finish_reason == "abort":
                    yield _error_line(self.error_message(out)[0])
                    return
                if out.finish_reason is not None:
                    reason = out.finish_reason
            yield self._final(handle, model, reason, chat=chat)
        except Exception as exc:
            yield _error_line(self.exception_message(handle, exc))
        finally:
            await handle.aclose()

    async def _whole(self, handle: RequestHandle, model: str, chat: bool, tools: ToolSession | None) -> dict[str, Any]:
        result = await self.collect(handle)
        return self._final(handle, model, result.reasons[0], chat=chat, text="".join(result.texts[0]), tools=tools)
