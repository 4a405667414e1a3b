"""A raw HTTP/1.1 client over asyncio sockets, for the reliability tests and scripts/soak.py:
it can vanish at any byte (mid-body, after the headers, after k events), stop reading, and
hold hundreds of connections without its own overhead dominating a 2-core machine. Also the
request bodies those runs send."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

__all__ = ["REFERENCE_PATH", "StreamResult", "chat_body", "completion_body", "http_request", "is_stream",
           "iter_body", "iter_lines", "long_prompt", "ollama_body", "read_head", "reference_body", "request_bytes",
           "split_url"]


def split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def request_bytes(method: str, path: str, body: bytes | None, headers: dict[str, str] | None = None,
                  content_length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body) if content_length is None else content_length}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), headers


async def iter_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while chunk := await reader.read(65536):
            yield chunk


async def iter_lines(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    buf = b""
    async for chunk in iter_body(reader, headers):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line
    if buf:
        yield buf


@dataclass
class StreamResult:
    """One request as the client saw it."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    events: list[Any] = field(default_factory=list)  # parsed SSE data / NDJSON objects; "[DONE]"
    body: Any = None  # non-streaming JSON body
    t_sent: float = 0.0
    t_head: float | None = None
    token_times: list[float] = field(default_factory=list)  # perf_counter of each event carrying text
    text: str = ""
    finish_reason: str | None = None
    error: Any = None  # the terminal error event / error body, if any
    done: bool = False  # [DONE] (SSE), done:true (NDJSON), or a complete JSON body
    exception: str | None = None  # client-side failure (connection reset...)
    closed_early: bool = False  # the client hung up on purpose

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.t_sent if self.token_times else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def ended_cleanly(self) -> bool:
        """A finish reason and the stream's end marker, or a terminal error event: never a silent cut."""
        if self.error is not None:
            return True
        return self.done and self.finish_reason is not None


def _content(obj: dict[str, Any]) -> tuple[str, str | None]:
    """(text delta, finish reason) of one OpenAI chunk / Ollama line / full body."""
    if "choices" in obj:
        if not obj["choices"]:
            return "", None
        c = obj["choices"][0]
        if "delta" in c:
            text = c["delta"].get("content") or ""
        elif "message" in c:
            text = c["message"].get("content") or ""
        else:
            text = c.get("text") or ""
        return text, c.get("finish_reason")
    if "message" in obj or "response" in obj:
        text = (obj.get("message") or {}).get("content") or obj.get("response") or ""
        return text, obj.get("done_reason") if obj.get("done") else None
    return "", None


def is_stream(path: str, body: dict[str, Any]) -> bool:
    """OpenAI routes stream only when asked; Ollama's stream unless told not to."""
    if path.startswith("/api/"):
        return body.get("stream") is not False
    return body.get("stream") is True


async def http_request(url: str, path: str, body: dict[str, Any] | bytes | None, *,
                       headers: dict[str, str] | None = None, method: str = "POST",
                       close_after_events: int | None = None, close_after_head: bool = False,
                       close_after_send: bool = False, timeout_s: float = 300.0,
                       res: StreamResult | None = None) -> StreamResult:
    """Send one request and read its answer (streamed or not), recording token timings in `res`
    (a fresh StreamResult unless given: pass one to watch a stream's progress while it runs).

    close_after_send / close_after_head / close_after_events: hang up at that point on purpose."""
    host, port = split_url(url)
    raw_body = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    streaming = isinstance(body, dict) and is_stream(path, body)
    res = res if res is not None else StreamResult()
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        res.t_sent = time.perf_counter()
        writer.write(request_bytes(method, path, raw_body, headers))
        await writer.drain()
        if close_after_send:
            res.closed_early = True
            return res
        async with asyncio.timeout(timeout_s):
            res.status, res.headers = await read_head(reader)
            res.t_head = time.perf_counter()
            if close_after_head:
                res.closed_early = True
                return res
            if res.status != 200 or not streaming:
                data = b"".join([c async for c in iter_body(reader, res.headers)])
                try:
                    res.body = json.loads(data) if data else None
                except ValueError:
                    res.body = data.decode("utf-8", "replace")
                if res.status != 200:
                    res.error = res.body
                elif isinstance(res.body, dict):
                    res.text, res.finish_reason = _content(res.body)
                    res.done = True
                return res
            sse = res.headers.get("content-type", "").startswith("text/event-stream")
            async for line in iter_lines(reader, res.headers):
                if sse:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        res.events.append("[DONE]")
                        res.done = True
                        continue
                    obj = json.loads(data)
                else:
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                res.events.append(obj)
                if "error" in obj:
                    res.error = obj
                    continue
                text, reason = _content(obj)
                if text:
                    res.text += text
                    res.token_times.append(time.perf_counter())
                if reason is not None:
                    res.finish_reason = reason
                if not sse and obj.get("done"):
                    res.done = True
                if close_after_events is not None and len(res.events) >= close_after_events:
                    res.closed_early = True
                    return res
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as exc:
        res.exception = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return res


# ------------------------------------------------------------------ request shapes


LONG_PROMPT_WORDS = ("river stone lantern orchard meadow harbor compass ember willow quarry "
                     "thistle beacon canyon glacier prairie tundra").split()


def long_prompt(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(LONG_PROMPT_WORDS) for _ in range(num_words))


def chat_body(content: str, max_tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": stream,
            **extra}


def completion_body(prompt: str, max_tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "stream": stream, **extra}


def ollama_body(content: str, max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "stream": stream,
            "options": {"num_predict": max_tokens, "temperature": 0.7}}


REFERENCE_PATH = "/v1/chat/completions"


def reference_body(max_tokens: int = 40) -> dict[str, Any]:
    """The well-behaved stream: greedy, a fixed length (ignore_eos), so its text can be compared."""
    return chat_body("List the planets of the solar system, one per line.", max_tokens, temperature=0,
                     ignore_eos=True)

