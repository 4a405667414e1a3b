"""Prompts to token ids: plain text, token ids, or chat messages through the model's template.

Kept apart from the engine so that a front end whose engine runs in another process
(`AsyncEngine(engine_process=True)`) tokenizes and checks prompts itself, off the engine's cores.
"""

from __future__ import annotations

from typing import Any

from rillet.engine.errors import PromptTooLongError

Prompt = str | list[int] | list[dict[str, Any]]
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


class PromptEncoder:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("prompt must be a non-empty string, list of token ids or list of messages")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
            return list(prompt)
        if all(isinstance(m, dict) for m in prompt):
            return self.encode_chat(prompt)
        raise ValueError("prompt must be a non-empty string, list of token ids or list of messages")

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        for i, m in enumerate(messages):
            if m.get("role") not in CHAT_ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
        if not getattr(self.tokenizer, "chat_template", None):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            return self.tokenizer.encode(text)
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates raise on role orders they do not accept
            raise ValueError(f"the model's chat template rejected these messages: {exc}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_prompt_length(self, num_tokens: int) -> None:
        if num_tokens >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {num_tokens} tokens but the context holds {self.max_model_len} "
                f"(max_model_len), leaving no room for output"
            )
