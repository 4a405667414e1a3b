"""Framing (SSE events, NDJSON lines, keep-alives) and the streaming ASGI response.

`StreamingBody` sends each chunk as soon as it is made and races the body against the
client: when `http.disconnect` arrives it cancels the body (whose cleanup aborts the
engine request) and calls `on_close`, like vLLM's `with_cancellation`. A client that stays
connected but stops reading is ended the same way once a send has been blocked for
`stall_timeout_s` (the server never buffers more than the socket and transport buffers).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = [
    "NDJSON_MEDIA_TYPE",
    "SSE_DONE",
    "SSE_KEEPALIVE",
    "SSE_MEDIA_TYPE",
    "STREAM_HEADERS",
    "EventTemplate",
    "StreamingBody",
    "ndjson_line",
    "ndjson_stream",
    "sse_event",
    "sse_stream",
]

logger = logging.getLogger("rillet.server")

SSE_MEDIA_TYPE = "text/event-stream"
NDJSON_MEDIA_TYPE = "application/x-ndjson"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def ndjson_line(obj: dict[str, Any]) -> bytes:
    return _dumps(obj).encode() + b"\n"


class EventTemplate:
    """The event of a chunk whose only varying field is one string, encoded once: each event is
    then prefix + the string's JSON + suffix, byte for byte what `encode(make(text))` gives (the
    JSON encoder's cost a streamed token saves; test_streaming_chunks holds them equal)."""

    _MARK = "\x00rillet-text\x00"  # no chunk field can hold it otherwise: JSON escapes it

    def __init__(self, make: Callable[[str], dict[str, Any]], encode: Callable[[dict[str, Any]], bytes]) -> None:
        parts = encode(make(self._MARK)).split(_dumps(self._MARK).encode())
        if len(parts) != 2:
            raise ValueError("the template string must appear exactly once in the chunk")
        self._prefix, self._suffix = parts

    def __call__(self, text: str) -> bytes:
        return self._prefix + _dumps(text).encode() + self._suffix


async def _framed(objects: AsyncIterator[dict[str, Any] | bytes], encode: Callable[[dict[str, Any]], bytes],
                  done: bytes | None) -> AsyncIterator[bytes]:
    """Each object encoded (bytes: an event already encoded, an EventTemplate's); an error object
    ends the stream (without `done`); closes `objects`."""
    try:
        async for obj in objects:
            if isinstance(obj, bytes):
                yield obj
                continue
            yield encode(obj)
            if "error" in obj:
                return
        if done is not None:
            yield done
    finally:
        await objects.aclose()  # type: ignore[attr-defined]


def sse_stream(objects: AsyncIterator[dict[str, Any] | bytes]) -> AsyncIterator[bytes]:
    """OpenAI framing: one `data:` event per object, `[DONE]` at the end, or an error event and no `[DONE]`."""
    return _framed(objects, sse_event, SSE_DONE)


def ndjson_stream(objects: AsyncIterator[dict[str, Any] | bytes]) -> AsyncIterator[bytes]:
    """Ollama framing: one JSON object per line; an error object is the last line."""
    return _framed(objects, ndjson_line, None)


class StreamingBody(Response):
    """Streams `body`; stops it when the client disconnects; optional keep-alive bytes when idle."""

    def __init__(self, body: AsyncIterator[bytes], *, media_type: str, status_code: int = 200,
                 headers: dict[str, str] | None = None, keepalive: bytes | None = None,
                 keepalive_interval_s: float = 15.0, stall_timeout_s: float | None = None,
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.body_iterator = body
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.keepalive = keepalive
        self.keepalive_interval_s = keepalive_interval_s
        self.stall_timeout_s = stall_timeout_s or None
        self.on_close = on_close
        self.client_disconnected = False
        self.client_stalled = False
        self.init_headers({**STREAM_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        lock = asyncio.Lock()
        last_send = loop.time()
        sending_since: float | None = None  # when the send in flight began (None: none in flight)

        async def send_body(chunk: bytes, more_body: bool = True) -> None:
            nonlocal last_send, sending_since
            async with lock:
                sending_since = loop.time()
                # blocks while the transport's write buffer is full (uvicorn's flow control)
                await send({"type": "http.response.body", "body": chunk, "more_body": more_body})
                sending_since = None
            last_send = loop.time()

        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send_body(chunk)
            await send_body(b"", more_body=False)

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        async def keepalive() -> None:
            interval = self.keepalive_interval_s
            while True:
                await asyncio.sleep(max(0.0, last_send + interval - loop.time()))
                if loop.time() - last_send >= interval:
                    await send_body(self.keepalive)  # type: ignore[arg-type]

        async def stall_watchdog() -> None:
            """A client that stops reading fills the socket and the transport buffer, then every
            send blocks; past `stall_timeout_s` the stream is ended (its engine request aborted),
            so a stalled reader holds neither a batch slot nor a growing queue of outputs."""
            timeout = self.stall_timeout_s
            assert timeout is not None
            while True:
                since = sending_since
                wait = timeout if since is None else since + timeout - loop.time()
                if since is not None and wait <= 0:
                    return
                await asyncio.sleep(min(max(wait, 0.05), 1.0))

        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(watch())
        ending = [pump_task, watch_task]  # the first of these to finish ends the response
        if self.stall_timeout_s:
            ending.append(asyncio.ensure_future(stall_watchdog()))
        tasks = list(ending)
        if self.keepalive:
            tasks.append(asyncio.ensure_future(keepalive()))
        try:
            await asyncio.wait(ending, return_when=asyncio.FIRST_COMPLETED)
            if not pump_task.done():
                if watch_task.done():
                    self.client_disconnected = True
                else:
                    self.client_stalled = True
                    logger.warning("the client has not read its stream for %.0fs: ending the stream and "
                                   "closing the connection", self.stall_timeout_s)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                if self.on_close is not None:
                    await self.on_close()
        if not pump_task.cancelled() and pump_task.exception() is not None:
            exc = pump_task.exception()
            if isinstance(exc, OSError):  # the connection broke while sending: a disconnect
                self.client_disconnected = True
                return
            raise exc  # type: ignore[misc]
