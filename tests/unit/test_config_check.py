"""models/config_check.py: configs whose math rillet does not implement are refused or bounded at load."""

from __future__ import annotations

import logging

import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from rillet.models.config_check import check_supported

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4, vocab_size=128, max_position_embeddings=32768)


def test_plain_configs_of_every_family_pass_unchanged(caplog):
    caplog.set_level(logging.WARNING)
    for config in (LlamaConfig(**SMALL), LlamaConfig(**SMALL, tie_word_embeddings=True),
                   MistralConfig(**SMALL, sliding_window=None), Qwen2Config(**SMALL), Qwen3Config(**SMALL),
                   Qwen3Config(**SMALL, head_dim=32)):  # head_dim != hidden_size / heads: implemented
        assert check_supported(config, 8192) == 8192, type(config).__name__
    assert not caplog.records


def test_mistral_sliding_window_caps_max_model_len_with_a_warning(caplog):
    caplog.set_level(logging.WARNING)
    config = MistralConfig(**SMALL, sliding_window=4096)  # Mistral-7B-v0.1
    assert check_supported(config, 8192) == 4096
    assert "sliding_window=4096" in caplog.text and "max_model_len 8192 -> 4096" in caplog.text
    caplog.clear()
    assert check_supported(config, 4096) == 4096 and check_supported(config, 2048) == 2048
    assert not caplog.records  # within the window: full attention is exact, nothing to say


def test_qwen2_sliding_window_off_still_loads_and_on_is_capped():
    # Qwen2/Qwen2.5 config.json files carry sliding_window with use_sliding_window false
    assert check_supported(Qwen2Config(**SMALL, sliding_window=4096, use_sliding_window=False), 8192) == 8192
    assert check_supported(Qwen3Config(**SMALL, sliding_window=4096, use_sliding_window=False), 8192) == 8192
    on = Qwen2Config(**SMALL, sliding_window=4096, use_sliding_window=True, max_window_layers=2)
    assert "sliding_attention" in on.layer_types
    assert check_supported(on, 8192) == 4096
    # Qwen3 layer_types given outright
    layer_types = ["full_attention"] * 3 + ["sliding_attention"]
    qwen3 = Qwen3Config(**SMALL, sliding_window=1024, use_sliding_window=True, layer_types=layer_types)
    assert check_supported(qwen3, 8192) == 1024
    # transformers drops the window when use_sliding_window is false: every layer attends in full
    assert check_supported(Qwen3Config(**SMALL, sliding_window=1024, layer_types=layer_types), 8192) == 8192


def test_llama_ignores_sliding_window_as_transformers_does():
    config = LlamaConfig(**SMALL)
    config.sliding_window = 1024
    assert check_supported(config, 8192) == 8192


def _with(config, **fields):
    """Set fields after construction: transformers' own validation refuses some of these outright."""
    for name, value in fields.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize("make, field", [
    (lambda: LlamaConfig(**SMALL, mlp_bias=True), "mlp_bias"),
    (lambda: LlamaConfig(**SMALL, attention_bias=True), "attention_bias"),  # o_proj bias too in transformers
    (lambda: Qwen3Config(**SMALL, attention_bias=True), "attention_bias"),
    (lambda: LlamaConfig(**SMALL, hidden_act="gelu"), "hidden_act"),
    (lambda: _with(LlamaConfig(**SMALL), num_key_value_heads=3), "num_key_value_heads"),
    (lambda: _with(LlamaConfig(**SMALL), head_dim=15), "head_dim"),
    (lambda: _with(LlamaConfig(**SMALL), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    (lambda: LlamaConfig(**SMALL, quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config"),
])
def test_unimplemented_math_is_refused_naming_the_field(make, field):
    config = make()
    with pytest.raises(ValueError, match=field):
        check_supported(config, 2048)


def test_qwen2_attention_bias_is_its_own_qkv_bias():
    config = Qwen2Config(**SMALL)
    config.attention_bias = True  # Qwen2 has q/k/v biases whatever the flag says; o_proj none
    assert check_supported(config, 2048) == 2048


def test_unknown_rope_type_is_refused():
    config = LlamaConfig(**SMALL)
    config.rope_parameters = {"rope_type": "mystery", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope_type"):
        check_supported(config, 2048)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
])
def test_static_rope_scalings_pass(rope):
    config = LlamaConfig(**SMALL, rope_parameters={**rope, "rope_theta": 500000.0})
    assert check_supported(config, 16384) == 16384


def test_length_dependent_rope_scalings_are_capped(caplog):
    caplog.set_level(logging.WARNING)
    dynamic = LlamaConfig(**{**SMALL, "max_position_embeddings": 4096},
                          rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert check_supported(dynamic, 8192) == 4096 and check_supported(dynamic, 2048) == 2048
    half = SMALL["hidden_size"] // SMALL["num_attention_heads"] // 2
    longrope = LlamaConfig(**SMALL, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
        "long_factor": [2.0] * half, "short_factor": [1.0] * half})
    assert check_supported(longrope, 16384) == 4096
    assert "longrope" in caplog.text


def test_rope_tables_agree_with_transformers_for_the_accepted_types():
    """What 'accepted' rests on: rillet's tables are transformers' frequencies at every position."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from rillet.models.llama import rope_tables

    for rope in ({"rope_type": "default"}, {"rope_type": "linear", "factor": 2.0},
                 {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 512}):
        config = LlamaConfig(**{**SMALL, "max_position_embeddings": 2048}, rope_parameters={**rope, "rope_theta": 1e4})
        cos, sin = rope_tables(config, 2048)
        ref_cos, ref_sin = LlamaRotaryEmbedding(config=config)(torch.zeros(1, dtype=torch.float32),
                                                               torch.arange(2048)[None])
        torch.testing.assert_close(cos, ref_cos[0]), torch.testing.assert_close(sin, ref_sin[0])


def test_the_default_model_config_passes():
    from rillet.models import resolve

    try:
        resolved = resolve.resolve_model(None)
    except Exception as exc:  # not installed here
        pytest.skip(f"default model unavailable: {exc}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolved.path, local_files_only=True)
    assert check_supported(config, 2048) == 2048


def _tiny_checkpoint(tmp_path, config):
    """A random-weight checkpoint of `config` with the default model's tokenizer files."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from rillet.models import resolve

    try:
        tokenizer_dir = resolve.resolve_model(None).path
    except Exception as exc:
        pytest.skip(f"default model unavailable (its tokenizer is borrowed): {exc}")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    return tmp_path


def test_load_model_caps_a_sliding_window_and_refuses_mlp_bias(tmp_path, caplog):
    import torch

    from rillet.models.loader import load_model

    caplog.set_level(logging.WARNING)
    tiny = dict(SMALL, vocab_size=49152, max_position_embeddings=4096, num_hidden_layers=2)
    path = _tiny_checkpoint(tmp_path / "mistral", MistralConfig(**tiny, sliding_window=64))
    loaded = load_model(path, torch.float32, torch.device("cpu"), max_positions=256)
    assert loaded.max_position_embeddings == 64  # the engine's max_model_len cannot exceed it
    assert "sliding_window=64" in caplog.text

    path = _tiny_checkpoint(tmp_path / "llama", LlamaConfig(**tiny, mlp_bias=True))
    with pytest.raises(ValueError, match="mlp_bias"):
        load_model(path, torch.float32, torch.device("cpu"), max_positions=256)
