"""The client's exceptions, and how HTTP error bodies and transport failures become them."""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any, Mapping

import httpx

class RilletError(Exception):
    """Base class of every error the client raises."""


class APIConnectionError(RilletError):
    """The server could not be reached, or the connection broke mid-way."""

    def __init__(self, message: str = "connection error") -> None:
        super().__init__(message)
        self.message = message


class APITimeoutError(APIConnectionError):
    """The request timed out."""


class APIStatusError(RilletError):
    """The server answered with an HTTP error status."""

    def __init__(self, status: int, message: str, body: Any = None, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.status_code = status
        self.message = message
        self.body = body
        self.headers = dict(headers or {})
        error = body.get("error") if isinstance(body, dict) else None
        self.type: str | None = error.get("type") if isinstance(error, dict) else None
        self.code: Any = error.get("code") if isinstance(error, dict) else None
        self.retry_after: float | None = parse_retry_after(self.headers.get("retry-after"))


class BadRequestError(APIStatusError):
    """400, 413 or 422: the request was malformed or a parameter was out of range."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: unknown route or model."""


class RateLimitError(APIStatusError):
    """429: the server is overloaded; `retry_after` tells how long it asked to wait."""


class ServiceUnavailableError(APIStatusError):
    """503: the server is starting, draining or its engine is down."""


class InternalServerError(APIStatusError):
    """Any other 5xx."""


class StreamError(RilletError):
    """An error event inside a stream, after the HTTP 200."""

    def __init__(self, message: str, *, type: str | None = None, code: Any = None, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.code = code
        self.body = body
        self.status: int | None = code if isinstance(code, int) and 100 <= code <= 599 else None


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: BadRequestError,
    422: BadRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def status_error(status: int, content: bytes, headers: Mapping[str, str]) -> APIStatusError:
    text = content.decode("utf-8", errors="replace")
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    message = ""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or "")
        elif isinstance(error, str):  # Ollama: {"error": "..."}
            message = error
        elif "detail" in body:  # FastAPI default
            message = body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])
        elif "message" in body:
            message = str(body["message"])
    if not message:
        message = text.strip()[:500] or httpx.codes.get_reason_phrase(status) or "error"
    cls = _STATUS_ERRORS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    return cls(status, message, body, headers=headers)


def stream_error(obj: dict) -> StreamError:
    error = obj.get("error")
    if isinstance(error, dict):
        return StreamError(str(error.get("message") or "stream error"), type=error.get("type"),
                           code=error.get("code"), body=obj)
    return StreamError(str(error), body=obj)


def connection_error(exc: httpx.HTTPError) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"timed out: {exc!r}")
    return APIConnectionError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


