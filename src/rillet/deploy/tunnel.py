"""HTTP requests carried to an engine replica and run through its own rillet app (no Ray here).

The ingress reads the client's request (method, path, headers, body) into a `TunnelRequest`,
a plain picklable object that the replica router can read (its `prompt` is the routing
text), and sends it to a replica. The replica runs it through the same `create_app` ASGI app
as `rillet serve` (`run_asgi`), so every OpenAI and Ollama route, its validation, errors and
framing are the ones a single server has, and streams the ASGI messages back as they are
sent: first `ResponseStart` (status, headers), then body chunks.

When the ingress stops reading (its client went away), closing the generator sends
`http.disconnect` to the app, whose stream then aborts the engine request, as it does for a
direct client. `error_event` frames the terminal error a stream ends with when its replica
dies after the 200 has gone out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ResponseStart", "TunnelRequest", "error_event", "is_stream", "label_metrics", "merge_metrics",
           "run_asgi"]

DISCONNECT_GRACE_S = 5.0  # after http.disconnect, how long the app may take to end before it is cancelled
SSE_MEDIA_TYPE = "text/event-stream"
NDJSON_MEDIA_TYPE = "application/x-ndjson"


@dataclass
class TunnelRequest:
    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None
    prompt: str = ""  # routing text (named like Ray's LLM requests, whose routers read `.prompt`)
    target_replica: str | None = None  # route to this replica only (/health and /metrics fan-out)


@dataclass
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]
    replica: str = ""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def is_stream(start: ResponseStart) -> bool:
    media = (start.header(b"content-type") or b"").decode("latin-1")
    return media.startswith((SSE_MEDIA_TYPE, NDJSON_MEDIA_TYPE))


def error_event(start: ResponseStart | None, message: str) -> bytes:
    """The terminal event of a stream cut by a replica's death, in the stream's own framing."""
    media = (start.header(b"content-type") or b"").decode("latin-1") if start else ""
    if media.startswith(NDJSON_MEDIA_TYPE):
        return json.dumps({"error": message}).encode() + b"\n"
    error = {"error": {"message": message, "type": "server_error", "param": None, "code": "replica_died"}}
    return b"data: " + json.dumps(error).encode() + b"\n\n"


async def run_asgi(app: Any, request: TunnelRequest, replica: str = "",
                   interval_s: float = 0.0) -> AsyncIterator[ResponseStart | bytes]:
    """Run one request through an ASGI app; yield its ResponseStart, then its body chunks.

    `interval_s` > 0 batches the body: a chunk that comes within `interval_s` of the last one
    yielded waits, and every chunk that arrives meanwhile goes out with it as one item. Each
    item costs the Ray hops a fixed price (serialisation, a message to the ingress and on to
    the proxy) that one token's SSE event cannot carry at thousands of tokens a second; Ray
    Serve LLM batches its streams the same way (50 ms by default). The first chunk after a
    quiet interval is not held, so the first token's latency is unchanged.

    Closing the generator early (the caller's client disconnected) sends `http.disconnect`
    and gives the app DISCONNECT_GRACE_S to clean up (abort the engine request)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path,
        "raw_path": request.path.encode(), "query_string": request.query_string,
        "root_path": "", "headers": list(request.headers), "client": request.client,
        "server": ("rillet-replica", 80), "state": {},
    }
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    async def call() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(call())
    loop = asyncio.get_running_loop()
    held: list[bytes] = []  # body chunks waiting for the interval to pass
    last_yield = -float("inf")
    try:
        while True:
            if held:
                wait = last_yield + interval_s - loop.time()
                if wait <= 0:
                    yield b"".join(held)
                    held.clear()
                    last_yield = loop.time()
                    continue
                try:
                    message = await asyncio.wait_for(messages.get(), wait)
                except asyncio.TimeoutError:
                    continue
            else:
                message = await messages.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], [(bytes(k), bytes(v)) for k, v in message.get("headers", [])],
                                    replica)
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    if held or loop.time() - last_yield < interval_s:
                        held.append(bytes(chunk))
                    else:
                        yield bytes(chunk)
                        last_yield = loop.time()
                if not message.get("more_body", False):
                    break
        if held:
            yield b"".join(held)
        await task
    finally:
        if not task.done():
            disconnected.set()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), DISCONNECT_GRACE_S)
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


# ------------------------------------------------------------------ /metrics of many replicas


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def label_metrics(text: str, replica: str) -> list[tuple[str, list[str]]]:
    """One replica's Prometheus text as (family header lines, labelled sample lines) per family."""
    families: list[tuple[str, list[str]]] = []
    headers: dict[str, list[str]] = {}
    label = f'replica="{_escape(replica)}"'
    current: list[str] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if name not in headers:
                    headers[name] = []
                    current = []
                    families.append((name, current))
                headers[name].append(line)
            continue
        name, sep, rest = line.partition("{")
        if sep:
            sample = f"{name}{{{label},{rest}" if not rest.startswith("}") else f"{name}{{{label}{rest}"
        else:
            metric, _, value = line.partition(" ")
            sample = f"{metric}{{{label}}} {value}"
        if current is None:
            current = []
            families.append(("", current))
        current.append(sample)
    return [("\n".join(headers.get(name, [])), samples) for name, samples in families]


def merge_metrics(per_replica: dict[str, str]) -> str:
    """Every replica's metrics in one exposition, each sample labelled `replica="<id>"`; the
    samples of one family stay together under one HELP/TYPE header, as Prometheus requires."""
    order: list[str] = []
    merged: dict[str, list[str]] = {}
    for replica, text in sorted(per_replica.items()):
        for header, samples in label_metrics(text, replica):
            if header not in merged:
                merged[header] = [header] if header else []
                order.append(header)
            merged[header].extend(samples)
    return "".join("\n".join(merged[h]) + "\n" for h in order)
