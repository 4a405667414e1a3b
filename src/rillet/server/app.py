"""The FastAPI application: factory, lifespan, error handlers, health/metrics/static.

The middleware lives in `rillet.server.middleware`, the routes in `openai_routes` and
`ollama_routes` (one call each into the serving classes of `AppContext`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from rillet import __version__
from rillet.config import EngineConfig, ServerConfig
from rillet.engine.engine_client import EngineClient
from rillet.engine.errors import EngineDeadError, EngineNotReadyError
from rillet.protocol.errors import ParamError
from rillet.server import faults
from rillet.server.context import AppContext
from rillet.server.errors import APIError, api_error_response, engine_refusal, error_response, is_ollama_path, \
    param_error
from rillet.server.metrics import CONTENT_TYPE_LATEST, Metrics
from rillet.server.middleware import AuthMiddleware, BodyLimitMiddleware, RequestContextMiddleware, request_id_var
from rillet.server.serving import ServerState

__all__ = ["AppContext", "BodyLimitMiddleware", "STATIC_DIR", "create_app", "request_id_var"]

logger = logging.getLogger("rillet.server")

STATIC_DIR = Path(__file__).parent / "static"
ENGINE_WATCH_INTERVAL_S = 0.2  # how often the app checks that the engine loop is alive
DEAD_ENGINE_GRACE_S = 5.0  # after the engine dies, how long streams may take to send their error event


# ------------------------------------------------------------------ error handlers


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, bool]:
    parts, param, bad_json = [], None, False
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            bad_json = True
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = loc[0]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    if bad_json:
        return "request body is not valid JSON", None, True
    return "; ".join(parts) or "invalid request", param, False


def _body_parse_message(cause: BaseException) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return f"request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset {cause.start})"
    if isinstance(cause, RecursionError):
        return "request body is nested too deeply to parse"
    if isinstance(cause, ValueError) and "digits" in str(cause):  # int() refuses > 4300 digits
        return "request body holds a number too long to parse"
    return "request body could not be parsed as JSON"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return api_error_response(request.url.path, exc)

    @app.exception_handler(ParamError)
    async def _param(request: Request, exc: ParamError) -> Response:
        return api_error_response(request.url.path, param_error(exc))

    @app.exception_handler(EngineNotReadyError)
    @app.exception_handler(EngineDeadError)
    async def _engine_unavailable(request: Request, exc: EngineNotReadyError | EngineDeadError) -> Response:
        return api_error_response(request.url.path, engine_refusal(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        message, param, bad_json = _validation_message(exc)
        path = request.url.path
        status = 400 if bad_json or is_ollama_path(path) else 422
        return error_response(path, status, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        path = request.url.path
        if exc.status_code == 404:
            message = f"no route {request.method} {path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {path}"
        elif exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not decode the body
            message = _body_parse_message(exc.__cause__)
        else:
            message = str(exc.detail)
        return error_response(path, exc.status_code, message, headers=getattr(exc, "headers", None))


# ------------------------------------------------------------------ factory


def create_app(server_config: ServerConfig | None = None, engine_config: EngineConfig | None = None, *,
               engine: EngineClient | None = None, serve_once_ready: bool = False) -> FastAPI:
    """Build the ASGI app over an engine: an AsyncEngine created from `engine_config` unless
    `engine` (any EngineClient) is given.

    The lifespan starts the engine in the background (/health answers 503 "loading" meanwhile),
    or with `serve_once_ready` before the server accepts a connection (the API servers beside
    the first, rillet.server.api_servers: the first answers "loading" for all of them), and
    shuts it down at exit. Mount it in your own app or run it with uvicorn.
    """
    server_config = server_config or ServerConfig()
    fault_env = os.environ.get(faults.ENV_VAR)
    if fault_env:
        faults.parse_fault_spec(fault_env)  # a typo fails at startup, not silently
    if engine is None:
        from rillet.engine.async_engine import AsyncEngine

        # the test hook goes in through core_setup, in whichever thread or process runs the core
        engine = AsyncEngine(engine_config or EngineConfig(), core_setup=faults.install_in_core if fault_env else None)
    elif fault_env:
        logger.warning("%s=%s ignored: the engine was built by the caller (give it core_setup=%s.install_in_core)",
                       faults.ENV_VAR, fault_env, faults.__name__)
    state = ServerState()
    metrics = Metrics(engine)
    ctx = AppContext(server_config=server_config, engine=engine, metrics=metrics, state=state)

    async def watch_engine() -> None:
        """The engine loop can die while serving (e.g. repeated failed forward steps): then every
        stream gets its terminal error event, /health answers 503 "dead", and the server exits
        non-zero (through on_engine_failure) so that a supervisor restarts it."""
        while engine.health != "dead":
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
        reason = engine.dead_reason or "the engine loop stopped"
        logger.error("the engine died (%s); ending %d request(s), then exiting so a supervisor can restart "
                     "the server", reason, len(state.active))
        if not await state.wait_idle(DEAD_ENGINE_GRACE_S):
            logger.error("%d request(s) still open after %.0fs", len(state.active), DEAD_ENGINE_GRACE_S)
        if ctx.on_engine_failure is not None:
            ctx.on_engine_failure(RuntimeError(f"the engine died: {reason}"))

    async def start_engine() -> None:
        try:
            await engine.start()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            ctx.start_error = exc
            # configuration mistakes (bad model path...) read better without a traceback
            logger.error("the engine failed to start: %s", exc,
                         exc_info=None if isinstance(exc, (ValueError, OSError)) else exc)
            if ctx.on_engine_failure is not None:
                ctx.on_engine_failure(exc)
            return
        ctx.watch_task = asyncio.create_task(watch_engine())
        logger.info("model %s ready (max_model_len %s)", engine.model_name, engine.max_model_len)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine.health != "ready" and serve_once_ready:
            await start_engine()
        elif engine.health != "ready":
            ctx.start_task = asyncio.create_task(start_engine())
        else:
            ctx.watch_task = asyncio.create_task(watch_engine())
        try:
            yield
        finally:
            state.draining = True
            for task in (ctx.start_task, ctx.watch_task):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            try:
                await engine.shutdown()
            except Exception:
                logger.exception("engine shutdown failed")

    app = FastAPI(title="rillet", version=__version__, lifespan=lifespan,
                  summary="OpenAI- and Ollama-compatible streaming LLM server")
    app.state.rillet = ctx

    # add_middleware puts each one outside the previous: add innermost first
    app.add_middleware(BodyLimitMiddleware, max_bytes=server_config.max_request_bytes)
    if server_config.api_key:
        app.add_middleware(AuthMiddleware, api_key=server_config.api_key)
    if server_config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=server_config.allowed_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"],
                           expose_headers=["X-Request-Id", "Retry-After"])
    app.add_middleware(RequestContextMiddleware)
    _install_error_handlers(app)

    from rillet.server import ollama_routes, openai_routes

    app.include_router(openai_routes.router)
    app.include_router(ollama_routes.router)

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        status = engine.health
        if state.draining and status != "dead":
            status = "draining"
        if status == "stopped" and ctx.start_task is not None and not ctx.start_task.done():
            status = "loading"  # start() is scheduled but has not run yet
        if status == "ready":
            return JSONResponse({"status": "ready", "model": engine.model_name})
        body: dict[str, Any] = {"status": status}
        if ctx.start_error is not None:
            body["error"] = str(ctx.start_error)
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"} if status == "loading" else None)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            return error_response("/", 404, "no chat page is installed (static/index.html is missing)")
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
