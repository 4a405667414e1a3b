"""A tiny OpenAI/Ollama-compatible fake server (in addition to the real `rillet serve` tests).

It streams a fixed answer word by word and can be told to answer 429 (with Retry-After)
a number of times before succeeding, which the retry tests need deterministically.
"""

from __future__ import annotations

import json
import socket
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ANSWER = ["Hello", " there", ",", " caf\u00e9", " friend", "!"]


class FakeState:
    def __init__(self) -> None:
        self.fail_next = 0  # answer this many requests with fail_status first
        self.fail_status = 429
        self.retry_after: str | None = "0"
        self.requests: list[dict] = []
        self.stream_error = False  # send an in-stream error event after the first chunk
        self.lock = threading.Lock()

    def take_failure(self) -> bool:
        with self.lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return True
            return False


def make_app(state: FakeState) -> Starlette:
    def failure() -> Response:
        headers = {"Retry-After": state.retry_after} if state.retry_after is not None else {}
        return JSONResponse({"error": {"message": "server busy", "type": "rate_limit", "param": None,
                                       "code": state.fail_status}}, status_code=state.fail_status, headers=headers)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def openai(request: Request) -> Response:
        body = await request.json()
        state.requests.append(body)
        if state.take_failure():
            return failure()
        chat = request.url.path.endswith("/chat/completions")
        words = ANSWER[: body.get("max_tokens") or len(ANSWER)]
        if not body.get("stream"):
            text = "".join(words)
            choice = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return JSONResponse({"id": "x", "model": body.get("model"), "choices": [choice],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": len(words),
                                           "total_tokens": 3 + len(words)}})

        async def events():
            if chat:
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}) + "\n\n"
            yield ": keep-alive\n\n"
            for i, word in enumerate(words):
                if state.stream_error and i == 1:
                    yield "data: " + json.dumps({"error": {"message": "engine died", "type": "server_error",
                                                           "code": 500}}) + "\n\n"
                    return
                finish = "length" if i == len(words) - 1 else None
                choice = {"index": 0, "finish_reason": finish}
                choice.update({"delta": {"content": word}} if chat else {"text": word})
                yield "data: " + json.dumps({"choices": [choice]}) + "\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(words),
                                                                     "total_tokens": 3 + len(words)}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def ollama(request: Request) -> Response:
        body = await request.json()
        state.requests.append(body)
        if state.take_failure():
            return JSONResponse({"error": "server busy"}, status_code=state.fail_status,
                                headers={"Retry-After": state.retry_after} if state.retry_after else {})
        chat = request.url.path == "/api/chat"
        words = ANSWER[: (body.get("options") or {}).get("num_predict") or len(ANSWER)]

        def line(word: str, done: bool) -> dict:
            obj: dict = {"model": body.get("model"), "done": done}
            obj.update({"message": {"role": "assistant", "content": word}} if chat else {"response": word})
            if done:
                obj.update(done_reason="length", prompt_eval_count=3, eval_count=len(words))
            return obj

        if not body.get("stream", True):
            return JSONResponse(line("".join(words), True))

        async def lines():
            for word in words:
                if state.stream_error:
                    yield json.dumps({"error": "engine died"}) + "\n"
                    return
                yield json.dumps(line(word, False)) + "\n"
            yield json.dumps(line("", True)) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return Starlette(routes=[
        Route("/v1/models", models),
        Route("/health", health),
        Route("/v1/chat/completions", openai, methods=["POST"]),
        Route("/v1/completions", openai, methods=["POST"]),
        Route("/api/chat", ollama, methods=["POST"]),
        Route("/api/generate", ollama, methods=["POST"]),
    ])


class FakeServer:
    """Runs the fake app with uvicorn in a thread on a socket bound (and listening) before start."""

    def __init__(self) -> None:
        self.state = FakeState()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
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
