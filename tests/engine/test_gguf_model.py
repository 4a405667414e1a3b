"""gguf_model.read_gguf_weights: the default GGUF straight into rillet's parameter names, quantized
blocks kept. Every tensor, dequantized, must equal transformers' own GGUF load of the file (after
fusing q/k/v and gate/up as rillet does): that pins the name mapping and the undoing of llama.cpp's
q/k row permutation."""

import numpy as np
import pytest
import torch

from rillet.models.gguf_model import fuse, read_gguf_header, read_gguf_weights, unpermute_rows
from rillet.models.quantize import QuantizedWeight, quantize
from rillet.models.resolve import ModelNotFoundError, default_gguf_path

FUSED = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
         "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"]}


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return default_gguf_path()
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def meta_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-meta") / "SmolLM2"


@pytest.fixture(scope="module")
def loaded(gguf_path, meta_cache):
    return read_gguf_weights(gguf_path, cache_dir=meta_cache)


@pytest.fixture(scope="module")
def transformers_state(gguf_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                 local_files_only=True)
    state = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    fused = {}
    for name, tensor in state.items():
        for target, parts in FUSED.items():
            if f".{parts[0]}." in name:
                prefix, suffix = name.split(f".{parts[0]}.")
                fused[f"{prefix}.{target}.{suffix}"] = torch.cat([state[f"{prefix}.{p}.{suffix}"] for p in parts])
        if not any(f".{p}." in name for parts in FUSED.values() for p in parts):
            fused[name] = tensor
    return fused, bool(model.config.tie_word_embeddings)


def _float(weight):
    return weight.dequantize() if isinstance(weight, QuantizedWeight) else weight.float()


def test_every_tensor_equals_transformers_dequantization(loaded, transformers_state):
    _, _, weights = loaded
    reference, tied = transformers_state
    assert tied and "lm_head.weight" not in weights  # SmolLM2 ties the output to the embedding
    reference = {k: v for k, v in reference.items() if k != "lm_head.weight"}
    assert set(weights) == set(reference)
    for name, weight in weights.items():
        assert torch.equal(_float(weight), reference[name]), name


def test_formats_of_the_default_model(loaded):
    config, _, weights = loaded
    forms = {name: (w.format if isinstance(w, QuantizedWeight) else str(w.dtype)) for name, w in weights.items()}
    assert forms["embed_tokens.weight"] == "q8"  # Q8_0
    for name, form in forms.items():
        if name.endswith("proj.weight"):
            assert form == "q4", name  # Q4_1
        elif name != "embed_tokens.weight":
            assert form == "torch.float32", name  # the norms
    assert len(weights) == 2 + 6 * config.num_hidden_layers


def test_weights_fit_causal_lm(loaded):
    from rillet.models.llama import CausalLM, family_of

    config, _, weights = loaded
    with torch.device("meta"):
        model = CausalLM(config, family_of(config))
    params = dict(model.named_parameters())
    assert set(params) == set(weights)
    for name, param in params.items():
        assert tuple(weights[name].shape) == tuple(param.shape), name


def test_config_and_tokenizer_come_back_from_the_cache(gguf_path, loaded, meta_cache):
    config, tokenizer, weights = loaded
    assert (meta_cache / "config.json").is_file() and (meta_cache / "tokenizer.json").is_file()
    again_config, again_tokenizer, again = read_gguf_weights(gguf_path, cache_dir=meta_cache)
    assert again_config.to_diff_dict() == config.to_diff_dict()
    text = "<|im_start|>user\nHéllo wörld, 12345 tokens!<|im_end|>"
    assert again_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert again_tokenizer.eos_token_id == tokenizer.eos_token_id == 2
    assert again_tokenizer.chat_template == tokenizer.chat_template
    assert torch.equal(_float(again["layers.3.self_attn.qkv_proj.weight"]),
                       _float(weights["layers.3.self_attn.qkv_proj.weight"]))


def test_header_matches_gguf_reader(gguf_path):
    import gguf

    header = read_gguf_header(gguf_path)
    reader = gguf.GGUFReader(gguf_path)
    assert header.architecture == "llama"
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for info, tensor in zip(header.tensors, reader.tensors):
        assert info.tensor_type == tensor.tensor_type, info.name
        assert info.shape == tuple(int(d) for d in reversed(tensor.shape.tolist())), info.name
        assert np.array_equal(header.data(info), np.asarray(tensor.data).reshape(-1).view(np.uint8)), info.name


@pytest.mark.parametrize("n_head,head_dim", [(9, 64), (3, 64), (4, 8)])
def test_unpermute_matches_transformers(n_head, head_dim):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows, k = n_head * head_dim, 64
    w = torch.randn(rows, k)
    expected = LlamaTensorProcessor()._reverse_permute_weights(w.numpy(), n_head, n_head)
    assert torch.equal(unpermute_rows(w, n_head), torch.from_numpy(expected))
    q = quantize(w, "q4")  # rows move whole: values, scales and mins alike
    assert torch.equal(unpermute_rows(q, n_head).dequantize(), torch.from_numpy(
        LlamaTensorProcessor()._reverse_permute_weights(q.dequantize().numpy(), n_head, n_head)))
    bias = torch.randn(rows)
    assert torch.equal(unpermute_rows(bias, n_head), torch.from_numpy(
        LlamaTensorProcessor()._reverse_permute_weights(bias.numpy(), n_head, n_head)))


def test_fuse_brings_odd_forms_to_the_majority():
    w = [torch.randn(64, 96) for _ in range(3)]
    q4, q8 = [quantize(x, "q4") for x in w], [quantize(x, "q8") for x in w]
    same = fuse(q4)
    assert same.format == "q4" and torch.equal(same.dequantize(), torch.cat([q.dequantize() for q in q4]))
    mixed = fuse([q4[0], q4[1], q8[2]])  # Q4_K_M style: v in Q6_K -> q8, q and k in q4
    assert mixed.format == "q4"
    assert torch.equal(mixed.dequantize()[:128], torch.cat([q4[0].dequantize(), q4[1].dequantize()]))
    assert torch.equal(mixed.values[128:], quantize(q8[2].dequantize(), "q4").values)
    assert fuse([q4[0], q8[1]]).format == "q8"  # a tie goes to the more precise form
    assert fuse([q8[0], w[1]]).dtype == torch.float32  # float beats q8 on a tie
    assert fuse([q8[0], q8[1], w[2]]).format == "q8"
    assert torch.equal(fuse([w[0], w[1], q8[2]]), torch.cat([w[0], w[1], q8[2].dequantize()]))
