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
    from rillet.models.gguf_blocks import convert_tensor

    for info, tensor in list(zip(header.tensors, reader.tensors))[:12]:  # the GGUFReader entry point too
        a, b = header.convert(info), convert_tensor(tensor)
        assert torch.equal(_float(a), _float(b)) and type(a) is type(b), info.name


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


def _random_blocks(qtype, n, k, rng):
    """Random raw GGUF blocks with finite float16 fields (the layout test_gguf_blocks covers)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // block_size, type_size), dtype=np.uint8)
    fields = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208]}[qtype]
    for offset in fields:
        d = (np.abs(rng.standard_normal((n, k // block_size))) * 0.01).astype(np.float16)
        raw[..., offset:offset + 2] = d.view(np.uint8).reshape(n, k // block_size, 2)
    if qtype == T.Q8_0:
        values = raw[..., 2:].view(np.int8)
        values[values == -128] = -127
    return raw.reshape(n, -1)


def test_mixed_formats_llama_file(tmp_path):
    """A small Q4_K_M-style llama file (q, k in Q4_K, v and ffn_down in Q6_K, ffn_up in Q5_0,
    untied output): names, q/k permutation and the fusing of mixed forms, against gguf-py's
    dequantization with transformers' reverse permutation."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize as gguf_quantize
    from transformers import LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    hidden, heads, kv_heads, inter, vocab, layers = 256, 4, 2, 512, 320, 2
    head_dim = hidden // heads
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(tmp_path / "mixed.gguf", "llama")
    writer.add_block_count(layers)
    tensors = {}

    def add(name, qtype, n, k):
        if qtype == T.F32:
            data = rng.standard_normal(k if n is None else (n, k)).astype(np.float32)
        elif qtype == T.Q5_0:
            data = gguf_quantize(rng.standard_normal((n, k)).astype(np.float32), T.Q5_0)
        else:
            data = _random_blocks(qtype, n, k, rng)
        writer.add_tensor(name, data, raw_dtype=None if qtype == T.F32 else qtype)
        tensors[name] = (data, qtype, (k,) if n is None else (n, k))

    add("token_embd.weight", T.Q4_1, vocab, hidden)
    add("output_norm.weight", T.F32, None, hidden)
    add("output.weight", T.Q6_K, vocab, hidden)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", T.F32, None, hidden)
        add(f"blk.{i}.attn_q.weight", T.Q4_K, heads * head_dim, hidden)
        add(f"blk.{i}.attn_k.weight", T.Q4_K, kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_v.weight", T.Q6_K, kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_output.weight", T.Q4_0, hidden, hidden)
        add(f"blk.{i}.ffn_norm.weight", T.F32, None, hidden)
        add(f"blk.{i}.ffn_gate.weight", T.Q8_0, inter, hidden)
        add(f"blk.{i}.ffn_up.weight", T.Q5_0, inter, hidden)
        add(f"blk.{i}.ffn_down.weight", T.Q6_K, hidden, inter)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    config = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=inter, vocab_size=vocab, num_hidden_layers=layers,
                         tie_word_embeddings=False)
    from rillet.models.gguf_blocks import convert_blocks
    from rillet.models.gguf_model import gguf_weights

    weights = gguf_weights(read_gguf_header(tmp_path / "mixed.gguf"), config)
    processor = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})

    def ref(name):
        data, qtype, shape = tensors[name]
        w = dequantize(data, qtype).reshape(shape)
        return torch.from_numpy(np.array(processor.process(weights=w, name=name).weights))

    assert weights["embed_tokens.weight"].format == "q4"
    assert torch.equal(weights["embed_tokens.weight"].dequantize(), ref("token_embd.weight"))
    assert weights["lm_head.weight"].format == "q8"  # Q6_K, within its bound
    assert torch.allclose(weights["lm_head.weight"].dequantize(), ref("output.weight"), rtol=0,
                          atol=float(weights["lm_head.weight"].scales.max()) * 0.5001)
    for i in range(layers):
        p = f"layers.{i}."
        assert torch.equal(weights[p + "input_layernorm.weight"], ref(f"blk.{i}.attn_norm.weight"))
        assert torch.equal(weights[p + "post_attention_layernorm.weight"], ref(f"blk.{i}.ffn_norm.weight"))
        assert torch.equal(weights[p + "self_attn.o_proj.weight"].dequantize(), ref(f"blk.{i}.attn_output.weight"))
        # q, k: Q4_K (exact, rows unpermuted); v: Q6_K -> q8, requantized to the majority q4
        qkv = weights[p + "self_attn.qkv_proj.weight"]
        assert qkv.format == "q4" and qkv.shape == ((heads + 2 * kv_heads) * head_dim, hidden)
        q_rows = (heads + kv_heads) * head_dim
        exact = torch.cat([ref(f"blk.{i}.attn_q.weight"), ref(f"blk.{i}.attn_k.weight")])
        assert torch.equal(qkv.dequantize()[:q_rows], exact)
        v_q8 = convert_blocks(*tensors[f"blk.{i}.attn_v.weight"])
        v_q4 = quantize(v_q8.dequantize(), "q4")
        assert torch.equal(qkv.values[q_rows:], v_q4.values) and torch.equal(qkv.scales[q_rows:], v_q4.scales)
        v, v_ref = qkv.dequantize()[q_rows:], ref(f"blk.{i}.attn_v.weight")
        bound = (qkv.scales[q_rows:] + v_q8.scales).repeat_interleave(32, 1) * 0.5001  # both steps
        assert ((v - v_ref).abs() <= bound).all()
        # gate (Q8_0 -> q8) and up (Q5_0 -> float) tie: fused in float, exactly
        gate_up = weights[p + "mlp.gate_up_proj.weight"]
        assert isinstance(gate_up, torch.Tensor) and gate_up.dtype == torch.float32
        assert torch.equal(gate_up, torch.cat([ref(f"blk.{i}.ffn_gate.weight"), ref(f"blk.{i}.ffn_up.weight")]))
        down = weights[p + "mlp.down_proj.weight"]
        assert down.format == "q8" and torch.allclose(down.dequantize(), ref(f"blk.{i}.ffn_down.weight"), rtol=0,
                                                      atol=float(down.scales.max()) * 0.5001)

    from rillet.models.llama import CausalLM

    with torch.device("meta"):
        model = CausalLM(config, "llama")
    params = dict(model.named_parameters())
    assert set(params) == set(weights)
    assert all(tuple(weights[n].shape) == tuple(t.shape) for n, t in params.items())
