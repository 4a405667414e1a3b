"""Generated text -> content and tool calls, incrementally.

`ToolCallParser` has one code path for streamed and whole answers, so both agree: the
constrained JSON of `tool_choice` "required" (an array of calls) or a named function (its
arguments object), or in "auto" the model's own format: Hermes/SmolLM2
`<tool_call>{json}</tool_call>` (or a JSON list inside) and Llama 3.x's bare
`{"name": ..., "parameters": ...}`. Text that is not a call stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from rillet.server.tool_schema import ToolPlan

__all__ = ["Event", "ToolCall", "ToolCallParser", "new_call_id"]


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    name: str
    arguments: str = ""  # JSON text of the arguments object
    id: str = field(default_factory=new_call_id)
    complete: bool = False

    def arguments_object(self) -> Any:
        try:
            return json.loads(self.arguments) if self.arguments.strip() else {}
        except ValueError:
            return self.arguments

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def ollama(self) -> dict[str, Any]:
        return {"function": {"name": self.name, "arguments": self.arguments_object()}}


# A parser event: ("content", text) or ("call", index, arguments piece); a call's first event
# (arguments "" or more) announces it: its name and id are in parser.calls[index].
Event = tuple[Any, ...]


class _JsonScanner:
    """Incremental scan of JSON text: tracks nesting, and at depth `item_depth` the key/value spans
    of the objects there (for `[{"name": ..., "arguments": {...}}, ...]`, item_depth 2)."""

    def __init__(self, item_depth: int) -> None:
        self.item_depth = item_depth
        self.text = ""
        self.pos = 0
        self.stack: list[str] = []  # "[" or "{"
        self.expect_key = False  # inside an object at the top of the stack: the next string is a key
        self.in_string = False
        self.escape = False
        self.key_start = -1
        self.key: str | None = None  # the last key read at item_depth
        self.value_key: str | None = None  # the key of the value being read at item_depth
        self.value_start = -1
        self.value_is_scalar = False
        self.items: list[dict[str, Any]] = []  # per item object: key -> [start, end or None]
        self.done = False  # the outermost value closed
        self.error = False

    def feed(self, text: str) -> None:
        self.text += text
        text = self.text
        while self.pos < len(text) and not self.error:
            c = text[self.pos]
            depth = len(self.stack)
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    if self.key_start >= 0:
                        try:
                            self.key = json.loads(text[self.key_start:self.pos + 1])
                        except ValueError:
                            self.error = True
                        self.key_start = -1
                    elif depth == self.item_depth and self.value_start >= 0:
                        self._end_value(self.pos + 1)
                self.pos += 1
                continue
            if self.value_is_scalar and (c in ",}] \t\r\n"):
                self._end_value(self.pos)
            if c in " \t\r\n":
                pass
            elif self.done:
                self.error = True  # text after the whole value
            elif c == '"':
                self.in_string = True
                if self.stack and self.stack[-1] == "{" and self.expect_key:
                    self.expect_key = False
                    if depth == self.item_depth:
                        self.key_start = self.pos
                else:
                    self._start_value(depth, self.pos, scalar=False)
            elif c in "[{":
                self._start_value(depth, self.pos, scalar=False)
                self.stack.append(c)
                self.expect_key = c == "{"
                if c == "{" and len(self.stack) == self.item_depth:
                    self.items.append({})
            elif c in "]}":
                if not self.stack or self.stack.pop() != ("[" if c == "]" else "{"):
                    self.error = True
                    continue
                if len(self.stack) == self.item_depth and self.value_start >= 0:
                    self._end_value(self.pos + 1)
                self.expect_key = False
                if not self.stack:
                    self.done = True
            elif c == ",":
                self.expect_key = bool(self.stack) and self.stack[-1] == "{"
            elif c == ":":
                pass
            else:  # number, true, false, null
                if self.value_start < 0 or depth != self.item_depth:
                    self._start_value(depth, self.pos, scalar=True)
            self.pos += 1

    def _start_value(self, depth: int, at: int, *, scalar: bool) -> None:
        if depth == self.item_depth and self.items and self.key is not None and self.value_start < 0:
            self.value_start = at
            self.value_is_scalar = scalar
            self.value_key, self.key = self.key, None
            self.items[-1][self.value_key] = [at, None]
        elif depth == 0 and scalar:
            self.error = True  # a bare scalar is not a call

    def _end_value(self, end: int) -> None:
        if self.items and self.value_key is not None:
            self.items[-1][self.value_key][1] = end
        self.value_start = -1
        self.value_is_scalar = False
        self.value_key = None

    def span(self, item: int, key: str) -> tuple[int, int | None] | None:
        s = self.items[item].get(key) if item < len(self.items) else None
        return (s[0], s[1]) if s else None


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_LLAMA_HEAD = re.compile(r'\s*(?:<\|python_tag\|>)?\s*\[?\s*\{\s*"name"\s*:')


def _partial_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that starts `marker` (held back: it may be markup)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _calls_from_json(value: Any, names: frozenset[str] | None) -> list[tuple[str, Any]] | None:
    """[(name, arguments)] from a call object or a list of them; None if it is not that. `names`:
    the offered tools (bare JSON must name one of them to count as a call)."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict) or (names is not None and item["name"] not in names):
            return None
        calls.append((item["name"], args))
    return calls or None


class ToolCallParser:
    """Generated text -> events, incrementally; `feed` per delta, `finish` once at the end."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.calls: list[ToolCall] = []
        self.content_parts: list[str] = []
        self._pending = ""  # auto: text not yet classified
        self._mode = "content"  # auto: "content" | "call" (inside <tool_call>) | "json" (maybe Llama JSON)
        self._seen_content = False
        self._scanner = _JsonScanner(2) if plan.mode == "required" else None
        self._emitted: list[int] = []  # required: argument characters sent per call
        self._raw = ""  # required: all text (the answer if no call began)
        self._ws = ""  # named: trailing whitespace held back

    # ---- public

    def feed(self, text: str) -> list[Event]:
        if not text:
            return []
        if self.plan.mode == "named":
            return self._feed_named(text)
        if self.plan.mode == "required":
            return self._feed_required(text)
        self._pending += text
        return self._drain(final=False)

    def finish(self) -> list[Event]:
        if self.plan.mode == "named":
            return self._finish_named()
        if self.plan.mode == "required":
            return self._finish_required()
        return self._drain(final=True)

    @property
    def content(self) -> str | None:
        text = "".join(self.content_parts)
        return text or None

    # ---- named: the output is the arguments object

    def _feed_named(self, text: str) -> list[Event]:
        events: list[Event] = []
        if not self.calls:
            self.calls.append(ToolCall(self.plan.named or ""))
            events.append(("call", 0, ""))
        piece = self._ws + text
        if not self.calls[0].arguments:
            piece = piece.lstrip()
        body = piece.rstrip()
        self._ws = piece[len(body):]
        if body:
            self.calls[0].arguments += body
            events.append(("call", 0, body))
        return events

    def _finish_named(self) -> list[Event]:
        events: list[Event] = []
        if not self.calls:  # nothing generated: still a call (an empty arguments text)
            self.calls.append(ToolCall(self.plan.named or ""))
            events.append(("call", 0, ""))
        call = self.calls[0]
        try:
            json.loads(call.arguments)
            call.complete = True
        except ValueError:  # cut short (max_tokens): sent as far as it got, finish_reason says "length"
            pass
        return events

    # ---- required: the output is a JSON array of {name, arguments}

    def _feed_required(self, text: str) -> list[Event]:
        scanner = self._scanner
        assert scanner is not None
        self._raw += text
        scanner.feed(text)
        if scanner.error:
            return []
        events: list[Event] = []
        for i in range(len(scanner.items)):
            name_span = scanner.span(i, "name")
            if i >= len(self.calls):
                if not name_span or name_span[1] is None:
                    break  # arguments may come first (keys in any order): wait for the name
                try:
                    name = json.loads(scanner.text[name_span[0]:name_span[1]])
                except ValueError:
                    break
                self.calls.append(ToolCall(str(name)))
                self._emitted.append(0)
                events.append(("call", i, ""))
            args_span = scanner.span(i, "arguments")
            if args_span:
                end = args_span[1] if args_span[1] is not None else len(scanner.text)
                piece = scanner.text[args_span[0] + self._emitted[i]:end]
                if piece:
                    self._emitted[i] += len(piece)
                    self.calls[i].arguments += piece
                    events.append(("call", i, piece))
                if args_span[1] is not None and name_span and name_span[1] is not None:
                    self.calls[i].complete = True
        return events

    def _finish_required(self) -> list[Event]:
        if self.calls:  # cut short, calls stay as far as they got (finish_reason says "length")
            return []
        # no call began (the output is not the constrained array): the text is the answer
        self.content_parts = [self._raw] if self._raw else []
        return [("content", self._raw)] if self._raw else []

    # ---- auto: the model's own format

    def _emit_content(self, text: str, events: list[Event]) -> None:
        if not self._seen_content:
            text = text.lstrip()
        if text:
            self._seen_content = True
            self.content_parts.append(text)
            events.append(("content", text))

    def _add_calls(self, body: str, events: list[Event], names: frozenset[str] | None) -> bool:
        try:
            value = json.loads(body)
        except ValueError:
            return False
        calls = _calls_from_json(value, names)
        if calls is None:
            return False
        for name, args in calls:
            call = ToolCall(name, json.dumps(args, ensure_ascii=False), complete=True)
            self.calls.append(call)
            index = len(self.calls) - 1
            events.append(("call", index, ""))
            events.append(("call", index, call.arguments))
        return True

    def _drain(self, *, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            if self._mode == "call":
                end = self._pending.find(_CLOSE)
                if end < 0 and not final:
                    return events
                body = self._pending if end < 0 else self._pending[:end]
                if not self._add_calls(body.strip(), events, None):
                    self._emit_content(_OPEN + (body if end < 0 else self._pending[:end + len(_CLOSE)]), events)
                self._pending = "" if end < 0 else self._pending[end + len(_CLOSE):]
                self._mode = "content"
                continue
            if self._mode == "json":
                if not final:
                    return events
                body = self._pending.strip()
                if body.startswith(_PYTHON_TAG):
                    body = body[len(_PYTHON_TAG):]
                if not self._add_calls(body, events, self.plan.names):
                    self._emit_content(self._pending, events)
                self._pending = ""
                self._mode = "content"
                continue
            # content
            if not self._seen_content and not self.calls and self._could_be_llama_json(self._pending):
                if _LLAMA_HEAD.match(self._pending):
                    self._mode = "json"
                    continue
                if not final:
                    return events  # too short to tell yet
            start = self._pending.find(_OPEN)
            if start >= 0:
                self._emit_content(self._pending[:start].rstrip(), events)
                self._pending = self._pending[start + len(_OPEN):]
                self._mode = "call"
                continue
            keep = 0 if final else _partial_prefix(self._pending, _OPEN)
            text = self._pending[:len(self._pending) - keep]
            if not final:  # trailing whitespace waits: it is dropped before a call and at the end
                stripped = text.rstrip()
                keep += len(text) - len(stripped)
                text = stripped
            else:
                text = text.rstrip()
            self._emit_content(text, events)
            self._pending = self._pending[len(self._pending) - keep:] if keep else ""
            if final:
                self._pending = ""
            return events

    @staticmethod
    def _could_be_llama_json(text: str) -> bool:
        """True while `text` is, or may still grow into, the head of a Llama JSON call."""
        if _LLAMA_HEAD.match(text):
            return True
        stripped = re.sub(r"\s+", "", text)
        for head in ('{"name":', '[{"name":', _PYTHON_TAG + '{"name":', _PYTHON_TAG + '[{"name":'):
            if head.startswith(stripped):
                return True
        return False
