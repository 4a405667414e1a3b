"""The kernels behind batch invariance (see rillet.models.llama.attend): a row's result must not
depend on the other rows of the matmul or on masked padding. Plain random inputs rarely show a
different order of additions in the last bit, so the linear layers are probed with ones and
+-2^25: the sum then counts the ones that survive, which depends on the order."""

import pytest
import torch

from rillet.models import cpu_kernels
from rillet.models.cpu_linear import KernelLinear, PackedLinear, onednn_packing_supported, order_sensitive_rows
from rillet.models.llama import attend
from support.cpu_variants import load_variant

DEFAULT_MODEL_SHAPES = [(1728, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # SmolLM2-135M

needs_onednn = pytest.mark.skipif(not onednn_packing_supported(torch.bfloat16, torch.device("cpu")),
                                  reason="oneDNN bf16 packing unavailable in this torch build")


@pytest.fixture(scope="module", params=cpu_kernels.available_isas())
def kernels(request):
    """Every kernel variant this CPU runs (support/cpu_variants.py)."""
    return load_variant(request.param)


@needs_onednn
@pytest.mark.parametrize("out_features,in_features", DEFAULT_MODEL_SHAPES)
def test_packed_linear_row_does_not_depend_on_row_count(out_features, in_features):
    linear = PackedLinear(torch.ones(out_features, in_features, dtype=torch.bfloat16), None, batch_hint=32)
    x = order_sensitive_rows(512, in_features, torch.bfloat16, seed=512)
    with torch.inference_mode():
        reference = linear(x)[:4]
        for rows in (1, 2, 3, 7, 16, 32, 33, 100, 512):
            assert torch.equal(linear(x[:rows])[:4], reference[:rows]), rows


def _bias(contexts: list[int], width: int, queries: int, group: int, num_kv_heads: int) -> torch.Tensor:
    positions = torch.tensor(contexts)[:, None] - queries + torch.arange(queries)[None, :]
    hidden = torch.arange(width)[None, None, :] > positions[:, :, None]
    bias = torch.zeros(hidden.shape, dtype=torch.bfloat16).masked_fill_(hidden, -float("inf"))
    if queries > 1:
        bias = bias[:, :, None, :].expand(-1, -1, group, -1).reshape(len(contexts), queries * group, width)
    return bias.repeat(num_kv_heads, 1, 1)


def attention_alone_and_together(attend_fn, queries: int, context: int):
    """One sequence's attention (`attend_fn`: attend or attend_float32) computed alone over its own
    keys and in a padded batch with 6 others: (together, alone), which must be equal."""
    torch.manual_seed(context + queries)
    nkv, group, d, mates = 3, 3, 64, 6
    contexts = [context] + torch.randint(queries, 1200, (mates,)).tolist()
    width = -(-max(contexts) // 16) * 16
    q = torch.randn(nkv, mates + 1, queries * group, d).bfloat16()
    k = torch.randn(nkv, mates + 1, width, d).bfloat16()
    v = torch.randn(nkv, mates + 1, width, d).bfloat16()
    together = attend_fn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                         _bias(contexts, width, queries, group, nkv), 0.125).view(nkv, mates + 1, -1, d)
    own = -(-context // 16) * 16
    alone = attend_fn(q[:, 0], k[:, 0, :own].contiguous(), v[:, 0, :own].contiguous(),
                      _bias([context], own, queries, group, nkv), 0.125)
    return together[:, 0], alone


@needs_onednn
@pytest.mark.parametrize("queries", [1, 5, 40])
@pytest.mark.parametrize("context", [48, 104, 107, 200, 226, 496, 700, 1100])  # 104-226: AMX's oneDNN differs
def test_attention_row_does_not_depend_on_batch_mates_or_padding(queries, context):
    assert torch.equal(*attention_alone_and_together(attend, queries, context))


def _paged_case(contexts, nkv=3, group=3, d=64, block_size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in contexts) + 4
    k_cache = torch.randn(nkv, num_blocks * block_size, d, generator=generator).bfloat16()
    v_cache = torch.randn(nkv, num_blocks * block_size, d, generator=generator).bfloat16()
    order = torch.randperm(num_blocks, generator=generator).tolist()  # blocks scattered over the cache
    tables, start = [], 0
    for c in contexts:
        n = -(-c // block_size)
        tables.append(order[start:start + n])
        start += n
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    # q rows strided as in the model: q is a slice of the q|k|v projection
    q = torch.randn(len(contexts), nkv * group + 2 * nkv, d, generator=generator).bfloat16()[:, :nkv * group]
    return q, k_cache, v_cache, block_tables, tables


@pytest.mark.parametrize("nkv,group,d", [(3, 3, 64), (2, 1, 64), (1, 4, 64), (2, 2, 128), (1, 3, 128), (2, 7, 128),
                                          (2, 2, 72), (1, 2, 8), (1, 5, 256)])
def test_paged_decode_kernel_matches_float32_attention(kernels, nkv, group, d):
    contexts, block_size = [1, 17, 300, 1100], 16
    q, k_cache, v_cache, block_tables, tables = _paged_case(contexts, nkv=nkv, group=group, d=d)
    out = kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, torch.tensor(contexts, dtype=torch.int32),
                                         block_size, d ** -0.5)
    for b, (c, table) in enumerate(zip(contexts, tables)):
        slots = torch.tensor([blk * block_size + i for blk in table for i in range(block_size)][:c])
        k, v = k_cache[:, slots].float(), v_cache[:, slots].float()  # [nkv, c, d]
        qb = q[b].float().view(nkv, group, d)
        expected = torch.softmax(qb @ k.transpose(1, 2) * d ** -0.5, dim=-1) @ v
        torch.testing.assert_close(out[b].float().view(nkv, group, d), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("nkv,group,d", [(3, 3, 64), (2, 2, 128), (2, 3, 72)])
def test_paged_decode_kernel_row_does_not_depend_on_batch_mates(kernels, nkv, group, d):
    contexts = [300, 5, 1100, 64, 513]
    q, k_cache, v_cache, block_tables, _ = _paged_case(contexts, nkv=nkv, group=group, d=d, seed=1)
    together = kernels.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                              torch.tensor(contexts, dtype=torch.int32), 16, 0.125)
    for b, c in enumerate(contexts):
        alone = kernels.paged_decode_attention(q[b:b + 1], k_cache, v_cache,
                                               block_tables[b:b + 1, :-(-c // 16)].contiguous(),
                                               torch.tensor([c], dtype=torch.int32), 16, 0.125)
        assert torch.equal(alone[0], together[b])


def test_fused_add_rms_norm_matches_torch_and_each_row_stands_alone(kernels):
    add_rms_norm = kernels.add_rms_norm
    generator = torch.Generator().manual_seed(3)
    residual = torch.randn(100, 576, generator=generator).bfloat16()
    x = torch.randn(100, 576, generator=generator).bfloat16()
    weight = torch.randn(576, generator=generator).bfloat16()
    expected_residual = residual + x
    expected = torch.nn.functional.rms_norm(expected_residual.float(), (576,), weight.float(), 1e-5)

    fused_residual = residual.clone()
    out = add_rms_norm(fused_residual, x, weight, 1e-5)  # 100 rows: split over threads
    assert torch.equal(fused_residual, expected_residual)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)
    for row in (0, 37, 99):
        alone_residual = residual[row:row + 1].clone()
        assert torch.equal(add_rms_norm(alone_residual, x[row:row + 1].contiguous(), weight, 1e-5), out[row:row + 1])


@pytest.fixture(scope="module")
def kernel_linear(kernels):
    return lambda weight, bias: KernelLinear(weight, bias, kernels)


# The default model's shapes, plus an odd input width, a partial tile of outputs and a bias.
@pytest.mark.parametrize("out_features,in_features,bias", [
    *((n, k, False) for n, k in DEFAULT_MODEL_SHAPES), (100, 77, True), (8, 9, True)])
def test_kernel_linear_row_does_not_depend_on_row_count(kernel_linear, out_features, in_features, bias):
    linear = kernel_linear(torch.ones(out_features, in_features, dtype=torch.bfloat16),
                           torch.ones(out_features, dtype=torch.bfloat16) if bias else None)
    x = order_sensitive_rows(64, in_features, torch.bfloat16, seed=64)
    reference = linear(x)[:4]
    for rows in (1, 2, 3, 5, 6, 7, 13, 32, 64):
        assert torch.equal(linear(x[:rows])[:4], reference[:rows]), rows


@pytest.mark.parametrize("out_features,in_features", [(1728, 576), (100, 77), (8, 3)])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_kernel_linear_matches_float32_matmul(kernel_linear, out_features, in_features, rows):
    generator = torch.Generator().manual_seed(rows + in_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator).bfloat16()
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    out = kernel_linear(weight, bias)(x)
    expected = (x.float() @ weight.float().T + bias.float()).bfloat16()
    assert out.shape == (rows, out_features) and out.dtype == torch.bfloat16
    # float32 sums in another order: equal up to one bf16 rounding step
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-3, rtol=8e-3)


def test_kernel_linear_reads_strided_rows(kernel_linear):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 32, generator=generator).bfloat16()
    wide = torch.randn(10, 96, generator=generator).bfloat16()
    linear = kernel_linear(weight, None)
    assert torch.equal(linear(wide[:, 32:64]), linear(wide[:, 32:64].contiguous()))


def test_float32_paths_agree_bit_for_bit_and_bf16_dot_products_closely(kernels):
    """AVX2, NEON and plain C round the same products in the same order (bf16 x bf16 is exact in
    float32, so FMA or not makes no difference): their results are identical. AVX512-BF16's dot
    product rounds differently, within a bf16 step."""
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(200, 333, generator=generator).bfloat16()
    bias = torch.randn(200, generator=generator).bfloat16()
    x = torch.randn(9, 333, generator=generator).bfloat16()
    out = KernelLinear(weight, bias, kernels)(x)
    generic = KernelLinear(weight, bias, cpu_kernels.load("generic"))(x)
    if kernels.features["bf16_dot"]:
        torch.testing.assert_close(out.float(), generic.float(), atol=1e-2, rtol=8e-3)
    else:
        assert torch.equal(out, generic)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_quantized_kernel_linear_matches_dequantized_matmul(kernels, fmt):
    from rillet.models.quantize import QBLOCK, QuantizedWeight

    if fmt not in kernels.formats:
        pytest.skip(f"{fmt} is not built into these kernels (kernels/linear_quant.c absent)")
    generator = torch.Generator().manual_seed(7)
    n, k = 96, 4 * QBLOCK
    if fmt == "q8":
        values = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
        mins = None
    else:
        values = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
        mins = -8 * torch.rand(n, k // QBLOCK, generator=generator) / 100
    weight = QuantizedWeight(fmt, values, torch.rand(n, k // QBLOCK, generator=generator) / 100, mins)
    bias = torch.randn(n, generator=generator).bfloat16()
    x = torch.randn(5, k, generator=generator).bfloat16()
    linear = KernelLinear.from_quantized(weight, bias, kernels)
    expected = x.float() @ weight.dequantize().T + bias.float()
    out = linear(x)
    assert out.shape == (5, n) and out.dtype == torch.bfloat16
    # activations are quantized to int8 per block: ~1% of the row's scale
    torch.testing.assert_close(out.float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0.02)
    for rows in (1, 2, 3):
        assert torch.equal(linear(x[:rows]), out[:rows])
