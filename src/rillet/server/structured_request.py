"""API fields that constrain the output -> `StructuredOutputs`.

OpenAI's `response_format`, vLLM's `structured_outputs` (and its older top-level `guided_*`
aliases) and Ollama's `format` all become one `StructuredOutputs`; more than one constraint in a
request is a 400 naming the fields. JSON schemas keep their key order (the order the output's
properties are generated in). Whether a schema, regex or grammar compiles is the engine's
check (`add_request` raises ValueError, which serving answers with a 400).
"""

from __future__ import annotations

import json
from typing import Any

from rillet.server.errors import APIError
from rillet.structured.spec import StructuredOutputs

__all__ = ["ollama_structured", "openai_structured"]

_GUIDED_ALIASES = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                   "guided_grammar": "grammar"}
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def _schema(value: Any, param: str) -> dict[str, Any] | bool:
    """A JSON schema given as an object or as JSON text (vLLM accepts both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise APIError(400, f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, (dict, bool)):
        raise APIError(400, f"{param} must be a JSON schema object, got {type(value).__name__}", param=param)
    return value


def _checked(spec: StructuredOutputs, param: str) -> StructuredOutputs:
    try:
        spec.validate()
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None
    return spec


def _from_kind(kind: str, value: Any, param: str) -> StructuredOutputs:
    if kind == "json":
        return _checked(StructuredOutputs.from_schema(_schema(value, param)), param)
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise APIError(400, f"{param} must be a list of strings", param=param)
        return _checked(StructuredOutputs(choice=tuple(value)), param)
    if not isinstance(value, str):
        raise APIError(400, f"{param} must be a string", param=param)
    spec = StructuredOutputs(regex=value) if kind == "regex" else StructuredOutputs(grammar=value)
    return _checked(spec, param)


def _response_format(fmt: Any) -> StructuredOutputs | None:
    if not isinstance(fmt, dict):
        raise APIError(400, "response_format must be an object with a type", param="response_format")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(400, "response_format json_schema needs a json_schema object holding the schema",
                           param="response_format")
        if "schema" not in spec:  # OpenAI's field; vLLM also took `json_schema.json_schema` long ago
            raise APIError(400, "response_format.json_schema.schema is missing: give the JSON schema the "
                                "output must follow", param="response_format")
        return _from_kind("json", spec["schema"], "response_format.json_schema.schema")
    raise APIError(400, f"response_format type {kind!r} is not supported (use text, json_object or json_schema)",
                   param="response_format")


def openai_structured(req: Any, tool_constraint: StructuredOutputs | None = None
                      ) -> tuple[StructuredOutputs | None, str | None]:
    """(the one constraint of an OpenAI or vLLM-style request, the field that gave it), or
    (None, None); 400 if there are several. `tool_constraint`: the one `tool_choice` "required"
    or a named function implies."""
    found: list[tuple[str, StructuredOutputs]] = []
    if tool_constraint is not None:
        found.append(("tool_choice", tool_constraint))
    fmt = getattr(req, "response_format", None)
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            found.append(("response_format", spec))
    extra = req.model_extra or {}
    so = extra.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise APIError(400, "structured_outputs must be an object", param="structured_outputs")
        for key in _STRUCTURED_KEYS:
            value = so.get(key)
            if value is None or (key == "json_object" and value is False):
                continue
            found.append((f"structured_outputs.{key}", _from_kind(key, value, f"structured_outputs.{key}")))
    for alias, kind in _GUIDED_ALIASES.items():
        value = extra.get(alias)
        if value is not None:
            found.append((alias, _from_kind(kind, value, alias)))
    if extra.get("guided_json_object"):
        found.append(("guided_json_object", StructuredOutputs(json_object=True)))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(400, f"only one output constraint may be given per request, got {names}",
                       param=found[1][0])
    return (found[0][1], found[0][0].split(".")[0]) if found else (None, None)


def ollama_structured(fmt: Any) -> StructuredOutputs | None:
    """Ollama's `format`: "json" (any JSON object), a JSON schema object, or absent/"" (free text)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return StructuredOutputs(json_object=True)
    if isinstance(fmt, dict):
        return _checked(StructuredOutputs.from_schema(fmt), "format")
    raise APIError(400, f'format must be "json" or a JSON schema object, got {json.dumps(fmt)[:80]}',
                   param="format")
