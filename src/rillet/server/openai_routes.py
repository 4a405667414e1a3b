"""OpenAI-compatible routes: thin handlers (parse, one call to serving)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from rillet.protocol import openai as oa
from rillet.server.context import AppContext, app_context
from rillet.server.errors import APIError

__all__ = ["router"]

router = APIRouter()


def _model_card(ctx: AppContext) -> oa.ModelCard:
    engine = ctx.engine
    try:
        max_len: int | None = engine.max_model_len
    except Exception:
        max_len = None
    return oa.ModelCard(id=engine.model_name, object="model", created=ctx.state.created, owned_by="rillet",
                        max_model_len=max_len)


@router.get("/v1/models")
async def list_models(request: Request) -> oa.ModelList:
    return oa.ModelList(object="list", data=[_model_card(app_context(request))])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> oa.ModelCard:
    ctx = app_context(request)
    if model_id != ctx.engine.model_name:
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return _model_card(ctx)


@router.post("/v1/chat/completions")
async def chat_completions(body: oa.ChatCompletionRequest, request: Request) -> Response:
    return await app_context(request).chat.create(body, request)


@router.post("/v1/completions")
async def completions(body: oa.CompletionRequest, request: Request) -> Response:
    return await app_context(request).completion.create(body, request)


@router.post("/tokenize")
async def tokenize(body: oa.TokenizeRequest, request: Request) -> oa.TokenizeResponse:
    return await app_context(request).tokens.tokenize(body)


@router.post("/detokenize")
async def detokenize(body: oa.DetokenizeRequest, request: Request) -> oa.DetokenizeResponse:
    return await app_context(request).tokens.detokenize(body)
