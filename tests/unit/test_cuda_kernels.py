"""The GPU path's Triton kernels (models/cuda_kernels.py) against torch, on any machine.

Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before anything imports Triton): the same kernel code, executed by numpy on the CPU. That checks their
indexing and arithmetic, not their speed; tests/gpu runs them compiled on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from support.triton_kernels import require_triton

require_triton()

from rillet.models import cuda_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter holds tensors in numpy, which has no bfloat16: there float16 stands in for the
# reduced-precision path (same kernel code); on a GPU both run.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def reference_attention(q, k_cache, v_cache, tables, q_starts, q_lens, context_lens, block_size, scale):
    """Gather each sequence's keys and attend causally in float32: [T, nh * d]."""
    T, nh, d = q.shape
    nkv = k_cache.shape[0]
    out = torch.zeros((T, nh * d), dtype=torch.float32)
    for seq in range(len(q_lens)):
        n, ctx, q0 = int(q_lens[seq]), int(context_lens[seq]), int(q_starts[seq])
        if n == 0:  # a padded sequence
            continue
        slots = torch.tensor([int(tables[seq, p // block_size]) * block_size + p % block_size for p in range(ctx)])
        keys = k_cache[:, slots].float()  # [nkv, ctx, d]
        values = v_cache[:, slots].float()
        for t in range(n):
            position = ctx - n + t
            for h in range(nh):
                kv = h // (nh // nkv)
                scores = keys[kv, :position + 1] @ q[q0 + t, h].float() * scale
                out[q0 + t, h * d:(h + 1) * d] = torch.softmax(scores, 0) @ values[kv, :position + 1]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,d", [(8, 2, 64), (6, 2, 32), (4, 4, 16)])
def test_paged_attention_matches_gathered_attention(dtype, nh, nkv, d):
    torch.manual_seed(0)
    block_size, num_blocks = 16, 24
    k_cache = torch.randn(nkv, num_blocks * block_size, d).to(dtype)
    v_cache = torch.randn(nkv, num_blocks * block_size, d).to(dtype)
    # a decode with a long context, a prompt chunk after a cached prefix, a whole prompt, a 1-token prompt
    q_lens = torch.tensor([1, 20, 37, 1], dtype=torch.int32)
    context_lens = torch.tensor([70, 50, 37, 1], dtype=torch.int32)
    q_starts = torch.cumsum(q_lens, 0, dtype=torch.int32) - q_lens
    blocks = torch.randperm(num_blocks)[:4 * 5].view(4, 5).to(torch.int32)  # scattered, not in order
    T = int(q_lens.sum())
    qkv = torch.randn(T, (nh + 2 * nkv) * d).to(dtype)  # q as a strided view, as the model passes it
    q = qkv[:, :nh * d].view(T, nh, d)
    scale = d ** -0.5
    got = cuda_kernels.paged_attention(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), blocks.to(DEVICE),
                                       q_starts.to(DEVICE), q_lens.to(DEVICE), context_lens.to(DEVICE),
                                       int(q_lens.max()), block_size, scale).cpu()
    want = reference_attention(q, k_cache, v_cache, blocks, q_starts, q_lens, context_lens, block_size, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)


def test_paged_attention_skips_padded_rows():
    """A padded CUDA-graph row (query length 0) is neither read nor written."""
    k_cache = torch.randn(2, 64, 16)
    out = torch.full((2, 4 * 16), 7.0, device=DEVICE)
    q = torch.randn(2, 4, 16)
    cuda_kernels.paged_attention(q.to(DEVICE), k_cache.to(DEVICE), k_cache.to(DEVICE),
                                 torch.zeros((2, 4), dtype=torch.int32, device=DEVICE),
                                 torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
                                 torch.tensor([1, 0], dtype=torch.int32, device=DEVICE),
                                 torch.tensor([3, 0], dtype=torch.int32, device=DEVICE), 1, 16, 0.25,
                                 out=out)
    assert torch.equal(out[1].cpu(), torch.full((4 * 16,), 7.0))


@pytest.mark.parametrize("splits", [2, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_kv_decode_matches_gathered_attention(dtype, splits):
    """Decodes with the context cut into runs (flash decoding): contexts shorter than one run per
    split (empty runs), longer than a tile per split, and a padded graph row that stays unwritten."""
    torch.manual_seed(2)
    nh, nkv, d, block_size = 8, 2, 32, 16
    k_cache = torch.randn(nkv, 128 * block_size, d).to(dtype)
    v_cache = torch.randn(nkv, 128 * block_size, d).to(dtype)
    q_lens = torch.tensor([1, 1, 1, 1, 0], dtype=torch.int32)
    context_lens = torch.tensor([1, 70, 300, 64, 0], dtype=torch.int32)
    q_starts = torch.arange(5, dtype=torch.int32)
    blocks = torch.randperm(128)[:5 * 20].view(5, 20).to(torch.int32)
    q = torch.randn(5, nh, d).to(dtype)
    out = torch.full((5, nh * d), 7.0, dtype=dtype)
    got = cuda_kernels.paged_attention(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), blocks.to(DEVICE),
                                       q_starts.to(DEVICE), q_lens.to(DEVICE), context_lens.to(DEVICE), 1,
                                       block_size, d ** -0.5, out=out.to(DEVICE), kv_splits=splits).cpu()
    want = reference_attention(q, k_cache, v_cache, blocks, q_starts, q_lens, context_lens, block_size, d ** -0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[:4].float(), want[:4], atol=tolerance, rtol=tolerance)
    assert torch.equal(got[4], torch.full((nh * d,), 7.0, dtype=dtype))


def test_decode_kv_splits_fill_the_gpu_only_for_small_batches():
    assert cuda_kernels.decode_kv_splits(1, 8, torch.device("cpu")) == 1
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        one = cuda_kernels.decode_kv_splits(1, 8, torch.device("cuda"))
        assert 1 < one <= cuda_kernels.MAX_KV_SPLITS and 8 * one <= sms
        assert cuda_kernels.decode_kv_splits(sms, 8, torch.device("cuda")) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_attention_over_a_padded_prompt_batch(dtype):
    """A prompt-graph batch: sequences of mixed lengths (tiles that straddle sequences), rows past
    the last one's padding, sequences of q_len 0 at the end; max_q_len is the padded size. Real
    rows equal the reference; padded rows are not written."""
    torch.manual_seed(1)
    nh, nkv, d, block_size = 8, 2, 32, 16
    k_cache = torch.randn(nkv, 40 * block_size, d).to(dtype)
    v_cache = torch.randn(nkv, 40 * block_size, d).to(dtype)
    q_lens = torch.tensor([5, 1, 33, 16, 17, 0, 0], dtype=torch.int32)
    context_lens = torch.tensor([5, 40, 60, 16, 17, 0, 0], dtype=torch.int32)
    q_starts = torch.cumsum(q_lens, 0, dtype=torch.int32) - q_lens
    blocks = torch.randperm(40)[:7 * 4].view(7, 4).to(torch.int32)
    real, padded = int(q_lens.sum()), 96
    q = torch.randn(padded, nh, d).to(dtype)
    out = torch.full((padded, nh * d), 7.0, dtype=dtype, device=DEVICE)
    cuda_kernels.paged_attention(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), blocks.to(DEVICE),
                                 q_starts.to(DEVICE), q_lens.to(DEVICE), context_lens.to(DEVICE), padded,
                                 block_size, d ** -0.5, out=out)
    got = out.cpu()
    want = reference_attention(q, k_cache, v_cache, blocks, q_starts, q_lens, context_lens, block_size, d ** -0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[:real].float(), want[:real], atol=tolerance, rtol=tolerance)
    assert torch.equal(got[real:], torch.full((padded - real, nh * d), 7.0, dtype=dtype))


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(with_residual, dtype):
    from rillet.models.llama import RMSNorm

    torch.manual_seed(1)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96)
    norm = norm.to(dtype)
    x, residual = torch.randn(5, 96).to(dtype), torch.randn(5, 96).to(dtype)
    want_residual = residual + x if with_residual else x
    want = norm(want_residual)
    got_residual = residual.clone().to(DEVICE) if with_residual else None
    got, got_residual = cuda_kernels.add_rms_norm(x.to(DEVICE), got_residual, norm.weight.data.to(DEVICE), 1e-5)
    torch.testing.assert_close(got_residual.cpu(), want_residual)
    if dtype == torch.float32:
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    else:  # one rounding of the weight product apart at most
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=3e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache(dtype):
    from transformers import LlamaConfig

    from rillet.models.llama import rope_tables

    nh, nkv, d, T = 6, 2, 32, 5
    config = LlamaConfig(hidden_size=nh * d, num_attention_heads=nh, num_key_value_heads=nkv, head_dim=d,
                         rope_theta=10000.0, max_position_embeddings=64)
    cos, sin = rope_tables(config, 64)
    signed_sin = torch.cat((-sin[:, :d // 2], sin[:, d // 2:]), dim=-1)
    torch.manual_seed(2)
    qkv = torch.randn(T, (nh + 2 * nkv) * d).to(dtype)
    positions = torch.tensor([0, 3, 17, 40, 63], dtype=torch.int32)
    slots = torch.tensor([5, -1, 0, 31, 12], dtype=torch.int32)  # -1: a padded row writes nothing
    k_cache, v_cache = torch.zeros(nkv, 32, d, dtype=dtype), torch.zeros(nkv, 32, d, dtype=dtype)
    heads = qkv.view(T, nh + 2 * nkv, d).float()
    c, s = cos[positions.long()][:, None], signed_sin[positions.long()][:, None]
    rotated = heads[:, :nh + nkv] * c + heads[:, :nh + nkv].roll(d // 2, dims=-1) * s

    got_qkv, got_k, got_v = qkv.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE)
    q = cuda_kernels.rope_and_cache(got_qkv, positions.to(DEVICE), cos.to(DEVICE), signed_sin.to(DEVICE), got_k,
                                    got_v, slots.to(DEVICE), nh, nkv, d)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q.cpu().float(), rotated[:, :nh], atol=tolerance, rtol=tolerance)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        torch.testing.assert_close(got_k.cpu()[:, slot].float(), rotated[t, nh:], atol=tolerance, rtol=tolerance)
        assert torch.equal(got_v.cpu()[:, slot], qkv.view(T, nh + 2 * nkv, d)[t, nh + nkv:])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [s for s in range(32) if s not in written]
    assert not got_k.cpu()[:, untouched].any() and not got_v.cpu()[:, untouched].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    torch.manual_seed(3)
    gate_up = torch.randn(3, 2 * 1100).to(dtype)  # not a multiple of the kernel's block
    gate, up = gate_up.split(1100, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = cuda_kernels.silu_mul(gate_up.to(DEVICE)).cpu()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(37, 96), (64, 2048), (8, 4096), (5, 1100), (13, 5000)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(dtype, n, k, bias):
    """One row through a weight: odd N (padding rows), K below, at and past one 1024-wide slice,
    K not a multiple of it (masked loads), the wide-K block sizes (8 rows a program, 2048-wide
    slices), with N and K off their multiples; bias or not."""
    torch.manual_seed(0)
    x = torch.randn(1, k).to(dtype)
    w = (torch.randn(n, k) * 0.05).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    got = cuda_kernels.gemv(x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE))
    assert got.dtype == dtype and got.shape == (1, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu().float(), want, atol=tol * (k ** 0.5), rtol=tol)
    whole = cuda_kernels.gemv(x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE), after_small_launch=True)
    torch.testing.assert_close(whole.cpu().float(), want, atol=tol * (k ** 0.5), rtol=tol)  # whole rows a tile
    logits = torch.empty(1, n, dtype=torch.float32, device=DEVICE)  # float32 out from half inputs: the head
    cuda_kernels.gemv(x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE), out=logits)
    torch.testing.assert_close(logits.cpu(), want, atol=tol * (k ** 0.5), rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_on_silu_mul_input_equals_the_two_kernels(dtype):
    """The down projection reading SiLU(gate) * up on the fly: the same row silu_mul would have
    written, so the same result as silu_mul then the GEMV."""
    torch.manual_seed(0)
    width, n = 1536, 40
    gate_up = torch.randn(1, 2 * width).to(dtype).to(DEVICE)
    w = (torch.randn(n, width) * 0.05).to(dtype).to(DEVICE)
    fused = cuda_kernels.gemv(gate_up, w, silu_mul_input=True)
    apart = cuda_kernels.gemv(cuda_kernels.silu_mul(gate_up), w)
    torch.testing.assert_close(fused, apart, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_argmax_rows_matches_torch_first_maximum(dtype):
    torch.manual_seed(0)
    logits = torch.randn(5, 9000).to(dtype)
    logits[1, 4100] = logits[1, 8999] = 50.0  # a tie across parts: the first wins
    logits[2, 7] = logits[2, 9] = 50.0  # a tie inside a part
    logits[3] = -float("inf")
    logits[4, 8999] = 60.0  # the last column, in a part past which there is padding
    wide = torch.randn(5, 9100).to(dtype)
    wide[:, :9000] = logits  # a view with a row stride past its width, as the sampler's vocabulary slice
    for x in (logits, wide[:, :9000]):
        got = cuda_kernels.argmax_rows(x.to(DEVICE)).cpu()
        assert got.tolist() == x.argmax(dim=-1).tolist() == [int(logits[0].argmax()), 4100, 7, 0, 8999]
    out = torch.full((8,), -1, dtype=torch.int64).to(DEVICE)  # a decode graph's buffer, its first rows
    assert cuda_kernels.argmax_rows(logits.to(DEVICE), out=out[:5]).data_ptr() == out.data_ptr()
    assert out.cpu().tolist() == [int(logits[0].argmax()), 4100, 7, 0, 8999, -1, -1, -1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(40, 1536), (9, 1100)])
def test_gemv_with_add_rms_norm_equals_the_two_kernels(dtype, n, k):
    """add + RMSNorm folded into the GEMV that reads its row: the same row add_rms_norm writes,
    so the same output, and the same new residual."""
    torch.manual_seed(0)
    x = torch.randn(1, k).to(dtype).to(DEVICE)
    residual = torch.randn(1, k).to(dtype).to(DEVICE)
    norm = (torch.rand(k) + 0.5).to(dtype).to(DEVICE)
    w = (torch.randn(n, k) * 0.05).to(dtype).to(DEVICE)
    fused, summed = cuda_kernels.add_rms_norm_gemv(x, residual.clone(), norm, 1e-5, w)
    h, apart_residual = cuda_kernels.add_rms_norm(x, residual.clone(), norm, 1e-5)
    torch.testing.assert_close(summed, apart_residual, atol=0, rtol=0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the sum of squares may add up in another order
    torch.testing.assert_close(fused.float(), cuda_kernels.gemv(h, w).float(), atol=tol, rtol=tol)


def decode_batch(nh, nkv, d, block_size, context_lens, dtype, seed):
    """A decode step's inputs: one token per sequence (q_len 0 for a padded row), its fused QKV
    row, slots at each sequence's last position in scattered blocks, and caches full of noise."""
    from transformers import LlamaConfig

    from rillet.models.llama import rope_tables

    torch.manual_seed(seed)
    B = len(context_lens)
    blocks_per_seq = max(-(-c // block_size) for c in context_lens) + 1
    num_blocks = B * blocks_per_seq
    config = LlamaConfig(hidden_size=nh * d, num_attention_heads=nh, num_key_value_heads=nkv, head_dim=d,
                         rope_theta=10000.0, max_position_embeddings=1024)
    cos, sin = rope_tables(config, 1024)
    signed_sin = torch.cat((-sin[:, :d // 2], sin[:, d // 2:]), dim=-1)
    tables = torch.randperm(num_blocks)[:B * blocks_per_seq].view(B, blocks_per_seq).to(torch.int32)
    q_lens = torch.tensor([1 if c else 0 for c in context_lens], dtype=torch.int32)
    contexts = torch.tensor(context_lens, dtype=torch.int32)
    positions = (contexts - 1).clamp(min=0)
    slots = torch.tensor([int(tables[i, (c - 1) // block_size]) * block_size + (c - 1) % block_size if c else -1
                          for i, c in enumerate(context_lens)], dtype=torch.int32)
    return dict(
        qkv=torch.randn(B, (nh + 2 * nkv) * d).to(dtype), positions=positions, cos=cos, signed_sin=signed_sin,
        k_cache=torch.randn(nkv, num_blocks * block_size, d).to(dtype),
        v_cache=torch.randn(nkv, num_blocks * block_size, d).to(dtype), slots=slots, tables=tables,
        q_starts=torch.arange(B, dtype=torch.int32), q_lens=q_lens, contexts=contexts)


def run_decode(batch, nh, nkv, d, block_size, fused, splits, device=DEVICE):
    """(attention output, k cache, v cache) of rope_and_cache + paged_attention, or of the fused
    launch, on copies of the batch's tensors."""
    b = {name: t.clone().to(device) for name, t in batch.items()}
    if fused:
        out = cuda_kernels.rope_cache_decode_attention(
            b["qkv"], b["positions"], b["cos"], b["signed_sin"], b["k_cache"], b["v_cache"], b["slots"], nh, d,
            b["tables"], b["q_starts"], b["q_lens"], b["contexts"], block_size, d ** -0.5, kv_splits=splits)
    else:
        q = cuda_kernels.rope_and_cache(b["qkv"], b["positions"], b["cos"], b["signed_sin"], b["k_cache"],
                                        b["v_cache"], b["slots"], nh, nkv, d)
        out = cuda_kernels.paged_attention(q, b["k_cache"], b["v_cache"], b["tables"], b["q_starts"], b["q_lens"],
                                           b["contexts"], 1, block_size, d ** -0.5, kv_splits=splits)
    return out.cpu(), b["k_cache"].cpu(), b["v_cache"].cpu()


@pytest.mark.parametrize("splits", [1, 2, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_cache_decode_attention_equals_the_two_kernels(dtype, splits):
    """Rotary + cache write inside the decode attention launch (the new key from registers, in
    split 0) against rope_and_cache then paged_attention: contexts of 1 key, at and past block
    and tile boundaries, long enough for every split, and a padded row; GQA 4:1. The split
    merge happens in the kernel (the last run to arrive) and leaves its counters at zero."""
    nh, nkv, d, block_size = 8, 2, 32, 16
    contexts = [1, 16, 17, 64, 65, 129, 300, 0]
    batch = decode_batch(nh, nkv, d, block_size, contexts, dtype, seed=4)
    got, got_k, got_v = run_decode(batch, nh, nkv, d, block_size, True, splits)
    want, want_k, want_v = run_decode(batch, nh, nkv, d, block_size, False, splits)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    real = len(contexts) - 1
    torch.testing.assert_close(got[:real].float(), want[:real].float(), atol=tolerance, rtol=tolerance)
    # the same slots; the same rotation (compiled, the two kernels may fuse its multiply-adds in
    # another order: a float32 ulp apart)
    assert torch.equal(got_v, want_v)
    torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=1e-6 if dtype == torch.float32 else 2e-3)
    if splits > 1:
        assert not cuda_kernels._arrival_counts(1, torch.device(DEVICE)).any()
