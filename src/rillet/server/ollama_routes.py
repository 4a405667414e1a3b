"""Ollama-compatible routes: /api/chat, /api/generate (NDJSON by default), /api/tags, /api/show, ..."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from rillet import __version__
from rillet.protocol import ollama as ol
from rillet.server.errors import APIError
from rillet.server.serving import check_num_messages, ollama_timestamp, run_until_disconnect
from rillet.server.streaming import NDJSON_MEDIA_TYPE, StreamingBody, ndjson_stream
from rillet.server.structured_request import ollama_structured
from rillet.server.tool_calls import ToolSession, ollama_message, plan_tools

__all__ = ["router"]

router = APIRouter()


def _ctx(request: Request) -> Any:
    return request.app.state.rillet


def _arrival(request: Request) -> float:
    return request.scope.get("state", {}).get("arrival") or time.perf_counter()


def _details() -> dict[str, Any]:
    return {"parent_model": "", "format": "", "family": "llama", "families": ["llama"], "parameter_size": "",
            "quantization_level": ""}


def _check_unsupported(body: ol.ChatRequest | ol.GenerateRequest) -> None:
    if getattr(body, "images", None):
        raise APIError(400, "images are not supported by this server", param="images")


def _load_response(model: str, chat: bool) -> dict[str, Any]:
    """What Ollama answers to an empty request: the model is loaded, nothing generated."""
    body: dict[str, Any] = {"model": model, "created_at": ollama_timestamp(), "done": True, "done_reason": "load"}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return body


async def _run(request: Request, prompt: Any, body: ol.ChatRequest | ol.GenerateRequest, model: str,
               chat: bool) -> Response:
    serving = _ctx(request).serving
    params = serving.ollama_params(body.options)
    structured = ollama_structured(body.format)
    if structured is not None:
        params = dataclasses.replace(params, structured=structured)
    plan = plan_tools(getattr(body, "tools", None))  # Ollama has no tool_choice: "auto"
    tools = ToolSession(plan, 1) if plan else None
    handle = await serving.submit(prompt, params, prefix="ollama", arrival=_arrival(request),
                                  prompt_param="messages" if chat else "prompt",
                                  tools=plan.tools if plan else None, constraint_param="format")
    if body.stream is not False:  # default (and null): stream
        return StreamingBody(ndjson_stream(serving.ollama_stream(handle, model, chat=chat, tools=tools)),
                             media_type=NDJSON_MEDIA_TYPE, on_close=handle.aclose,
                             stall_timeout_s=_ctx(request).server_config.stream_stall_timeout_s)
    try:
        result = await run_until_disconnect(serving.ollama_full(handle, model, chat=chat, tools=tools),
                                            request.receive)
    finally:
        await handle.aclose()
    if result is None:
        return Response(status_code=499)
    return JSONResponse(result)


@router.post("/api/chat")
async def chat(body: ol.ChatRequest, request: Request) -> Response:
    serving = _ctx(request).serving
    model = serving.check_model(body.model, ollama=True)
    _check_unsupported(body)
    if not body.messages:
        return JSONResponse(_load_response(model, chat=True))
    check_num_messages(len(body.messages), _ctx(request).engine.max_model_len)
    for m in body.messages:
        if m.images:
            raise APIError(400, "images are not supported by this server", param="messages")
    messages = [ollama_message(i, m) for i, m in enumerate(body.messages)]
    return await _run(request, messages, body, model, chat=True)


@router.post("/api/generate")
async def generate(body: ol.GenerateRequest, request: Request) -> Response:
    serving = _ctx(request).serving
    model = serving.check_model(body.model, ollama=True)
    _check_unsupported(body)
    if not body.prompt and not (body.system and not body.raw):
        return JSONResponse(_load_response(model, chat=False))
    if body.raw:
        prompt: Any = body.prompt
    else:
        prompt = ([{"role": "system", "content": body.system}] if body.system else [])
        prompt.append({"role": "user", "content": body.prompt or ""})
    return await _run(request, prompt, body, model, chat=False)


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    name = ctx.engine.model_name
    return {"models": [{"name": name, "model": name, "modified_at": ollama_timestamp(ctx.state.created),
                        "size": 0, "digest": "", "details": _details()}]}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    name = ctx.engine.model_name
    return {"models": [{"name": name, "model": name, "size": 0, "digest": "", "details": _details(),
                        "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0,
                        "context_length": ctx.engine.max_model_len}]}


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.post("/api/show")
async def show(body: ol.ShowRequest, request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    model = ctx.serving.check_model(body.model or body.name, ollama=True)
    template = ""
    try:
        template = getattr(ctx.engine.tokenizer, "chat_template", None) or ""
    except Exception:
        pass
    return {"modelfile": f"FROM {model}\n", "parameters": "", "template": template, "details": _details(),
            "model_info": {"general.architecture": "llama", "llama.context_length": ctx.engine.max_model_len},
            "capabilities": ["completion", "tools"], "modified_at": ollama_timestamp(ctx.state.created)}
