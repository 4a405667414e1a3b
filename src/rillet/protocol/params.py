"""API fields -> `SamplingParams`: the one conversion both APIs' request models use.

`SamplingParams` checks the value ranges; a ValueError naming a field becomes a `ParamError`
naming the API's own field (`max_completion_tokens`, `num_predict`, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from rillet.protocol.errors import ParamError
from rillet.sampling_params import SamplingParams

__all__ = ["OLLAMA_OPTION_NAMES", "sampling_params"]

# SamplingParams field -> Ollama option: the client sends them under these names, the server reads them.
OLLAMA_OPTION_NAMES = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}

_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def sampling_params(api_names: Mapping[str, str] | None = None, **values: Any) -> SamplingParams:
    """SamplingParams from the values that were given (None: the default; for max_tokens, up to the
    context); ParamError naming the API's field for a value out of range."""
    values = {k: v for k, v in values.items() if v is not None or k == "max_tokens"}
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as exc:
        raise param_error(exc, api_names) from None


def param_error(exc: Exception, api_names: Mapping[str, str] | None = None,
                default: str | None = None) -> ParamError:
    """The ParamError for SamplingParams' ValueError `exc` (its message starts with the field)."""
    message = str(exc)
    first = message.split(" ", 1)[0]
    param = first if first in _SAMPLING_FIELDS else default
    if param is not None and api_names and param in api_names:
        param = api_names[param]  # the API's name for the field, in the message too
        message = param + message[len(first):]
    return ParamError(message, param)
