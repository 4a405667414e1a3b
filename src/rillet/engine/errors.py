"""Exceptions the engine raises at submission time; the server maps them to HTTP statuses."""


class EngineError(Exception):
    """Base class for engine errors."""


class PromptTooLongError(EngineError, ValueError):
    """The prompt (plus the room asked for output) cannot fit in max_model_len."""


class QueueFullError(EngineError):
    """More requests are waiting than max_waiting allows; retry later."""


class EngineDeadError(EngineError):
    """The engine loop died and cannot serve requests."""


class EngineNotReadyError(EngineError):
    """The engine is still loading or is shutting down."""
