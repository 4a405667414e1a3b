"""Wire schemas of rillet's HTTP APIs (pydantic); shared by the server and the client."""

from rillet.protocol import errors, ollama, openai

__all__ = ["errors", "ollama", "openai"]
