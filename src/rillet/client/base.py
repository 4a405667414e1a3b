"""What the sync and async clients share: configuration, headers and the retry policy."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Mapping

import httpx

from rillet.client.errors import APIStatusError, connection_error, status_error
from rillet.client.wire import Api, build_request

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})

# The backoff waits (module attributes so tests can record them instead of waiting).
sleep = time.sleep
async_sleep = asyncio.sleep


class ClientBase:
    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api: Api = "openai", api_key: str | None = None,
                 model: str | None = None, timeout: float | httpx.Timeout | None = 600.0, max_retries: int = 2,
                 backoff: float = 0.5, max_backoff: float = 30.0, headers: Mapping[str, str] | None = None) -> None:
        if api not in ("openai", "ollama"):
            raise ValueError(f"api must be 'openai' or 'ollama', got {api!r}")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):  # accept OpenAI-style base URLs too
            self.base_url = self.base_url[:-3]
        self.api = api
        self.api_key = api_key
        self.model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._headers = {"Accept": "application/json, text/event-stream, application/x-ndjson"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._headers.update(headers or {})
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)

    def _delay(self, attempt: int, error: APIStatusError | None) -> float:
        if error is not None and error.retry_after is not None:
            return min(error.retry_after, self.max_backoff)
        base = min(self.backoff * (2 ** attempt), self.max_backoff)
        return base * (0.5 + random.random() / 2)

    def _should_retry(self, attempt: int, status: int) -> bool:
        return attempt < self.max_retries and status in RETRY_STATUSES

    def _request_for(self, kind: str, payload: Any, stream: bool, model: str | None,
                     params: Mapping[str, Any]) -> tuple[str, dict]:
        return build_request(self.api, kind, payload, model, stream, params)

    def _connect_retry(self, attempt: int, exc: httpx.HTTPError) -> float:
        """Seconds to wait before retrying a request that failed to connect; raises the client's
        error when it is not retried (other transport errors, or no attempts left)."""
        if isinstance(exc, httpx.ConnectError) and attempt < self.max_retries:
            return self._delay(attempt, None)
        raise connection_error(exc) from exc

    def _status_retry(self, attempt: int, response: httpx.Response, content: bytes) -> float:
        """Seconds to wait before retrying an HTTP error answer; raises it when it is not retried."""
        error = status_error(response.status_code, content, response.headers)
        if not self._should_retry(attempt, response.status_code):
            raise error
        return self._delay(attempt, error)
