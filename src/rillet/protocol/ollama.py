"""Ollama-compatible request and response schemas (/api/chat, /api/generate, /api/tags, ...).

Durations are integers in nanoseconds, as Ollama reports them. Requests turn their `options`
into `SamplingParams` (`to_sampling_params`); the server builds its answers from the response
models here, dumped with `exclude_unset`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rillet.protocol.errors import ParamError
from rillet.protocol.params import OLLAMA_OPTION_NAMES, sampling_params
from rillet.sampling_params import SamplingParams
from rillet.structured.spec import StructuredOutputs

__all__ = [
    "ChatRequest",
    "ChatResponse",
    "GenerateRequest",
    "GenerateResponse",
    "Message",
    "ModelDetails",
    "Options",
    "PsModel",
    "PsResponse",
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

    def to_sampling_params(self, structured: StructuredOutputs | None = None) -> SamplingParams:
        num_predict = self.num_predict
        if num_predict is not None and num_predict < 0:
            num_predict = None  # -1 (and -2): up to the context
        if num_predict == 0:
            raise ParamError("num_predict must be >= 1 (or -1 for up to the context)", "num_predict")
        if self.num_ctx is not None and self.num_ctx < 0:
            # Ollama caps a num_ctx above the model's context to it; rillet serves within max_model_len
            raise ParamError(f"num_ctx must be >= 0, got {self.num_ctx}", "num_ctx")
        # Ollama's runtime defaults: temperature 0.8, top_k 40, top_p 0.9; seed -1: a random seed
        return sampling_params(
            OLLAMA_OPTION_NAMES,
            max_tokens=num_predict,
            temperature=0.8 if self.temperature is None else self.temperature,
            top_p=0.9 if self.top_p is None else self.top_p,
            top_k=40 if self.top_k is None else self.top_k,
            min_p=self.min_p, seed=None if self.seed == -1 else self.seed, stop=self.stop,
            repetition_penalty=self.repeat_penalty, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, structured=structured,
        )


class Message(_Request):
    role: str
    content: str | None = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None  # assistant: [{"function": {"name", "arguments": {...}}}]
    tool_name: str | None = None  # role "tool": the function whose result this is


class _GenerateFields(_Request):
    model: str = ""
    stream: bool | None = True  # null: the default (stream)
    options: Options | None = None

    def to_sampling_params(self, structured: StructuredOutputs | None = None) -> SamplingParams:
        return (self.options or Options()).to_sampling_params(structured)


class ChatRequest(_GenerateFields):
    messages: list[Message] | None = None
    format: Any = None  # "json" or a JSON schema object
    tools: Any = None  # OpenAI-shaped function definitions (checked by the server: 400s naming the fault)
    keep_alive: Any = None


class GenerateRequest(_GenerateFields):
    prompt: str | None = ""
    system: str | None = None
    raw: bool | None = False
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
    arguments: Any  # an object (a model's call that is not valid JSON is passed on as its text)


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


class _ModelEntry(BaseModel):
    name: str
    model: str
    size: int = 0
    digest: str = ""
    details: ModelDetails = Field(default_factory=ModelDetails)


class TagsModel(_ModelEntry):
    modified_at: str


class TagsResponse(BaseModel):
    models: list[TagsModel]


class PsModel(_ModelEntry):
    expires_at: str = ""
    size_vram: int = 0
    context_length: int | None = None


class PsResponse(BaseModel):
    models: list[PsModel]


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
