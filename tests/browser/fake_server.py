"""A tiny OpenAI-compatible SSE server for developing and testing the chat page.

It serves the real static files of the package (GET / and /static/<file>) and
fakes `/v1/models` and a streaming `/v1/chat/completions` that answers with a
short Markdown text, token by token. The real `rillet serve` is used by the
tests that need a model (growing text, Stop/abort metrics, 401); this fake
serves the page for tests whose completions are canned with `page.route`.

Run it by hand: `.venv/bin/python tests/browser/fake_server.py 8765`.
"""

from __future__ import annotations

import json
import mimetypes
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parents[2] / "src" / "rillet" / "server" / "static"
MODEL_ID = "fake-model"


def answer_for(messages: list[dict]) -> str:
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    return (
        f"You said: {last}\n\n"
        "Here is **bold**, *italic* and `code`:\n\n"
        "- one\n- two\n\n"
        "```python\nprint('hi')\n```\n"
    )


def tokens_of(text: str) -> list[str]:
    out, cur = [], ""
    for ch in text:
        cur += ch
        if ch in " \n" or len(cur) >= 4:
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-openai/0"
    token_delay_s = 0.02
    requests: list[dict] = []

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            return self._json(200, {"status": "ok"})
        if path == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})
        if path == "/":
            path = "/static/index.html"
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            file = (STATIC_DIR / name).resolve()
            if file.parent == STATIC_DIR and file.is_file():
                data = file.read_bytes()
                self.send_response(200)
                ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                if ctype.startswith("text/") or ctype.endswith("javascript"):
                    ctype += "; charset=utf-8"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                self.wfile.write(data)
                return None
        return self._json(404, {"error": {"message": "not found", "type": "not_found", "code": 404}})

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            return self._json(404, {"error": {"message": "not found"}})
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        Handler.requests.append({"body": body, "headers": dict(self.headers)})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": MODEL_ID}

        def event(obj) -> None:
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        try:
            event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})
            messages = body.get("messages", [])
            # A question containing "slow" gets a slow answer (for Stop / New chat mid-stream).
            delay = 0.25 if "slow" in (messages[-1].get("content", "") if messages else "") else self.token_delay_s
            pieces = tokens_of(answer_for(messages))
            limit = body.get("max_tokens") or len(pieces)
            pieces = pieces[:limit]
            for n, piece in enumerate(pieces):
                time.sleep(delay)  # the fake "model" produces tokens over time
                last = n == len(pieces) - 1
                reason = ("length" if limit < len(tokens_of(answer_for(body.get("messages", [])))) else "stop")
                event({**base, "choices": [{"index": 0, "delta": {"content": piece},
                                            "finish_reason": reason if last else None}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                event({**base, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": len(pieces),
                                                        "total_tokens": 10 + len(pieces)}})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        return None


def start(port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


if __name__ == "__main__":
    srv, url = start(int(sys.argv[1]) if len(sys.argv) > 1 else 8765)
    print(f"fake OpenAI server on {url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.shutdown()
