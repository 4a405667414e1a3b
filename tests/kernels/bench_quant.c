/* Timing of linear_quant.c (activation quantization + the linear, in one parallel region, as
   linear.c runs them) on SmolLM2-135M's projection shapes. Build with any ISA flags:

       K=src/rillet/models/kernels
       cc -O3 -fopenmp -mavx2 -mfma -mf16c -I$K tests/kernels/bench_quant.c $K/linear_quant.c -lm -o /tmp/bq
       /tmp/bq [threads] [m,m,...] [q4|q8]

   With -DBENCH_BF16 and linear.c + linear_bf16.c added to the build, the bf16 format runs too
   (through rillet_linear, its own parallel region) for comparison. COLD_MB (default 96) sizes
   the m = 1 copies: make it larger than the L3 cache.

   m = 1 streams weights from memory (the call cycles through copies larger than the L3 cache)
   and reports GB/s of packed weights; larger m reuse one hot copy and report GFLOP/s (2 m n k). */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "bench_common.h"
#include "rillet_kernels.h"

int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 2;
    int ms[16], nm = 0;
    {
        char buf[256];
        snprintf(buf, sizeof buf, "%s", argc > 2 ? argv[2] : "1,16,32");
        for (char *t = strtok(buf, ","); t && nm < 16; t = strtok(NULL, ",")) ms[nm++] = atoi(t);
    }
    int fmts[3] = {RILLET_WEIGHT_Q4, RILLET_WEIGHT_Q8, -1}, nf = 2;
#ifdef BENCH_BF16
    fmts[nf++] = RILLET_WEIGHT_BF16;
#endif
    if (argc > 3) {
        nf = 1;
        fmts[0] = !strcmp(argv[3], "q8") ? RILLET_WEIGHT_Q8 : !strcmp(argv[3], "bf16") ? RILLET_WEIGHT_BF16 : RILLET_WEIGHT_Q4;
    }
    static const char *names[3] = {"bf16", "q8", "q4"};
    static const int64_t shapes[][2] = {{1728, 576}, {576, 576}, {3072, 576}, {576, 1536}, {49152, 576}};
    const int64_t cold_bytes = (int64_t)(getenv("COLD_MB") ? atoi(getenv("COLD_MB")) : 96) << 20;
    (void)threads;
    for (int f = 0; f < nf; f++) {
        const int fmt = fmts[f];
        double total[16] = {0};
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            const int64_t n = shapes[s][0], k = shapes[s][1], nb = k / RILLET_QBLOCK;
#ifdef BENCH_BF16
            const int64_t bytes = rillet_weight_packed_bytes(fmt, n, k), stride = (bytes + 4095) / 4096 * 4096;
#else
            const int64_t bytes = rillet_quant_packed_bytes(fmt, n, k), stride = (bytes + 4095) / 4096 * 4096;
#endif
            int copies = (int)(cold_bytes / bytes);
            if (copies < 1) copies = 1;
            uint8_t *values = malloc((size_t)(n * k));
            float *scales = malloc(sizeof(float) * (size_t)(n * nb)), *mins = malloc(sizeof(float) * (size_t)(n * nb));
            for (int64_t i = 0; i < n * k; i++) values[i] = fmt == RILLET_WEIGHT_Q8 ? (uint8_t)next() : (uint8_t)(next() & 15);
            for (int64_t i = 0; i < n * nb; i++) { scales[i] = 0.01f; mins[i] = -0.08f; }
            uint8_t *packed = aligned_alloc(4096, (size_t)(stride * copies));
#ifdef BENCH_BF16
            uint16_t *wbf = NULL;
            if (fmt == RILLET_WEIGHT_BF16) {
                wbf = malloc(2 * (size_t)(n * k));
                for (int64_t i = 0; i < n * k; i++) wbf[i] = f32_to_bf16((float)((int)(next() % 2001) - 1000) / 50000.0f);
            }
            rillet_weight_pack(fmt, fmt == RILLET_WEIGHT_BF16 ? (const void *)wbf : values, scales, mins, n, k, packed);
            free(wbf);
#else
            rillet_quant_pack(fmt, values, scales, mins, n, k, packed);
#endif
            for (int c = 1; c < copies; c++) memcpy(packed + c * stride, packed, (size_t)bytes);
            printf("%-4s %5lldx%-5lld %6.2fMB |", names[fmt], (long long)n, (long long)k, bytes / 1e6);
            for (int mi = 0; mi < nm; mi++) {
                const int64_t m = ms[mi];
                uint16_t *x = malloc(2 * (size_t)(m * k)), *y = malloc(2 * (size_t)(m * n));
                for (int64_t i = 0; i < m * k; i++) x[i] = f32_to_bf16((float)((int)(next() % 2001) - 1000) / 500.0f);
                int8_t *xq = aligned_alloc(64, (size_t)((m * k + 63) / 64 * 64));
                float *xs = malloc(sizeof(float) * (size_t)(m * nb));
                int32_t *xsum = malloc(sizeof(int32_t) * (size_t)(m * nb));
                double best = 1e9, spent = 0;
                int rep = 0;
                for (; rep < 2000 && (rep < 20 || spent < 0.6); rep++) {
                    const uint8_t *w = packed + (m == 1 ? (int64_t)(rep % copies) * stride : 0);
                    const double t0 = now();
#ifdef BENCH_BF16
                    if (fmt == RILLET_WEIGHT_BF16) {
                        const rillet_weight wt = {fmt, 0, n, k, w, NULL};
                        rillet_linear(&wt, x, k, y, m, threads);
                    } else
#endif
#pragma omp parallel num_threads(threads)
                    {
                        rillet_quantize_rows_part(x, k, m, k, xq, xs, xsum);
                        rillet_linear_quant_part(fmt, w, NULL, xq, xs, xsum, y, m, n, k);
                    }
                    const double dt = now() - t0;
                    spent += dt;
                    if (dt < best) best = dt;
                }
                total[mi] += best;
                if (m == 1) printf(" m=1 %8.1fus %5.1fGB/s |", best * 1e6, bytes / best / 1e9);
                else printf(" m=%lld %8.1fus %6.1fGF/s |", (long long)m, best * 1e6, 2.0 * m * n * k / best / 1e9);
                free(x); free(y); free(xq); free(xs); free(xsum);
            }
            printf("\n");
            fflush(stdout);
            free(values); free(scales); free(mins); free(packed);
        }
        printf("%s 1 layer + head:", names[fmt]);
        for (int mi = 0; mi < nm; mi++) printf(" m=%d %.3fms", ms[mi], total[mi] * 1e3);
        printf("\n");
    }
    return 0;
}
