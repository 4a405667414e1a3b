"""The wire formats: request bodies for both APIs, whole answers, and the SSE / NDJSON stream
decoder that turns lines into deltas."""

from __future__ import annotations

import json
from typing import Any, Literal, Mapping, Sequence

from rillet.client.errors import StreamError, stream_error
from rillet.client.results import Completion, Delta, ToolCall, ToolCallAssembler, Usage
from rillet.protocol.params import OLLAMA_OPTION_NAMES
from rillet.structured.tighten import close_objects

Api = Literal["openai", "ollama"]
Messages = str | Sequence[Mapping[str, Any]]

_OLLAMA_BODY_FIELDS = ("format", "keep_alive", "raw", "system", "template", "think", "tools", "images", "suffix")


def _messages(messages: Messages) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


def _drop_none(params: Mapping[str, Any]) -> dict:
    return {k: v for k, v in params.items() if v is not None}


def pydantic_model(response_format: Any) -> Any:
    """The pydantic model class given as `response_format`, else None."""
    return response_format if isinstance(response_format, type) and hasattr(response_format, "model_json_schema") \
        else None


def strict_schema(schema: Any) -> Any:
    """A pydantic model's JSON schema with every object closed (`additionalProperties: false`), as
    OpenAI's strict mode and the openai SDK's `.parse()` send it: otherwise a model may add keys of
    its own, which the schema allows but the pydantic model then has to ignore. (rillet's server
    closes them too; other servers may not.)"""
    return close_objects(schema)


def _model_schema(model: Any) -> dict:
    return strict_schema(model.model_json_schema())


def _openai_response_format(response_format: Any) -> Any:
    model = pydantic_model(response_format)
    if model is None:
        return response_format
    return {"type": "json_schema",
            "json_schema": {"name": model.__name__, "schema": _model_schema(model), "strict": True}}


def _ollama_format(response_format: Any) -> Any:
    """Ollama's `format` for an OpenAI-style `response_format` (or a pydantic model)."""
    model = pydantic_model(response_format)
    if model is not None:
        return _model_schema(model)
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema")
    if kind == "text":
        return None
    raise ValueError(f"response_format must be a pydantic model or an OpenAI response_format object, "
                     f"got {response_format!r}")


def build_request(api: str, kind: str, payload: Any, model: str, stream: bool,
                  params: Mapping[str, Any]) -> tuple[str, dict]:
    """(path, json body) for a chat ("chat") or completion ("complete") request."""
    params = _drop_none(params)
    if api == "openai":
        body: dict[str, Any] = {"model": model}
        if kind == "chat":
            body["messages"] = _messages(payload)
        else:
            body["prompt"] = payload
        if "response_format" in params:
            params["response_format"] = _openai_response_format(params["response_format"])
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
        if "tool_choice" in params or "parallel_tool_calls" in params:
            raise ValueError("tool_choice and parallel_tool_calls are OpenAI parameters; Ollama's API has neither")
        if "response_format" in params:
            fmt = _ollama_format(params.pop("response_format"))
            if fmt is not None:
                params["format"] = fmt
        options = dict(params.pop("options", None) or {})
        for name in _OLLAMA_BODY_FIELDS:
            if name in params:
                body[name] = params.pop(name)
        for name, value in params.items():
            options[OLLAMA_OPTION_NAMES.get(name, name)] = value
        if options:
            body["options"] = options
        return ("/api/chat" if kind == "chat" else "/api/generate"), body
    raise ValueError(f"api must be 'openai' or 'ollama', got {api!r}")


def parse_completion(api: str, kind: str, obj: dict, response_format: Any = None) -> Completion:
    if api == "ollama":
        message = obj.get("message") or {}
        text = message.get("content", "") if kind == "chat" else obj.get("response", "")
        done = obj.get("done_reason")
        calls = [ToolCall.from_wire(c) for c in message.get("tool_calls") or []]
        answer = Completion(text=text or "", finish_reason=done, usage=Usage.from_ollama(obj),
                            model=obj.get("model"), choices=[text or ""], tool_calls=calls, raw=obj)
    else:
        choices = sorted(obj.get("choices") or [], key=lambda c: c.get("index", 0))
        texts = []
        for choice in choices:
            if kind == "chat":
                texts.append((choice.get("message") or {}).get("content") or "")
            else:
                texts.append(choice.get("text") or "")
        first = choices[0] if choices else {}
        calls = [ToolCall.from_wire(c) for c in (first.get("message") or {}).get("tool_calls") or []]
        answer = Completion(text=texts[0] if texts else "", finish_reason=first.get("finish_reason"),
                            usage=Usage.from_openai(obj.get("usage")), model=obj.get("model"), id=obj.get("id"),
                            choices=texts, tool_calls=calls, raw=obj)
    model = pydantic_model(response_format)
    if model is not None and answer.finish_reason != "length" and answer.text:
        answer.parsed = model.model_validate_json(answer.text)
    return answer


def ollama_model_ids(obj: dict) -> list[str]:
    return [m.get("name") or m.get("model") for m in obj.get("models", [])]


class Decoder:
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
            raise stream_error(obj)
        deltas = []
        usage = Usage.from_openai(obj.get("usage"))
        choices = obj.get("choices") or []
        for choice in choices:
            delta = choice.get("delta") or {}
            text = (delta.get("content") or "") if self.kind == "chat" else (choice.get("text") or "")
            calls = (delta.get("tool_calls") or []) if self.kind == "chat" else []
            finish = choice.get("finish_reason")
            if text or finish or calls:
                deltas.append(Delta(text=text, finish_reason=finish, index=choice.get("index", 0),
                                    tool_calls=list(calls), raw=obj))
        if usage is not None:
            if deltas:  # servers that put usage on the last content chunk (llama.cpp)
                deltas[-1].usage = usage
            else:
                deltas.append(Delta(usage=usage, raw=obj))
        return deltas

    def _ollama(self, obj: dict) -> list[Delta]:
        if "error" in obj:
            self.done = True
            raise stream_error(obj)
        message = obj.get("message") or {}
        text = (message.get("content") or "") if self.kind == "chat" else (obj.get("response") or "")
        calls = list(message.get("tool_calls") or [])
        if obj.get("done"):
            self.done = True
            return [Delta(text=text, finish_reason=obj.get("done_reason") or "stop", tool_calls=calls,
                          usage=Usage.from_ollama(obj), raw=obj)]
        return [Delta(text=text, tool_calls=calls, raw=obj)] if text or calls else []


class StreamState:
    """What both stream kinds remember: the text so far, the finish reason, the usage, and the
    first choice's tool calls, assembled from their pieces."""

    def _init_state(self, api: str, kind: str) -> None:
        self._decoder = Decoder(api, kind)
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.num_deltas = 0
        self._tool_calls = ToolCallAssembler()
        self._whole_calls = api == "ollama"

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self._tool_calls.result()

    def _take(self, line: str | None) -> list[Delta]:
        """The deltas of one body line (None: the body ended), recorded."""
        deltas = self._decoder.close() if line is None else self._decoder.feed(line)
        for delta in deltas:
            self._record(delta)
        return deltas

    def _record(self, delta: Delta) -> None:
        if delta.index == 0:
            self.text += delta.text
            if delta.finish_reason:
                self.finish_reason = delta.finish_reason
            if delta.tool_calls:
                self._tool_calls.add(delta.tool_calls, whole=self._whole_calls)
        if delta.text:
            self.num_deltas += 1
        if delta.usage is not None:
            self.usage = delta.usage
