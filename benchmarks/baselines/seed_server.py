"""The seed article's server, as the article builds it (section 5): a FastAPI app whose routes
return a `StreamingResponse` over a plain generator that reads a `TextIteratorStreamer`,
fed by one `Thread(target=model.generate, ...)` per request.

It is the baseline for `benchmarks/bench_serving.py`, so it stays faithful: sync route
handlers, sync generators (Starlette iterates them in its thread pool), no batching, no
queue, no cancellation (a closed connection keeps generating), text pieces exactly as the
streamer releases them. To be driven by the same load generator as rillet it also answers:

- ``POST /api``                  the article's route: one line ``{"content": <answer so far>}`` per piece
                                  (body optional: ``{"prompt": ..., "max_new_tokens": ...}``)
- ``POST /api/chat``             NDJSON, Ollama-style: ``{"message": {"role", "content": delta}, "done": false}``
                                  lines, then a ``done: true`` line with counts
- ``POST /v1/chat/completions``  OpenAI chat, SSE when ``stream`` is true (``stream_options.include_usage``
                                  adds a usage chunk)
- ``GET  /v1/models``            the one model

``max_tokens`` (``options.num_predict``) sets ``max_new_tokens``; ``ignore_eos`` sets
``min_new_tokens = max_new_tokens`` so the work per request is forced.

    python -m benchmarks.baselines.seed_server --port 7777 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any, Iterator

from fastapi import Body, FastAPI
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse, StreamingResponse

from benchmarks.baselines.seed_engine import DEFAULT_STREAMER_TIMEOUT_S, SeedEngine

ARTICLE_PROMPT = "写一篇800字的作文"
ARTICLE_MAX_NEW_TOKENS = 1024
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ChatRequest(BaseModel):
    """What both chat routes read; other fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict]
    ignore_eos: bool = False


class ChatCompletionRequest(ChatRequest):
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream_options: dict | None = None


class OllamaChatRequest(ChatRequest):
    stream: bool = True
    options: dict | None = None


def create_app(engine: SeedEngine) -> FastAPI:
    app = FastAPI(title="seed baseline (article design)")
    created = int(time.time())

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": created,
                                             "owned_by": "seed-baseline"}]}

    @app.post("/api")
    def article_route(body: dict | None = Body(None)) -> StreamingResponse:
        """The article's route: a fixed prompt (or body.prompt), cumulative answer per line."""
        body = body or {}
        prompt = body.get("prompt") or ARTICLE_PROMPT
        max_new_tokens = int(body.get("max_new_tokens") or body.get("max_tokens") or ARTICLE_MAX_NEW_TOKENS)
        messages = [{"role": "user", "content": prompt}]

        def handle_post_request() -> Iterator[str]:
            request = engine.start(messages, max_new_tokens, ignore_eos=bool(body.get("ignore_eos")))
            answer = ""
            for new_text in request.streamer:
                answer += new_text
                yield json.dumps({"content": answer}, ensure_ascii=False) + "\n"

        return StreamingResponse(handle_post_request(), media_type="application/x-ndjson")

    @app.post("/api/chat")
    def ollama_chat(req: OllamaChatRequest) -> Any:
        options = req.options or {}
        max_new_tokens = int(options.get("num_predict") or ARTICLE_MAX_NEW_TOKENS)
        if max_new_tokens < 1:  # Ollama's -1 / -2: "until done"
            max_new_tokens = ARTICLE_MAX_NEW_TOKENS
        ignore_eos = bool(req.ignore_eos or options.get("ignore_eos"))
        model_name = req.model or engine.name

        def handle_post_request() -> Iterator[str]:
            start = time.perf_counter()
            request = engine.start(req.messages, max_new_tokens, ignore_eos=ignore_eos,
                                   temperature=options.get("temperature"), top_p=options.get("top_p"))
            for new_text in request.streamer:
                if new_text:
                    yield json.dumps({"model": model_name, "created_at": _now_iso(),
                                      "message": {"role": "assistant", "content": new_text}, "done": False},
                                     ensure_ascii=False) + "\n"
            request.thread.join()
            yield json.dumps({"model": model_name, "created_at": _now_iso(),
                              "message": {"role": "assistant", "content": ""}, "done": True,
                              "done_reason": request.finish_reason,
                              "total_duration": int((time.perf_counter() - start) * 1e9),
                              "prompt_eval_count": request.num_prompt_tokens,
                              "eval_count": request.num_output_tokens or 0}) + "\n"

        if req.stream:
            return StreamingResponse(handle_post_request(), media_type="application/x-ndjson", headers=STREAM_HEADERS)
        request = engine.start(req.messages, max_new_tokens, ignore_eos=ignore_eos,
                               temperature=options.get("temperature"), top_p=options.get("top_p"))
        text = "".join(request.streamer)
        request.thread.join()
        return {"model": model_name, "created_at": _now_iso(), "message": {"role": "assistant", "content": text},
                "done": True, "done_reason": request.finish_reason, "prompt_eval_count": request.num_prompt_tokens,
                "eval_count": request.num_output_tokens or 0}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatCompletionRequest) -> Any:
        max_new_tokens = req.max_completion_tokens or req.max_tokens or ARTICLE_MAX_NEW_TOKENS
        model_name = req.model or engine.name
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            obj = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                   "model": model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def handle_post_request() -> Iterator[str]:
            request = engine.start(req.messages, max_new_tokens, ignore_eos=req.ignore_eos,
                                   temperature=req.temperature, top_p=req.top_p)
            yield chunk({"role": "assistant", "content": ""})
            for new_text in request.streamer:
                if new_text:
                    yield chunk({"content": new_text})
            request.thread.join()
            yield chunk({}, request.finish_reason)
            if include_usage:
                completion_tokens = request.num_output_tokens or 0
                usage = {"prompt_tokens": request.num_prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": request.num_prompt_tokens + completion_tokens}
                obj = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                       "model": model_name, "choices": [], "usage": usage}
                yield f"data: {json.dumps(obj)}\n\n"
            yield "data: [DONE]\n\n"

        if req.stream:
            return StreamingResponse(handle_post_request(), media_type="text/event-stream", headers=STREAM_HEADERS)
        request = engine.start(req.messages, max_new_tokens, ignore_eos=req.ignore_eos,
                               temperature=req.temperature, top_p=req.top_p)
        text = "".join(request.streamer)
        request.thread.join()
        completion_tokens = request.num_output_tokens or 0
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": request.finish_reason}],
            "usage": {"prompt_tokens": request.num_prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": request.num_prompt_tokens + completion_tokens},
        })

    return app


def seed_server_command(port: int | str, dtype: str, model: str | None = None) -> list[str]:
    """The command line that runs this server on `port` (from the repository root). Its streamer has
    no queue timeout (--streamer-timeout 0), so a long wait under load is measured, not failed."""
    cmd = [sys.executable, "-m", "benchmarks.baselines.seed_server", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", dtype, "--streamer-timeout", "0"]
    return cmd + (["--model", model] if model else [])


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The seed article's FastAPI + TextIteratorStreamer server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("API_PORT", 7777)))
    parser.add_argument("--model", default=None, help="Hugging Face directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--streamer-timeout", type=float, default=DEFAULT_STREAMER_TIMEOUT_S,
                        help="TextIteratorStreamer timeout in seconds (the article's 60; 0: none)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    import uvicorn

    engine = SeedEngine(args.model, args.dtype, streamer_timeout=args.streamer_timeout or None)
    print(f"seed server: {engine.name} ({engine.dtype}) on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, workers=1, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
