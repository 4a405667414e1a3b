"""Tool calling over the HTTP APIs: tool definitions and `tool_choice` in, `tool_calls` out.

- `plan_tools` checks the request's tools and choice and returns a `ToolPlan`: which tools go to
  the chat template, and for `tool_choice: "required"` or a named function the JSON schema the
  output is constrained to (so even a small model emits a valid call).
- `ToolCallParser` turns generated text into content and tool calls incrementally (one code path
  for streamed and whole answers, so both agree): the constrained JSON of "required"/named, or in
  "auto" the model's own format: Hermes/SmolLM2 `<tool_call>{json}</tool_call>` (or a JSON list
  inside) and Llama 3.x's bare `{"name": ..., "parameters": ...}`. Text that is not a call stays
  content.
- Message conversion: OpenAI and Ollama assistant `tool_calls` and `role: "tool"` messages to the
  shape chat templates take (arguments as objects).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from rillet.server.errors import APIError
from rillet.structured.spec import StructuredOutputs

__all__ = ["ToolCall", "ToolCallParser", "ToolPlan", "ToolSession", "ollama_message", "openai_tool_message",
           "plan_tools"]

MAX_TOOLS = 128
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ------------------------------------------------------------------ tool definitions and tool_choice


def _check_tools(tools: Any, param: str) -> list[dict[str, Any]]:
    """Normalised OpenAI function definitions; 400 naming what is wrong."""
    if not isinstance(tools, list):
        raise APIError(400, f"{param} must be a list of tool definitions", param=param)
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"{param} may hold at most {MAX_TOOLS} tools, got {len(tools)}", param=param)
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict):
            raise APIError(400, f"{where} must be an object", param=param)
        if tool.get("type", "function") != "function":
            raise APIError(400, f"{where}.type must be 'function', got {tool.get('type')!r}", param=param)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise APIError(400, f"{where}.function must be an object with a name", param=param)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"{where}.function.name is missing", param=param)
        if not _NAME_RE.fullmatch(name):
            raise APIError(400, f"{where}.function.name {name!r} must be 1-64 letters, digits, '_', '-' or '.'",
                           param=param)
        if name in names:
            raise APIError(400, f"{where}.function.name {name!r} is defined twice", param=param)
        names.add(name)
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = _EMPTY_PARAMETERS  # OpenAI: no parameters means a function without arguments
        if not isinstance(parameters, dict):
            raise APIError(400, f"{where}.function.parameters must be a JSON schema object", param=param)
        if parameters.get("type", "object") != "object":
            raise APIError(400, f"{where}.function.parameters must describe an object (type 'object')",
                           param=param)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise APIError(400, f"{where}.function.description must be a string", param=param)
        clean = {"name": name, "parameters": parameters}
        if description:
            clean["description"] = description
        out.append({"type": "function", "function": clean})
    return out


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for generation.

    mode: "auto" (parse the model's own format), "required" (output is a JSON array of calls)
    or "named" (output is the named function's arguments object).
    tools: the definitions the chat template sees. structured: the constraint for required/named.
    """

    mode: str
    tools: list[dict[str, Any]]
    names: frozenset[str]
    named: str | None = None
    structured: StructuredOutputs | None = None

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self)


def _closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on objects that list properties and say
    nothing about others: a forced call then holds only the declared arguments (still valid
    against the tool's own schema), where a small model otherwise invents keys without end."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _closed(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if isinstance(out.get("items"), dict):
        out["items"] = _closed(out["items"])
    return out


def _hoist_defs(schema: Any, prefix: str, defs: dict[str, Any]) -> Any:
    """`schema` with its `$defs`/`definitions` moved into `defs` (names prefixed) and its local
    `$ref`s rewritten to match: nested under the call array, "#/$defs/X" would no longer
    resolve (pydantic and openai.pydantic_function_tool write nested models that way)."""
    if isinstance(schema, list):
        return [_hoist_defs(v, prefix, defs) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():
                defs[prefix + name] = _hoist_defs(sub, prefix, defs)
        elif key == "$ref" and isinstance(value, str) and value.startswith(("#/$defs/", "#/definitions/")):
            out[key] = "#/$defs/" + prefix + value.split("/", 2)[2]
        else:
            out[key] = _hoist_defs(value, prefix, defs)
    return out


def _required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    # name before arguments: the model picks the function, then writes its arguments
    variants = [{"type": "object",
                 "properties": {"name": {"const": t["function"]["name"]},
                                "arguments": _hoist_defs(_closed(t["function"]["parameters"]),
                                                         t["function"]["name"] + "__", defs)},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": variants[0] if len(variants) == 1 else {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def plan_tools(tools: Any, tool_choice: Any = None, parallel_tool_calls: bool | None = None) -> ToolPlan | None:
    """The request's ToolPlan, or None when no tool may be called (no tools, or tool_choice "none")."""
    if tool_choice is not None and tool_choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools: give the tool definitions in tools", param="tool_choice")
    if not tools:
        return None
    checked = _check_tools(tools, "tools")
    names = frozenset(t["function"]["name"] for t in checked)
    if tool_choice is None or tool_choice == "auto":
        return ToolPlan("auto", checked, names)
    if tool_choice == "none":
        return None
    parallel = parallel_tool_calls is not False
    if tool_choice == "required":
        return ToolPlan("required", checked, names,
                        structured=StructuredOutputs.from_schema(_required_schema(checked, parallel)))
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise APIError(400, 'tool_choice must be "none", "auto", "required" or '
                                '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        if name not in names:
            raise APIError(400, f"tool_choice names function {name!r}, which is not among tools "
                                f"({', '.join(sorted(names))})", param="tool_choice")
        (tool,) = [t for t in checked if t["function"]["name"] == name]
        return ToolPlan("named", [tool], names, named=name,
                        structured=StructuredOutputs.from_schema(_closed(tool["function"]["parameters"])))
    raise APIError(400, f'tool_choice must be "none", "auto", "required" or a named function, got '
                        f'{json.dumps(tool_choice)[:80]}', param="tool_choice")


# ------------------------------------------------------------------ incremental parsing


@dataclass
class ToolCall:
    name: str
    arguments: str = ""  # JSON text of the arguments object
    id: str = field(default_factory=_new_call_id)
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
Event = tuple


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


# ------------------------------------------------------------------ per-request session


class ToolSession:
    """One request's parsers (one per choice) and the wire shapes of their events."""

    def __init__(self, plan: ToolPlan, n: int) -> None:
        self.plan = plan
        self.parsers = [plan.parser() for _ in range(n)]
        self._ollama_sent = [0] * n

    def finish_reason(self, index: int, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.parsers[index].calls else reason

    # ---- OpenAI

    def openai_deltas(self, index: int, text: str, finished: bool) -> list[dict[str, Any]]:
        """Chat chunk deltas for one engine output: content, or tool_calls[i] (id, type and name
        first, then the arguments in pieces)."""
        parser = self.parsers[index]
        events = parser.feed(text) + (parser.finish() if finished else [])
        deltas: list[dict[str, Any]] = []
        for event in events:
            if event[0] == "content":
                if deltas and "content" in deltas[-1]:
                    deltas[-1]["content"] += event[1]
                else:
                    deltas.append({"content": event[1]})
                continue
            _, i, piece = event
            if piece == "":  # a call's first event: id, type and name
                call = parser.calls[i]
                deltas.append({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            elif piece:
                last = deltas[-1]["tool_calls"][0] if deltas and "tool_calls" in deltas[-1] else None
                if last is not None and last["index"] == i and "id" not in last:  # not into the announcement
                    last["function"]["arguments"] += piece
                else:
                    deltas.append({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        return deltas

    def openai_message(self, index: int, text: str) -> dict[str, Any]:
        parser = self.parsers[index]
        parser.feed(text)
        parser.finish()
        message: dict[str, Any] = {"role": "assistant", "content": parser.content}
        if parser.calls:
            message["tool_calls"] = [c.openai() for c in parser.calls]
        return message

    # ---- Ollama (tool calls are sent whole, as Ollama does)

    def ollama_events(self, index: int, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool calls completed by this output) for one engine output."""
        parser = self.parsers[index]
        events = parser.feed(text) + (parser.finish() if finished else [])
        content = "".join(e[1] for e in events if e[0] == "content")
        done = self._ollama_sent[index]
        # calls complete in order; stop at the first one still being written (at the end: send all)
        count = 0
        for c in parser.calls[done:]:
            if not c.complete and not finished:
                break
            count += 1
        ready = parser.calls[done:done + count]
        self._ollama_sent[index] += count
        return content, [c.ollama() for c in ready]

    def ollama_message(self, index: int, text: str) -> dict[str, Any]:
        parser = self.parsers[index]
        parser.feed(text)
        parser.finish()
        message: dict[str, Any] = {"role": "assistant", "content": parser.content or ""}
        if parser.calls:
            message["tool_calls"] = [c.ollama() for c in parser.calls]
        return message


# ------------------------------------------------------------------ conversation messages


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise APIError(400, f"{where} is not valid JSON", param="messages") from None
    if not isinstance(value, dict):
        raise APIError(400, f"{where} must be a JSON object", param="messages")
    return value


def _template_calls(tool_calls: Any, where: str, *, ids: bool) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list):
        raise APIError(400, f"{where} must be a list", param="messages")
    out = []
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"{where}[{j}].function.name is missing", param="messages")
        entry = {"type": "function", "function": {
            "name": fn["name"], "arguments": _arguments(fn.get("arguments", {}), f"{where}[{j}].function.arguments")}}
        call_id = call.get("id")
        if ids or call_id:
            entry["id"] = str(call_id or _new_call_id())
        out.append(entry)
    return out


def openai_tool_message(i: int, role: str, content: str, extra: dict[str, Any],
                        names_by_id: dict[str, str]) -> dict[str, Any]:
    """An OpenAI assistant message with `tool_calls`, or a `tool` message, in the chat-template
    shape: arguments as objects, a tool result with `tool_call_id` and the called function's
    `name` (looked up from the assistant message that made the call)."""
    if role == "tool":
        call_id = extra.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise APIError(400, f"messages[{i}] (role tool) needs tool_call_id", param="messages")
        message = {"role": "tool", "content": content, "tool_call_id": call_id}
        name = names_by_id.get(call_id) or extra.get("name")
        if name:
            message["name"] = name
        return message
    calls = _template_calls(extra["tool_calls"], f"messages[{i}].tool_calls", ids=True)
    for call in calls:
        names_by_id[call["id"]] = call["function"]["name"]
    return {"role": "assistant", "content": content, "tool_calls": calls}


def ollama_message(i: int, m: Any) -> dict[str, Any]:
    """An Ollama message (with `tool_calls` or `tool_name`) in the chat-template shape."""
    message: dict[str, Any] = {"role": m.role, "content": m.content or ""}
    if m.tool_calls:
        if m.role != "assistant":
            raise APIError(400, f"messages[{i}]: only assistant messages carry tool_calls", param="messages")
        message["tool_calls"] = _template_calls(m.tool_calls, f"messages[{i}].tool_calls", ids=False)
    if m.role == "tool" and m.tool_name:
        message["name"] = m.tool_name
    return message
