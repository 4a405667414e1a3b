"""The fused decode attention (rotary + KV-cache write + split-KV attention + the splits' merge
in one launch, models/cuda_kernels.py) compiled on the GPU, against the separate kernels it
replaces (rope_and_cache, then paged_attention), at the Llama-3.2-1B attention shape (32 query
heads, 8 KV heads, head dim 64) in bfloat16 and float32:

- eagerly, for batches of 1, 3 and 40 sequences (16 runs a context, 16, and none: the default
  split choice) with contexts of 1 key, at and past block and key-tile boundaries, up to 8k, and
  a padded row (q_len 0, slot -1) that writes nothing;
- as a CUDA graph captured once and replayed for contexts that grow step by step across tile
  boundaries: the in-kernel merge's arrival counters are back at zero after every replay.
"""

from __future__ import annotations

import pytest
import torch

from rillet.models import cuda_kernels

NH, NKV, D, BLOCK_SIZE = 32, 8, 64, 16


def make_step(contexts, dtype, seed=0):
    """A decode step's device tensors: a fused QKV row per sequence, slots at each sequence's
    last position in scattered blocks, caches full of noise."""
    from transformers import LlamaConfig

    from rillet.models.llama import rope_tables

    torch.manual_seed(seed)
    B = len(contexts)
    per_seq = max(-(-c // BLOCK_SIZE) for c in contexts) + 1
    config = LlamaConfig(hidden_size=NH * D, num_attention_heads=NH, num_key_value_heads=NKV, head_dim=D,
                         rope_theta=500000.0, max_position_embeddings=9000)
    cos, sin = rope_tables(config, 9000)
    tables = torch.randperm(B * per_seq).view(B, per_seq).to(torch.int32)
    slots = [int(tables[i, (c - 1) // BLOCK_SIZE]) * BLOCK_SIZE + (c - 1) % BLOCK_SIZE if c else -1
             for i, c in enumerate(contexts)]
    step = dict(
        qkv=torch.randn(B, (NH + 2 * NKV) * D), cos=cos, signed_sin=torch.cat((-sin[:, :D // 2], sin[:, D // 2:]), -1),
        k_cache=torch.randn(NKV, B * per_seq * BLOCK_SIZE, D), v_cache=torch.randn(NKV, B * per_seq * BLOCK_SIZE, D),
        positions=torch.tensor([max(c - 1, 0) for c in contexts], dtype=torch.int32),
        slots=torch.tensor(slots, dtype=torch.int32), tables=tables, q_starts=torch.arange(B, dtype=torch.int32),
        q_lens=torch.tensor([1 if c else 0 for c in contexts], dtype=torch.int32),
        contexts=torch.tensor(contexts, dtype=torch.int32))
    return {k: v.to("cuda", dtype if v.dtype == torch.float32 and k not in ("cos", "signed_sin") else v.dtype)
            for k, v in step.items()}


def fused(s, out=None):
    o = cuda_kernels.rope_cache_decode_attention(
        s["qkv"], s["positions"], s["cos"], s["signed_sin"], s["k_cache"], s["v_cache"], s["slots"], NH, D,
        s["tables"], s["q_starts"], s["q_lens"], s["contexts"], BLOCK_SIZE, D ** -0.5)
    if out is not None:
        out.copy_(o)
    return o


def separate(s):
    q = cuda_kernels.rope_and_cache(s["qkv"], s["positions"], s["cos"], s["signed_sin"], s["k_cache"],
                                    s["v_cache"], s["slots"], NH, NKV, D)
    return cuda_kernels.paged_attention(q, s["k_cache"], s["v_cache"], s["tables"], s["q_starts"], s["q_lens"],
                                        s["contexts"], 1, BLOCK_SIZE, D ** -0.5)


def assert_same_cache(a, b):
    """The same slots written: v copied as it came, k rotated by the same formula (the compiler
    may fuse its multiply-adds in another order in the two kernels: a float32 ulp apart)."""
    assert torch.equal(a["v_cache"], b["v_cache"])
    tolerance = 1e-6 if a["k_cache"].dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a["k_cache"], b["k_cache"], atol=tolerance, rtol=tolerance)


def copies(s):
    return {k: v.clone() for k, v in s.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 3, 40])
def test_fused_decode_attention_equals_rope_and_cache_then_attention(dtype, batch):
    base = [1, 16, 17, 64, 65, 127, 128, 129, 1000, 8192]
    contexts = [base[i % len(base)] for i in range(batch - 1)] + [0] if batch > 1 else [300]
    for seed, ctx in enumerate([contexts, [c + 1 if c else 0 for c in contexts]]):
        a = make_step(ctx, dtype, seed)
        b = copies(a)
        got, want = fused(a), separate(b)
        real = [i for i, c in enumerate(ctx) if c]
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got[real].float(), want[real].float(), atol=tolerance, rtol=tolerance)
        assert_same_cache(a, b)
    assert not cuda_kernels._arrival_counts(1, torch.device("cuda", torch.cuda.current_device())).any()


def test_fused_decode_attention_replays_as_a_cuda_graph():
    s = make_step([1100, 1100], torch.bfloat16)  # block tables and caches for up to 1100 keys
    out = torch.zeros((2, NH * D), dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused(copies(s))  # compile and make the arrival counters outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fused(s, out)
    torch.cuda.current_stream().wait_stream(stream)
    tables = s["tables"].cpu()
    for context in (1, 63, 64, 65, 130, 511, 1024, 1025):
        ctx = [context, context + 37]
        s["contexts"].copy_(torch.tensor(ctx))
        s["positions"].copy_(torch.tensor(ctx) - 1)
        s["slots"].copy_(torch.tensor([int(tables[i, (c - 1) // BLOCK_SIZE]) * BLOCK_SIZE + (c - 1) % BLOCK_SIZE
                                       for i, c in enumerate(ctx)]))
        s["qkv"].normal_()
        want_step = copies(s)
        graph.replay()
        torch.cuda.synchronize()
        want = separate(want_step)
        torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)
        assert_same_cache(s, want_step)
        assert not cuda_kernels._arrival_counts(1, torch.device("cuda", torch.cuda.current_device())).any()
