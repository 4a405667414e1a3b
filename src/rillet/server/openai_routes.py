"""OpenAI-compatible routes: thin handlers (parse, call serving, frame)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from rillet.protocol import openai as oa
from rillet.server.errors import APIError
from rillet.server.serving import OpenAIMeta, openai_messages, run_until_disconnect
from rillet.server.streaming import SSE_KEEPALIVE, SSE_MEDIA_TYPE, StreamingBody, sse_stream
from rillet.server.structured_request import openai_structured
from rillet.server.tool_calls import ToolSession, plan_tools

__all__ = ["router"]

router = APIRouter()


def _ctx(request: Request) -> Any:
    return request.app.state.rillet


def _arrival(request: Request) -> float:
    return request.scope.get("state", {}).get("arrival") or time.perf_counter()


def _model_card(ctx: Any) -> dict[str, Any]:
    engine = ctx.engine
    try:
        max_len = engine.max_model_len
    except Exception:
        max_len = None
    return {"id": engine.model_name, "object": "model", "created": ctx.state.created, "owned_by": "rillet",
            "max_model_len": max_len}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(_ctx(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    if model_id != ctx.engine.model_name:
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return _model_card(ctx)


async def _respond(request: Request, handle: Any, meta: OpenAIMeta, stream: bool, stream_fn: Any,
                   full_fn: Any) -> Response:
    if stream:
        return StreamingBody(sse_stream(stream_fn(handle, meta)), media_type=SSE_MEDIA_TYPE,
                             keepalive=SSE_KEEPALIVE, on_close=handle.aclose,
                             stall_timeout_s=_ctx(request).server_config.stream_stall_timeout_s)
    try:
        result = await run_until_disconnect(full_fn(handle, meta), request.receive)
    finally:
        await handle.aclose()
    if result is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    return JSONResponse(result)


@router.post("/v1/chat/completions")
async def chat_completions(body: oa.ChatCompletionRequest, request: Request) -> Response:
    serving = _ctx(request).serving
    model = serving.check_model(body.model)
    messages = openai_messages(body.messages, _ctx(request).engine.max_model_len)
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    structured, constraint_param = openai_structured(body, plan.structured if plan else None)
    params = serving.openai_params(body, structured)
    handle = await serving.submit(messages, params, prefix="chatcmpl", arrival=_arrival(request),
                                  prompt_param="messages", tools=plan.tools if plan else None,
                                  constraint_param=constraint_param)
    meta = OpenAIMeta(id=handle.request_id, model=model, created=int(time.time()), n=params.n,
                      include_usage=bool(body.stream_options and body.stream_options.include_usage),
                      logprobs=params.logprobs is not None, tools=ToolSession(plan, params.n) if plan else None)
    return await _respond(request, handle, meta, body.stream, serving.chat_stream, serving.chat_full)


@router.post("/v1/completions")
async def completions(body: oa.CompletionRequest, request: Request) -> Response:
    serving = _ctx(request).serving
    model = serving.check_model(body.model)
    prompt = serving.completion_prompt(body)
    structured, constraint_param = openai_structured(body)
    params = serving.openai_params(body, structured)
    handle = await serving.submit(prompt, params, prefix="cmpl", arrival=_arrival(request), prompt_param="prompt",
                                  constraint_param=constraint_param)
    meta = OpenAIMeta(id=handle.request_id, model=model, created=int(time.time()), n=params.n,
                      include_usage=bool(body.stream_options and body.stream_options.include_usage),
                      logprobs=params.logprobs is not None,
                      echo=prompt if body.echo and isinstance(prompt, str) else None)
    return await _respond(request, handle, meta, body.stream, serving.completion_stream, serving.completion_full)
