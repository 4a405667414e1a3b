"""Exceptions the engine raises at submission time; the server maps them to HTTP statuses."""


class EngineError(Exception):
    """Base class for engine errors."""


class PromptTooLongError(EngineError, ValueError):
    """The prompt (plus the room asked for output) cannot fit in max_model_len.

    Carries the numbers, so that a server can state the limit: `max_model_len`, `num_prompt_tokens`
    and `max_tokens` (None when the prompt alone does not fit)."""

    def __init__(self, message: str, *, max_model_len: int | None = None, num_prompt_tokens: int | None = None,
                 max_tokens: int | None = None) -> None:
        super().__init__(message)
        self.max_model_len = max_model_len
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens

    def __reduce__(self) -> tuple[object, tuple[str, int | None, int | None, int | None]]:  # keyword-only numbers survive pickling (the engine core is another process)
        return (_rebuild_prompt_too_long, (str(self), self.max_model_len, self.num_prompt_tokens, self.max_tokens))


def _rebuild_prompt_too_long(message: str, max_model_len: int | None, num_prompt_tokens: int | None,
                             max_tokens: int | None) -> PromptTooLongError:
    return PromptTooLongError(message, max_model_len=max_model_len, num_prompt_tokens=num_prompt_tokens,
                              max_tokens=max_tokens)


class QueueFullError(EngineError):
    """More requests are waiting than max_waiting allows; retry later."""


class EngineDeadError(EngineError):
    """The engine loop died and cannot serve requests."""


class EngineNotReadyError(EngineError):
    """The engine is still loading or is shutting down."""
