"""StructuredOutputs: one constraint per request, shape checks, and a schema's key order kept (it is
the order in which the output's properties are generated)."""

from __future__ import annotations

import json
import pickle

import pytest

from rillet.sampling_params import SamplingParams
from rillet.structured import StructuredOutputs


def test_from_schema_keeps_the_property_order():
    schema = {"type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "integer"}}}
    spec = StructuredOutputs.from_schema(schema)
    assert list(json.loads(spec.json)["properties"]) == ["zeta", "alpha"]
    assert spec.kind == "json" and pickle.loads(pickle.dumps(spec)) == spec


@pytest.mark.parametrize("spec, message", [
    (StructuredOutputs(), "exactly one of"),
    (StructuredOutputs(regex="a+", choice=("a",)), "exactly one of"),
    (StructuredOutputs(choice=()), "choice must hold"),
    (StructuredOutputs(choice=("a", "")), "choice must hold"),
    (StructuredOutputs(regex=""), "regex must be a non-empty string"),
    (StructuredOutputs(grammar="x" * ((1 << 20) + 1)), "larger than 1 MiB"),
])
def test_bad_specs_are_refused_naming_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(structured=spec)


def test_a_schema_must_be_an_object():
    with pytest.raises(ValueError, match="must be an object"):
        StructuredOutputs.from_schema(["not", "a", "schema"])
