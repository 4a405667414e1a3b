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

Structured output and tools, on both APIs::

    class City(pydantic.BaseModel):
        name: str
        population: int

    answer = client.chat("Name a big city", response_format=City)   # or a JSON schema dict
    answer.parsed                       # City(...), validated; answer.json() for a dict schema
    answer = client.chat("Weather in Paris?", tools=[{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        tool_choice="required")
    answer.tool_calls[0].name, answer.tool_calls[0].args             # "get_weather", {"city": "Paris"}

`response_format` takes a pydantic model class or OpenAI's `{"type": "json_object"}` /
`{"type": "json_schema", ...}`; with `api="ollama"` it becomes Ollama's `format`. `tools` are
OpenAI function definitions (Ollama takes the same); a stream assembles streamed tool calls into
`stream.tool_calls` as they arrive.

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

from rillet.client.aio import AsyncClient, AsyncStream
from rillet.client.base import DEFAULT_BASE_URL
from rillet.client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RilletError,
    ServiceUnavailableError,
    StreamError,
)
from rillet.client.results import Completion, Delta, ToolCall, Usage
from rillet.client.sync import Client, Stream

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
    "DEFAULT_BASE_URL",
    "Delta",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RilletError",
    "ServiceUnavailableError",
    "Stream",
    "StreamError",
    "ToolCall",
    "Usage",
]
