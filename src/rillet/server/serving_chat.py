"""POST /v1/chat/completions: messages, tools and output constraints in; a chat completion, or
its chunks over SSE, out (content and tool_calls, logprobs, usage)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from rillet.engine.outputs import RequestOutput, TokenLogprob
from rillet.engine.prompts import ChatPrompt
from rillet.protocol import openai as oa
from rillet.server.errors import APIError
from rillet.server.serving import OpenAIAnswer, RequestHandle, ServingBase, arrival_of, finite, openai_error_event
from rillet.server.structured_request import openai_structured
from rillet.server.tool_calls import ToolSession, openai_tool_message, plan_tools

__all__ = ["ServingChat", "chat_logprobs", "chat_prompt", "openai_messages"]

_ROLES = {"system", "user", "assistant", "developer", "tool"}


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [
        {"token": lp.token, "logprob": finite(lp.logprob), "bytes": list(lp.token.encode("utf-8")),
         "top_logprobs": [{"token": t, "logprob": finite(v), "bytes": list(t.encode("utf-8"))}
                          for _, t, v in lp.top]}
        for lp in entries]}


def _output_logprobs(out: RequestOutput, offset: int) -> dict[str, Any]:
    return chat_logprobs(out.logprobs or [])


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


def chat_prompt(body: oa.ChatCompletionRequest | oa.TokenizeRequest, messages: list[dict[str, Any]]
                ) -> list[dict[str, Any]] | ChatPrompt:
    """The messages, with vLLM's chat-template fields where the request sets any."""
    add_generation_prompt = body.add_generation_prompt is not False
    continue_final_message = bool(body.continue_final_message)
    kwargs = body.chat_template_kwargs
    if add_generation_prompt and not continue_final_message and kwargs is None:
        return messages
    try:
        return ChatPrompt(messages, add_generation_prompt, continue_final_message, kwargs or {})
    except ValueError as exc:
        message = str(exc)
        param = next((f for f in ("continue_final_message", "chat_template_kwargs") if message.startswith(f)),
                     "messages")
        raise APIError(400, message, param=param) from None


def openai_messages(messages: list[oa.ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages in the shape chat templates take (tool calls with arguments as objects)."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for the tool messages that answer them
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise APIError(400, f"unsupported message role {m.role!r}", param="messages")
        if m.content is None and m.role != "assistant":  # as OpenAI: only an assistant's may be null
            raise APIError(400, f"messages[{i}].content is null: a {m.role} message needs its text (a string "
                                "or a list of text parts)", param="messages")
        if m.role == "tool" or (m.role == "assistant" and m.tool_calls):
            out.append(openai_tool_message(i, m.role, _content_text(m), m.model_dump(), call_names))
            continue
        out.append({"role": "system" if m.role == "developer" else m.role, "content": _content_text(m)})
    return out


@dataclass
class _Chat(OpenAIAnswer):
    tools: ToolSession | None = None  # tool calls are parsed out of the text

    def chunk(self, choices: list[oa.ChatCompletionChunkChoice], usage: oa.Usage | None = None) -> dict[str, Any]:
        return self.dump(oa.ChatCompletionChunk(id=self.id, object="chat.completion.chunk", created=self.created,
                                                model=self.model, choices=choices), usage)

    def text_chunk(self, index: int, text: str) -> dict[str, Any]:
        """chunk([_choice(index, {"content": text})]), the streamed token's chunk, built directly."""
        return self.plain_chunk("chat.completion.chunk", {"index": index, "logprobs": None, "finish_reason": None,
                                                          "delta": {"content": text}})


def _choice(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
            finish_reason: str | None = None) -> oa.ChatCompletionChunkChoice:
    return oa.ChatCompletionChunkChoice(index=index, delta=oa.DeltaMessage.model_validate(delta), logprobs=logprobs,
                                        finish_reason=finish_reason)


class ServingChat(ServingBase):
    async def create(self, body: oa.ChatCompletionRequest, request: Request) -> Response:
        model = self.check_model(body.model)
        self.check_num_messages(len(body.messages))
        messages = openai_messages(body.messages)
        plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        structured, constraint_param = openai_structured(body, plan.structured if plan else None)
        params = body.to_sampling_params(structured)
        handle = await self.submit(chat_prompt(body, messages), params, prefix="chatcmpl", arrival=arrival_of(request),
                                   prompt_param="messages", tools=plan.tools if plan else None,
                                   constraint_param=constraint_param)
        chat = _Chat(id=handle.request_id, model=model, created=int(time.time()), n=params.n,
                     include_usage=bool(body.stream_options and body.stream_options.include_usage),
                     logprobs=params.logprobs is not None, tools=ToolSession(plan, params.n) if plan else None)
        return await self.respond(request, handle, bool(body.stream), lambda: self._events(handle, chat),
                                  lambda: self._whole(handle, chat))

    async def _events(self, handle: RequestHandle, chat: _Chat) -> AsyncIterator[dict[str, Any] | bytes]:
        try:
            for i in range(chat.n):
                yield chat.chunk([_choice(i, {"role": "assistant", "content": ""})])
            async for out in handle:
                reason = out.finish_reason
                if reason == "error" or reason == "abort":
                    if out.text:
                        yield chat.text_chunk(out.index, out.text)
                    message, code = self.error_message(out)
                    yield openai_error_event(message, code)
                    return
                if not out.text and reason is None and not out.logprobs:
                    continue
                if chat.tools is None and reason is None and not out.logprobs:
                    yield chat.text_event(out.index, out.text)  # most tokens: a template, no models
                    continue
                if chat.tools is not None:  # content and tool_calls parsed out of the text
                    deltas = chat.tools.openai_deltas(out.index, out.text, reason is not None) or [{}]
                    reason = chat.tools.finish_reason(out.index, reason)
                else:
                    deltas = [{"content": out.text} if out.text else {}]
                for delta in deltas[:-1]:
                    yield chat.chunk([_choice(out.index, delta)])
                logprobs = chat_logprobs(out.logprobs) if chat.logprobs and out.logprobs else None
                choice = _choice(out.index, deltas[-1], logprobs, reason)
                if reason is not None:
                    choice.stop_reason = out.stop_reason
                elif not deltas[-1] and logprobs is None:
                    continue  # held back (it may be tool-call markup): nothing to send yet
                yield chat.chunk([choice])
            if chat.include_usage:
                yield chat.chunk([], handle.usage())
        except Exception as exc:  # engine failure after the 200: a terminal error event, never a silent cut
            yield openai_error_event(self.exception_message(handle, exc), "engine_error")
        finally:
            await handle.aclose()

    async def _whole(self, handle: RequestHandle, chat: _Chat) -> dict[str, Any]:
        result = await self.collect(handle, _output_logprobs if chat.logprobs else None)
        choices = []
        for i in range(chat.n):
            text = "".join(result.texts[i])
            reason = result.reasons[i]
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if chat.tools is not None:
                message = chat.tools.openai_message(i, text)
                reason = chat.tools.finish_reason(i, reason)
            logprobs = {"content": [e for part in result.logprobs[i] for e in part["content"]]} \
                if chat.logprobs else None
            choices.append(oa.ChatCompletionChoice(index=i, message=oa.AssistantMessage.model_validate(message),
                                                   logprobs=logprobs, finish_reason=reason,
                                                   stop_reason=result.stop_reasons[i]))
        return oa.ChatCompletionResponse(id=chat.id, object="chat.completion", created=chat.created,
                                         model=chat.model, choices=choices, usage=handle.usage(),
                                         system_fingerprint=None).model_dump(exclude_unset=True)
