"""`LLM`: offline batched generation in the calling thread (no server, no event loop)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence as SequenceType

from rillet.client.results import Usage
from rillet.config import EngineConfig
from rillet.engine.llm_engine import LLMEngine, Prompt
from rillet.engine.prompts import ChatPrompt
from rillet.engine.outputs import TokenLogprob
from rillet.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    """One finished choice (vLLM's name; `rillet.client.Completion` is a server's answer)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


@dataclass
class GenerationResult:
    """The result for one prompt: `.text`, `.token_ids`, `.finish_reason` of its first choice;
    all choices (n > 1) in `.outputs`."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason

    @property
    def usage(self) -> Usage:
        prompt, completion = len(self.prompt_token_ids), sum(len(o.token_ids) for o in self.outputs)
        return Usage(prompt, completion, prompt + completion)


class LLM:
    """Batched offline generation: every prompt of one call shares each forward pass.

    >>> llm = LLM()  # the embedded SmolLM2-135M-Instruct
    >>> llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=16)).text
    """

    def __init__(self, model: str | None = None, dtype: str | None = None, device: str | None = None,
                 **engine_options: Any):
        options = dict(engine_options, model=model)
        if dtype is not None:
            options["dtype"] = dtype
        if device is not None:
            options["device"] = device
        self.engine = LLMEngine(EngineConfig(**options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Stop the engine's tensor-parallel workers, if any (also done at interpreter exit)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(self, prompts: Prompt | SequenceType[Prompt], params: SamplingParams | None = None
                 ) -> GenerationResult | list[GenerationResult]:
        """Complete one prompt (a string, token ids or a ChatPrompt) or a list of them; returns the same shape."""
        single = isinstance(prompts, (str, ChatPrompt)) or (
            isinstance(prompts, list) and bool(prompts) and all(isinstance(t, int) for t in prompts))
        return self._run([prompts] if single else list(prompts), params, single)

    def chat(self, conversations: list[dict] | list[list[dict]] | ChatPrompt | list[ChatPrompt],
             params: SamplingParams | None = None) -> GenerationResult | list[GenerationResult]:
        """Answer one conversation (a list of messages, or a ChatPrompt with vLLM's template
        fields) or a list of conversations."""
        single = isinstance(conversations, ChatPrompt) or (bool(conversations) and isinstance(conversations[0], dict))
        return self._run([conversations] if single else list(conversations), params, single)

    def _run(self, prompts: list[Prompt], params: SamplingParams | None, single: bool):
        params = params or SamplingParams()
        engine = self.engine
        results: dict[str, GenerationResult] = {}
        order = []
        try:
            for prompt in prompts:
                seqs = engine.add_request(None, prompt, params)
                rid = seqs[0].request_id
                order.append(rid)
                results[rid] = GenerationResult(rid, seqs[0].prompt_token_ids,
                                                [CompletionOutput(i, "", [], "") for i in range(params.n)])
            while engine.has_unfinished():
                for out in engine.step():
                    choice = results[out.request_id].outputs[out.index]
                    choice.text += out.text
                    choice.token_ids += out.token_ids
                    if out.logprobs:
                        choice.logprobs = (choice.logprobs or []) + out.logprobs
                    if out.finish_reason:
                        choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason
                        choice.error = out.error
        except BaseException:
            for rid in order:
                engine.abort(rid)
            raise
        ordered = [results[rid] for rid in order]
        return ordered[0] if single else ordered
