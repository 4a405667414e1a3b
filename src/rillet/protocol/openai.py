"""OpenAI-compatible request and response schemas (chat completions, completions, models).

Requests allow unknown fields (clients send `user`, `metadata`, ...) and ignore them, and turn
themselves into `SamplingParams` (`to_sampling_params`, ParamError for a refused field). The
server builds every response and chunk from the response models here, dumped with
`exclude_unset` (a field it sets to null is sent as null, one it does not set is left out).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rillet.protocol.errors import ParamError
from rillet.protocol.params import sampling_params
from rillet.sampling_params import SamplingParams
from rillet.structured.spec import StructuredOutputs

__all__ = [
    "ChatCompletionChoice",
    "ChatCompletionChunk",
    "ChatCompletionChunkChoice",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionRequest",
    "CompletionResponse",
    "ContentPart",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "DeltaFunctionCall",
    "DeltaMessage",
    "DeltaToolCall",
    "FunctionCall",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "TokenizeRequest",
    "TokenizeResponse",
    "ToolCall",
    "Usage",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: bool = False


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Any = None  # assistant: the calls it made (content may be null); checked by the server
    tool_call_id: str | None = None  # role "tool": which call this is the result of


class _SamplingFields(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions (plus vLLM's extras)."""

    model: str | None = None
    stream: bool | None = False  # clients often send null for "default"
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = True
    min_tokens: int | None = None
    include_stop_str_in_output: bool | None = False

    def _sampling_params(self, api_names: dict[str, str], max_tokens: int | None, logprobs: int | None,
                         structured: StructuredOutputs | None) -> SamplingParams:
        logit_bias = None
        if self.logit_bias:
            try:
                logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError:
                raise ParamError("logit_bias keys must be token ids", "logit_bias") from None
        return sampling_params(
            api_names,
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            logit_bias=logit_bias, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos or None, n=self.n, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, structured=structured, min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output or None,
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: Any = None  # [{"type": "function", "function": {name, description, parameters}}]
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool | None = None
    # vLLM's chat-template fields (rillet.engine.prompts.ChatPrompt)
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    # {"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {name, schema, strict}};
    # vLLM's `structured_outputs` {json | regex | choice | grammar | json_object} and its older
    # `guided_*` fields are read from the extra fields (rillet.server.structured_request)
    response_format: Any = None

    def to_sampling_params(self, structured: StructuredOutputs | None = None) -> SamplingParams:
        names = {"logprobs": "top_logprobs"}
        max_tokens = self.max_tokens
        if self.max_completion_tokens is not None:
            max_tokens = self.max_completion_tokens
            names["max_tokens"] = "max_completion_tokens"
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs requires logprobs to be true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(names, max_tokens, logprobs, structured)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    response_format: Any = None  # as on chat (vLLM takes it on completions too)

    def to_sampling_params(self, structured: StructuredOutputs | None = None) -> SamplingParams:
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ParamError("best_of is not supported (it must equal n)", "best_of")
        if self.suffix:
            raise ParamError("suffix is not supported", "suffix")
        return self._sampling_params({}, self.max_tokens, self.logprobs, structured)

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids: one, or a list of them (each answered with n
        choices, numbered prompt by prompt). ParamError for none or an empty one."""
        prompt = self.prompt
        prompts: list[str | list[int]]
        if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
            prompts = [prompt]  # type: ignore[list-item]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts or not all(prompts):
            raise ParamError("prompt must not be empty" if len(prompts) < 2 else "no prompt of the list may be empty",
                             "prompt")
        return prompts


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of the arguments object


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class _Choice(BaseModel):
    """What every choice carries, whole or streamed; `stop_reason` on a choice's last chunk only."""

    index: int
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class _Answer(BaseModel):
    """What every completion response and chunk carries (a chunk has usage only when asked)."""

    id: str
    created: int
    model: str
    usage: Usage | None = None


class ChatCompletionChoice(_Choice):
    message: AssistantMessage


class ChatCompletionResponse(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A streamed call: its first delta has id, type and function.name; later ones add arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionChunkChoice(_Choice):
    delta: DeltaMessage


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionChunkChoice]


class CompletionChoice(_Choice):
    text: str


class CompletionChunk(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class CompletionResponse(CompletionChunk):
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rillet"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeRequest(_Request):
    """vLLM's POST /tokenize: a `prompt` as /v1/completions takes it, or `messages` (with tools and
    the chat-template fields) as /v1/chat/completions renders them."""

    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # a prompt string: the tokenizer's own (BOS) tokens; default true
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Any = None
    return_token_strs: bool | None = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
