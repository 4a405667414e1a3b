"""Python client for rillet (and any OpenAI- or Ollama-compatible server), on httpx.

`Client` and `AsyncClient` are twins with the same surface::

    from rillet import Client

    with Client("http://127.0.0.1:8000") as client:
        print(client.chat("Say hi").text)                      # one JSON answer
        with client.chat([{"role": "user", "content": "Count to 5"}],
                         stream=True, max_tokens=32) as stream:
            for delta in stream:                               # deltas as they are generated
                print(delta.text, end="", flush=True)
        print(stream.finish_reason, stream.usage)

    async with AsyncClient("http://127.0.0.1:8000", api="ollama") as client:
        async with client.chat("Say hi", stream=True) as stream:
            async for delta in stream:
                ...
        answer = await client.complete("Once upon a time", max_tokens=16)

`chat`/`complete` take sampling parameters as keyword arguments (`max_tokens`,
`temperature`, `top_p`, `seed`, `stop`, `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`, `logit_bias`, ...). With `api="openai"` (the default) they go into
the JSON body as they are; with `api="ollama"` they are translated into Ollama's
`options` (`max_tokens` -> `num_predict`, `repetition_penalty` -> `repeat_penalty`).

Leaving a stream early (`break`, an exception, `close()`, the end of a `with`
block) closes its HTTP connection, which makes the server abort the request.

Exceptions (all subclasses of `RilletError`):

- `APIConnectionError`: the server could not be reached or the connection broke
  (`APITimeoutError` for timeouts).
- `APIStatusError(status, message, body)`: the server answered an HTTP error.
  Subclasses by status: `BadRequestError` (400, 413, 422), `AuthenticationError`
  (401), `PermissionDeniedError` (403), `NotFoundError` (404), `RateLimitError`
  (429; `.retry_after` in seconds when the server sent Retry-After),
  `ServiceUnavailableError` (503; also `.retry_after`), `InternalServerError`
  (other 5xx). `.type` and `.code` come from an OpenAI-style error body.
- `StreamError(message, type, code, body)`: the server reported an error inside a
  stream after its 200 (an SSE `data: {"error": ...}` event or an NDJSON
  `{"error": ...}` line). `.status` is the error's `code` when it is an HTTP status.

Retries: requests answered 429 or 503, and connections that could not be opened,
are retried up to `max_retries` times with exponential backoff (`backoff` *
2**attempt, jittered, at most `max_backoff` seconds), waiting what Retry-After
says when the server sends it. A stream is only retried before its first byte.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Literal, Mapping, Sequence

import httpx

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "Completion",
    "Delta",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RilletError",
    "ServiceUnavailableError",
    "Stream",
    "StreamError",
    "Usage",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})

# The backoff waits (module attributes so tests can record them instead of waiting).
_sleep = time.sleep
_async_sleep = asyncio.sleep
Api = Literal["openai", "ollama"]
Messages = str | Sequence[Mapping[str, Any]]


# ----------------------------------------------------------------------------- errors


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
        self.retry_after: float | None = _parse_retry_after(self.headers.get("retry-after"))


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


def _parse_retry_after(value: str | None) -> float | None:
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


def _status_error(status: int, content: bytes, headers: Mapping[str, str]) -> APIStatusError:
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


def _stream_error(obj: dict) -> StreamError:
    error = obj.get("error")
    if isinstance(error, dict):
        return StreamError(str(error.get("message") or "stream error"), type=error.get("type"),
                           code=error.get("code"), body=obj)
    return StreamError(str(error), body=obj)


def _connection_error(exc: httpx.HTTPError) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"timed out: {exc!r}")
    return APIConnectionError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


# ----------------------------------------------------------------------------- results


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_openai(cls, obj: Mapping[str, Any] | None) -> Usage | None:
        if not obj:
            return None
        prompt = int(obj.get("prompt_tokens") or 0)
        completion = int(obj.get("completion_tokens") or 0)
        return cls(prompt, completion, int(obj.get("total_tokens") or prompt + completion))

    @classmethod
    def from_ollama(cls, obj: Mapping[str, Any]) -> Usage | None:
        if "eval_count" not in obj and "prompt_eval_count" not in obj:
            return None
        prompt = int(obj.get("prompt_eval_count") or 0)
        completion = int(obj.get("eval_count") or 0)
        return cls(prompt, completion, prompt + completion)


@dataclass
class Delta:
    """One piece of a streamed answer: new `text`, and on the last ones `finish_reason` and `usage`."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    index: int = 0
    raw: dict = field(default_factory=dict, repr=False)


@dataclass
class Completion:
    """A whole (non-streamed) answer; `choices` holds every choice's text when n > 1."""

    text: str
    finish_reason: str | None
    usage: Usage | None
    model: str | None = None
    id: str | None = None
    choices: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)


# ----------------------------------------------------------------------------- request building

_OLLAMA_OPTION_NAMES = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}


def _messages(messages: Messages) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


def _drop_none(params: Mapping[str, Any]) -> dict:
    return {k: v for k, v in params.items() if v is not None}


def _build_request(api: str, kind: str, payload: Any, model: str, stream: bool,
                   params: Mapping[str, Any]) -> tuple[str, dict]:
    """(path, json body) for a chat ("chat") or completion ("complete") request."""
    params = _drop_none(params)
    if api == "openai":
        body: dict[str, Any] = {"model": model}
        if kind == "chat":
            body["messages"] = _messages(payload)
        else:
            body["prompt"] = payload
        body.update(params)
        body["stream"] = stream
        if stream:
            body.setdefault("stream_options", {"include_usage": True})
        return ("/v1/chat/completions" if kind == "chat" else "/v1/completions"), body
    if api == "ollama":
        body = {"model": model, "stream": stream}
        if kind == "chat":
            body["messages"] = _messages(payload)
        else:
            body["prompt"] = payload
        options = dict(params.pop("options", None) or {})
        for name in ("format", "keep_alive", "raw", "system", "template", "think", "tools", "images", "suffix"):
            if name in params:
                body[name] = params.pop(name)
        for name, value in params.items():
            options[_OLLAMA_OPTION_NAMES.get(name, name)] = value
        if options:
            body["options"] = options
        return ("/api/chat" if kind == "chat" else "/api/generate"), body
    raise ValueError(f"api must be 'openai' or 'ollama', got {api!r}")


def _parse_completion(api: str, kind: str, obj: dict) -> Completion:
    if api == "ollama":
        text = (obj.get("message") or {}).get("content", "") if kind == "chat" else obj.get("response", "")
        return Completion(text=text or "", finish_reason=obj.get("done_reason"), usage=Usage.from_ollama(obj),
                          model=obj.get("model"), choices=[text or ""], raw=obj)
    choices = sorted(obj.get("choices") or [], key=lambda c: c.get("index", 0))
    texts = []
    for choice in choices:
        if kind == "chat":
            texts.append((choice.get("message") or {}).get("content") or "")
        else:
            texts.append(choice.get("text") or "")
    first = choices[0] if choices else {}
    return Completion(text=texts[0] if texts else "", finish_reason=first.get("finish_reason"),
                      usage=Usage.from_openai(obj.get("usage")), model=obj.get("model"), id=obj.get("id"),
                      choices=texts, raw=obj)


def _ollama_model_ids(obj: dict) -> list[str]:
    return [m.get("name") or m.get("model") for m in obj.get("models", [])]


class _Decoder:
    """Turns lines of an SSE (OpenAI) or NDJSON (Ollama) body into deltas."""

    def __init__(self, api: str, kind: str) -> None:
        self.api = api
        self.kind = kind
        self.done = False
        self._data: list[str] = []

    def feed(self, line: str) -> list[Delta]:
        if self.done:
            return []
        if self.api == "ollama":
            line = line.strip()
            return self._ollama(json.loads(line)) if line else []
        # SSE: "data: ..." lines accumulate until a blank line ends the event; ":" lines are comments.
        if line.endswith("\r"):
            line = line[:-1]
        if line == "":
            return self._flush()
        if line.startswith(":"):
            return []
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return []

    def close(self) -> list[Delta]:
        return self._flush() if self.api == "openai" else []

    def _flush(self) -> list[Delta]:
        if not self._data:
            return []
        data = "\n".join(self._data)
        self._data = []
        if data.strip() == "[DONE]":
            self.done = True
            return []
        try:
            obj = json.loads(data)
        except ValueError:
            raise StreamError(f"malformed event in stream: {data[:200]!r}") from None
        return self._openai(obj)

    def _openai(self, obj: dict) -> list[Delta]:
        if "error" in obj and not obj.get("choices"):
            self.done = True
            raise _stream_error(obj)
        deltas = []
        usage = Usage.from_openai(obj.get("usage"))
        choices = obj.get("choices") or []
        for choice in choices:
            if self.kind == "chat":
                text = (choice.get("delta") or {}).get("content") or ""
            else:
                text = choice.get("text") or ""
            finish = choice.get("finish_reason")
            if text or finish:
                deltas.append(Delta(text=text, finish_reason=finish, index=choice.get("index", 0), raw=obj))
        if usage is not None:
            if deltas:  # servers that put usage on the last content chunk (llama.cpp)
                deltas[-1].usage = usage
            else:
                deltas.append(Delta(usage=usage, raw=obj))
        return deltas

    def _ollama(self, obj: dict) -> list[Delta]:
        if "error" in obj:
            self.done = True
            raise _stream_error(obj)
        if self.kind == "chat":
            text = (obj.get("message") or {}).get("content") or ""
        else:
            text = obj.get("response") or ""
        if obj.get("done"):
            self.done = True
            return [Delta(text=text, finish_reason=obj.get("done_reason") or "stop",
                          usage=Usage.from_ollama(obj), raw=obj)]
        return [Delta(text=text, raw=obj)] if text else []


class _StreamState:
    """What both stream kinds remember: the text so far, the finish reason, the usage."""

    def _init_state(self) -> None:
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.num_deltas = 0

    def _record(self, delta: Delta) -> None:
        if delta.index == 0:
            self.text += delta.text
            if delta.finish_reason:
                self.finish_reason = delta.finish_reason
        if delta.text:
            self.num_deltas += 1
        if delta.usage is not None:
            self.usage = delta.usage


# ----------------------------------------------------------------------------- sync


class Stream(_StreamState):
    """Iterator of `Delta`s over one streamed response; a context manager that always closes.

    After iteration, `text`, `finish_reason` and `usage` hold the totals.
    """

    def __init__(self, response: httpx.Response, api: str, kind: str) -> None:
        self.response = response
        self._decoder = _Decoder(api, kind)
        self._iterator = self._deltas()
        self.closed = False
        self._init_state()

    def _deltas(self) -> Iterator[Delta]:
        try:
            for line in self.response.iter_lines():
                for delta in self._decoder.feed(line):
                    self._record(delta)
                    yield delta
                if self._decoder.done:
                    break
            for delta in self._decoder.close():
                self._record(delta)
                yield delta
        except httpx.HTTPError as exc:
            raise _connection_error(exc) from exc
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


class _ClientBase:
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
        return _build_request(self.api, kind, payload, model, stream, params)


class Client(_ClientBase):
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
                return _ollama_model_ids(self._json("GET", "/api/tags"))
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

    def _resolve_model(self, model: str | None) -> str:
        """The model to ask for: the argument, else the client's, else the first one the server lists."""
        if model or self.model:
            return model or self.model  # type: ignore[return-value]
        ids = self.models()
        if not ids:
            raise RilletError("the server lists no models; pass model=")
        self.model = ids[0]
        return self.model

    def _generate(self, kind: str, payload: Any, stream: bool, model: str | None, params: Mapping[str, Any]):
        path, body = self._request_for(kind, payload, stream, self._resolve_model(model), params)
        if not stream:
            return _parse_completion(self.api, kind, self._json("POST", path, body))
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
            except httpx.ConnectError as exc:
                if attempt < self.max_retries:
                    _sleep(self._delay(attempt, None))
                    attempt += 1
                    continue
                raise _connection_error(exc) from exc
            except httpx.HTTPError as exc:
                raise _connection_error(exc) from exc
            if response.status_code < 400:
                return response
            try:
                content = response.read()
            except httpx.HTTPError:
                content = b""
            finally:
                response.close()
            error = _status_error(response.status_code, content, response.headers)
            if not self._should_retry(attempt, response.status_code):
                raise error
            _sleep(self._delay(attempt, error))
            attempt += 1


# ----------------------------------------------------------------------------- async


class AsyncStream(_StreamState):
    """Async twin of `Stream`. The request is sent on `await`, `async with` or the first `async for` step."""

    def __init__(self, client: AsyncClient, kind: str, payload: Any, model: str | None,
                 params: Mapping[str, Any]) -> None:
        self._client = client
        self._kind = kind
        self._payload = payload
        self._model = model
        self._params = params
        self.response: httpx.Response | None = None
        self._decoder = _Decoder(client.api, kind)
        self._iterator: AsyncIterator[Delta] | None = None
        self.closed = False
        self._init_state()

    async def _open(self) -> AsyncStream:
        if self.response is None:
            if self.closed:
                raise RuntimeError("stream is closed")
            client = self._client
            path, body = client._request_for(self._kind, self._payload, True,
                                             await client._resolve_model(self._model), self._params)
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
                for delta in self._decoder.feed(line):
                    self._record(delta)
                    yield delta
                if self._decoder.done:
                    break
            for delta in self._decoder.close():
                self._record(delta)
                yield delta
        except httpx.HTTPError as exc:
            raise _connection_error(exc) from exc
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


class AsyncClient(_ClientBase):
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
                return _ollama_model_ids(await self._json("GET", "/api/tags"))
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

    async def _resolve_model(self, model: str | None) -> str:
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
        path, body = self._request_for(kind, payload, False, await self._resolve_model(model), params)
        return _parse_completion(self.api, kind, await self._json("POST", path, body))

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
            except httpx.ConnectError as exc:
                if attempt < self.max_retries:
                    await _async_sleep(self._delay(attempt, None))
                    attempt += 1
                    continue
                raise _connection_error(exc) from exc
            except httpx.HTTPError as exc:
                raise _connection_error(exc) from exc
            if response.status_code < 400:
                return response
            try:
                content = await response.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                await response.aclose()
            error = _status_error(response.status_code, content, response.headers)
            if not self._should_retry(attempt, response.status_code):
                raise error
            await _async_sleep(self._delay(attempt, error))
            attempt += 1
