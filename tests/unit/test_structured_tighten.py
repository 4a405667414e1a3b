"""JSON schemas as constrained decoding reads them (structured/tighten.py): objects closed to keys
they do not name, as vLLM's xgrammar and llama.cpp's converter read them, numbers bounded in
length, as llama.cpp's are; and what the compiled grammar then allows."""

import copy
import json

import pytest

from rillet.models.loader import load_tokenizer
from rillet.models.resolve import resolve_model
from rillet.structured import StructuredOutputs
from rillet.structured.tighten import FORMAT_LENGTHS, NUMBER_LIMIT, NUMBER_STEP, close_objects, tighten
from rillet.structured.grammar import grammar_compiler
from rillet.structured.matcher import Guide

POINT = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}


def test_every_object_that_names_properties_is_closed_wherever_schemas_nest():
    schema = {
        "type": "object",
        "properties": {"p": POINT, "list": {"type": "array", "items": POINT},
                       "pair": {"type": "array", "prefixItems": [POINT, {"$ref": "#/$defs/named"}]},
                       "either": {"anyOf": [POINT, {"type": "null"}]}, "one": {"oneOf": [POINT]},
                       "map": {"type": "object", "additionalProperties": POINT},
                       "old_tuple": {"type": "array", "items": [POINT]},
                       "patterned": {"patternProperties": {"^a": {"type": "string"}}}},
        "$defs": {"named": POINT}, "definitions": {"legacy": POINT},
    }
    before = copy.deepcopy(schema)
    closed = close_objects(schema)
    assert schema == before  # a copy: the caller's schema is not changed
    props = closed["properties"]
    found = [closed, props["p"], props["list"]["items"], props["pair"]["prefixItems"][0],
             props["either"]["anyOf"][0], props["one"]["oneOf"][0], props["map"]["additionalProperties"],
             props["old_tuple"]["items"][0], props["patterned"],
             closed["$defs"]["named"], closed["definitions"]["legacy"]]
    assert [s.get("additionalProperties") for s in found] == [False] * len(found)
    assert props["pair"]["prefixItems"][1] == {"$ref": "#/$defs/named"}  # a reference, not an object
    assert "additionalProperties" not in props["either"]["anyOf"][1]


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
    {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "integer"}},
    {"type": "object", "properties": {"a": {}}, "unevaluatedProperties": False},
    {"type": "object"},  # no properties named: any object (json_object mode)
    {"type": "object", "additionalProperties": {"type": "string"}},
    {"allOf": [POINT, {"$ref": "#/$defs/p"}], "$defs": {"p": POINT}},  # a member that is not a plain object
    {"allOf": [POINT, {"properties": {"y": {}}, "additionalProperties": True}]},  # a member open on purpose
    {"$ref": "#/$defs/base", "properties": {"extra": {}}, "$defs": {"base": {"type": "object"}}},
    True, False,
])
def test_objects_left_open_on_purpose_stay_open(schema):
    closed = close_objects(schema)
    if isinstance(schema, bool):
        assert closed is schema
        return
    assert closed.get("additionalProperties") == schema.get("additionalProperties")
    assert closed.get("allOf") == schema.get("allOf")  # members are parts of one object: left open


def test_an_allof_of_plain_objects_is_closed_to_the_union_of_their_names_and_its_members_stay_open():
    schema = {"allOf": [POINT, {"type": "object", "properties": {"y": {"type": "integer"}, "x": {}}}]}
    closed = close_objects(schema)
    assert closed["properties"] == {"x": {}, "y": {}} and closed["additionalProperties"] is False
    assert closed["allOf"] == schema["allOf"]  # each member closed would forbid the other's keys
    own = close_objects({**schema, "properties": {"z": {"type": "string"}}})
    assert list(own["properties"]) == ["z", "x", "y"] and own["properties"]["z"] == {"type": "string"}


def test_a_definition_extended_with_more_keys_stays_open():
    """JSON Schema's inheritance idiom: a base definition plus keys beside it, through allOf or a
    $ref with sibling properties; closed, the base would forbid the added keys."""
    base = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}
    schema = {"$defs": {"Base": base, "Other": base},
              "type": "object", "properties": {
                  "a": {"allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"name": {"type": "string"}}}]},
                  "b": {"$ref": "#/$defs/Base", "properties": {"tag": {"type": "string"}}},
                  "c": {"$ref": "#/$defs/Other"}}}
    closed = close_objects(schema)
    assert closed["$defs"]["Base"] == base  # extended: left open
    assert closed["$defs"]["Other"]["additionalProperties"] is False  # only referred to: closed
    assert closed["additionalProperties"] is False


def test_negations_and_conditions_are_left_as_given():
    """Narrower there, the schema would let through what it refuses as given: `not` a closed point
    allows points with more keys, which `not` the open point refuses."""
    schema = {"not": POINT, "if": POINT, "then": POINT, "else": {"type": "integer"}}
    out = tighten(schema)
    assert out["not"] == POINT and out["if"] == POINT
    assert out["then"]["additionalProperties"] is False and out["else"]["maximum"] == NUMBER_LIMIT


def test_values_are_not_schemas_and_are_left_as_they_are():
    value = {"properties": {"k": 1}}
    schema = {"type": "object", "properties": {"c": {"const": value}, "e": {"enum": [value]},
                                               "d": {"type": "object", "default": value, "examples": [value]}}}
    props = close_objects(schema)["properties"]
    assert props["c"]["const"] == value and props["e"]["enum"] == [value]
    assert props["d"]["default"] == value and props["d"]["examples"] == [value]
    # a property called "properties" is a name, not a keyword: its schema is what gets closed
    named = close_objects({"type": "object", "properties": {"properties": POINT}})
    assert named["properties"] == {"properties": {**POINT, "additionalProperties": False}}


@pytest.fixture(scope="module")
def compiler():
    tokenizer = load_tokenizer(resolve_model(None).path)
    return tokenizer, grammar_compiler(tokenizer, [tokenizer.eos_token_id])


def _accepts(compiler, schema, text: str) -> bool:
    tokenizer, grammar = compiler
    guide = Guide(grammar.compile(StructuredOutputs.from_schema(schema)))
    return all(guide.accept(token) for token in tokenizer.encode(text))


def test_the_compiled_grammar_refuses_keys_the_schema_does_not_name(compiler):
    """A schema sent as it is (Ollama's `format` from pydantic's model_json_schema(), a raw
    response_format): a key it does not name is refused, nested objects too, unless the schema
    opens the object itself."""
    nested = {"type": "object", "properties": {"p": POINT}, "required": ["p"]}
    assert _accepts(compiler, POINT, '{"x":1}')
    assert not _accepts(compiler, POINT, '{"x":1,"y":2}')
    assert _accepts(compiler, nested, '{"p":{"x":1}}')
    assert not _accepts(compiler, nested, '{"p":{"x":1,"z":3}}')
    assert _accepts(compiler, {**POINT, "additionalProperties": True}, '{"x":1,"y":2}')
    assert _accepts(compiler, {"type": "object"}, json.dumps({"any": ["thing"]}, separators=(",", ":")))
    merged = {"allOf": [POINT, {"type": "object", "properties": {"y": {"type": "integer"}}, "required": ["y"]}]}
    assert _accepts(compiler, merged, '{"x":1,"y":2}')
    assert not _accepts(compiler, merged, '{"x":1,"y":2,"z":3}')


def test_numbers_get_bounds_and_a_step_only_where_the_schema_gives_none():
    limits = {"minimum": -NUMBER_LIMIT, "maximum": NUMBER_LIMIT}
    assert tighten({"type": "integer"}) == {"type": "integer", **limits}
    assert tighten({"type": ["number", "null"]}) == {"type": ["number", "null"], **limits, "multipleOf": NUMBER_STEP}
    assert tighten({"type": "number", "minimum": 0, "multipleOf": 0.5}) == \
        {"type": "number", "minimum": 0, "maximum": NUMBER_LIMIT, "multipleOf": 0.5}
    assert tighten({"type": "integer", "exclusiveMaximum": 10}) == \
        {"type": "integer", "exclusiveMaximum": 10, "minimum": -NUMBER_LIMIT}
    assert tighten({"type": "integer", "minimum": 10**20}) == {"type": "integer", "minimum": 10**20}  # never empty
    assert tighten({"type": "string"}) == {"type": "string"} and tighten({"enum": [1, 2]}) == {"enum": [1, 2]}
    listed = {"type": "number", "enum": [3.14159265358979, 1e20]}  # no step or bound may drop a listed value
    assert tighten(listed) == listed
    assert tighten({"type": "number", "const": 1e-12}) == {"type": "number", "const": 1e-12}
    nested = tighten({"type": "object", "properties": {"n": {"type": "integer"}}})
    assert nested["properties"]["n"] == {"type": "integer", **limits} and nested["additionalProperties"] is False
    assert close_objects({"type": "integer"}) == {"type": "integer"}  # the client's strict schemas: objects only


def test_the_compiled_grammar_bounds_digits(compiler):
    """A quarter of greedy or sampled SmolLM2 answers to one-number schemas wrote digits until
    max_tokens; now a number ends within 16 digits before the point and 10 after."""
    count = {"type": "object", "properties": {"n": {"type": "integer"}}}
    price = {"type": "object", "properties": {"p": {"type": "number"}}}
    assert _accepts(compiler, count, '{"n":' + "9" * 16 + "}")
    assert not _accepts(compiler, count, '{"n":' + "1" * 17)
    assert _accepts(compiler, price, '{"p":-12.' + "5" * 10 + "}")
    assert not _accepts(compiler, price, '{"p":1.' + "5" * 11)
    assert _accepts(compiler, {"type": "integer", "minimum": 10**17}, str(10**17))  # the schema's own range
    far = {"type": "number", "maximum": 1e300}  # a far bound stays one-sided (adding -1e16 made no range)
    assert tighten(far) == {**far, "multipleOf": NUMBER_STEP}


def test_a_tightened_schema_llguidance_cannot_build_falls_back_to_the_schema_as_given(compiler, monkeypatch):
    import rillet.structured.grammar as grammar

    tokenizer, _ = compiler
    monkeypatch.setattr(grammar, "tighten", lambda schema: {**schema, "minimum": -1e16, "maximum": 1e300})
    fresh = grammar.GrammarCompiler(tokenizer, [tokenizer.eos_token_id])
    guide = Guide(fresh.compile(StructuredOutputs.from_schema({"type": "number"})))
    assert all(guide.accept(token) for token in tokenizer.encode("-12.5"))
    with pytest.raises(ValueError, match="does not compile"):  # a schema bad as given is still refused
        fresh.compile(StructuredOutputs.from_schema({"type": "number", "maximum": 1e300}))


def test_date_times_get_a_length_their_fractions_of_a_second_fit_in(compiler):
    assert tighten({"type": "string", "format": "date-time"})["maxLength"] == FORMAT_LENGTHS["date-time"]
    assert tighten({"type": "string", "format": "time", "maxLength": 12})["maxLength"] == 12
    assert "maxLength" not in tighten({"type": "string", "format": "email"})
    stamp = {"type": "string", "format": "date-time"}
    assert _accepts(compiler, stamp, '"2018-04-17T09:30:00.123456789+01:00"')
    assert not _accepts(compiler, stamp, '"2018-04-17T00:00:09.' + "8" * 30)
