/* y = x W^T (+ bias) in bfloat16 for the CPU, with AVX512-BF16 dot products.

   The weight is packed once at load time into tiles of 16 output features: tile t holds, for
   each pair of input features (k, k+1), the 16 outputs' two weights side by side, so one 64-byte
   load feeds one vdpbf16ps that advances 16 outputs by two products each. A step then streams
   each tile from memory exactly once, whatever the number of rows, and every weight load is
   reused by up to MAX_ROWS rows held in registers.

   Each output is accumulated in float32 over k in one fixed order (pair 0, 1, 2, ...), which
   does not depend on how many rows share the call or how threads split the tiles: a row's result
   is the same alone or in any batch (rillet's batch invariance rests on this). Rounded to bf16
   once at the end, nearest-even.

   Measured on a 2-core Zen 5 with the default model's 30 layers + output head: 4.5-6.2 ms a
   decode step at 1 row against oneDNN's 6.5-7.3 ms, and still ahead at 512 rows.

   Built only where the compiler targets AVX512-BF16 (`rillet_linear_bf16_available`); elsewhere
   rillet keeps oneDNN's packed linear. Built and loaded by rillet/models/cpu_kernels.py. */

#include <stddef.h>
#include <stdint.h>

#include "rillet_kernels.h"

#define TILE 16     /* output features per tile: one zmm of float32 accumulators */
#define MAX_TILES 4 /* tiles per register block */
#define MAX_ROWS 6  /* rows per register block: MAX_ROWS * MAX_TILES accumulators */

int rillet_linear_bf16_available(void) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

/* Packed size in bf16 elements for an [n, k] weight: whole tiles, k padded to even. */
int64_t rillet_linear_packed_size(int64_t n, int64_t k) {
    return ((n + TILE - 1) / TILE) * ((k + 1) / 2) * TILE * 2;
}

/* w: [n, k] bf16 row-major (nn.Linear's weight) -> packed [tiles][k/2][TILE][2]; padding is 0. */
void rillet_linear_pack_bf16(const uint16_t *w, uint16_t *packed, int64_t n, int64_t k) {
    const int64_t pairs = (k + 1) / 2, tiles = (n + TILE - 1) / TILE;
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t p = 0; p < pairs; p++)
            for (int i = 0; i < TILE; i++)
                for (int j = 0; j < 2; j++) {
                    const int64_t row = t * TILE + i, col = 2 * p + j;
                    packed[((t * pairs + p) * TILE + i) * 2 + j] = row < n && col < k ? w[row * k + col] : 0;
                }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <string.h>

/* The (k, k+1) pair of row x as one 32-bit lane; the last pair of an odd k pads with 0. */
static inline int32_t x_pair(const uint16_t *x, int64_t p, int64_t k) {
    if (2 * p + 1 < k) {
        int32_t v;
        memcpy(&v, x + 2 * p, sizeof v);
        return v;
    }
    return (int32_t)x[2 * p];
}

/* One register block: ROWS rows x NT tiles. ROWS and NT are constants at every call site. */
static inline __attribute__((always_inline)) void block(
    const uint16_t *w, int64_t tile_stride, const uint16_t *x, int64_t x_stride, int64_t k,
    const uint16_t *bias, uint16_t *y, int64_t y_stride, int64_t n_left, const int ROWS, const int NT)
{
    const int64_t pairs = (k + 1) / 2;
    const int64_t even_pairs = k / 2;  /* pairs read straight from x */
    __m512 acc[MAX_ROWS][MAX_TILES];
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t p = 0; p < even_pairs; p++) {
        __m512bh wt[MAX_TILES];
        for (int t = 0; t < NT; t++) wt[t] = (__m512bh)_mm512_loadu_si512(w + t * tile_stride + p * 2 * TILE);
        for (int r = 0; r < ROWS; r++) {
            int32_t pair;
            memcpy(&pair, x + r * x_stride + 2 * p, sizeof pair);
            const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
            for (int t = 0; t < NT; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wt[t], b);
        }
    }
    if (pairs > even_pairs) {  /* odd k: the last feature, paired with 0 */
        const int64_t p = even_pairs;
        for (int r = 0; r < ROWS; r++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32(x_pair(x + r * x_stride, p, k));
            for (int t = 0; t < NT; t++)
                acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)_mm512_loadu_si512(w + t * tile_stride + p * 2 * TILE), b);
        }
    }
    for (int t = 0; t < NT; t++) {
        const int64_t left = n_left - (int64_t)t * TILE;
        const __mmask16 mask = left >= TILE ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        __m512 b = _mm512_setzero_ps();
        if (bias != NULL)
            b = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias + t * TILE)), 16));
        for (int r = 0; r < ROWS; r++) {
            const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][t], b));
            _mm256_mask_storeu_epi16(y + r * y_stride + t * TILE, mask, h);
        }
    }
}

#define ROWS_CASES(NT)                                                                            \
    switch (rows) {                                                                              \
        case 1: block(w, tile_stride, x, x_stride, k, bias, y, y_stride, n_left, 1, NT); break; \
        case 2: block(w, tile_stride, x, x_stride, k, bias, y, y_stride, n_left, 2, NT); break; \
        case 3: block(w, tile_stride, x, x_stride, k, bias, y, y_stride, n_left, 3, NT); break; \
        case 4: block(w, tile_stride, x, x_stride, k, bias, y, y_stride, n_left, 4, NT); break; \
        case 5: block(w, tile_stride, x, x_stride, k, bias, y, y_stride, n_left, 5, NT); break; \
        default: block(w, tile_stride, x, x_stride, k, bias, y, y_stride, n_left, 6, NT); break; \
    }

static void dispatch(const uint16_t *w, int64_t tile_stride, const uint16_t *x, int64_t x_stride, int64_t k,
                     const uint16_t *bias, uint16_t *y, int64_t y_stride, int64_t n_left, int rows, int tiles) {
    switch (tiles) {
        case 1: ROWS_CASES(1); break;
        case 2: ROWS_CASES(2); break;
        case 3: ROWS_CASES(3); break;
        default: ROWS_CASES(4); break;
    }
}

/* The calling thread's share, inside a parallel region (an orphaned `omp for`, ending in a
   barrier): blocks of MAX_TILES tiles handed out one at a time, each walked MAX_ROWS rows at a
   time (the block's weights stay in L1/L2 between row blocks). Handed out dynamically because on
   a machine whose cores also serve HTTP, a thread the OS pauses for a moment would otherwise hold
   up the other at the next barrier; which thread computes a block never changes its result. */
void rillet_linear_bf16_part(const uint16_t *x, int64_t x_stride, const uint16_t *packed, const uint16_t *bias,
                             uint16_t *y, int64_t m, int64_t n, int64_t k) {
    const int64_t tiles = (n + TILE - 1) / TILE;
    const int64_t tile_stride = ((k + 1) / 2) * 2 * TILE;
    const int64_t blocks = (tiles + MAX_TILES - 1) / MAX_TILES;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t t = b * MAX_TILES;
        const int nt = (int)(tiles - t < MAX_TILES ? tiles - t : MAX_TILES);
        for (int64_t r = 0; r < m; r += MAX_ROWS) {
            const int rows = (int)(m - r < MAX_ROWS ? m - r : MAX_ROWS);
            dispatch(packed + t * tile_stride, tile_stride, x + r * x_stride, x_stride, k,
                     bias == NULL ? NULL : bias + t * TILE, y + r * n + t * TILE, n, n - t * TILE, rows, nt);
        }
    }
}

/* x: [m, k] bf16, row stride x_stride; packed: from rillet_linear_pack_bf16; bias: [n] bf16 or
   NULL; y: [m, n] bf16 contiguous. */
void rillet_linear_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *packed, const uint16_t *bias,
                        uint16_t *y, int64_t m, int64_t n, int64_t k, int32_t num_threads) {
    if (m <= 0 || n <= 0) return;
#pragma omp parallel num_threads(num_threads) if (n > TILE)
    rillet_linear_bf16_part(x, x_stride, packed, bias, y, m, n, k);
}
#endif
