/* Row-wise pieces of sampling on the CPU.

   rillet_argmax_rows: a greedy step's picks. torch's argmax over a batch of 49k-wide logits
   rows took ~0.5 ms on 2 cores (2-3% of a 16-stream decode step); two passes a row (a
   vectorized maximum, then the first index holding it), rows spread over the threads, take a
   quarter of that (117 us).

   Built and loaded by rillet/models/cpu_kernels.py. */

#include <math.h>
#include <stdint.h>

#include "rillet_kernels.h"

void rillet_argmax_rows(const float *x, int64_t rows, int64_t cols, int64_t stride, int64_t *out,
                        int32_t num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows > 1 && rows * cols >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        float m = -INFINITY;
        int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
        for (int64_t i = 0; i < cols; i++) {
            m = row[i] > m ? row[i] : m;
            nan |= row[i] != row[i];
        }
        int64_t at = 0;
        for (int64_t i = 0; i < cols; i++)
            if (nan ? row[i] != row[i] : row[i] == m) {
                at = i;
                break;
            }
        out[r] = at;
    }
}
