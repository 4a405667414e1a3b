"""JSON schemas for structured output, the corpus of benchmarks/bench_structured.py and of the
structured-output tests (engine and HTTP): `SCHEMAS` is a list of (name, schema). Each keeps its valid outputs short (bounded strings, small arrays) so a small
model finishes one within ~150 tokens; together they cover nested objects, arrays with
min/maxItems, enums, bounded numbers and integers, optional fields, $ref/$defs, string
patterns, booleans, nulls and anyOf."""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "minLength": 1, "maxLength": 12}
_SHORT = {"type": "string", "maxLength": 16}

SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("person", {
        "type": "object",
        "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False,
    }),
    ("boolean_flag", {
        "type": "object", "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"], "additionalProperties": False,
    }),
    ("enum_color", {
        "type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"], "additionalProperties": False,
    }),
    ("bounded_number", {
        "type": "object",
        "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60}},
        "required": ["temperature"], "additionalProperties": False,
    }),
    ("integer_range", {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["score"], "additionalProperties": False,
    }),
    ("nullable", {
        "type": "object", "properties": {"middle_name": {"type": ["string", "null"], "maxLength": 10}},
        "required": ["middle_name"], "additionalProperties": False,
    }),
    ("null_only", {
        "type": "object", "properties": {"nothing": {"type": "null"}},
        "required": ["nothing"], "additionalProperties": False,
    }),
    ("string_array", {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                "minItems": 1, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False,
    }),
    ("integer_array_exact", {
        "type": "object",
        "properties": {"digits": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                  "minItems": 3, "maxItems": 3}},
        "required": ["digits"], "additionalProperties": False,
    }),
    ("nested_object", {
        "type": "object",
        "properties": {"user": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                           "address": {"type": "object",
                                       "properties": {"city": _NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                       "required": ["city", "zip"], "additionalProperties": False}},
            "required": ["id", "address"], "additionalProperties": False,
        }},
        "required": ["user"], "additionalProperties": False,
    }),
    ("optional_fields", {
        "type": "object",
        "properties": {"title": _NAME, "subtitle": _SHORT, "pages": {"type": "integer", "minimum": 1, "maximum": 999}},
        "required": ["title"], "additionalProperties": False,
    }),
    ("all_optional", {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "boolean"}},
        "additionalProperties": False,
    }),
    ("defs_ref", {
        "type": "object",
        "$defs": {"point": {"type": "object",
                            "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                           "y": {"type": "integer", "minimum": -99, "maximum": 99}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False,
    }),
    ("definitions_ref", {
        "type": "object",
        "definitions": {"money": {"type": "object",
                                  "properties": {"amount": {"type": "number", "minimum": 0, "maximum": 1000},
                                                 "currency": {"enum": ["USD", "EUR", "JPY"]}},
                                  "required": ["amount", "currency"], "additionalProperties": False}},
        "properties": {"price": {"$ref": "#/definitions/money"}},
        "required": ["price"], "additionalProperties": False,
    }),
    ("string_pattern", {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
        "required": ["code"], "additionalProperties": False,
    }),
    ("date_pattern", {
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
        "required": ["date"], "additionalProperties": False,
    }),
    ("any_of_scalar", {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100},
                                           {"type": "string", "maxLength": 8}]}},
        "required": ["value"], "additionalProperties": False,
    }),
    ("any_of_objects", {
        "type": "object",
        "properties": {"shape": {"anyOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"},
                                              "r": {"type": "integer", "minimum": 1, "maximum": 50}},
             "required": ["kind", "r"], "additionalProperties": False},
            {"type": "object", "properties": {"kind": {"const": "square"},
                                              "side": {"type": "integer", "minimum": 1, "maximum": 50}},
             "required": ["kind", "side"], "additionalProperties": False},
        ]}},
        "required": ["shape"], "additionalProperties": False,
    }),
    ("const_field", {
        "type": "object",
        "properties": {"version": {"const": 2}, "name": _NAME},
        "required": ["version", "name"], "additionalProperties": False,
    }),
    ("array_of_objects", {
        "type": "object",
        "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z][0-9]{2}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False,
    }),
    ("top_level_array", {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
        "minItems": 2, "maxItems": 4,
    }),
    ("top_level_enum", {"enum": ["yes", "no", "maybe"]}),
    ("top_level_integer", {"type": "integer", "minimum": 1, "maximum": 1000}),
    ("top_level_boolean", {"type": "boolean"}),
    ("enum_mixed", {
        "type": "object", "properties": {"level": {"enum": [1, 2, 3, "max", None]}},
        "required": ["level"], "additionalProperties": False,
    }),
    ("weather_report", {
        "type": "object",
        "properties": {"city": _NAME,
                       "conditions": {"enum": ["sunny", "cloudy", "rain", "snow"]},
                       "high": {"type": "integer", "minimum": -40, "maximum": 50},
                       "low": {"type": "integer", "minimum": -40, "maximum": 50}},
        "required": ["city", "conditions", "high", "low"], "additionalProperties": False,
    }),
    ("tool_call_args", {
        "type": "object",
        "properties": {"query": {"type": "string", "minLength": 1, "maxLength": 20},
                       "limit": {"type": "integer", "minimum": 1, "maximum": 10},
                       "safe": {"type": "boolean"}},
        "required": ["query", "limit"], "additionalProperties": False,
    }),
    ("nested_arrays", {
        "type": "object",
        "properties": {"matrix": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "array", "minItems": 2, "maxItems": 2,
            "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
        "required": ["matrix"], "additionalProperties": False,
    }),
    ("ref_in_array", {
        "type": "object",
        "$defs": {"step": {"type": "object",
                           "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
                                          "done": {"type": "boolean"}},
                           "required": ["n", "done"], "additionalProperties": False}},
        "properties": {"steps": {"type": "array", "items": {"$ref": "#/$defs/step"}, "minItems": 1, "maxItems": 2}},
        "required": ["steps"], "additionalProperties": False,
    }),
    ("number_exclusive", {
        "type": "object",
        "properties": {"ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
        "required": ["ratio"], "additionalProperties": False,
    }),
    ("sentiment", {
        "type": "object",
        "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                       "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["label", "confidence"], "additionalProperties": False,
    }),
    ("email_like", {
        "type": "object",
        "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"}},
        "required": ["email"], "additionalProperties": False,
    }),
    ("unique_small_set", {
        "type": "object",
        "properties": {"picks": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 0, "maxItems": 2}},
        "required": ["picks"], "additionalProperties": False,
    }),
    ("open_object_small", {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["id"], "maxProperties": 1,
    }),
]
