"""The app's ASGI middleware, outermost first: request context (X-Request-Id, access log,
catch-all 500) -> CORS (Starlette's) -> API-key auth -> request body size limit -> routes.

All are plain ASGI, so streams pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import logging
import re
import time
import uuid
from typing import cast

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rillet.server.errors import error_response, is_api_path

__all__ = ["AuthMiddleware", "BodyLimitMiddleware", "RequestContextMiddleware", "request_id_var"]

logger = logging.getLogger("rillet.server")

# The X-Request-Id of the request being handled (set by RequestContextMiddleware).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("rillet_request_id", default="-")

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_QUIET_PATHS = ("/health", "/metrics")
REFUSED_BODY_DRAIN_BYTES = 64 << 20  # an oversized body is read and dropped up to this much before the 413
REFUSED_BODY_DRAIN_S = 5.0  # ... or for this long


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return cast(bytes, value)
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
    """Bearer API key on the API routes (/v1, /api, /tokenize, /detokenize; constant-time
    compare); other paths (the page, /health, /metrics) stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") != "OPTIONS":
            path = scope.get("path", "")
            if is_api_path(path):
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
    Ollama and OpenAI accept that), so the header is normalised for the API routes."""

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
        if body and is_api_path(path):
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
