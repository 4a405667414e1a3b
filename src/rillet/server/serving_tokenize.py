"""vLLM's POST /tokenize and /detokenize: the token ids the server would feed the model for a
prompt or a chat (through the same template, tools and chat-template fields as a generation
request), and the text of token ids. Both run in the API server, off the engine."""

from __future__ import annotations

import asyncio
from typing import Any

from rillet.engine.prompts import Prompt, PromptEncoder
from rillet.protocol import openai as oa
from rillet.server.errors import APIError
from rillet.server.serving import ServingBase, check_unicode
from rillet.server.serving_chat import chat_prompt, openai_messages
from rillet.server.tool_schema import plan_tools

__all__ = ["ServingTokenize"]


class ServingTokenize(ServingBase):
    """(The engine's refusals before it is ready are mapped once, by the app's handlers.)"""

    async def tokenize(self, body: oa.TokenizeRequest) -> oa.TokenizeResponse:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        tokenizer: Any = self.engine.tokenizer
        max_model_len = self.engine.max_model_len
        encoder = PromptEncoder(tokenizer, self.engine.vocab_size, max_model_len)  # the engine's checks
        tools = None
        prompt: Prompt
        if body.messages is not None:
            self.check_num_messages(len(body.messages))
            plan = plan_tools(body.tools, None)
            tools = plan.tools if plan else None
            prompt = chat_prompt(body, openai_messages(body.messages))
            param = "messages"
        else:
            prompt, param = body.prompt or "", "prompt"
        check_unicode(prompt, param)
        try:
            if isinstance(prompt, str) and body.add_special_tokens is False:
                tokens = await asyncio.to_thread(lambda: list(tokenizer.encode(prompt, add_special_tokens=False)))
            else:
                tokens = await asyncio.to_thread(encoder.encode_prompt, prompt, tools)
        except ValueError as exc:
            raise APIError(400, str(exc), param=param) from None
        strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return oa.TokenizeResponse(count=len(tokens), max_model_len=max_model_len, tokens=tokens, token_strs=strs)

    async def detokenize(self, body: oa.DetokenizeRequest) -> oa.DetokenizeResponse:
        self.check_model(body.model)
        vocab_size = self.engine.vocab_size
        outside = [t for t in body.tokens if not 0 <= t < vocab_size]
        if outside:
            raise APIError(400, f"tokens holds ids outside the vocabulary (0..{vocab_size - 1}): {outside[0]}",
                           param="tokens")
        text = await asyncio.to_thread(self.engine.tokenizer.decode, body.tokens)
        return oa.DetokenizeResponse(prompt=text)
