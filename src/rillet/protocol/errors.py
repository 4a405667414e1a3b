"""Error bodies (OpenAI-shaped for /v1 routes, Ollama-shaped for /api routes) and `ParamError`,
which request models raise for a field the API refuses."""

from __future__ import annotations

from pydantic import BaseModel

__all__ = ["ErrorInfo", "ErrorResponse", "OllamaErrorResponse", "ParamError"]


class ParamError(ValueError):
    """A request field the API refuses (the server answers 400 naming `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """`{"error": {"message", "type", "param", "code"}}`; also the body of a terminal SSE error event."""

    error: ErrorInfo


class OllamaErrorResponse(BaseModel):
    """`{"error": "..."}`; a terminal NDJSON error line also carries `"done": true`."""

    error: str
    done: bool | None = None
