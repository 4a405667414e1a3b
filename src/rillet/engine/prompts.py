"""Prompts to token ids: plain text, token ids, or chat messages through the model's template.

Kept apart from the engine so that a front end whose engine runs in another process
(`AsyncEngine(engine_process=True)`) tokenizes and checks prompts itself, off the engine's cores.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from rillet.engine.errors import PromptTooLongError

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class ChatPrompt:
    """Chat messages with vLLM's chat-template fields. `add_generation_prompt`: open the
    assistant's turn after the messages (the default); `continue_final_message`: continue the
    last message, the assistant's, instead (its turn left open: a prefilled answer);
    `template_kwargs`: more variables for the model's chat template (Qwen3's `enable_thinking`).
    ValueError naming the field for a combination that cannot render."""

    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message continues the last message: set add_generation_prompt "
                             "to false with it")
        if self.continue_final_message and not (self.messages and isinstance(self.messages[-1], dict)
                                                and self.messages[-1].get("role") == "assistant"):
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        if not isinstance(self.template_kwargs, dict) or not all(isinstance(k, str) for k in self.template_kwargs):
            raise ValueError("chat_template_kwargs must be an object of template variables")
        reserved = sorted(_template_parameters() & set(self.template_kwargs))
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}: the request's own fields do")


@functools.cache
def _template_parameters() -> frozenset[str]:
    """apply_chat_template's own parameters, which template variables may not shadow."""
    return frozenset([*inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters, "messages",
                      "add_special_tokens"])


Prompt = str | list[int] | list[dict[str, Any]] | ChatPrompt

# For chat templates that ignore `tools` (SmolLM2's): the tools as a system section in the
# Hermes / SmolLM2 function-calling format, which the server's tool-call parser reads back.
TOOLS_SYSTEM_PROMPT = (
    "You can call functions. You are given a question and a set of functions; if one of them answers "
    "the question, call it, and if none does, answer in plain text.\n"
    "You have access to the following tools:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, reply with only a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": "function_name", "arguments": {{"argument": "value"}}}}\n</tool_call>'
)


def template_knows_tools(template: str) -> bool:
    """Whether a chat template renders `tools`, assistant `tool_calls` and `tool` messages itself
    (Qwen2.5/Qwen3, Llama 3.x, Hermes, Mistral do; SmolLM2's does not). A textual check: Jinja
    templates that use them name them."""
    return "tools" in template and "tool_calls" in template


def _tool_call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    return "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) \
        + "\n</tool_call>"


def render_tools_as_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Messages for a template that knows only role and content: the tools become a system
    section (joined to the first system message), an assistant's tool calls become
    `<tool_call>` text, and tool results become a user turn of `<tool_response>` blocks
    (consecutive results share one turn, as Qwen's and Hermes' templates render them)."""
    out: list[dict[str, Any]] = []
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        section = TOOLS_SYSTEM_PROMPT.format(tools=listing)
        if messages and messages[0].get("role") == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + section})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": section})
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
            continue
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_tool_call_text(c) for c in m["tool_calls"])
            content = (content + "\n" if content else "") + calls
        out.append({"role": role, "content": content})
    for m in out:
        m.pop("tool_results", None)
    return out


class PromptEncoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def encode_prompt(self, prompt: Prompt, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a prompt; `tools` (OpenAI function definitions) go to the chat template of a
        messages prompt, as transformers' `apply_chat_template(tools=...)` takes them."""
        if isinstance(prompt, ChatPrompt):
            return self.encode_chat(prompt.messages, tools, prompt)
        if tools and not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)):
            raise ValueError("tools need a chat (messages) prompt")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return list(self.tokenizer.encode(prompt))
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("prompt must be a non-empty string, list of token ids or list of messages")
        items: list[object] = list(prompt)
        token_ids = [t for t in items if isinstance(t, int) and not isinstance(t, bool)]
        if len(token_ids) == len(items):
            bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
            return token_ids
        messages = [m for m in items if isinstance(m, dict)]
        if len(messages) == len(items):
            return self.encode_chat(messages, tools)
        raise ValueError("prompt must be a non-empty string, list of token ids or list of messages")

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    options: ChatPrompt | None = None) -> list[int]:
        """Token ids of messages through the chat template; `options` (a ChatPrompt): its
        template fields (its own messages are not read)."""
        options = options or ChatPrompt(messages)
        if not messages:
            raise ValueError("messages must not be empty")
        for i, m in enumerate(messages):
            if m.get("role") not in CHAT_ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.get('role')!r}")
            calls = m.get("tool_calls")
            if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)
                                      or not all(isinstance(c, dict) for c in calls)):
                raise ValueError(f"messages[{i}].tool_calls must be a list of calls on an assistant message")
            # an assistant message that calls tools may have no content (OpenAI sends null)
            if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
                raise ValueError(f"messages[{i}].content must be a string")
        template = getattr(self.tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template_knows_tools(template):
            if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
                messages = render_tools_as_text(messages, tools)
                tools = None
        if not template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            if options.continue_final_message:
                text = text[:-1]  # the last message stays open
            elif options.add_generation_prompt:
                text += "assistant: "
            return list(self.tokenizer.encode(text))
        try:
            tool_specs: list[dict[Any, Any] | Callable[..., Any]] | None = list(tools) if tools else None
            rendered = self.tokenizer.apply_chat_template(
                messages, tools=tool_specs, tokenize=False, add_generation_prompt=options.add_generation_prompt,
                continue_final_message=options.continue_final_message, **options.template_kwargs)
        except Exception as exc:  # templates raise on role orders they do not accept
            raise ValueError(f"the model's chat template rejected these messages: {exc}") from None
        if not isinstance(rendered, str):
            raise ValueError("the model's chat template did not render text")
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))

    def check_prompt_length(self, num_tokens: int, max_tokens: int | None = None, *, what: str = "prompt") -> None:
        """PromptTooLongError if the prompt leaves no room for output, or if the prompt plus
        `max_tokens` (None: up to the context) exceeds max_model_len, stating the numbers as vLLM
        and OpenAI do. `what` names the prompt in the message: "prompt" or "messages"."""
        if num_tokens >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {num_tokens} tokens but the context holds {self.max_model_len} "
                f"(max_model_len), leaving no room for output",
                max_model_len=self.max_model_len, num_prompt_tokens=num_tokens)
        if max_tokens is not None and num_tokens + max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_tokens + max_tokens} tokens ({num_tokens} in the {what}, {max_tokens} in the completion). "
                f"Please reduce the length of the {what} or completion.",
                max_model_len=self.max_model_len, num_prompt_tokens=num_tokens, max_tokens=max_tokens)

    def check_token_ids(self, params: Any) -> None:
        """ValueError naming the field for a logit_bias key or stop_token_id outside the vocabulary
        (OpenAI and vLLM refuse them; the sampler could only ignore them)."""
        for field, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            bad = sorted(t for t in ids if not 0 <= t < self.vocab_size)
            if bad:
                shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
                raise ValueError(f"{field} holds token ids outside the vocabulary (0..{self.vocab_size - 1}): "
                                 f"{shown}")
