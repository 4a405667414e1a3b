/* Decode attention straight from the paged bf16 KV cache, for the CPU.

   One query token per sequence attends over its own context, reading K and V where the cache
   keeps them (no gathered copy), in float32. Work is split over (sequence, KV head) pairs on
   torch's own OpenMP pool (this library links the libgomp torch has already loaded).

   Every sum runs in an order fixed by the sequence's own context length: 16 float lanes, then
   the lanes added in one fixed order. A sequence's result therefore does not depend on its
   batch mates, however many threads share the work.

   Built and loaded by rillet/models/cpu_kernels.py. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rillet_kernels.h"

#define LANES 16
#define MAX_HEAD_DIM 256
#define MAX_GROUP 16

/* acc[g * d + i] += p[g * stride + j] * v[j][i] for the n contiguous rows v of one block. */
static inline void value_run(float *acc, const uint16_t *vp, const float *p, size_t stride, int n, int group, int d);

/* exp(x) for x <= 0 (softmax after subtracting the max): 2^(x log2 e), a degree-6 polynomial for
   the fraction (relative error ~2e-7). Unlike libm's expf it vectorizes, and it is the same on
   every row. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;
    const float whole = floorf(t);
    const float f = t - whole;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)whole + 127) << 23;
    return p * scale.f;
}

/* Sum of n floats (n >= 1): LANES partial sums, then a fixed tree. */
static inline float sum_lanes(const float *x, int n) {
    float lanes[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) lanes[l] += x[i + l];
    for (int l = 0; i < n; i++, l++) lanes[l] += x[i];
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) lanes[l] += lanes[l + width];
    return lanes[0];
}

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 load_bf16x16(const uint16_t *p) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* scores[g * stride] = scale * q_g . k for the group's queries against one key row. */
static inline void key_scores(const float *qf, const uint16_t *kp, int group, int d, float scale,
                              float *scores, size_t stride) {
    __m512 k[MAX_HEAD_DIM / LANES];
    for (int c = 0; c < d / LANES; c++) k[c] = load_bf16x16(kp + c * LANES);
    for (int g = 0; g < group; g++) {
        const float *qg = qf + g * d;
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);
        for (int c = 1; c < d / LANES; c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * LANES), k[c], acc);
        scores[g * stride] = _mm512_reduce_add_ps(acc) * scale;
    }
}
/* acc[g * d + i] += p[g * stride + j] * v[j][i] for the n contiguous rows v of one block, with the
   accumulators held in registers (GROUP and D are constants at every call site). */
static inline __attribute__((always_inline)) void value_run_fixed(
    float *acc, const uint16_t *vp, const float *p, size_t stride, int n, const int GROUP, const int D) {
    __m512 a[GROUP * (D / LANES)];
    for (int r = 0; r < GROUP * (D / LANES); r++) a[r] = _mm512_loadu_ps(acc + r * LANES);
    for (int j = 0; j < n; j++) {
        __m512 v[D / LANES];
        for (int c = 0; c < D / LANES; c++) v[c] = load_bf16x16(vp + (size_t)j * D + c * LANES);
        for (int g = 0; g < GROUP; g++) {
            const __m512 pg = _mm512_set1_ps(p[g * stride + j]);
            for (int c = 0; c < D / LANES; c++) a[g * (D / LANES) + c] = _mm512_fmadd_ps(pg, v[c], a[g * (D / LANES) + c]);
        }
    }
    for (int r = 0; r < GROUP * (D / LANES); r++) _mm512_storeu_ps(acc + r * LANES, a[r]);
}

static inline int value_run_registers(float *acc, const uint16_t *vp, const float *p, size_t stride, int n,
                                      int group, int d) {
    if (d == 64) {
        switch (group) {
            case 1: value_run_fixed(acc, vp, p, stride, n, 1, 64); return 1;
            case 2: value_run_fixed(acc, vp, p, stride, n, 2, 64); return 1;
            case 3: value_run_fixed(acc, vp, p, stride, n, 3, 64); return 1;
            case 4: value_run_fixed(acc, vp, p, stride, n, 4, 64); return 1;
        }
    } else if (d == 128) {
        switch (group) {
            case 1: value_run_fixed(acc, vp, p, stride, n, 1, 128); return 1;
            case 2: value_run_fixed(acc, vp, p, stride, n, 2, 128); return 1;
        }
    }
    return 0;
}
#else
static inline int value_run_registers(float *acc, const uint16_t *vp, const float *p, size_t stride, int n,
                                      int group, int d) {
    return 0;
}

static inline void key_scores(const float *qf, const uint16_t *kp, int group, int d, float scale,
                              float *scores, size_t stride) {
    float row[MAX_HEAD_DIM];
    for (int i = 0; i < d; i++) row[i] = bf16_to_f32(kp[i]);
    for (int g = 0; g < group; g++) {
        float lanes[LANES] = {0};
        for (int i = 0; i < d; i += LANES)
            for (int l = 0; l < LANES; l++) lanes[l] += qf[g * d + i + l] * row[i + l];
        for (int width = LANES / 2; width > 0; width /= 2)
            for (int l = 0; l < width; l++) lanes[l] += lanes[l + width];
        scores[g * stride] = lanes[0] * scale;
    }
}
#endif

static inline void value_run(float *acc, const uint16_t *vp, const float *p, size_t stride, int n, int group, int d) {
    if (value_run_registers(acc, vp, p, stride, n, group, d)) return;
    float row[MAX_HEAD_DIM];
    for (int j = 0; j < n; j++) {
        for (int i = 0; i < d; i++) row[i] = bf16_to_f32(vp[(size_t)j * d + i]);
        for (int g = 0; g < group; g++) {
            const float pg = p[g * stride + j];
            float *a = acc + g * d;
            for (int i = 0; i < d; i++) a[i] += pg * row[i];
        }
    }
}

int rillet_max_head_dim(void) { return MAX_HEAD_DIM; }
int rillet_max_group(void) { return MAX_GROUP; }

/* The work of one thread in an enclosing parallel region (an orphaned `omp for`, which ends in a
   barrier); rillet_paged_decode_attention_bf16 below documents the arguments. */
void rillet_paged_attention_part(
    const uint16_t *q, int64_t q_row_stride, const uint16_t *k_cache, const uint16_t *v_cache,
    int64_t num_slots, const int32_t *block_tables, int32_t max_blocks, const int32_t *context_lens,
    int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
    float scale, uint16_t *out)
{
    const int group = num_heads / num_kv_heads;
    const int d = head_dim;
    float *scores = NULL;
    size_t capacity = 0;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < num_seqs; b++) {
        for (int h = 0; h < num_kv_heads; h++) {
            const int ctx = context_lens[b];
            const size_t need = (size_t)group * (size_t)ctx;
            if (need > capacity) {
                free(scores);
                capacity = need;
                scores = (float *)malloc(capacity * sizeof(float));
            }
            float qf[MAX_GROUP * MAX_HEAD_DIM];
            float acc[MAX_GROUP * MAX_HEAD_DIM];
            const uint16_t *qb = q + (int64_t)b * q_row_stride + (int64_t)h * group * d;
            for (int i = 0; i < group * d; i++) qf[i] = bf16_to_f32(qb[i]);
            const int32_t *table = block_tables + (int64_t)b * max_blocks;
            const uint16_t *k_head = k_cache + (int64_t)h * num_slots * d;
            const uint16_t *v_head = v_cache + (int64_t)h * num_slots * d;

            /* Blocks are block_size contiguous slots: walk them block by block. */
            for (int start = 0; start < ctx; start += block_size) {
                const uint16_t *kp = k_head + (int64_t)table[start / block_size] * block_size * d;
                const int n = ctx - start < block_size ? ctx - start : block_size;
                for (int j = 0; j < n; j++)
                    key_scores(qf, kp + (int64_t)j * d, group, d, scale, scores + start + j, (size_t)ctx);
            }
            float inv_sum[MAX_GROUP];
            for (int g = 0; g < group; g++) {
                float *s = scores + (size_t)g * ctx;
                float m = s[0];
#pragma omp simd reduction(max : m)
                for (int pos = 1; pos < ctx; pos++) m = s[pos] > m ? s[pos] : m;  /* exact in any order */
#pragma omp simd
                for (int pos = 0; pos < ctx; pos++) s[pos] = exp_nonpositive(s[pos] - m);
                inv_sum[g] = 1.0f / sum_lanes(s, ctx);
            }
            memset(acc, 0, sizeof(float) * (size_t)group * d);
            for (int start = 0; start < ctx; start += block_size) {
                const uint16_t *vp = v_head + (int64_t)table[start / block_size] * block_size * d;
                const int n = ctx - start < block_size ? ctx - start : block_size;
                value_run(acc, vp, scores + start, (size_t)ctx, n, group, d);
            }
            uint16_t *ob = out + (int64_t)b * num_heads * d + (int64_t)h * group * d;
            for (int g = 0; g < group; g++)
                for (int i = 0; i < d; i++) ob[g * d + i] = f32_to_bf16(acc[g * d + i] * inv_sum[g]);
        }
    }
    free(scores);
}

/* q: row b of the step at q + b * q_row_stride, heads of head_dim contiguous (bf16).
   k_cache, v_cache: [num_kv_heads, num_slots, head_dim] bf16.
   block_tables: [num_seqs, max_blocks] int32; context_lens: [num_seqs] int32 (>= 1).
   out: [num_seqs, num_heads * head_dim] bf16. num_threads: torch's (the pool is shared).
   head_dim must be a multiple of LANES and at most MAX_HEAD_DIM; num_heads / num_kv_heads at
   most MAX_GROUP (checked by the caller). */
void rillet_paged_decode_attention_bf16(
    const uint16_t *q, int64_t q_row_stride, const uint16_t *k_cache, const uint16_t *v_cache,
    int64_t num_slots, const int32_t *block_tables, int32_t max_blocks, const int32_t *context_lens,
    int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
    float scale, uint16_t *out, int32_t num_threads)
{
#pragma omp parallel num_threads(num_threads)
    rillet_paged_attention_part(q, q_row_stride, k_cache, v_cache, num_slots, block_tables, max_blocks,
                                context_lens, num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale, out);
}

/* residual += x (rounded to bf16, as a bf16 add in torch), then
   out = bf16(residual * rsqrt(mean(residual^2) + eps) * weight): the residual add and RMSNorm
   between a layer's blocks in one pass instead of about ten torch ops. Each row's sums run in a
   fixed order. residual, x, out: [rows, dim] contiguous bf16; weight: [dim] bf16. For one row,
   x NULL: no add (the first layer's norm of its input). */
void rillet_add_rms_norm_row(uint16_t *res, const uint16_t *xr, const uint16_t *weight, uint16_t *o,
                             int32_t dim, float eps) {
    float lanes[LANES] = {0};
    int i = 0;
    for (; i + LANES <= dim; i += LANES) {
        for (int l = 0; l < LANES; l++) {
            if (xr != NULL) res[i + l] = f32_to_bf16(bf16_to_f32(res[i + l]) + bf16_to_f32(xr[i + l]));
            const float v = bf16_to_f32(res[i + l]);
            lanes[l] += v * v;
        }
    }
    for (int l = 0; i < dim; i++, l++) {
        if (xr != NULL) res[i] = f32_to_bf16(bf16_to_f32(res[i]) + bf16_to_f32(xr[i]));
        const float v = bf16_to_f32(res[i]);
        lanes[l] += v * v;
    }
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) lanes[l] += lanes[l + width];
    const float inv_rms = 1.0f / sqrtf(lanes[0] / (float)dim + eps);
    for (int j = 0; j < dim; j++) o[j] = f32_to_bf16(bf16_to_f32(res[j]) * inv_rms * bf16_to_f32(weight[j]));
}

void rillet_add_rms_norm_bf16(uint16_t *residual, const uint16_t *x, const uint16_t *weight, uint16_t *out,
                              int64_t rows, int32_t dim, float eps, int32_t num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++)
        rillet_add_rms_norm_row(residual + r * dim, x + r * dim, weight, out + r * dim, dim, eps);
}
