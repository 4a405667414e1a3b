"""The asynchronous client and its stream: twins of `rillet.client.sync`."""

from __future__ import annotations

from typing import Any, AsyncIterator, Mapping

import httpx

from rillet.client import base
from rillet.client.base import DEFAULT_BASE_URL, ClientBase
from rillet.client.errors import APIStatusError, NotFoundError, RilletError, connection_error
from rillet.client.results import Completion, Delta
from rillet.client.wire import Api, StreamState, Messages, ollama_model_ids, parse_completion


class AsyncStream(StreamState):
    """Async twin of `Stream`. The request is sent on `await`, `async with` or the first `async for` step."""

    def __init__(self, client: AsyncClient, kind: str, payload: Any, model: str | None,
                 params: Mapping[str, Any]) -> None:
        self._client = client
        self._kind = kind
        self._payload = payload
        self._model = model
        self._params = params
        self.response: httpx.Response | None = None
        self._iterator: AsyncIterator[Delta] | None = None
        self.closed = False
        self._init_state(client.api, kind)

    async def _open(self) -> AsyncStream:
        if self.response is None:
            if self.closed:
                raise RuntimeError("stream is closed")
            client = self._client
            path, body = client._request_for(self._kind, self._payload, True,
                                             await client.resolve_model(self._model), self._params)
            self.response = await client._send("POST", path, body, stream=True)
        return self

    def __await__(self):
        return self._open().__await__()

    async def __aenter__(self) -> AsyncStream:
        return await self._open()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Delta:
        if self._iterator is None:
            self._iterator = self._deltas()
        return await self._iterator.__anext__()

    async def _deltas(self) -> AsyncIterator[Delta]:
        await self._open()
        assert self.response is not None
        try:
            async for line in self.response.aiter_lines():
                for delta in self._take(line):
                    yield delta
                if self._decoder.done:
                    break
            for delta in self._take(None):
                yield delta
        except httpx.HTTPError as exc:
            raise connection_error(exc) from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (if the answer is not finished, the server aborts it)."""
        if not self.closed:
            self.closed = True
            if self.response is not None:
                await self.response.aclose()

    async def until_done(self) -> AsyncStream:
        async for _ in self:
            pass
        return self


class AsyncClient(ClientBase):
    """Asynchronous twin of `Client`.

    `await client.chat(...)` returns a `Completion`; `client.chat(..., stream=True)`
    returns an `AsyncStream` to use with `async with`, `async for` or `await`.
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api: Api = "openai", api_key: str | None = None,
                 model: str | None = None, timeout: float | httpx.Timeout | None = 600.0, max_retries: int = 2,
                 backoff: float = 0.5, max_backoff: float = 30.0, headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, http_client: httpx.AsyncClient | None = None,
                 max_connections: int | None = None) -> None:
        super().__init__(base_url, api=api, api_key=api_key, model=model, timeout=timeout, max_retries=max_retries,
                         backoff=backoff, max_backoff=max_backoff, headers=headers)
        self._owns_http = http_client is None
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections) \
            if max_connections else httpx.Limits()
        self._http = http_client or httpx.AsyncClient(timeout=self._timeout, transport=transport, limits=limits)

    def chat(self, messages: Messages, *, stream: bool = False, model: str | None = None, **params: Any):
        """Chat completion: a coroutine giving a `Completion`, or with stream=True an `AsyncStream`."""
        return self._generate("chat", messages, stream, model, params)

    def complete(self, prompt: str, *, stream: bool = False, model: str | None = None, **params: Any):
        """Text completion: a coroutine giving a `Completion`, or with stream=True an `AsyncStream`."""
        return self._generate("complete", prompt, stream, model, params)

    async def models(self) -> list[str]:
        """Ids of the served models."""
        if self.api == "ollama":
            try:
                return ollama_model_ids(await self._json("GET", "/api/tags"))
            except NotFoundError:
                pass
        return [m["id"] for m in (await self._json("GET", "/v1/models")).get("data", [])]

    async def health(self) -> dict:
        """The server's /health answer; raises APIStatusError (e.g. 503 while loading). Not retried."""
        response = await self._send("GET", "/health", retry=False)
        try:
            return response.json()
        except ValueError:
            return {"status": response.text.strip() or "ok"}

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def resolve_model(self, model: str | None) -> str:
        if model or self.model:
            return model or self.model  # type: ignore[return-value]
        ids = await self.models()
        if not ids:
            raise RilletError("the server lists no models; pass model=")
        self.model = ids[0]
        return self.model

    def _generate(self, kind: str, payload: Any, stream: bool, model: str | None, params: Mapping[str, Any]):
        if stream:
            return AsyncStream(self, kind, payload, model, params)
        return self._complete(kind, payload, model, params)

    async def _complete(self, kind: str, payload: Any, model: str | None, params: Mapping[str, Any]) -> Completion:
        path, body = self._request_for(kind, payload, False, await self.resolve_model(model), params)
        return parse_completion(self.api, kind, await self._json("POST", path, body),
                                params.get("response_format"))

    async def _json(self, method: str, path: str, body: Any = None) -> dict:
        response = await self._send(method, path, body)
        try:
            return response.json()
        except ValueError:
            raise APIStatusError(response.status_code, f"not JSON: {response.text[:200]!r}", response.text) from None

    async def _send(self, method: str, path: str, body: Any = None, *, stream: bool = False,
                          retry: bool = True) -> httpx.Response:
        attempt = 0 if retry else self.max_retries
        while True:
            request = self._http.build_request(method, self.base_url + path, json=body, headers=self._headers)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                await base.async_sleep(self._connect_retry(attempt, exc))
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            try:
                content = await response.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                await response.aclose()
            await base.async_sleep(self._status_retry(attempt, response, content))
            attempt += 1
