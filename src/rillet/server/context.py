"""`AppContext`: what the routes need, stored on `app.state.rillet` by `create_app`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from rillet.config import ServerConfig
from rillet.engine.engine_client import EngineClient
from rillet.server.metrics import Metrics
from rillet.server.model_info import ModelInfo
from rillet.server.serving import ServerState
from rillet.server.serving_chat import ServingChat
from rillet.server.serving_completion import ServingCompletion
from rillet.server.serving_ollama import ServingOllama
from rillet.server.serving_tokenize import ServingTokenize

__all__ = ["AppContext", "app_context"]


@dataclass
class AppContext:
    server_config: ServerConfig
    engine: EngineClient
    metrics: Metrics
    state: ServerState
    chat: ServingChat = field(init=False)
    completion: ServingCompletion = field(init=False)
    ollama: ServingOllama = field(init=False)
    tokens: ServingTokenize = field(init=False)
    start_task: asyncio.Task[None] | None = None
    start_error: BaseException | None = None
    # Called once when the engine fails to start or dies while serving (the runner exits non-zero).
    on_engine_failure: Callable[[BaseException], None] | None = None
    watch_task: asyncio.Task[None] | None = None
    model_info: ModelInfo | None = None  # read on the first /api/show, /api/tags or /api/ps

    def __post_init__(self) -> None:
        shared = (self.engine, self.metrics, self.state, self.server_config)
        self.chat = ServingChat(*shared)
        self.completion = ServingCompletion(*shared)
        self.ollama = ServingOllama(*shared)
        self.tokens = ServingTokenize(*shared)


def app_context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.rillet
    return ctx
