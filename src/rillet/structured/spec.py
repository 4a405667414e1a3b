"""What a request constrains its output to: the engine-side form of OpenAI's `response_format`,
vLLM's `structured_outputs`, Ollama's `format` and a forced tool call. A plain picklable value
(it crosses the pipe to the engine core), validated for shape here; whether the grammar compiles
is checked against the tokenizer by `rillet.structured.grammar`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_SPEC_CHARS = 1 << 20  # a schema or grammar larger than 1 MiB is refused, not compiled
MAX_CHOICES = 4096


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of the fields is set.

    json: a JSON schema, as compact JSON text; key order is kept, since it is the order in which
        the output's properties are generated (as OpenAI's strict mode does)
    json_object: any JSON object (OpenAI's `{"type": "json_object"}`, Ollama's `format: "json"`)
    regex: a regular expression the whole output matches
    choice: the output is exactly one of these strings
    grammar: a Lark grammar (llguidance's dialect, which also reads most GBNF-like Lark)
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    @classmethod
    def from_schema(cls, schema: dict[str, Any] | bool) -> StructuredOutputs:
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls(json=json.dumps(schema, separators=(",", ":")))

    @property
    def kind(self) -> str:
        set_fields = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            set_fields.append("json_object")
        if len(set_fields) != 1:
            raise ValueError(f"structured outputs take exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(set_fields) or 'none'}")
        return set_fields[0]

    def validate(self) -> None:
        kind = self.kind
        if kind == "choice":
            choice = self.choice or ()
            if not choice or len(choice) > MAX_CHOICES or not all(isinstance(c, str) and c for c in choice):
                raise ValueError(f"choice must hold 1 to {MAX_CHOICES} non-empty strings")
            if sum(map(len, choice)) > MAX_SPEC_CHARS:
                raise ValueError("choice is larger than 1 MiB")
            return
        if kind == "json_object":
            return
        value = getattr(self, kind)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{kind} must be a non-empty string")
        if len(value) > MAX_SPEC_CHARS:
            raise ValueError(f"the {kind} is larger than 1 MiB")
        if kind == "json":
            json.loads(value)  # from_schema made it; a hand-built one must still be JSON
