"""Ollama-compatible request and response schemas (/api/chat, /api/generate, /api/tags, ...).

Durations are integers in nanoseconds, as Ollama reports them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatRequest",
    "ChatResponse",
    "GenerateRequest",
    "GenerateResponse",
    "Message",
    "ModelDetails",
    "Options",
    "ShowRequest",
    "ShowResponse",
    "TagsModel",
    "TagsResponse",
    "ToolCall",
    "ToolFunction",
    "VersionResponse",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class Options(_Request):
    """Ollama `options`; the ones rillet maps to sampling parameters (others are accepted and ignored)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    num_predict: int | None = None  # -1 (or absent): up to the context
    num_ctx: int | None = None  # accepted: rillet serves every request within its own max_model_len
    stop: list[str] | str | None = None
    seed: int | None = None  # -1: unseeded (Ollama's default)
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


class Message(_Request):
    role: str
    content: str | None = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None  # assistant: [{"function": {"name", "arguments": {...}}}]
    tool_name: str | None = None  # role "tool": the function whose result this is


class ChatRequest(_Request):
    model: str = ""
    messages: list[Message] | None = None
    stream: bool | None = True  # null: the default (stream)
    options: Options | None = None
    format: Any = None  # "json" or a JSON schema object
    tools: Any = None  # OpenAI-shaped function definitions (checked by the server: 400s naming the fault)
    keep_alive: Any = None


class GenerateRequest(_Request):
    model: str = ""
    prompt: str | None = ""
    system: str | None = None
    raw: bool | None = False
    stream: bool | None = True  # null: the default (stream)
    options: Options | None = None
    format: Any = None
    images: list[Any] | None = None
    keep_alive: Any = None


class ShowRequest(_Request):
    model: str | None = None
    name: str | None = None  # older clients


class _Final(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ToolFunction(BaseModel):
    name: str
    arguments: dict[str, Any]


class ToolCall(BaseModel):
    function: ToolFunction


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str = ""
    tool_calls: list[ToolCall] | None = None


class ChatResponse(_Final):
    message: AssistantMessage


class GenerateResponse(_Final):
    response: str


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class TagsModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int = 0
    digest: str = ""
    details: ModelDetails = Field(default_factory=ModelDetails)


class TagsResponse(BaseModel):
    models: list[TagsModel]


class VersionResponse(BaseModel):
    version: str


class ShowResponse(BaseModel):
    modelfile: str = ""
    parameters: str = ""
    template: str = ""
    details: ModelDetails = Field(default_factory=ModelDetails)
    model_info: dict[str, Any] = Field(default_factory=dict)
    capabilities: list[str] = Field(default_factory=list)
    modified_at: str | None = None
