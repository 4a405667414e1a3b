"""HTTP errors: one exception type, rendered OpenAI-shaped on /v1 and Ollama-shaped on /api."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

__all__ = ["APIError", "error_body", "error_response", "error_type", "is_ollama_path"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class APIError(Exception):
    """Raised by routes and serving; the app turns it into a JSON error response."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: int | str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param
        self.code = code if code is not None else status
        self.headers = headers

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def is_ollama_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def error_body(path: str, status: int, message: str, *, type: str | None = None, param: str | None = None,
               code: int | str | None = None) -> dict[str, Any]:
    if is_ollama_path(path):
        return {"error": message}
    return {"error": {"message": message, "type": type or error_type(status), "param": param,
                      "code": code if code is not None else status}}


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message that quotes the client's input (a model name
    holding a lone surrogate, say) must never fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(path: str, status: int, message: str, *, type: str | None = None, param: str | None = None,
                   code: int | str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(path, status, message, type=type, param=param, code=code)
    return ErrorJSONResponse(body, status_code=status, headers=headers)


def api_error_response(path: str, exc: APIError) -> JSONResponse:
    return error_response(path, exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code,
                          headers=exc.headers)
