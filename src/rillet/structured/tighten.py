"""JSON schemas read the way constrained decoding should read them: objects closed to keys they
do not name, numbers bounded in length.

Objects. A schema's object that lists `properties` and says nothing of others allows any further
key (the JSON Schema default). Constrained decoding then lets a small model add keys until
max_tokens, and the peers users come from do not: vLLM's default backend (xgrammar, strict mode)
and llama.cpp's grammar converter (Ollama's `format`) both read such an object as closed. So does
rillet: `close_objects` adds `additionalProperties: false` wherever a schema object names
properties and neither `additionalProperties` nor `unevaluatedProperties` is given. An explicit
`"additionalProperties": true` (or a schema) keeps an object open.

The members of an `allOf` are parts of one object, so each is left open (closed, each would
forbid the others' keys); where every member is a plain object naming its properties, the
`allOf` itself is closed to the union of their names (as llama.cpp merges them). A schema beside
a `$ref` is left open (its keys come from both), and so is a definition that an `allOf` member
or such a schema refers to (closed, it would forbid the keys added beside it). The walk goes only
where the schema holds schemas, never into `const`, `enum`, `default` or `examples` values, nor
into `not` or `if` (narrower there, a schema lets through what it refused).

Numbers. An unbounded number lets a small model write digits until max_tokens (a quarter of
SmolLM2-135M's answers to one-number schemas did). llama.cpp's converter allows 16 digits before
the point and 16 after; `tighten` (what the grammar compiles) also closes objects, and gives an
integer or number that lacks them the bounds +-(10^16 - 1), and a number without `multipleOf`
a multipleOf of 1e-10 (at most 10 digits after the point: the finest llguidance takes). A
`date-time` or `time` string without maxLength gets one (40 and 30 characters) for the same
reason: their fractions of a second have no end of their own. Every output still validates
against the schema as given.
"""

from __future__ import annotations

from typing import Any

__all__ = ["close_objects", "tighten"]

NUMBER_LIMIT = 10**16 - 1  # 16 digits, as llama.cpp's integral part
NUMBER_STEP = 1e-10  # 10 digits after the point
FORMAT_LENGTHS = {"date-time": 40, "time": 30}  # 2018-04-17T09:30:00.123456789+01:00 is 35

# keywords whose value is a map of names to schemas, a list of schemas, or one schema (or, for
# `items` before draft 2020-12, a list). Not `not` or `if`: a narrower schema there would let
# through what the schema as given refuses.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMAS = ("additionalProperties", "unevaluatedProperties", "items", "additionalItems", "unevaluatedItems",
            "contains", "propertyNames", "then", "else")


def close_objects(schema: Any) -> Any:
    """A copy of `schema` with every object that names properties closed to others (see above);
    anything that is not a schema object (a boolean schema) is returned as it is."""
    return _Walk(schema, bound_numbers=False).schema(schema, True)


def tighten(schema: Any) -> Any:
    """close_objects(schema), with integers and numbers bounded too (see above): the schema the
    grammar is compiled from."""
    return _Walk(schema, bound_numbers=True).schema(schema, True)


class _Walk:
    def __init__(self, root: Any, bound_numbers: bool) -> None:
        self.extended: set[str] = set()
        _extended_refs(root, self.extended)
        self.bound_numbers = bound_numbers

    def schema(self, schema: Any, close_here: bool) -> Any:
        if not isinstance(schema, dict):
            return schema
        out = dict(schema)
        for key in _SCHEMA_MAPS:
            if isinstance(out.get(key), dict):
                defs = key in ("$defs", "definitions")
                out[key] = {name: self.schema(sub, not (defs and f"#/{key}/{name}" in self.extended))
                            for name, sub in out[key].items()}
        for key in _SCHEMA_LISTS:
            if isinstance(out.get(key), list):
                out[key] = [self.schema(sub, True) for sub in out[key]]
        if isinstance(out.get("allOf"), list):
            out["allOf"] = [self.schema(sub, False) for sub in out["allOf"]]
        for key in _SCHEMAS:
            value = out.get(key)
            if isinstance(value, list):
                out[key] = [self.schema(sub, True) for sub in value]
            elif isinstance(value, dict):
                out[key] = self.schema(value, True)
        if self.bound_numbers:
            _bound_number(out)
            if out.get("format") in FORMAT_LENGTHS and "maxLength" not in out:
                out["maxLength"] = FORMAT_LENGTHS[out["format"]]
        return _close(out, close_here)


def _bound_number(out: dict[str, Any]) -> None:
    """Bounds (and, for a number, a step) on a schema whose type admits integers or numbers, each
    only where the schema gives none and where it leaves the range non-empty."""
    given = out.get("type")
    kinds = {given} if isinstance(given, str) else set(given) if isinstance(given, list) else set()
    if not kinds & {"integer", "number"} or "enum" in out or "const" in out:  # listed values stand as given
        return
    low, high = _limit(out, "minimum", "exclusiveMinimum"), _limit(out, "maximum", "exclusiveMaximum")
    if low is None and (high is None or abs(high) < NUMBER_LIMIT):  # a far bound stays one-sided
        out["minimum"] = -NUMBER_LIMIT
    if high is None and (low is None or abs(low) < NUMBER_LIMIT):
        out["maximum"] = NUMBER_LIMIT
    if "number" in kinds and "multipleOf" not in out:
        out["multipleOf"] = NUMBER_STEP


def _limit(schema: dict[str, Any], inclusive: str, exclusive: str) -> float | None:
    """The schema's bound on one side (draft 4's boolean exclusive form read through its
    inclusive value); None if it gives none."""
    for key in (exclusive, inclusive):
        value = schema.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None


def _close(out: dict[str, Any], close_here: bool) -> Any:
    if not close_here or "$ref" in out or "additionalProperties" in out or "unevaluatedProperties" in out:
        return out
    if "allOf" in out:
        names = _member_names(out["allOf"])  # walked without closing: the names and keys as given
        if names is None or "patternProperties" in out:
            return out
        own = out.get("properties") if isinstance(out.get("properties"), dict) else {}
        out["properties"] = {**own, **{name: {} for name in names if name not in own}}
    elif not (isinstance(out.get("properties"), dict) or isinstance(out.get("patternProperties"), dict)):
        return out
    out["additionalProperties"] = False
    return out


def _extended_refs(value: Any, found: set[str]) -> None:
    """The `$ref`s that an `allOf` member makes, or that sit beside `properties` (a definition
    extended with more keys), anywhere in `value`."""
    if isinstance(value, list):
        for item in value:
            _extended_refs(item, found)
        return
    if not isinstance(value, dict):
        return
    if isinstance(value.get("$ref"), str) and "properties" in value:
        found.add(value["$ref"])
    for member in value.get("allOf") or []:
        if isinstance(member, dict) and isinstance(member.get("$ref"), str):
            found.add(member["$ref"])
    for sub in value.values():
        _extended_refs(sub, found)


def _member_names(members: Any) -> list[str] | None:
    """The property names of `allOf` members that are all plain objects naming their properties
    and closed to nothing else of their own accord, in order; None if any is not."""
    if not isinstance(members, list):
        return None
    names: list[str] = []
    for member in members:
        if not isinstance(member, dict) or not isinstance(member.get("properties"), dict) or any(
                key in member for key in ("additionalProperties", "unevaluatedProperties", "patternProperties",
                                          "$ref", "allOf", "anyOf", "oneOf")):
            return None
        names += [name for name in member["properties"] if name not in names]
    return names
