"""Tool calls over the HTTP APIs: one request's parsers and the wire shapes of their events
(`ToolSession`), and the conversation's tool messages in the shape chat templates take.

- `rillet.server.tool_schema`: tool definitions and `tool_choice` -> `ToolPlan`.
- `rillet.server.tool_parser`: generated text -> content and calls, incrementally.
- here: OpenAI deltas / messages and Ollama messages from the parser's events; OpenAI and
  Ollama assistant `tool_calls` and `role: "tool"` messages converted for the chat template
  (arguments as objects).
"""

from __future__ import annotations

import json
from typing import Any

from rillet.server.errors import APIError
from rillet.server.tool_parser import ToolCallParser, new_call_id
from rillet.server.tool_schema import ToolPlan, plan_tools

__all__ = ["ToolPlan", "ToolSession", "ollama_message", "openai_tool_message", "plan_tools"]


class ToolSession:
    """One request's parsers (one per choice) and the wire shapes of their events."""

    def __init__(self, plan: ToolPlan, n: int) -> None:
        self.plan = plan
        self.parsers = [ToolCallParser(plan) for _ in range(n)]
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
            entry["id"] = str(call_id or new_call_id())
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
