/* linear_quant.c's SIMD path (whatever the target flags select: NEON sdot / smull, AVX2, AVX-512
   VNNI) against its plain C path in the same binary, plus batch invariance of the SIMD path.
   For aarch64 under qemu-user (no aarch64 machine needed):

       K=src/rillet/models/kernels
       aarch64-linux-gnu-gcc -O2 -march=armv8.2-a+dotprod -I$K tests/kernels/check_quant_simd.c $K/linear_quant.c -lm -o /tmp/cq
       qemu-aarch64 -L /usr/aarch64-linux-gnu /tmp/cq          (and with -march=armv8-a: no sdot)

   Natively the same with gcc and the x86 flags. Prints one line per case and exits 1 on any
   failure. The SIMD and plain C results may differ by float rounding only (the integer dots are
   exact): at most one bf16 ulp, and nearly always equal. */

#define RILLET_QUANT_PLAIN_C
#define rillet_quant_packed_bytes plain_quant_packed_bytes
#define rillet_quant_pack plain_quant_pack
#define rillet_quantize_rows_part plain_quantize_rows_part
#define rillet_quantize_blocks plain_quantize_blocks
#define rillet_linear_quant_part plain_linear_quant_part
#include "linear_quant.c"
#undef rillet_quant_packed_bytes
#undef rillet_quant_pack
#undef rillet_quantize_rows_part
#undef rillet_quantize_blocks
#undef rillet_linear_quant_part

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

int64_t rillet_quant_packed_bytes(int32_t format, int64_t n, int64_t k);
void rillet_quant_pack(int32_t format, const void *values, const float *scales, const float *mins,
                       int64_t n, int64_t k, void *packed);
void rillet_quantize_rows_part(const uint16_t *x, int64_t x_stride, int64_t m, int64_t k, int8_t *xq,
                               float *xscale, int32_t *xsum);
void rillet_linear_quant_part(int32_t format, const void *packed, const uint16_t *bias, const int8_t *xq,
                              const float *xscale, const int32_t *xsum, uint16_t *y, int64_t m, int64_t n,
                              int64_t k);

static uint64_t state = 0x9e3779b97f4a7c15ull;
static uint32_t next(void) {
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return (uint32_t)(state >> 16);
}
static float uniform(void) { return (float)(next() & 0xffffff) / 16777216.0f; }

typedef void (*quantize_fn)(const uint16_t *, int64_t, int64_t, int64_t, int8_t *, float *, int32_t *);
typedef void (*linear_fn)(int32_t, const void *, const uint16_t *, const int8_t *, const float *, const int32_t *,
                          uint16_t *, int64_t, int64_t, int64_t);
typedef void (*pack_fn)(int32_t, const void *, const float *, const float *, int64_t, int64_t, void *);
typedef int64_t (*bytes_fn)(int32_t, int64_t, int64_t);

static void run(bytes_fn bytes, pack_fn pack, quantize_fn quantize, linear_fn linear, int fmt, const void *values,
                const float *scales, const float *mins, const uint16_t *bias, const uint16_t *x, int64_t x_stride,
                int64_t m, int64_t n, int64_t k, uint16_t *y) {
    void *packed = aligned_alloc(64, (size_t)((bytes(fmt, n, k) + 63) / 64 * 64));
    pack(fmt, values, scales, mins, n, k, packed);
    int8_t *xq = malloc((size_t)(m * k));
    float *xs = malloc(sizeof(float) * (size_t)(m * k / 32));
    int32_t *xsum = malloc(sizeof(int32_t) * (size_t)(m * k / 32));
    quantize(x, x_stride, m, k, xq, xs, xsum);
    linear(fmt, packed, bias, xq, xs, xsum, y, m, n, k);
    free(packed); free(xq); free(xs); free(xsum);
}

int main(void) {
    static const int64_t shapes[][2] = {{16, 32}, {23, 96}, {8, 64}, {100, 576}, {61, 1536}};
    int failed = 0, cases = 0;
    for (int fmt = 1; fmt <= 2; fmt++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            const int64_t n = shapes[s][0], k = shapes[s][1], m = 11, stride = k + 8, nb = k / 32;
            uint8_t *values = malloc((size_t)(n * k));
            float *scales = malloc(sizeof(float) * (size_t)(n * nb)), *mins = malloc(sizeof(float) * (size_t)(n * nb));
            uint16_t *bias = malloc(2 * (size_t)n), *x = malloc(2 * (size_t)(m * stride));
            for (int64_t i = 0; i < n * k; i++) values[i] = fmt == 1 ? (uint8_t)(next() & 0xff) : (uint8_t)(next() & 15);
            for (int64_t i = 0; i < n * nb; i++) {
                scales[i] = 0.01f + 0.02f * uniform();
                mins[i] = -8.0f * scales[i] * (0.8f + 0.4f * uniform());
            }
            for (int64_t i = 0; i < n; i++) bias[i] = f32_to_bf16(uniform() - 0.5f);
            for (int64_t i = 0; i < m * stride; i++) x[i] = f32_to_bf16((uniform() - 0.5f) * (1.0f + 8.0f * uniform()));
            for (int64_t i = 0; i < 32 && k >= 64; i++) x[stride + 32 + i] = 0;  /* an all-zero block */
            uint16_t *ys = malloc(2 * (size_t)(m * n)), *yc = malloc(2 * (size_t)(m * n)), *y1 = malloc(2 * (size_t)n);
            const float *mn = fmt == 2 ? mins : NULL;
            run(rillet_quant_packed_bytes, rillet_quant_pack, rillet_quantize_rows_part, rillet_linear_quant_part,
                fmt, values, scales, mn, bias, x, stride, m, n, k, ys);
            run(plain_quant_packed_bytes, plain_quant_pack, plain_quantize_rows_part, plain_linear_quant_part,
                fmt, values, scales, mn, bias, x, stride, m, n, k, yc);
            int equal = 0, off = 0, batch = 0;
            for (int64_t i = 0; i < m * n; i++) {
                const float a = bf16_to_f32(ys[i]), c = bf16_to_f32(yc[i]);
                if (ys[i] == yc[i]) equal++;
                else if (fabsf(a - c) > 0.0079f * (fabsf(a) + fabsf(c)) + 1e-3f) off++;
            }
            for (int64_t r = 0; r < m; r += 3) {  /* a row alone: bit-identical to its batch result */
                run(rillet_quant_packed_bytes, rillet_quant_pack, rillet_quantize_rows_part, rillet_linear_quant_part,
                    fmt, values, scales, mn, bias, x + r * stride, stride, 1, n, k, y1);
                if (memcmp(y1, ys + r * n, 2 * (size_t)n)) batch++;
            }
            const int ok = off == 0 && batch == 0 && equal * 10 >= 9 * m * n;
            printf("%s %s n=%lld k=%lld: %d/%lld equal to plain C, %d beyond rounding, %d rows differ alone\n",
                   ok ? "PASS" : "FAIL", fmt == 1 ? "q8" : "q4", (long long)n, (long long)k, equal, (long long)(m * n),
                   off, batch);
            failed += !ok;
            cases++;
            free(values); free(scales); free(mins); free(bias); free(x); free(ys); free(yc); free(y1);
        }
    printf("%d passed, %d failed\n", cases - failed, failed);
    return failed != 0;
}
