"""The kernels behind batch invariance (see rillet.models.llama.attend): a row's result must not
depend on the other rows of the matmul or on masked padding. Plain random inputs rarely show a
different order of additions in the last bit, so the linear layers are probed with ones and
+-2^25: the sum then counts the ones that survive, which depends on the order."""

import pytest
import torch

from rillet.models.cpu_linear import PackedLinear, packing_supported
from rillet.models.llama import PV_CHUNK, attend

DEFAULT_MODEL_SHAPES = [(1728, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # SmolLM2-135M

pytestmark = pytest.mark.skipif(not packing_supported(torch.bfloat16, torch.device("cpu")),
                                reason="oneDNN bf16 packing unavailable in this torch build")


def order_sensitive_rows(rows: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows)
    x = torch.ones(rows, width)
    for row in x:
        row[torch.randperm(width, generator=generator)[:6]] = torch.tensor([2.0 ** 25, -2.0 ** 25] * 3)
    return x.bfloat16()


@pytest.mark.parametrize("out_features,in_features", DEFAULT_MODEL_SHAPES)
def test_packed_linear_row_does_not_depend_on_row_count(out_features, in_features):
    linear = PackedLinear(torch.ones(out_features, in_features, dtype=torch.bfloat16), None, batch_hint=32)
    x = order_sensitive_rows(512, in_features)
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


@pytest.mark.parametrize("queries", [1, 5, 40])
@pytest.mark.parametrize("context", [48, 200, 496, 700, 1100])
def test_attention_row_does_not_depend_on_batch_mates_or_padding(queries, context):
    torch.manual_seed(context + queries)
    nkv, group, d, mates = 3, 3, 64, 6
    contexts = [context] + torch.randint(queries, 1200, (mates,)).tolist()
    width = -(-max(contexts) // 16) * 16
    q = torch.randn(nkv, mates + 1, queries * group, d).bfloat16()
    k = torch.randn(nkv, mates + 1, width, d).bfloat16()
    v = torch.randn(nkv, mates + 1, width, d).bfloat16()
    together = attend(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                      _bias(contexts, width, queries, group, nkv), 0.125).view(nkv, mates + 1, -1, d)
    own = -(-context // 16) * 16
    alone = attend(q[:, 0], k[:, 0, :own].contiguous(), v[:, 0, :own].contiguous(),
                   _bias([context], own, queries, group, nkv), 0.125)
    assert (width > PV_CHUNK) or (own <= PV_CHUNK)
    assert torch.equal(together[:, 0], alone)
