"""POST /v1/completions: a prompt (text or token ids), or a list of them, in; text completions,
or their chunks over SSE, out (echo, logprobs with text offsets, usage). Each prompt of a list
is its own engine request (server/handle_group.py), its n choices numbered after the prompts
before it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from rillet.engine.outputs import RequestOutput, TokenLogprob
from rillet.protocol import openai as oa
from rillet.server.handle_group import HandleGroup
from rillet.server.serving import OpenAIAnswer, RequestHandle, ServingBase, arrival_of, finite, openai_error_event
from rillet.server.structured_request import openai_structured

__all__ = ["ServingCompletion", "completion_logprobs"]


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for lp in entries:
        tokens.append(lp.token)
        token_logprobs.append(finite(lp.logprob))
        top.append({t: finite(v) for _, t, v in lp.top} if lp.top else None)
        text_offset.append(offset)
        offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset}


def _output_logprobs(out: RequestOutput, offset: int) -> dict[str, Any]:
    return completion_logprobs(out.logprobs or [], offset)


def _merge_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not parts:
        return None
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for k in merged:
            merged[k].extend(p[k])
    return merged


@dataclass
class _Completion(OpenAIAnswer):
    echoes: list[str] | None = None  # echo: true: each choice's prompt, sent first ("" for token ids)

    def chunk(self, choices: list[oa.CompletionChoice], usage: oa.Usage | None = None) -> dict[str, Any]:
        return self.dump(oa.CompletionChunk(id=self.id, object="text_completion", created=self.created,
                                            model=self.model, choices=choices), usage)

    def text_chunk(self, index: int, text: str) -> dict[str, Any]:
        """chunk([_choice(index, text)]), the streamed token's chunk, built directly."""
        return self.plain_chunk("text_completion", {"index": index, "logprobs": None, "finish_reason": None,
                                                    "text": text})


def _choice(index: int, text: str, logprobs: dict[str, Any] | None = None,
            finish_reason: str | None = None) -> oa.CompletionChoice:
    return oa.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)


class ServingCompletion(ServingBase):
    async def create(self, body: oa.CompletionRequest, request: Request) -> Response:
        model = self.check_model(body.model)
        prompts = body.prompts()
        structured, constraint_param = openai_structured(body)
        params = body.to_sampling_params(structured)
        arrival = arrival_of(request)
        handles: list[RequestHandle] = []
        try:
            for prompt in prompts:  # all admitted, or none: a refusal ends those admitted before it
                handles.append(await self.submit(prompt, params, prefix="cmpl", arrival=arrival,
                                                 prompt_param="prompt", constraint_param=constraint_param))
        except BaseException:  # a refusal, an engine failure or a cancelled request: none left running
            for admitted in handles:
                await admitted.aclose()
            raise
        handle: RequestHandle | HandleGroup = handles[0] if len(handles) == 1 else HandleGroup(handles)
        echoes = None
        if body.echo:
            echoes = [prompt if isinstance(prompt, str) else "" for prompt in prompts for _ in range(params.n)]
        completion = _Completion(id=handle.request_id, model=model, created=int(time.time()), n=handle.n,
                                 include_usage=bool(body.stream_options and body.stream_options.include_usage),
                                 logprobs=params.logprobs is not None, echoes=echoes)
        return await self.respond(request, handle, bool(body.stream), lambda: self._events(handle, completion),
                                  lambda: self._whole(handle, completion))

    async def _events(self, handle: RequestHandle | HandleGroup, completion: _Completion
                      ) -> AsyncIterator[dict[str, Any] | bytes]:
        offsets = [0] * completion.n
        try:
            for i, echo in enumerate(completion.echoes or ()):
                if echo:
                    offsets[i] = len(echo)
                    yield completion.chunk([_choice(i, echo)])
            async for out in handle:
                reason = out.finish_reason
                if reason == "error" or reason == "abort":
                    if out.text:
                        yield completion.text_chunk(out.index, out.text)
                    yield openai_error_event(*self.error_message(out))
                    return
                if reason is None and not out.logprobs:
                    if out.text:  # most tokens: a template, no models
                        offsets[out.index] += len(out.text)
                        yield completion.text_event(out.index, out.text)
                    continue
                logprobs = None
                if completion.logprobs and out.logprobs:
                    logprobs = completion_logprobs(out.logprobs, offsets[out.index])
                offsets[out.index] += len(out.text)
                choice = _choice(out.index, out.text, logprobs, reason)
                if reason is not None:
                    choice.stop_reason = out.stop_reason
                yield completion.chunk([choice])
            if completion.include_usage:
                yield completion.chunk([], handle.usage())
        except Exception as exc:
            yield openai_error_event(self.exception_message(handle, exc), "engine_error")
        finally:
            await handle.aclose()

    async def _whole(self, handle: RequestHandle | HandleGroup, completion: _Completion) -> dict[str, Any]:
        echoes = completion.echoes or [""] * completion.n
        result = await self.collect(handle, _output_logprobs, offsets=[len(echo) for echo in echoes])
        choices = [oa.CompletionChoice(index=i, text=echoes[i] + "".join(result.texts[i]),
                                       logprobs=_merge_logprobs(result.logprobs[i]) if completion.logprobs else None,
                                       finish_reason=result.reasons[i], stop_reason=result.stop_reasons[i])
                   for i in range(completion.n)]
        return oa.CompletionResponse(id=completion.id, object="text_completion", created=completion.created,
                                     model=completion.model, choices=choices,
                                     usage=handle.usage()).model_dump(exclude_unset=True)
