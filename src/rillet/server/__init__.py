"""rillet's HTTP server: OpenAI-compatible SSE, Ollama-compatible NDJSON, plain JSON.

`create_app(server_config, engine_config, engine=None)` builds the ASGI app (mount it in your
own app or run it with any ASGI server); `serve(...)` runs it on uvicorn with SIGTERM draining.
"""

from rillet.server.app import create_app
from rillet.server.runner import serve

__all__ = ["create_app", "serve"]
