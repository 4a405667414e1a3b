"""The one fake OpenAI/Ollama-compatible server of the tests (tests/client, tests/browser): no
model, a canned answer streamed piece by piece, and failures on demand.

- `/v1/chat/completions`, `/v1/completions` (SSE when `stream`), `/api/chat`, `/api/generate`
  (NDJSON unless `stream` is false), `/v1/models`, `/health`;
- `/` and `/static/<file>`: the package's real chat page, so the browser tests can load it.

`FakeState` steers it: `fail_next` requests answer `fail_status` (with `Retry-After:
retry_after`) first, `stream_error` cuts a stream with an error event, `answer(messages)` gives
the text (split into pieces by `pieces_of`), `token_delay_s` paces the pieces ("slow" in the
question: 0.25 s), and `requests` records every body (`request_headers` their headers).

Run it by hand for the chat page: `.venv/bin/python -m support.fake_openai 8765` (from tests/).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import rillet.server

__all__ = ["ANSWER", "MODEL_ID", "FakeServer", "FakeState", "make_app", "markdown_answer", "pieces_of"]

MODEL_ID = "fake-model"
ANSWER = "Hello there, caf\u00e9 friend!"
STATIC_DIR = Path(rillet.server.__file__).resolve().parent / "static"
PROMPT_TOKENS = 3


def pieces_of(text: str) -> list[str]:
    """Words with their leading space, punctuation on its own: "Hello", " there", ",", ..."""
    out: list[str] = []
    for ch in text:
        if out and (ch.isalnum() or ch in "\u00e9'") and (out[-1][-1].isalnum() or out[-1][-1] in "\u00e9'"):
            out[-1] += ch
        elif out and out[-1] == " ":
            out[-1] += ch
        else:
            out.append(ch)
    return out


def markdown_answer(messages: list[dict]) -> str:
    """The browser tests' answer: the question echoed, then some Markdown."""
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    return (f"You said: {last}\n\nHere is **bold**, *italic* and `code`:\n\n- one\n- two\n\n"
            "```python\nprint('hi')\n```\n")


class FakeState:
    def __init__(self, answer: Callable[[list[dict]], str] = lambda messages: ANSWER,
                 token_delay_s: float = 0.0) -> None:
        self.answer = answer
        self.token_delay_s = token_delay_s
        self.fail_next = 0  # answer this many requests with fail_status first
        self.fail_status = 429
        self.retry_after: str | None = "0"
        self.stream_error = False  # cut the stream with an error event after the first piece
        self.requests: list[dict] = []
        self.request_headers: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def reset(self) -> None:
        self.fail_next, self.fail_status, self.retry_after, self.stream_error = 0, 429, "0", False
        self.requests.clear()
        self.request_headers.clear()

    def take_failure(self) -> bool:
        with self.lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return True
            return False

    def reply(self, body: dict, limit: int | None) -> tuple[list[str], str, float]:
        """(pieces, finish reason, delay per piece) for a request body."""
        messages = body.get("messages") or [{"role": "user", "content": body.get("prompt", "")}]
        pieces = pieces_of(self.answer(messages))
        cut = pieces[:limit] if limit else pieces
        slow = "slow" in str(messages[-1].get("content", "")) if messages else False
        return cut, ("length" if len(cut) < len(pieces) else "stop"), (
            0.25 if slow else self.token_delay_s)


def make_app(state: FakeState) -> Starlette:
    async def record(request: Request) -> dict:
        body = await request.json()
        state.requests.append(body)
        state.request_headers.append(dict(request.headers))
        return body

    def failure(ollama: bool) -> Response:
        headers = {"Retry-After": state.retry_after} if state.retry_after is not None else {}
        error: Any = "server busy" if ollama else {"message": "server busy", "type": "rate_limit", "param": None,
                                                   "code": state.fail_status}
        return JSONResponse({"error": error}, status_code=state.fail_status, headers=headers)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def static(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        file = (STATIC_DIR / name).resolve()
        if file.parent != STATIC_DIR or not file.is_file():
            return JSONResponse({"error": {"message": "not found", "type": "not_found", "code": 404}}, 404)
        return FileResponse(file, headers={"Cache-Control": "no-cache"})

    async def openai(request: Request) -> Response:
        body = await record(request)
        if state.take_failure():
            return failure(ollama=False)
        chat = request.url.path.endswith("/chat/completions")
        pieces, finish, delay = state.reply(body, body.get("max_tokens"))
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(pieces),
                 "total_tokens": PROMPT_TOKENS + len(pieces)}
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk" if chat else "text_completion",
                "model": body.get("model") or MODEL_ID}
        if not body.get("stream"):
            text = "".join(pieces)
            choice = {"index": 0, "finish_reason": finish}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return JSONResponse({**base, "choices": [choice], "usage": usage})

        def event(obj: dict) -> str:
            return "data: " + json.dumps(obj) + "\n\n"

        async def events():
            if chat:
                yield event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None}]})
            yield ": keep-alive\n\n"
            for i, piece in enumerate(pieces):
                if state.stream_error and i == 1:
                    yield event({"error": {"message": "engine died", "type": "server_error", "code": 500}})
                    return
                await asyncio.sleep(delay)  # the fake "model" produces tokens over time
                choice = {"index": 0, "finish_reason": finish if i == len(pieces) - 1 else None}
                choice.update({"delta": {"content": piece}} if chat else {"text": piece})
                yield event({**base, "choices": [choice]})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield event({**base, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def ollama(request: Request) -> Response:
        body = await record(request)
        if state.take_failure():
            return failure(ollama=True)
        chat = request.url.path == "/api/chat"
        pieces, finish, delay = state.reply(body, (body.get("options") or {}).get("num_predict"))

        def line(piece: str, done: bool) -> dict:
            obj: dict = {"model": body.get("model"), "done": done}
            obj.update({"message": {"role": "assistant", "content": piece}} if chat else {"response": piece})
            if done:
                obj.update(done_reason=finish, prompt_eval_count=PROMPT_TOKENS, eval_count=len(pieces))
            return obj

        if not body.get("stream", True):
            return JSONResponse(line("".join(pieces), True))

        async def lines():
            for piece in pieces:
                if state.stream_error:
                    yield json.dumps({"error": "engine died"}) + "\n"
                    return
                await asyncio.sleep(delay)
                yield json.dumps(line(piece, False)) + "\n"
            yield json.dumps(line("", True)) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return Starlette(routes=[
        Route("/", static),
        Route("/static/{name}", static),
        Route("/v1/models", models),
        Route("/health", health),
        Route("/v1/chat/completions", openai, methods=["POST"]),
        Route("/v1/completions", openai, methods=["POST"]),
        Route("/api/chat", ollama, methods=["POST"]),
        Route("/api/generate", ollama, methods=["POST"]),
    ])


class FakeServer:
    """Runs the fake app with uvicorn in a thread on a socket bound (and listening) before start."""

    def __init__(self, state: FakeState | None = None, port: int = 0) -> None:
        self.state = state or FakeState()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(make_app(self.state), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> FakeServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


if __name__ == "__main__":
    fake = FakeServer(FakeState(markdown_answer, token_delay_s=0.02), int(sys.argv[1]) if len(sys.argv) > 1 else 8765)
    print(f"fake OpenAI server on {fake.url}", flush=True)
    fake.start().thread.join()
