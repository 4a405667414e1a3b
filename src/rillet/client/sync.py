"""The synchronous client and its stream."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import httpx

from rillet.client import base
from rillet.client.base import DEFAULT_BASE_URL, ClientBase
from rillet.client.errors import APIStatusError, NotFoundError, RilletError, connection_error
from rillet.client.results import Completion, Delta
from rillet.client.wire import Api, Messages, StreamState, ollama_model_ids, parse_completion


class Stream(StreamState):
    """Iterator of `Delta`s over one streamed response; a context manager that always closes.

    After iteration, `text`, `finish_reason` and `usage` hold the totals.
    """

    def __init__(self, response: httpx.Response, api: str, kind: str) -> None:
        self.response = response
        self._iterator = self._deltas()
        self.closed = False
        self._init_state(api, kind)

    def _deltas(self) -> Iterator[Delta]:
        try:
            for line in self.response.iter_lines():
                yield from self._take(line)
                if self._decoder.done:
                    break
            yield from self._take(None)
        except httpx.HTTPError as exc:
            raise connection_error(exc) from exc
        finally:
            self.close()

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        return next(self._iterator)

    def close(self) -> None:
        """Close the connection (if the answer is not finished, the server aborts it)."""
        if not self.closed:
            self.closed = True
            self.response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a stream dropped without close() still frees its connection
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def until_done(self) -> Stream:
        """Consume the rest of the stream; returns self (then read `.text`, `.usage`)."""
        for _ in self:
            pass
        return self


class Client(ClientBase):
    """Synchronous client. Use as a context manager, or call `close()`.

    `base_url` is the server root (a trailing `/v1` is accepted). `api` picks the
    wire protocol: "openai" (SSE) or "ollama" (NDJSON). `model` is the default model
    name for requests. See the module docstring for errors and retries.
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api: Api = "openai", api_key: str | None = None,
                 model: str | None = None, timeout: float | httpx.Timeout | None = 600.0, max_retries: int = 2,
                 backoff: float = 0.5, max_backoff: float = 30.0, headers: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None, http_client: httpx.Client | None = None) -> None:
        super().__init__(base_url, api=api, api_key=api_key, model=model, timeout=timeout, max_retries=max_retries,
                         backoff=backoff, max_backoff=max_backoff, headers=headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self._timeout, transport=transport)

    # -- public surface

    def chat(self, messages: Messages, *, stream: bool = False, model: str | None = None,
             **params: Any) -> Completion | Stream:
        """Chat completion. `messages`: a list of {"role", "content"} dicts, or a string (one user turn)."""
        return self._generate("chat", messages, stream, model, params)

    def complete(self, prompt: str, *, stream: bool = False, model: str | None = None,
                 **params: Any) -> Completion | Stream:
        """Plain text completion of `prompt`."""
        return self._generate("complete", prompt, stream, model, params)

    def models(self) -> list[str]:
        """Ids of the served models."""
        if self.api == "ollama":
            try:
                return ollama_model_ids(self._json("GET", "/api/tags"))
            except NotFoundError:  # a server with the NDJSON routes but no /api/tags
                pass
        return [m["id"] for m in self._json("GET", "/v1/models").get("data", [])]

    def health(self) -> dict:
        """The server's /health answer; raises APIStatusError (e.g. 503 while loading) when it is not
        healthy. Not retried: it reports the state of now."""
        response = self._send("GET", "/health", retry=False)
        try:
            return response.json()
        except ValueError:
            return {"status": response.text.strip() or "ok"}

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- internals

    def resolve_model(self, model: str | None) -> str:
        """The model to ask for: the argument, else the client's, else the first one the server lists."""
        if model or self.model:
            return model or self.model  # type: ignore[return-value]
        ids = self.models()
        if not ids:
            raise RilletError("the server lists no models; pass model=")
        self.model = ids[0]
        return self.model

    def _generate(self, kind: str, payload: Any, stream: bool, model: str | None, params: Mapping[str, Any]):
        path, body = self._request_for(kind, payload, stream, self.resolve_model(model), params)
        if not stream:
            return parse_completion(self.api, kind, self._json("POST", path, body), params.get("response_format"))
        return Stream(self._send("POST", path, body, stream=True), self.api, kind)

    def _json(self, method: str, path: str, body: Any = None) -> dict:
        response = self._send(method, path, body)
        try:
            return response.json()
        except ValueError:
            raise APIStatusError(response.status_code, f"not JSON: {response.text[:200]!r}", response.text) from None

    def _send(self, method: str, path: str, body: Any = None, *, stream: bool = False,
                    retry: bool = True) -> httpx.Response:
        attempt = 0 if retry else self.max_retries
        while True:
            request = self._http.build_request(method, self.base_url + path, json=body, headers=self._headers)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                base.sleep(self._connect_retry(attempt, exc))
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            try:
                content = response.read()
            except httpx.HTTPError:
                content = b""
            finally:
                response.close()
            base.sleep(self._status_retry(attempt, response, content))
            attempt += 1


# ----------------------------------------------------------------------------- async
