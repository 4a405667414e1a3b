"""HTTP errors: one exception type, rendered OpenAI-shaped on /v1 and Ollama-shaped on /api
(bodies from `rillet.protocol.errors`); the engine's refusals mapped to statuses, once."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from rillet.engine.errors import EngineDeadError, EngineNotReadyError, QueueFullError
from rillet.protocol.errors import ErrorInfo, ErrorResponse, OllamaErrorResponse, ParamError

__all__ = ["APIError", "ENGINE_UNAVAILABLE_RETRY_AFTER_S", "QUEUE_FULL_RETRY_AFTER_S", "engine_refusal",
           "error_body", "error_response", "error_type", "is_api_path", "is_ollama_path", "param_error"]

ENGINE_UNAVAILABLE_RETRY_AFTER_S = 5  # the model is loading, or the engine died and is being restarted
QUEUE_FULL_RETRY_AFTER_S = 1

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


def param_error(exc: ParamError) -> APIError:
    return APIError(400, exc.message, param=exc.param)


def engine_refusal(exc: EngineNotReadyError | EngineDeadError | QueueFullError) -> APIError:
    """The one mapping of the engine's refusals: 503 (with Retry-After) while it is loading or
    after it died, 429 while its queue is full."""
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc) or "too many requests are waiting; retry later", code="queue_full",
                        headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})
    retry = {"Retry-After": str(ENGINE_UNAVAILABLE_RETRY_AFTER_S)}
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc) or "the engine has stopped", code="engine_dead", headers=retry)
    return APIError(503, f"the model is not ready: {exc}" if str(exc) else "the model is still loading",
                    code="not_ready", headers=retry)


def is_ollama_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


TOKENIZER_PATHS = ("/tokenize", "/detokenize")  # vLLM's, outside /v1


def is_api_path(path: str) -> bool:
    """A route of the APIs (OpenAI's /v1, Ollama's /api, vLLM's tokenizer routes): behind the API
    key, its body read as JSON whatever its Content-Type."""
    return path == "/v1" or path.startswith("/v1/") or is_ollama_path(path) or path in TOKENIZER_PATHS


def error_body(path: str, status: int, message: str, *, type: str | None = None, param: str | None = None,
               code: int | str | None = None) -> dict[str, Any]:
    if is_ollama_path(path):
        return OllamaErrorResponse(error=message).model_dump(exclude_unset=True)
    info = ErrorInfo(message=message, type=type or error_type(status), param=param,
                     code=code if code is not None else status)
    return ErrorResponse(error=info).model_dump()


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
