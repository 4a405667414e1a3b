"""The protocol models' `to_sampling_params()`: the one conversion of API fields to SamplingParams,
and its errors naming the API's own field."""

from __future__ import annotations

import pytest

from rillet.protocol import ollama as ol
from rillet.protocol import openai as oa
from rillet.protocol.errors import ParamError
from rillet.protocol.params import OLLAMA_OPTION_NAMES
from rillet.sampling_params import SEED_MAX, SEED_MIN, SamplingParams

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_openai_chat_fields():
    p = oa.ChatCompletionRequest.model_validate({**CHAT, "max_completion_tokens": 5, "max_tokens": 9, "seed": 3,
                                                 "logprobs": True, "top_logprobs": 2, "stop": "x",
                                                 "logit_bias": {"7": 1.5}}).to_sampling_params()
    assert (p.max_tokens, p.seed, p.logprobs, p.stop, p.logit_bias) == (5, 3, 2, ["x"], {7: 1.5})
    assert oa.ChatCompletionRequest.model_validate(CHAT).to_sampling_params().max_tokens is None  # up to the context


@pytest.mark.parametrize("fields, param", [
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"seed": SEED_MAX + 1}, "seed"),
    ({"temperature": -1}, "temperature"),
])
def test_openai_chat_errors_name_the_field(fields, param):
    with pytest.raises(ParamError) as info:
        oa.ChatCompletionRequest.model_validate({**CHAT, **fields}).to_sampling_params()
    assert info.value.param == param and param in info.value.message


def test_completion_fields_and_prompt():
    req = oa.CompletionRequest.model_validate({"prompt": ["once"], "logprobs": 3, "n": 2})
    assert req.prompts() == ["once"]
    p = req.to_sampling_params()
    assert (p.logprobs, p.n) == (3, 2)
    prompts = {"x": ["x"], (1, 2): [[1, 2]], ("a", "b"): ["a", "b"], ((1,), (2, 3)): [[1], [2, 3]]}
    for prompt, expected in prompts.items():
        as_json = prompt if isinstance(prompt, str) else [list(p) if isinstance(p, tuple) else p for p in prompt]
        assert oa.CompletionRequest.model_validate({"prompt": as_json}).prompts() == expected
    for prompt in (["a", ""], [[1], []], [], ""):
        with pytest.raises(ParamError) as info:
            oa.CompletionRequest.model_validate({"prompt": prompt}).prompts()
        assert info.value.param == "prompt" and "empty" in info.value.message
    for fields, param in (({"best_of": 3}, "best_of"), ({"suffix": "z"}, "suffix")):
        with pytest.raises(ParamError) as info:
            oa.CompletionRequest.model_validate({"prompt": "a", **fields}).to_sampling_params()
        assert info.value.param == param


def test_ollama_options():
    p = ol.ChatRequest.model_validate(CHAT).to_sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed) == (0.8, 0.9, 40, None, None)
    p = ol.GenerateRequest.model_validate({"options": {"num_predict": 4, "seed": -1, "repeat_penalty": 1.1}}
                                          ).to_sampling_params()
    assert (p.max_tokens, p.seed, p.repetition_penalty) == (4, None, 1.1)
    with pytest.raises(ParamError) as info:
        ol.Options(repeat_penalty=0).to_sampling_params()
    assert info.value.param == "repeat_penalty" and info.value.message.startswith("repeat_penalty")
    assert OLLAMA_OPTION_NAMES["max_tokens"] == "num_predict"


def test_one_seed_range_int64():
    for seed in (SEED_MIN, SEED_MAX, 0):
        assert SamplingParams(seed=seed).seed == seed
    for seed in (SEED_MIN - 1, SEED_MAX + 1, 2**64 - 17):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed)
