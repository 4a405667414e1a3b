"""Triton kernels of the GPU path: paged attention that reads K/V in place, and the fusions
that cut a decode step's launches (residual add + RMSNorm, rotary + KV-cache write, SiLU * up).

Every kernel reads the shapes it is launched with from tensors on the device, never from the
host, so a decode step made of them can be captured once as a CUDA graph and replayed with new
inputs (engine/cuda_graphs.py). The KV cache is rillet's head-major [nkv, S, d] layout (one
slot = one token; slot = block * block_size + offset), the same as the CPU path's.

Where no GPU is present the same kernels run under Triton's interpreter (TRITON_INTERPRET=1),
which is how tests/unit/test_cuda_kernels.py checks them against torch on a CPU-only machine.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def pdl_enabled() -> bool:
    """Programmatic dependent launch (Hopper on; RILLET_CUDA_PDL=0 turns it off): each kernel is
    launched while the one before it still runs, waits for it (gdc_wait) only before it touches
    what that one writes, and lets the next launch at once (gdc_launch_dependents). A decode
    step's ~100 launches then overlap their ramps and tails, and a GEMV streams its first weight
    tile before the wait (weights are never written)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("RILLET_CUDA_PDL", "1") == "0":
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _pdl_launch() -> dict:
    """The launch options of a kernel with a USE_GDC constexpr."""
    return {"USE_GDC": True, "launch_pdl": True} if pdl_enabled() else {"USE_GDC": False}


@triton.jit
def _pdl_start(USE_GDC: tl.constexpr):
    """Wait for the kernel before (its writes are visible after) and let the next one launch."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# ---- paged attention ----------------------------------------------------------------------------

@triton.jit
def _tile_owner(q_starts_ptr, num_seqs, tile, TOKENS: tl.constexpr):
    """The sequence whose tiles include flat tile number `tile`, when sequence s's tiles start at
    q_starts[s] // TOKENS + s (monotonic: q_starts are packed in order): a binary search."""
    left = tile * 0  # int32 tensors from the start: the loop carries them
    right = left + num_seqs
    while left < right:
        mid = (left + right) // 2
        if tl.load(q_starts_ptr + mid) // TOKENS + mid <= tile:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, cache_head, stride_tables, start, end, dims, dim_ok,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    """The cached keys and values start..start + BLOCK_N - 1 of `seq` (zeros from `end` on)."""
    keys = start + tl.arange(0, BLOCK_N)
    key_ok = keys < end
    block = tl.load(block_tables_ptr + seq.to(tl.int64) * stride_tables + keys // PAGE, mask=key_ok, other=0)
    kv_offsets = cache_head + (block.to(tl.int64) * PAGE + keys % PAGE)[:, None] * HEAD_DIM + dims[None, :]
    kv_mask = key_ok[:, None] & dim_ok[None, :]
    return tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0), \
        tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)


@triton.jit
def _attend_tile(q, k, v, visible, m_i, l_i, acc, scale, IEEE_DOT: tl.constexpr):
    """One key tile of an online softmax (flash attention): the query rows q against keys k and
    values v where `visible` ([rows, keys]), (m_i, l_i, acc) carried on."""
    if IEEE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(visible, s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE_DOT:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit(do_not_specialize=["num_seqs"])  # one compiled kernel for any number of sequences
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, q_starts_ptr, q_lens_ptr, context_lens_ptr,
    scale, num_seqs, stride_q_token, stride_q_head, stride_cache_head, stride_tables, stride_out_token,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE_DOT: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Prompts (and any step with a query longer than one token). One program: up to
    BLOCK_M // GROUP consecutive query tokens of one sequence times the GROUP query heads that
    share KV head `kv_head` (GQA heads packed into the rows of one tile, so they share each K/V
    load). Causal by position: a query at position p sees keys 0..p; the sequence's new tokens
    are the last q_len of its context_len. Program (tile, kv_head) over every sequence's tiles
    laid end to end (as vLLM's unified attention does), so the grid is bounded by the tokens plus
    the sequences, not sequences x the longest prompt, and does not depend on how the tokens
    split into sequences (a CUDA graph fixes it)."""
    _pdl_start(USE_GDC)
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    flat = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _tile_owner(q_starts_ptr, num_seqs, flat, TOKENS)
    tile = flat - (tl.load(q_starts_ptr + seq) // TOKENS + seq)
    q_len = tl.load(q_lens_ptr + seq)
    if tile * TOKENS >= q_len:  # past this sequence's queries (or a padded graph row: q_len 0)
        return
    context = tl.load(context_lens_ptr + seq)
    q_start = tl.load(q_starts_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    token = tile * TOKENS + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOKENS * GROUP) & (token < q_len)
    position = context - q_len + token
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_offsets = (q_start + token).to(tl.int64)[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    # -1e30, not -inf, so rows that see nothing stay NaN-free.
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end = context - q_len + tl.minimum(q_len, (tile + 1) * TOKENS)  # keys this tile can see: 0..end-1
    cache_head = kv_head.to(tl.int64) * stride_cache_head
    for start in range(0, end, BLOCK_N):
        k, v = _kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, cache_head, stride_tables, start, end, dims,
                        dim_ok, HEAD_DIM, BLOCK_N, PAGE)
        keys = start + tl.arange(0, BLOCK_N)
        visible = (keys < end)[None, :] & (keys[None, :] <= position[:, None])
        m_i, l_i, acc = _attend_tile(q, k, v, visible, m_i, l_i, acc, scale, IEEE_DOT)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out_offsets = (q_start + token).to(tl.int64)[:, None] * stride_out_token + head[:, None] * HEAD_DIM + dims[None, :]
    tl.store(out_ptr + out_offsets, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, q_starts_ptr, q_lens_ptr, context_lens_ptr,
    partial_ml_ptr, partial_acc_ptr, arrivals_ptr, positions_ptr, cos_ptr, signed_sin_ptr, slots_ptr,
    scale, stride_q_token, stride_q_head, stride_cache_head, stride_tables, stride_out_token, stride_partial_token,
    stride_rope, k_offset, v_offset,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE_DOT: tl.constexpr, SPLITS: tl.constexpr,
    ROPE: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Decodes (every q_len 1, or 0 for a padded graph row). Program (seq, split, kv_head): the
    sequence's query heads that share KV head `kv_head` (GQA heads in the rows of one tile).

    With SPLITS > 1 the context is cut into up to SPLITS runs of whole key tiles (flash decoding,
    vLLM's paged attention v2) so that a small batch with a long context still fills the GPU (one
    program per sequence and KV head is 8 programs at batch 1). Only the runs the context needs
    are used (a context of one tile: one program, no merge); each writes its unnormalised output
    with its row max and sum to partial_*, counts itself in arrivals[seq, kv_head], and the last
    to arrive merges them into out and sets the count back to 0 (for the next launch, or the next
    replay of a CUDA graph): no separate merge launch.

    With ROPE the query row is the fused QKV output: the program rotates q and the new k itself
    (rope_and_cache's arithmetic), and split 0 attends to the new key and value from registers
    and writes them into the cache at the token's slot (none for a negative slot), while every
    run reads only the keys before it from the cache: rotary + cache write without a launch."""
    if not ROPE:  # the cache was just written by rope_and_cache: nothing before the wait
        _pdl_start(USE_GDC)
    seq = tl.program_id(0)
    split = tl.program_id(1)
    kv_head = tl.program_id(2)
    if tl.load(q_lens_ptr + seq) == 0:  # a padded graph row
        return
    context = tl.load(context_lens_ptr + seq)
    end = context - 1 if ROPE else context  # the keys read from the cache: 0..end-1
    lo = 0
    runs = 1
    if SPLITS > 1:  # this program's run: lo..end-1 in whole tiles
        run = tl.maximum(tl.cdiv(tl.cdiv(end, SPLITS), BLOCK_N), 1) * BLOCK_N
        runs = tl.maximum(tl.cdiv(end, run), 1)
        if split >= runs:
            return
        lo = split * run
        end = tl.minimum(end, lo + run)
    token = tl.load(q_starts_ptr + seq).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_mask = row_ok[:, None] & dim_ok[None, :]
    cache_head = kv_head.to(tl.int64) * stride_cache_head
    # With ROPE, the launch before (the QKV projection) writes only q, k and v: the cached keys,
    # from earlier steps, and the rotary tables are read before the wait.
    k, v = _kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, cache_head, stride_tables, lo, end, dims, dim_ok,
                    HEAD_DIM, BLOCK_N, PAGE)
    q_row = q_ptr + token * stride_q_token
    if ROPE:  # out = x * cos + roll(x, d/2) * signed_sin, in float32, rounded to the dtype
        table = tl.load(positions_ptr + token).to(tl.int64) * stride_rope
        cos = tl.load(cos_ptr + table + dims, mask=dim_ok, other=0.0)
        sin = tl.load(signed_sin_ptr + table + dims, mask=dim_ok, other=0.0)
        slot = tl.load(slots_ptr + token).to(tl.int64)
        _pdl_start(USE_GDC)
    q = tl.load(q_row + head[:, None] * stride_q_head + dims[None, :], mask=q_mask, other=0.0)
    # -1e30, not -inf, so rows that see nothing stay NaN-free.
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if ROPE:
        rolled = (dims + HEAD_DIM // 2) % HEAD_DIM
        q_roll = tl.load(q_row + head[:, None] * stride_q_head + rolled[None, :], mask=q_mask, other=0.0)
        q = (q.to(tl.float32) * cos[None, :] + q_roll.to(tl.float32) * sin[None, :]).to(q.dtype)
        if split == 0:  # the new key and value, from the QKV row: weight 1 at its own max
            k_row = q_row + k_offset + kv_head * HEAD_DIM
            k_new = tl.load(k_row + dims, mask=dim_ok, other=0.0)
            k_roll = tl.load(k_row + rolled, mask=dim_ok, other=0.0)
            k_new = (k_new.to(tl.float32) * cos + k_roll.to(tl.float32) * sin).to(k_new.dtype)
            v_new = tl.load(q_row + v_offset + kv_head * HEAD_DIM + dims, mask=dim_ok, other=0.0)
            m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
            l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
            acc = acc + v_new.to(tl.float32)[None, :]
            if slot >= 0:
                tl.store(k_cache_ptr + cache_head + slot * HEAD_DIM + dims, k_new, mask=dim_ok)
                tl.store(v_cache_ptr + cache_head + slot * HEAD_DIM + dims, v_new, mask=dim_ok)
    for start in range(lo, end, BLOCK_N):  # every key < end is at or before the query's position
        keys = start + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_tile(q, k, v, (keys < end)[None, :], m_i, l_i, acc, scale, IEEE_DOT)
        k, v = _kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, cache_head, stride_tables, start + BLOCK_N,
                        end, dims, dim_ok, HEAD_DIM, BLOCK_N, PAGE)  # the next tile's loads under this one's math
    out_offsets = token * stride_out_token + head[:, None] * HEAD_DIM + dims[None, :]
    if runs == 1:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(out_ptr + out_offsets, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
        return
    part = token * stride_partial_token + head * SPLITS
    tl.store(partial_ml_ptr + (part + split) * 2, m_i, mask=row_ok)
    tl.store(partial_ml_ptr + (part + split) * 2 + 1, l_i, mask=row_ok)
    tl.store(partial_acc_ptr + (part + split)[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)
    tl.debug_barrier()  # every thread's partial stored before the count: the release below covers them
    arrivals = arrivals_ptr + seq * tl.num_programs(2) + kv_head
    if tl.atomic_add(arrivals, 1, sem="acq_rel", scope="gpu") != runs - 1:
        return
    tl.store(arrivals, 0)  # the last run: merge every run's rows, rescaled to their overall max
    every = tl.arange(0, SPLITS)
    m_all = tl.load(partial_ml_ptr + (part[:, None] + every[None, :]) * 2,
                    mask=row_ok[:, None] & (every < runs)[None, :], other=-1e30, cache_modifier=".cg")
    m_max = tl.max(m_all, 1)
    total = tl.sum(tl.load(partial_ml_ptr + (part[:, None] + every[None, :]) * 2 + 1,
                           mask=row_ok[:, None] & (every < runs)[None, :], other=0.0, cache_modifier=".cg")
                   * tl.exp(m_all - m_max[:, None]), 1)
    merged = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for r in tl.static_range(SPLITS):  # no branch: the loads of every run issue together
        live = row_ok & (rows * 0 + r < runs)  # (a block, not a scalar, in masks)
        m_r = tl.load(partial_ml_ptr + (part + r) * 2, mask=live, other=-1e30, cache_modifier=".cg")
        acc_r = tl.load(partial_acc_ptr + (part + r)[:, None] * HEAD_DIM + dims[None, :],
                        mask=live[:, None] & dim_ok[None, :], other=0.0, cache_modifier=".cg")
        merged += acc_r * tl.exp(m_r - m_max)[:, None]
    total = tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + out_offsets, (merged / total[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)


MAX_KV_SPLITS = 16
_arrivals: dict[torch.device, list[torch.Tensor]] = {}


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_kv_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """How many runs a decode's context may be cut into: doubled (to MAX_KV_SPLITS) while the grid
    still fits in one wave of the GPU's multiprocessors, so at batch 1 (8 KV heads, 132 SMs) 16
    runs a head, and from ~16 sequences up none (the batch fills the GPU). Only the batch
    decides, not the context: a CUDA graph fixes the grid for every context it replays (the
    kernel leaves the runs a short context does not need idle)."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    splits = 1
    while splits < MAX_KV_SPLITS and num_seqs * num_kv_heads * splits * 2 <= sms:
        splits *= 2
    return splits


def _arrival_counts(n: int, device: torch.device) -> torch.Tensor:
    """n zeroed int32 counters that the split decode kernel leaves zeroed, made once per device
    (outside a graph's capture: a graph's warm-up run comes first). A larger set replaces the
    current one for new launches; the old stays alive, as a captured graph may still use it."""
    held = _arrivals.setdefault(device, [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, 1024), dtype=torch.int32, device=device))
    return held[-1]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    q_starts: torch.Tensor, q_lens: torch.Tensor, context_lens: torch.Tensor, max_q_len: int,
                    block_size: int, scale: float, out: torch.Tensor | None = None,
                    kv_splits: int | None = None) -> torch.Tensor:
    """Causal attention of a flat batch of queries over the paged cache, for decodes and prompt
    chunks alike (a prompt chunk after a cached prefix reads that prefix in place).

    q: [T, nh, d] (any token and head strides, last dim contiguous: a view into the fused QKV
    output works); k_cache, v_cache: [nkv, S, d]; sequence i's queries are rows
    q_starts[i]..q_starts[i] + q_lens[i] of q, and the last q_lens[i] of its context_lens[i]
    tokens, whose blocks of block_size slots are block_tables[i] (int32 [B, nb]). The sequences lie in q in
    order (q_starts[i + 1] = q_starts[i] + q_lens[i]); rows past the last one's are padding, and so are
    sequences of q_len 0 at the end. max_q_len: 1 for decodes only (every q_len 1 or 0), else anything
    above 1. kv_splits (decodes only, a power of two): runs per context, decode_kv_splits' choice by
    default. Returns [T, nh * d]."""
    T, nh, d = q.shape
    if out is None:
        out = torch.empty((T, nh * d), dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    if max_q_len == 1:
        _launch_decode(q, None, k_cache, v_cache, block_tables, q_starts, q_lens, context_lens, block_size, scale,
                       out, kv_splits, nh, q.stride(0), q.stride(1))
        return out
    nkv = k_cache.shape[0]
    group = nh // nkv
    block_m = max(64, triton.next_power_of_2(group))
    num_seqs = q_lens.shape[0]
    # sequence s needs cdiv(q_len, tokens_per_tile) tiles <= its share of T // tokens_per_tile + 1
    _paged_attention_kernel[(T // (block_m // group) + num_seqs, nkv)](
        q, k_cache, v_cache, out, block_tables, q_starts, q_lens, context_lens,
        scale, num_seqs, q.stride(0), q.stride(1), k_cache.stride(0), block_tables.stride(0), out.stride(0),
        GROUP=group, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_N=64 if d <= 128 else 32,
        PAGE=block_size, IEEE_DOT=q.dtype == torch.float32, **_pdl_launch(),
    )
    return out


def rope_cache_decode_attention(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                                signed_sin_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                slot_mapping: torch.Tensor, num_heads: int, head_dim: int,
                                block_tables: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor,
                                context_lens: torch.Tensor, block_size: int, scale: float,
                                kv_splits: int | None = None) -> torch.Tensor:
    """rope_and_cache then paged_attention of a decode step (every q_len 1 or 0: max_q_len 1) in
    one launch, from the fused QKV output [T, (nh + 2 nkv) * d]: the same rotation, cache write
    and attention. Returns [T, nh * d]; qkv is left as it was."""
    T = qkv.shape[0]
    nkv = k_cache.shape[0]
    out = torch.empty((T, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return out
    assert qkv.stride(1) == 1 and head_dim % 2 == 0 and qkv.shape[1] == (num_heads + 2 * nkv) * head_dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    _launch_decode(qkv, (positions, cos_table, signed_sin_table, slot_mapping), k_cache, v_cache, block_tables,
                   q_starts, q_lens, context_lens, block_size, scale, out, kv_splits, num_heads, qkv.stride(0),
                   head_dim)
    return out


def _decode_tile(head_dim: int, element_size: int, splits: int) -> tuple[int, int]:
    """(keys a tile, warps) of the decode kernel, so that a short context is one tile, read before
    the wait, and needs no merge. A batch that fills the GPU (one run a context): 16 KB of keys a
    tile (128 keys at head dim 64 in bf16), 4 warps. A small batch whose contexts are cut into
    runs: 32 KB (256 keys) and 8 warps, as its few programs wait on their loads: on an H200 at
    batch 1 (the 1B shape, contexts 74-224) 0.776 ms a step against 0.795 with 128 keys and 4
    warps (128 keys, 8 warps: 0.795; 256 keys, 4 warps: 0.785). Larger batches were not measured
    with the larger tile, so they keep the smaller one."""
    if splits > 1:
        return max(16, 32768 // (head_dim * element_size)), 8
    return max(16, 16384 // (head_dim * element_size)), 4


def _launch_decode(q: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, q_starts: torch.Tensor,
                   q_lens: torch.Tensor, context_lens: torch.Tensor, block_size: int, scale: float, out: torch.Tensor,
                   kv_splits: int | None, nh: int, stride_q_token: int, stride_q_head: int) -> None:
    T = q.shape[0]
    nkv, _, d = k_cache.shape
    group = nh // nkv
    num_seqs = q_lens.shape[0]
    splits = decode_kv_splits(num_seqs, nkv, q.device) if kv_splits is None else kv_splits
    assert splits & (splits - 1) == 0, "kv_splits is a power of two"
    partial_ml = partial_acc = arrivals = out
    if splits > 1:  # (allocated inside a graph's capture, they live in its private pool)
        partial_ml = torch.empty((T, nh, splits, 2), dtype=torch.float32, device=q.device)
        partial_acc = torch.empty((T, nh, splits, d), dtype=torch.float32, device=q.device)
        arrivals = _arrival_counts(num_seqs * nkv, q.device)
    positions, cos, signed_sin, slots = rope if rope is not None else (q_lens, out, out, q_lens)
    block_n, num_warps = _decode_tile(d, q.element_size(), splits)
    _decode_attention_kernel[(num_seqs, splits, nkv)](
        q, k_cache, v_cache, out, block_tables, q_starts, q_lens, context_lens, partial_ml, partial_acc, arrivals,
        positions, cos, signed_sin, slots,
        scale, stride_q_token, stride_q_head, k_cache.stride(0), block_tables.stride(0), out.stride(0), nh * splits,
        cos.stride(0), nh * d, (nh + nkv) * d,
        GROUP=group, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n, PAGE=block_size, IEEE_DOT=q.dtype == torch.float32, SPLITS=splits,
        ROPE=rope is not None, num_warps=num_warps, **_pdl_launch(),
    )


# ---- residual add + RMSNorm ---------------------------------------------------------------------

@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_residual, stride_out, hidden,
                         eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    _pdl_start(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        tl.store(residual_ptr + row * stride_residual + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    # transformers' order: normalise in float32, round to the dtype, then scale by the weight.
    tl.store(out_ptr + row * stride_out + cols, (x32 * rstd).to(x.dtype) * weight, mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x) * weight, residual + x) for x [T, H], as DecoderLayer.add_norm. The
    sum is written into `residual` in place; with residual None the residual is x itself."""
    T, hidden = x.shape
    out = torch.empty_like(x)
    if T:
        _add_rms_norm_kernel[(T,)](
            x, x if residual is None else residual, weight, out, x.stride(0),
            x.stride(0) if residual is None else residual.stride(0), out.stride(0), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden), **_pdl_launch())
    return out, x if residual is None else residual


# ---- rotary embedding + KV-cache write ----------------------------------------------------------

@triton.jit
def _rope_and_cache_kernel(qkv_ptr, positions_ptr, cos_ptr, signed_sin_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                           stride_qkv, stride_table, stride_cache_head,
                           NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           HALF_BLOCK: tl.constexpr, HEADS_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
                           DIM_BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    """One token: rotate its q and k heads (rotate-half form: out = x * cos + roll(x, d/2) *
    signed_sin, as Attention.forward), q in place in the QKV buffer, k straight into the cache at
    the token's slot, and v copied there too. A negative slot (a padded graph row) writes nothing."""
    _pdl_start(USE_GDC)
    token = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    position = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    half = tl.arange(0, HALF_BLOCK)
    half_ok = half < HALF
    table = position * stride_table
    cos1 = tl.load(cos_ptr + table + half, mask=half_ok, other=0.0)[None, :]
    cos2 = tl.load(cos_ptr + table + HALF + half, mask=half_ok, other=0.0)[None, :]
    sin1 = tl.load(signed_sin_ptr + table + half, mask=half_ok, other=0.0)[None, :]
    sin2 = tl.load(signed_sin_ptr + table + HALF + half, mask=half_ok, other=0.0)[None, :]
    heads = tl.arange(0, HEADS_BLOCK)
    ok = (heads < NUM_HEADS + NUM_KV_HEADS)[:, None] & half_ok[None, :]
    first = qkv_ptr + token * stride_qkv + heads[:, None] * HEAD_DIM + half[None, :]
    x1 = tl.load(first, mask=ok, other=0.0)
    x2 = tl.load(first + HALF, mask=ok, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    out1 = (x1f * cos1 + x2f * sin1).to(x1.dtype)
    out2 = (x2f * cos2 + x1f * sin2).to(x1.dtype)
    is_q = (heads < NUM_HEADS)[:, None]
    tl.store(first, out1, mask=ok & is_q)
    tl.store(first + HALF, out2, mask=ok & is_q)
    kv_head = (heads - NUM_HEADS).to(tl.int64)[:, None]
    k_dst = k_cache_ptr + kv_head * stride_cache_head + slot * HEAD_DIM + half[None, :]
    write_k = ok & ((heads >= NUM_HEADS) & (heads * 0 + slot >= 0))[:, None]  # blocks, not a scalar, in masks
    tl.store(k_dst, out1, mask=write_k)
    tl.store(k_dst + HALF, out2, mask=write_k)
    v_heads = tl.arange(0, KV_BLOCK)
    dims = tl.arange(0, DIM_BLOCK)
    v_ok = (v_heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    v_src = qkv_ptr + token * stride_qkv + (NUM_HEADS + NUM_KV_HEADS + v_heads[:, None]) * HEAD_DIM + dims[None, :]
    v = tl.load(v_src, mask=v_ok, other=0.0)
    v_dst = v_cache_ptr + v_heads.to(tl.int64)[:, None] * stride_cache_head + slot * HEAD_DIM + dims[None, :]
    tl.store(v_dst, v, mask=v_ok & (v_heads * 0 + slot >= 0)[:, None])


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                   signed_sin_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Rotary embedding of the fused QKV output [T, (nh + 2 nkv) * d] and the K/V cache write, in
    one launch. Returns q [T, nh, d], rotated (a view into qkv)."""
    T = qkv.shape[0]
    assert qkv.stride(1) == 1 and head_dim % 2 == 0
    if T:
        _rope_and_cache_kernel[(T,)](
            qkv, positions, cos_table, signed_sin_table, k_cache, v_cache, slot_mapping,
            qkv.stride(0), cos_table.stride(0), k_cache.stride(0),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            HALF_BLOCK=triton.next_power_of_2(head_dim // 2),
            HEADS_BLOCK=triton.next_power_of_2(num_heads + num_kv_heads),
            KV_BLOCK=triton.next_power_of_2(num_kv_heads), DIM_BLOCK=triton.next_power_of_2(head_dim),
            **_pdl_launch())
    return qkv[:, :num_heads * head_dim].view(T, num_heads, head_dim)


# ---- SiLU(gate) * up ----------------------------------------------------------------------------

@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, width, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    _pdl_start(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # as F.silu(gate) * up: the SiLU rounded to the dtype, then the product
    tl.store(out_ptr + row * stride_out + cols, (g / (1.0 + tl.exp(-g))).to(gate.dtype) * up, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for gate_up = [gate | up], [T, 2 I] -> [T, I]."""
    T, two_width = gate_up.shape
    width = two_width // 2
    out = torch.empty((T, width), dtype=gate_up.dtype, device=gate_up.device)
    if T:
        block = 1024
        _silu_mul_kernel[(T, triton.cdiv(width, block))](gate_up, out, gate_up.stride(0), out.stride(0), width,
                                                         BLOCK=block, **_pdl_launch())
    return out


# ---- one row times a weight (batch-1 decode) ----------------------------------------------------

@triton.jit
def _gemv_x(x_ptr, residual_ptr, norm_ptr, k, K, rstd, FULL: tl.constexpr, SILU_MUL: tl.constexpr,
            ADD_NORM: tl.constexpr):
    """The row's slice k of a GEMV, as float32: x, or silu_mul's or add + RMSNorm's arithmetic."""
    if FULL:
        x = tl.load(x_ptr + k)
        if SILU_MUL:  # x = [gate | up]: silu_mul's arithmetic, element by element
            up = tl.load(x_ptr + K + k)
        if ADD_NORM:
            x = x + tl.load(residual_ptr + k)
            scale = tl.load(norm_ptr + k)
    else:
        x = tl.load(x_ptr + k, mask=k < K, other=0.0)
        if SILU_MUL:
            up = tl.load(x_ptr + K + k, mask=k < K, other=0.0)
        if ADD_NORM:
            x = x + tl.load(residual_ptr + k, mask=k < K, other=0.0)
            scale = tl.load(norm_ptr + k, mask=k < K, other=0.0)
    if SILU_MUL:
        g = x.to(tl.float32)
        x = (g / (1.0 + tl.exp(-g))).to(up.dtype) * up
    if ADD_NORM:  # add_rms_norm's arithmetic: normalise in float32, round, scale by the weight
        x = (x.to(tl.float32) * rstd).to(scale.dtype) * scale
    return x.to(tl.float32)


@triton.jit
def _gemv_w(w_ptr, rows, k, stride_w, K, FULL: tl.constexpr):
    if FULL:
        return tl.load(w_ptr + rows[:, None] * stride_w + k[None, :])
    return tl.load(w_ptr + rows[:, None] * stride_w + k[None, :], mask=(k < K)[None, :], other=0.0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, stride_w, residual_ptr, norm_ptr, sum_ptr, eps,
                 K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, ADD_NORM: tl.constexpr,
                 NORM_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr):
    FULL: tl.constexpr = K % BLOCK_K == 0
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    rows = tl.where(live, rows, 0).to(tl.int64)  # padding rows read row 0: no mask on the weight loads
    cols = tl.arange(0, BLOCK_K)
    w = _gemv_w(w_ptr, rows, cols, stride_w, K, FULL)  # weights are never written: before the wait
    _pdl_start(USE_GDC)
    rstd = 0.0
    if ADD_NORM:  # the row is rms_norm(x + residual) * norm: every program takes the (few-KB) row's norm
        every = tl.arange(0, NORM_BLOCK)
        summed = tl.load(x_ptr + every, mask=every < K, other=0.0) + \
            tl.load(residual_ptr + every, mask=every < K, other=0.0)
        if tl.program_id(0) == 0:  # the new residual, for the next add + norm
            tl.store(sum_ptr + every, summed, mask=every < K)
        s32 = summed.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(s32 * s32, 0) / K + eps)
    # summed across K once, at the end; tile by tile in order, the first one peeled
    acc = w.to(tl.float32) * _gemv_x(x_ptr, residual_ptr, norm_ptr, cols, K, rstd, FULL, SILU_MUL, ADD_NORM)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + cols
        w = _gemv_w(w_ptr, rows, k, stride_w, K, FULL)
        acc += w.to(tl.float32) * _gemv_x(x_ptr, residual_ptr, norm_ptr, k, K, rstd, FULL, SILU_MUL, ADD_NORM)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=live)


def gemv_takes(weight: torch.Tensor) -> bool:
    """Whether `gemv` is used for this weight: half precision, contiguous along K (float32 stays
    on cuBLAS, whose sums the float32 parity with the torch path is measured on)."""
    return weight.dtype in (torch.bfloat16, torch.float16) and weight.stride(1) == 1


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         out: torch.Tensor | None = None, silu_mul_input: bool = False, after_small_launch: bool = False
         ) -> torch.Tensor:
    """F.linear(x, weight, bias) for one row x [1, K] and weight [N, K] (contiguous along K),
    float32 accumulation, into `out` [1, N] if given (its dtype: float32 logits straight from the
    head), else a new tensor of x's dtype. With `silu_mul_input`, x is [1, 2K] = [gate | up] and
    the row used is silu_mul(x), computed on the fly (the down projection without its own launch).
    `after_small_launch`: the launch before leaves most of the GPU and HBM idle (the O projection
    after a lone row's attention), so rows of up to 2048 are loaded whole before the PDL wait.

    At one row a matmul only streams the weight. cuBLAS reached 0.9-3.8 TB/s on the 1B model's
    shapes on an H200 (cold L2); this kernel, launched back to back under PDL, 3.0 (O) to 4.5
    (head) TB/s: a few rows per program, a whole 1024- or 2048-wide K slice per load, one
    cross-lane sum at the end. Its block sizes come from sweeps there (`_gemv_config`: one config
    per shape, no autotuning at run time)."""
    K = weight.shape[1]
    assert x.shape == (1, 2 * K if silu_mul_input else K) and x.is_contiguous() and weight.stride(1) == 1
    return _launch_gemv(x, weight, bias, out, silu_mul_input=silu_mul_input, whole_rows=after_small_launch)


def add_rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gemv(h, weight, bias), residual + x) where h, residual + x = add_rms_norm(x, residual, ...):
    one launch instead of two for a lone row [1, K]. Each program sums the row's squares itself
    (the row is a few KB, read from L2); the first writes the new residual, into a new tensor
    since the others still read the old one."""
    K = weight.shape[1]
    assert x.shape == residual.shape == (1, K) and x.is_contiguous() and residual.is_contiguous()
    summed = torch.empty_like(x)
    out = _launch_gemv(x, weight, bias, None, norm=(residual, norm_weight, eps, summed))
    return out, summed


def _launch_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None, *,
                 silu_mul_input: bool = False, whole_rows: bool = False,
                 norm: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor] | None = None) -> torch.Tensor:
    N, K = weight.shape
    if out is None:
        out = torch.empty((1, N), dtype=x.dtype, device=x.device)
    residual, norm_weight, eps, summed = norm if norm is not None else (x, x, 0.0, x)
    block_n, block_k, num_warps, num_stages = _gemv_config(N, K, whole_rows)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, weight if bias is None else bias, out, N, weight.stride(0), residual, norm_weight, summed, eps,
        K=K, HAS_BIAS=bias is not None, SILU_MUL=silu_mul_input, ADD_NORM=norm is not None,
        NORM_BLOCK=triton.next_power_of_2(K), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages, **_pdl_launch())
    return out


def _gemv_config(N: int, K: int, whole_rows: bool = False) -> tuple[int, int, int, int]:
    """(rows a program, K a tile, warps, stages) of the GEMV for weight [N, K], from sweeps on an
    H200 (the 1B model's shapes, each alone and in a batch-1 step; `benchmarks/sweep_gpu_step.py`).
    Rows of up to 2048 (QKV, O, gate/up, head): 4 rows a program in 1024-wide tiles, the first
    tile loaded before the PDL wait. Whole 2048-wide rows loaded before the wait were slower, alone
    (QKV 4.3 vs 3.6 us, O 3.5 vs 2.8, gate/up 17.6 vs 16.0) and in the step (0.779 vs 0.768 ms),
    except with `whole_rows`, behind a launch that leaves HBM idle: the O projection, behind the
    attention, loads its 8 MB whole during it (a step 0.771 -> 0.753 ms; QKV so too: 0.760).
    The wide down projection: 8 rows a program in 2048-wide tiles, 8 warps (alone 9.5 us against
    10-11 for 4 rows or 1024-wide tiles; the step with the 1024-wide tiles 0.760 ms)."""
    if K >= 4096:
        return 8, 2048, 8, 2
    return 4, triton.next_power_of_2(K) if whole_rows else min(1024, triton.next_power_of_2(K)), 4, 2


# ---- greedy: argmax of each row -----------------------------------------------------------------

@triton.jit
def _argmax_part_kernel(x_ptr, values_ptr, indices_ptr, stride_x, V, PARTS: tl.constexpr, BLOCK: tl.constexpr,
                        USE_GDC: tl.constexpr):
    _pdl_start(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    cols = part * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
    best, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(values_ptr + row * PARTS + part, best)
    tl.store(indices_ptr + row * PARTS + part, part * BLOCK + at)


@triton.jit
def _argmax_final_kernel(values_ptr, indices_ptr, out_ptr, PARTS: tl.constexpr, USE_GDC: tl.constexpr):
    _pdl_start(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    parts = tl.arange(0, PARTS)
    _, at = tl.max(tl.load(values_ptr + row * PARTS + parts), 0, return_indices=True,
                   return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(indices_ptr + row * PARTS + at).to(tl.int64))


def argmax_rows(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits.argmax(dim=-1) for [B, V] (a row's first maximum, as torch), in two launches that
    spread each row over the GPU: torch's reduction took 28 us for one 49k-wide row on an H200,
    a few percent of a batch-1 decode step. Into `out` (int64 [B]) if given."""
    B, V = logits.shape
    block = 4096
    parts = triton.next_power_of_2(triton.cdiv(V, block))
    values = torch.empty((B, parts), dtype=torch.float32, device=logits.device)
    indices = torch.empty((B, parts), dtype=torch.int32, device=logits.device)
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=logits.device)
    assert out.shape == (B,) and out.dtype == torch.int64 and out.is_contiguous()
    if B:
        _argmax_part_kernel[(B, parts)](logits, values, indices, logits.stride(0), V, PARTS=parts, BLOCK=block,
                                        **_pdl_launch())
        _argmax_final_kernel[(B,)](values, indices, out, PARTS=parts, **_pdl_launch())
    return out
