"""What the client returns: usage, streamed deltas, whole answers and tool calls."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping


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
class ToolCall:
    """A function the model asked to call. `arguments` is JSON text, as OpenAI sends it (Ollama's
    argument objects are serialised to match); `args` parses it."""

    name: str
    arguments: str = ""
    id: str | None = None

    @property
    def args(self) -> Any:
        """The arguments as Python values (ValueError if the model's JSON is not valid)."""
        return json.loads(self.arguments) if self.arguments else {}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> ToolCall:
        """One entry of `message.tool_calls`, OpenAI's shape or Ollama's."""
        function = obj.get("function") or {}
        arguments = function.get("arguments")
        if not isinstance(arguments, str):  # Ollama: an object
            arguments = json.dumps(arguments if arguments is not None else {})
        return cls(name=function.get("name") or "", arguments=arguments, id=obj.get("id"))


@dataclass
class Delta:
    """One piece of a streamed answer: new `text`, and on the last ones `finish_reason` and `usage`.
    `tool_calls` holds the pieces of tool calls this chunk carried, as the server sent them
    (OpenAI: `{"index", "id"?, "function": {"name"?, "arguments"?}}`; the stream assembles them)."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    index: int = 0
    tool_calls: list[dict] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)


@dataclass
class Completion:
    """A whole (non-streamed) answer; `choices` holds every choice's text when n > 1.
    `tool_calls` are the first choice's; `parsed` is the answer validated into the pydantic model
    given as `response_format` (None otherwise, or when the answer was cut short)."""

    text: str
    finish_reason: str | None
    usage: Usage | None
    model: str | None = None
    id: str | None = None
    choices: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    parsed: Any = None
    raw: dict = field(default_factory=dict, repr=False)

    def json(self) -> Any:
        """The answer's text parsed as JSON (for `response_format` JSON answers)."""
        return json.loads(self.text)


class ToolCallAssembler:
    """Builds whole tool calls from streamed pieces: OpenAI sends a call's id and name first, then
    its arguments in fragments, each tagged with the call's index; Ollama sends whole calls."""

    def __init__(self) -> None:
        self.calls: dict[int, ToolCall] = {}

    def add(self, pieces: list[dict], *, whole: bool = False) -> None:
        for piece in pieces:
            if whole:
                self.calls[len(self.calls)] = ToolCall.from_wire(piece)
                continue
            index = int(piece.get("index", len(self.calls)))
            call = self.calls.setdefault(index, ToolCall(name=""))
            function = piece.get("function") or {}
            if piece.get("id"):
                call.id = piece["id"]
            if function.get("name"):
                call.name += function["name"]
            if function.get("arguments"):
                call.arguments += function["arguments"]

    def result(self) -> list[ToolCall]:
        return [self.calls[i] for i in sorted(self.calls)]
