"""JSON schemas with their objects closed to keys they do not name.

A schema's object that lists `properties` and says nothing of others allows any further key (the
JSON Schema default). Constrained decoding then lets a small model add keys until max_tokens, and
the peers users come from do not: vLLM's default backend (xgrammar, strict mode) and llama.cpp's
grammar converter (Ollama's `format`) both read such an object as closed. So does rillet:
`close_objects` adds `additionalProperties: false` wherever a schema object names properties and
neither `additionalProperties` nor `unevaluatedProperties` is given. An explicit
`"additionalProperties": true` (or a schema) keeps an object open.

Objects that are parts of a larger one are left as they are: the members of an `allOf` (each
closed would forbid the others' keys) and a schema beside an `allOf` or a `$ref` (the keys come
from both). The walk goes only where the schema holds schemas, never into `const`, `enum`,
`default` or `examples` values.
"""

from __future__ import annotations

from typing import Any

__all__ = ["close_objects"]

# keywords whose value is a map of names to schemas, a list of schemas, or one schema (or, for
# `items` before draft 2020-12, a list)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMAS = ("additionalProperties", "unevaluatedProperties", "items", "additionalItems", "unevaluatedItems",
            "contains", "propertyNames", "not", "if", "then", "else")


def close_objects(schema: Any) -> Any:
    """A copy of `schema` with every object that names properties closed to others (see above);
    anything that is not a schema object (a boolean schema) is returned as it is."""
    return _walk(schema, close_here=True)


def _walk(schema: Any, close_here: bool) -> Any:
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _walk(sub, True) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_walk(sub, True) for sub in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_walk(sub, False) for sub in out["allOf"]]
    for key in _SCHEMAS:
        value = out.get(key)
        if isinstance(value, list):
            out[key] = [_walk(sub, True) for sub in value]
        elif isinstance(value, dict):
            out[key] = _walk(value, True)
    named = isinstance(out.get("properties"), dict) or isinstance(out.get("patternProperties"), dict)
    composed = "allOf" in out or "$ref" in out
    if close_here and named and not composed and "additionalProperties" not in out \
            and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out
