"""The FastAPI application: factory, lifespan, middleware, error handlers, health/metrics/static.

Middleware, outermost first: request context (X-Request-Id, access log, catch-all 500) ->
CORS -> API-key auth -> request body size limit -> routes. All are plain ASGI, so streams
pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rillet import __version__
from rillet.config import EngineConfig, ServerConfig
from rillet.engine.errors import EngineDeadError, EngineNotReadyError
from rillet.server import faults
from rillet.server.errors import APIError, api_error_response, error_response, is_ollama_path
from rillet.server.metrics import CONTENT_TYPE_LATEST, Metrics
from rillet.server.serving import ServerState, Serving, request_id_var

__all__ = ["AppContext", "STATIC_DIR", "create_app", "request_id_var"]

logger = logging.getLogger("rillet.server")

STATIC_DIR = Path(__file__).parent / "static"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_QUIET_PATHS = ("/health", "/metrics")
REFUSED_BODY_DRAIN_BYTES = 64 << 20  # an oversized body is read and dropped up to this much before the 413
REFUSED_BODY_DRAIN_S = 5.0  # ... or for this long
ENGINE_WATCH_INTERVAL_S = 0.2  # how often the app checks that the engine loop is alive
DEAD_ENGINE_GRACE_S = 5.0  # after the engine dies, how long streams may take to send their error event


@dataclass
class AppContext:
    """What routes need, stored on `app.state.rillet`."""

    server_config: ServerConfig
    engine: Any
    serving: Serving
    metrics: Metrics
    state: ServerState
    start_task: asyncio.Task | None = None
    start_error: BaseException | None = None
    # Called once when the engine fails to start or dies while serving (the runner exits non-zero).
    on_engine_failure: Callable[[BaseException], None] | None = None
    watch_task: asyncio.Task | None = None


# ------------------------------------------------------------------ middleware


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class RequestContextMiddleware:
    """X-Request-Id (accepted or generated, echoed), arrival time, access log, and the catch-all:
    an exception before the response started becomes a clean JSON 500 (logged with its traceback)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival = time.perf_counter()
        raw = _header(scope, b"x-request-id")
        request_id = raw.decode("latin-1") if raw else ""
        if not _REQUEST_ID_RE.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {}).update(request_id=request_id, arrival=arrival)
        token = request_id_var.set(request_id)
        status = 0
        rid_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
            await send(message)

        path = scope.get("path", "")
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            logger.exception("[%s] unhandled error on %s %s", request_id, scope.get("method"), path)
            if status == 0:
                response = error_response(path, 500, f"internal server error (request id {request_id})",
                                          type="server_error")
                await response(scope, receive, send_wrapper)
        finally:
            level = logging.DEBUG if path in _QUIET_PATHS else logging.INFO
            if logger.isEnabledFor(level):
                logger.log(level, '[%s] "%s %s" %d %.1fms', request_id, scope.get("method"), path, status,
                           (time.perf_counter() - arrival) * 1000)
            request_id_var.reset(token)


class AuthMiddleware:
    """Bearer API key on /v1 and /api routes (constant-time compare); other paths stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") != "OPTIONS":
            path = scope.get("path", "")
            if path == "/v1" or path.startswith("/v1/") or is_ollama_path(path):
                auth = _header(scope, b"authorization") or b""
                token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
                if not hmac.compare_digest(token, self.key):
                    response = error_response(path, 401, "invalid or missing API key "
                                              "(send 'Authorization: Bearer <key>')",
                                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Read the whole body before routing and refuse it with 413 beyond `max_bytes`, counting
    while reading (so chunked uploads are cut off too); then replay it to the app.

    API bodies are JSON whatever their Content-Type says (`curl -d` sends form-urlencoded, and
    Ollama and OpenAI accept that), so the header is normalised for /v1 and /api routes."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await self._refuse(scope, receive, send, path, discard=True)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, path, discard=message.get("more_body", False))
                return
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False
        if body and (path.startswith("/v1/") or is_ollama_path(path)):
            content_type = _header(scope, b"content-type") or b""
            if b"json" not in content_type.lower():
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, path: str, discard: bool) -> None:
        if discard:
            # Read (and drop) the rest of the body first, within bounds: closing a connection with
            # unread input makes the kernel send a reset, and the client never sees the 413.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._discard_body(receive), REFUSED_BODY_DRAIN_S)
        response = error_response(path, 413, f"request body is larger than {self.max_bytes} bytes",
                                  code="request_too_large", headers={"Connection": "close"})
        await response(scope, receive, send)

    @staticmethod
    async def _discard_body(receive: Receive) -> None:
        discarded = 0
        while discarded < REFUSED_BODY_DRAIN_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return
            discarded += len(message.get("body", b""))


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

    @app.exception_handler(EngineNotReadyError)
    async def _not_ready(request: Request, exc: EngineNotReadyError) -> Response:
        return error_response(request.url.path, 503, f"the model is not ready: {exc}", code="not_ready",
                              headers={"Retry-After": "5"})

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError) -> Response:
        return error_response(request.url.path, 503, str(exc) or "the engine has stopped", code="engine_dead")

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
               engine: Any = None) -> FastAPI:
    """Build the ASGI app over an AsyncEngine (created from `engine_config` unless `engine` is given).

    The lifespan starts the engine in the background (/health answers 503 "loading" meanwhile)
    and shuts it down at exit. Mount it in your own app or run it with uvicorn.
    """
    server_config = server_config or ServerConfig()
    fault_env = os.environ.get(faults.ENV_VAR)
    if fault_env:
        faults.parse_fault_spec(fault_env)  # a typo fails at startup, not silently
    hook_installed = engine is None and bool(fault_env)
    if engine is None:
        from rillet.engine.async_engine import AsyncEngine

        engine = AsyncEngine(engine_config or EngineConfig(), core_setup=faults.install_in_core if fault_env else None)
    state = ServerState()
    metrics = Metrics(engine)
    ctx = AppContext(server_config=server_config, engine=engine, serving=Serving(engine, metrics, state),
                     metrics=metrics, state=state)

    async def watch_engine() -> None:
        """The engine loop can die while serving (e.g. repeated failed forward steps): then every
        stream gets its terminal error event, /health answers 503 "dead", and the server exits
        non-zero (through on_engine_failure) so that a supervisor restarts it."""
        while getattr(engine, "health", None) != "dead":
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
        reason = getattr(engine, "dead_reason", None) or "the engine loop stopped"
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
        if not hook_installed:
            faults.install_from_env(engine)
        ctx.watch_task = asyncio.create_task(watch_engine())
        logger.info("model %s ready (max_model_len %s)", engine.model_name, engine.max_model_len)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if getattr(engine, "health", None) != "ready":
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
