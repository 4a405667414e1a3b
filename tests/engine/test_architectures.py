"""Every supported architecture, on a small random-weight checkpoint saved the way the hub ships it
(config.json + safetensors + the default model's tokenizer):

- float32: rillet's greedy tokens equal transformers' `generate`, token for token;
- bfloat16: the C decode kernel (all layers in one call, models/cpu_decode.py, on whichever kernel
  variant is selected: run with RILLET_CPU_ISA=avx2 or generic for the others) and the torch path
  give the same next-token logits up to bf16 rounding, for a batch of sequences at different
  positions. This covers the parts only some families have: Qwen2's q/k/v bias, Qwen3's q/k norm;
- int8 and q4 weights: the same comparison, with query-head groups that are whole quantization
  blocks of the o projection's input (the attention task quantizes its own output) and that are not.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from rillet import LLM, SamplingParams
from rillet.models.resolve import resolve_model

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
}
PROMPTS = ["The river flows", "Count: one, two, three,", "你好，世界"]


def save_checkpoint(path, family: str, **dims):
    """A random checkpoint of `family` (dims override the small default shape) with the default
    model's tokenizer; returns the transformers model."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    tokenizer_dir = resolve_model(None).path
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2) | dims
    config = getattr(transformers, config_name)(
        vocab_size=49152, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, **shape, **extra)
    torch.manual_seed(sum(map(ord, family)))
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # larger than the default init, so the layers matter to the logits
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif param.dim() == 2:
                param.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(family)
    return family, path, save_checkpoint(path, family)


def test_float32_greedy_matches_transformers(checkpoint):
    family, path, reference = checkpoint
    llm = LLM(model=str(path), dtype="float32", max_model_len=256, kv_cache_gib=0.02)
    results = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, result in zip(PROMPTS, results):
        ids = llm.engine.tokenizer(prompt, return_tensors="pt").input_ids
        expected = reference.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, ids.shape[1]:]
        assert result.token_ids == expected.tolist(), (family, prompt)


def kernel_and_torch_logits(path, **engine_options) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token logits of one decode step over PROMPTS (rows at different positions), from
    the C decode kernel and then from the torch path, on the same engine."""
    from rillet.models import cpu_kernels

    if cpu_kernels.disabled():
        pytest.skip("RILLET_CPU_KERNELS=0: no C decode kernel to compare")
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler: rillet's CPU kernels (and the C decode step) cannot be built here")
    llm = LLM(model=str(path), max_model_len=256, kv_cache_gib=0.02, **engine_options)
    engine = llm.engine
    if engine.runner.decode_forward is None:
        pytest.fail(f"the C decode kernel is not in use for this model ({engine.runner.describe_kernels()})")
    captured = []
    execute = engine.runner.execute

    def capture(batch, block_manager):
        logits, sampling = execute(batch, block_manager)
        captured.append(logits.clone())
        return logits, sampling

    engine.runner.execute = capture
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    logits = []
    for attempt in ("kernel", "torch"):
        if attempt == "torch":
            engine.runner.decode_forward = None  # the same step on the torch path
        captured.clear()
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"{attempt}{i}", prompt, params)
        while engine.has_unfinished():
            engine.step()
        logits.append(captured[-1])  # the decode step: one token per sequence
    return logits[0], logits[1]


def assert_close_logits(kernel_logits: torch.Tensor, torch_logits: torch.Tensor, what: str) -> None:
    assert kernel_logits.shape == torch_logits.shape == (len(PROMPTS), 49152)
    scale = torch_logits.abs().max()
    assert (kernel_logits - torch_logits).abs().max() < 0.03 * scale, what
    assert torch.equal(kernel_logits.argmax(-1), torch_logits.argmax(-1)), what


def test_bfloat16_decode_kernel_matches_torch_path(checkpoint):
    family, path, _ = checkpoint
    assert_close_logits(*kernel_and_torch_logits(path, dtype="bfloat16"), family)


@pytest.mark.parametrize("quantization", ["int8", "q4"])
@pytest.mark.parametrize("heads", [(4, 2, 32), (4, 4, 16)], ids=["group-whole-blocks", "group-part-block"])
def test_quantized_decode_kernel_matches_torch_path(tmp_path, quantization, heads):
    num_heads, num_kv_heads, head_dim = heads  # 2 x 32 inputs of o a KV head; or 16, half a block
    save_checkpoint(tmp_path, "llama", hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
                    num_key_value_heads=num_kv_heads, head_dim=head_dim)
    assert_close_logits(*kernel_and_torch_logits(tmp_path, dtype="bfloat16", quantization=quantization),
                        f"{quantization} {heads}")
