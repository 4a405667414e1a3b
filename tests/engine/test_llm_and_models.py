"""The offline `LLM` API and model resolution (default, GGUF path, HF directory, hub id)."""

import time

import pytest

from rillet import LLM, ChatPrompt, SamplingParams
from rillet.models.resolve import ModelNotFoundError, default_gguf_path, resolve_model


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=1024, kv_cache_gib=0.1)


def test_generate_many_prompts_returns_results_in_order(llm):
    params = SamplingParams(max_tokens=6, temperature=0)
    results = llm.generate(["The sky is", "One, two, three,"], params)
    assert len(results) == 2
    for r in results:
        assert r.text and r.token_ids and r.finish_reason in ("stop", "length")
        assert r.usage.completion_tokens == len(r.token_ids) <= 6
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    alone = llm.generate("One, two, three,", params)
    assert alone.token_ids == results[1].token_ids


def test_chat_applies_the_template_and_n_gives_several_choices(llm):
    result = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(max_tokens=12, temperature=0))
    assert "Paris" in result.text
    several = llm.chat([[{"role": "user", "content": "Pick a number."}]],
                       SamplingParams(max_tokens=5, n=3, temperature=1.0, seed=3))
    assert [o.index for o in several[0].outputs] == [0, 1, 2]
    # a ChatPrompt (vLLM's template fields): one conversation, or a list of them
    prefilled = ChatPrompt([{"role": "user", "content": "What is the capital of France?"},
                            {"role": "assistant", "content": "The capital of France is"}],
                           add_generation_prompt=False, continue_final_message=True)
    goes_on = llm.chat(prefilled, SamplingParams(max_tokens=4, temperature=0))
    assert "Paris" in goes_on.text and llm.generate(prefilled, SamplingParams(max_tokens=4, temperature=0)).text \
        == goes_on.text
    assert [r.text for r in llm.chat([prefilled], SamplingParams(max_tokens=4, temperature=0))] == [goes_on.text]


def test_gguf_path_and_converted_directory_resolve_to_loadable_models():
    gguf = default_gguf_path()
    converted = resolve_model(str(gguf))
    assert converted.path == resolve_model(None).path  # the cache is reused
    assert (converted.path / "config.json").is_file() and (converted.path / "model.safetensors").is_file()
    start = time.monotonic()
    from_dir = LLM(model=str(converted.path), dtype="float32", max_model_len=256, kv_cache_gib=0.05)
    assert time.monotonic() - start < 60
    assert from_dir.generate("Hello", SamplingParams(max_tokens=2)).finish_reason in ("stop", "length")


def test_hub_id_without_network_fails_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="could not fetch model 'some-org/some-model'.*--model"):
        resolve_model("some-org/some-model")


def test_missing_local_path_is_named():
    with pytest.raises(ModelNotFoundError, match="neither a model directory nor a .gguf"):
        resolve_model("./no/such/model")


def test_float16_on_the_cpu_runs_where_onednn_cannot_pack_it():
    # oneDNN packs float16 linears only on CPUs with AVX512-FP16 / AVX-NE-CONVERT; elsewhere
    # rillet must fall back to plain linears, not fail at load.
    llm = LLM(dtype="float16", max_model_len=256, kv_cache_gib=0.05)
    result = llm.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0))
    assert len(result.token_ids) == 4 and result.finish_reason == "length"
