/* What rillet's CPU kernel sources share: bf16 <-> float32 conversions, the weight formats, and
   the per-thread parts that decode_forward.c runs inside its own parallel region.

   The same sources are built once per instruction set (cpu_kernels.py: avx512, avx2, neon,
   generic); each kernel picks its code path from the compiler's target macros (__AVX512BF16__,
   __AVX512VNNI__, __AVX2__ + __FMA__, __ARM_NEON, __ARM_FEATURE_DOTPROD) and always has a plain C
   path, so every build exports every function below. Without OpenMP the pragmas are ignored
   and every `*_part` runs the whole range on the calling thread. */

#ifndef RILLET_KERNELS_H
#define RILLET_KERNELS_H

#include <stddef.h>
#include <stdint.h>

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);  /* NaN */
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

/* ---- Weight formats of the linear kernels ------------------------------------------------

   RILLET_WEIGHT_BF16: bf16 weights, float32 accumulation.
   RILLET_WEIGHT_Q8:   int8 values q in [-127, 127], one float scale s per RILLET_QBLOCK inputs
                       of an output: w = s * q (llama.cpp's Q8_0; per-channel int8 is the case
                       of equal scales along a row).
   RILLET_WEIGHT_Q4:   4-bit values q in [0, 15], a scale s and a min m per RILLET_QBLOCK inputs
                       of an output: w = s * q + m (Q4_1; Q4_0 is m = -8 s; Q4_K's sub-blocks).

   Packing stores each scale and min as float16 (rounded to nearest even): exact for GGUF's
   Q4_0/Q4_1/Q8_0, which carry float16 already, and a relative 2^-11 for others, far below the
   4- and 8-bit steps themselves. A reference must round them the same way.

   Q8 and Q4 multiply against activations quantized on the fly per row and per RILLET_QBLOCK
   inputs to int8 (xq = round(x / dx), dx = max|x| / 127, with sum(xq) kept for Q4's min term),
   as llama.cpp does, so the inner loops are integer dot products (VNNI, AVX2 maddubs, NEON
   sdot):  y[o] = sum over blocks b of dx_b * (s_ob * dot(q_ob, xq_b) + m_ob * sum(xq_b)).
   Every output sums its blocks in one fixed order, so a row's result never depends on the
   other rows of the call or on the thread split (batch invariance). */

enum { RILLET_WEIGHT_BF16 = 0, RILLET_WEIGHT_Q8 = 1, RILLET_WEIGHT_Q4 = 2 };
#define RILLET_QBLOCK 32

typedef struct {
    int32_t format;        /* RILLET_WEIGHT_* */
    int32_t reserved;
    int64_t n, k;          /* output and input features (Q8/Q4: k a multiple of RILLET_QBLOCK) */
    const void *packed;    /* from rillet_weight_pack; the layout is private to each build */
    const uint16_t *bias;  /* bf16 [n], or NULL */
} rillet_weight;

/* linear.c: bytes of the packed form of an [n, k] weight of this format. */
int64_t rillet_weight_packed_bytes(int32_t format, int64_t n, int64_t k);

/* linear.c: pack a weight once, at load. BF16: `values` is the [n, k] bf16 nn.Linear weight,
   scales and mins NULL. Q8: `values` int8 [n, k], scales float [n, k / RILLET_QBLOCK], mins
   NULL. Q4: `values` uint8 [n, k] in 0..15, scales and mins float [n, k / RILLET_QBLOCK].
   Returns 0, or -1 for an unknown format or a k the format cannot take. */
int rillet_weight_pack(int32_t format, const void *values, const float *scales, const float *mins,
                       int64_t n, int64_t k, void *packed);

/* linear.c: scratch bytes rillet_linear_part needs for m rows (0 for BF16). */
int64_t rillet_linear_scratch_bytes(const rillet_weight *w, int64_t m);

/* linear.c: y[m, n] (bf16, contiguous) = x[m, k] (bf16, row stride x_stride) @ W^T (+ bias),
   the calling thread's share inside a parallel region: orphaned `omp for`s, ending in a
   barrier. scratch: rillet_linear_scratch_bytes(w, m) bytes shared by the team. */
void rillet_linear_part(const rillet_weight *w, const uint16_t *x, int64_t x_stride, uint16_t *y, int64_t m,
                        void *scratch);

/* linear.c: rillet_linear_part in two steps, so that a caller can prepare each row as it makes
   it (no barrier of its own) and save a pass over the team. rillet_linear_prepare readies
   inputs [first, first + count) of row r of x (whole RILLET_QBLOCKs; x points at that row) in
   the scratch (Q8/Q4: quantized; BF16: nothing to do); once every row is ready and the team has
   met at a barrier, rillet_linear_run_part is the rest of rillet_linear_part (ending in a
   barrier). */
void rillet_linear_prepare(const rillet_weight *w, const uint16_t *x, int64_t r, int64_t m, int64_t first,
                           int64_t count, void *scratch);
void rillet_linear_run_part(const rillet_weight *w, const uint16_t *x, int64_t x_stride, uint16_t *y, int64_t m,
                            void *scratch);

/* linear.c: the same as a whole call, with its own parallel region. */
void rillet_linear(const rillet_weight *w, const uint16_t *x, int64_t x_stride, uint16_t *y, int64_t m,
                   int32_t num_threads);

/* linear_bf16.c: the BF16 format. */
int64_t rillet_bf16_packed_bytes(int64_t n, int64_t k);
void rillet_bf16_pack(const uint16_t *w, void *packed, int64_t n, int64_t k);
void rillet_linear_bf16_part(const uint16_t *x, int64_t x_stride, const void *packed, const uint16_t *bias,
                             uint16_t *y, int64_t m, int64_t n, int64_t k);

/* linear_quant.c: the Q8 and Q4 formats. */
int64_t rillet_quant_packed_bytes(int32_t format, int64_t n, int64_t k);
void rillet_quant_pack(int32_t format, const void *values, const float *scales, const float *mins,
                       int64_t n, int64_t k, void *packed);
/* Activation rows to int8 per RILLET_QBLOCK (an `omp for` over rows). xq [m, k],
   xscale and xsum [m, k / RILLET_QBLOCK]. */
void rillet_quantize_rows_part(const uint16_t *x, int64_t x_stride, int64_t m, int64_t k, int8_t *xq,
                               float *xscale, int32_t *xsum);
/* `blocks` consecutive RILLET_QBLOCKs of one row, the same arithmetic (no `omp for`). */
void rillet_quantize_blocks(const uint16_t *x, int64_t blocks, int8_t *xq, float *xscale, int32_t *xsum);
/* y [m, n] bf16 from quantized rows (an `omp for` over output tiles). */
void rillet_linear_quant_part(int32_t format, const void *packed, const uint16_t *bias, const int8_t *xq,
                              const float *xscale, const int32_t *xsum, uint16_t *y, int64_t m, int64_t n,
                              int64_t k);

/* ---- Attention and norms (paged_attention.c) --------------------------------------------- */

/* An orphaned `omp for` over (sequence, KV head) (ends in a barrier). */
void rillet_paged_attention_part(
    const uint16_t *q, int64_t q_row_stride, const uint16_t *k_cache, const uint16_t *v_cache,
    int64_t num_slots, const int32_t *block_tables, int32_t max_blocks, const int32_t *context_lens,
    int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
    float scale, uint16_t *out);

/* One (sequence, KV head) of rillet_paged_attention_part: the group of query heads that share
   the KV head (q_group: group * head_dim bf16), over the sequence's ctx slots (table: its block
   table; k_head, v_head: that KV head's [num_slots, head_dim] cache), into out_group. *scores
   (capacity floats, grown with malloc as needed) is the caller's scratch, freed by the caller. */
void rillet_paged_attention_task(const uint16_t *q_group, const uint16_t *k_head, const uint16_t *v_head,
                                 const int32_t *table, int32_t ctx, int32_t group, int32_t head_dim,
                                 int32_t block_size, float scale, uint16_t *out_group, float **scores,
                                 size_t *capacity);

/* One row of residual += x, then RMSNorm (x NULL: no add). */
void rillet_add_rms_norm_row(uint16_t *res, const uint16_t *xr, const uint16_t *weight, uint16_t *o,
                             int32_t dim, float eps);

/* ---- Sampling (sampling.c) --------------------------------------------------------------- */

/* out[r] = the index of row r's first maximum (x [rows, cols] float32, row stride `stride`), as
   torch's argmax: a NaN counts as the maximum, the first NaN wins. */
void rillet_argmax_rows(const float *x, int64_t rows, int64_t cols, int64_t stride, int64_t *out,
                        int32_t num_threads);

#endif
