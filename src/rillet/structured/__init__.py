"""Structured output: constraining generation to a JSON schema, regex, choice or grammar."""

from rillet.structured.spec import StructuredOutputs

__all__ = ["StructuredOutputs"]
