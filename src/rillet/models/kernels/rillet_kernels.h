/* What rillet's CPU kernel sources share: bf16 <-> float32 conversions, and the per-thread parts
   that decode_forward.c runs inside its own parallel region. */

#ifndef RILLET_KERNELS_H
#define RILLET_KERNELS_H

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

/* linear_bf16.c: an orphaned `omp for` over the output tiles (ends in a barrier). */
void rillet_linear_bf16_part(const uint16_t *x, int64_t x_stride, const uint16_t *packed, const uint16_t *bias,
                             uint16_t *y, int64_t m, int64_t n, int64_t k);

/* paged_attention.c: an orphaned `omp for` over (sequence, KV head) (ends in a barrier). */
void rillet_paged_attention_part(
    const uint16_t *q, int64_t q_row_stride, const uint16_t *k_cache, const uint16_t *v_cache,
    int64_t num_slots, const int32_t *block_tables, int32_t max_blocks, const int32_t *context_lens,
    int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
    float scale, uint16_t *out);

/* paged_attention.c: one row of residual += x, then RMSNorm (x NULL: no add). */
void rillet_add_rms_norm_row(uint16_t *res, const uint16_t *xr, const uint16_t *weight, uint16_t *o,
                             int32_t dim, float eps);

#endif
