/* The linear kernels' entry points over every weight format (rillet_kernels.h): BF16 goes to
   linear_bf16.c; Q8 and Q4 quantize the activation rows into scratch, then run linear_quant.c.

   Built and loaded by rillet/models/cpu_kernels.py. */

#include <stdint.h>
#include <stdlib.h>

#include "rillet_kernels.h"

#define ALIGN 64

static int64_t align_up(int64_t bytes) { return (bytes + ALIGN - 1) / ALIGN * ALIGN; }

/* RILLET_NO_QUANT: built without linear_quant.c (cpu_kernels.py sets it while that file is
   absent); Q8/Q4 then report themselves unavailable (packed bytes -1). */
#ifdef RILLET_NO_QUANT
#define QUANT(call) ((void)0)
static int is_quant(int32_t format) { (void)format; return 0; }
#else
#define QUANT(call) call
static int is_quant(int32_t format) { return format == RILLET_WEIGHT_Q8 || format == RILLET_WEIGHT_Q4; }
#endif

int64_t rillet_weight_packed_bytes(int32_t format, int64_t n, int64_t k) {
    if (format == RILLET_WEIGHT_BF16) return rillet_bf16_packed_bytes(n, k);
    int64_t bytes = -1;
    if (is_quant(format) && k % RILLET_QBLOCK == 0) QUANT(bytes = rillet_quant_packed_bytes(format, n, k));
    return bytes;
}

int rillet_weight_pack(int32_t format, const void *values, const float *scales, const float *mins,
                       int64_t n, int64_t k, void *packed) {
    if (format == RILLET_WEIGHT_BF16) {
        rillet_bf16_pack((const uint16_t *)values, packed, n, k);
        return 0;
    }
    if (!is_quant(format) || k % RILLET_QBLOCK != 0) return -1;
    QUANT(rillet_quant_pack(format, values, scales, mins, n, k, packed));
    return 0;
}

/* Quantized activations: xq [m, k] int8, then xscale float and xsum int32 [m, k / QBLOCK]. */
int64_t rillet_linear_scratch_bytes(const rillet_weight *w, int64_t m) {
    if (!is_quant(w->format)) return 0;
    const int64_t blocks = m * (w->k / RILLET_QBLOCK);
    return align_up(m * w->k) + align_up(blocks * (int64_t)sizeof(float)) + align_up(blocks * (int64_t)sizeof(int32_t));
}

#ifndef RILLET_NO_QUANT
/* Where the quantized activations of m rows sit in the scratch. */
typedef struct {
    int8_t *xq;
    float *xscale;
    int32_t *xsum;
} quant_rows;

static quant_rows scratch_rows(const rillet_weight *w, int64_t m, void *scratch) {
    const int64_t blocks = m * (w->k / RILLET_QBLOCK);
    quant_rows rows;
    rows.xq = (int8_t *)scratch;
    rows.xscale = (float *)((char *)scratch + align_up(m * w->k));
    rows.xsum = (int32_t *)((char *)rows.xscale + align_up(blocks * (int64_t)sizeof(float)));
    return rows;
}
#endif

void rillet_linear_prepare(const rillet_weight *w, const uint16_t *x, int64_t r, int64_t m, int64_t first,
                           int64_t count, void *scratch) {
#ifndef RILLET_NO_QUANT
    if (!is_quant(w->format)) return;
    const quant_rows rows = scratch_rows(w, m, scratch);
    const int64_t nb = w->k / RILLET_QBLOCK, b0 = first / RILLET_QBLOCK;
    rillet_quantize_blocks(x + first, count / RILLET_QBLOCK, rows.xq + r * w->k + first, rows.xscale + r * nb + b0,
                           rows.xsum + r * nb + b0);
#else
    (void)w, (void)x, (void)r, (void)m, (void)first, (void)count, (void)scratch;
#endif
}

void rillet_linear_run_part(const rillet_weight *w, const uint16_t *x, int64_t x_stride, uint16_t *y, int64_t m,
                            void *scratch) {
    if (w->format == RILLET_WEIGHT_BF16) {
        rillet_linear_bf16_part(x, x_stride, w->packed, w->bias, y, m, w->n, w->k);
        return;
    }
#ifndef RILLET_NO_QUANT
    const quant_rows rows = scratch_rows(w, m, scratch);
    rillet_linear_quant_part(w->format, w->packed, w->bias, rows.xq, rows.xscale, rows.xsum, y, m, w->n, w->k);
#else
    (void)scratch;
#endif
}

void rillet_linear_part(const rillet_weight *w, const uint16_t *x, int64_t x_stride, uint16_t *y, int64_t m,
                        void *scratch) {
#ifndef RILLET_NO_QUANT
    if (is_quant(w->format)) {
        const quant_rows rows = scratch_rows(w, m, scratch);
        rillet_quantize_rows_part(x, x_stride, m, w->k, rows.xq, rows.xscale, rows.xsum); /* ends in a barrier */
    }
#endif
    rillet_linear_run_part(w, x, x_stride, y, m, scratch);
}

void rillet_linear(const rillet_weight *w, const uint16_t *x, int64_t x_stride, uint16_t *y, int64_t m,
                   int32_t num_threads) {
    if (m <= 0 || w->n <= 0) return;
    const int64_t bytes = rillet_linear_scratch_bytes(w, m);
    void *scratch = bytes > 0 ? aligned_alloc(ALIGN, (size_t)bytes) : NULL;
    if (bytes > 0 && scratch == NULL) abort();
#pragma omp parallel num_threads(num_threads) if (w->n > 16)
    rillet_linear_part(w, x, x_stride, y, m, scratch);
    free(scratch);
}

/* What this build's code paths use (cpu_kernels.Kernels.features): bit 0 bf16 dot products
   (AVX512-BF16), 1 int8 dot products (AVX512-VNNI / AVX-VNNI), 2 NEON dot products, 3 OpenMP. */
int32_t rillet_kernel_features(void) {
    int32_t bits = 0;
#if defined(__AVX512BF16__)
    bits |= 1;
#endif
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
    bits |= 2;
#endif
#if defined(__ARM_FEATURE_DOTPROD)
    bits |= 4;
#endif
#if defined(_OPENMP)
    bits |= 8;
#endif
    return bits;
}
