"""Tool definitions and `tool_choice` -> a `ToolPlan`.

`plan_tools` checks the request's tools and choice (400s naming the fault) and returns which
tools go to the chat template and, for `tool_choice: "required"` or a named function, the JSON
schema the output is constrained to (so even a small model emits a valid call).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from rillet.server.errors import APIError
from rillet.structured.spec import StructuredOutputs
from rillet.structured.tighten import close_objects

__all__ = ["MAX_TOOLS", "ToolPlan", "plan_tools"]

MAX_TOOLS = 128
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


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
                                "arguments": _hoist_defs(close_objects(t["function"]["parameters"]),
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
                        structured=StructuredOutputs.from_schema(close_objects(tool["function"]["parameters"])))
    raise APIError(400, f'tool_choice must be "none", "auto", "required" or a named function, got '
                        f'{json.dumps(tool_choice)[:80]}', param="tool_choice")
