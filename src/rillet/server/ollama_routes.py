"""Ollama-compatible routes: /api/chat, /api/generate (NDJSON by default), /api/tags, /api/show, ..."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.responses import Response

from rillet import __version__
from rillet.protocol import ollama as ol
from rillet.server.context import AppContext, app_context
from rillet.server.model_info import ModelInfo, read_model_info
from rillet.server.serving import ollama_timestamp

__all__ = ["router"]

router = APIRouter()


async def _model_info(ctx: AppContext) -> ModelInfo:
    """Read once, off the event loop (it reads the model's config and safetensors headers)."""
    if ctx.model_info is None:
        ctx.model_info = await asyncio.to_thread(read_model_info, ctx.engine)
    return ctx.model_info


@router.post("/api/chat")
async def chat(body: ol.ChatRequest, request: Request) -> Response:
    return await app_context(request).ollama.chat(body, request)


@router.post("/api/generate")
async def generate(body: ol.GenerateRequest, request: Request) -> Response:
    return await app_context(request).ollama.generate(body, request)


@router.get("/api/tags")
async def tags(request: Request) -> ol.TagsResponse:
    ctx = app_context(request)
    name = ctx.engine.model_name
    details = (await _model_info(ctx)).details()
    return ol.TagsResponse(models=[ol.TagsModel(name=name, model=name, modified_at=ollama_timestamp(ctx.state.created),
                                                size=0, digest="", details=details)])


@router.get("/api/ps")
async def ps(request: Request) -> ol.PsResponse:
    ctx = app_context(request)
    name = ctx.engine.model_name
    details = (await _model_info(ctx)).details()
    return ol.PsResponse(models=[ol.PsModel(name=name, model=name, size=0, digest="", details=details,
                                            expires_at="2999-01-01T00:00:00Z", size_vram=0,
                                            context_length=ctx.engine.max_model_len)])


@router.get("/api/version")
async def version() -> ol.VersionResponse:
    return ol.VersionResponse(version=__version__)


@router.post("/api/show")
async def show(body: ol.ShowRequest, request: Request) -> ol.ShowResponse:
    ctx = app_context(request)
    model = ctx.ollama.check_model(body.model or body.name, ollama=True)
    template = ""
    try:
        template = getattr(ctx.engine.tokenizer, "chat_template", None) or ""
    except Exception:
        pass
    info = await _model_info(ctx)
    return ol.ShowResponse(modelfile=f"FROM {model}\n", parameters="", template=template, details=info.details(),
                           model_info=info.model_info(), capabilities=["completion", "tools"],
                           modified_at=ollama_timestamp(ctx.state.created))
