/* y = x W^T (+ bias) with bf16 weights and activations, float32 accumulation, on every CPU.

   The weight is packed once at load time into tiles of 16 output features: tile t holds, for
   each pair of input features (k, k+1), the 16 outputs' two weights side by side (one 32-bit
   lane per output: k in the low half, k+1 in the high half). A step streams each tile from
   memory once, whatever the number of rows, and every weight load is reused by the rows held in
   registers. The layout is the same in every build; only the inner loop differs:

   - AVX512-BF16: one 64-byte load feeds one vdpbf16ps (16 outputs, two products each).
   - AVX2 + FMA (also AVX-512 CPUs without BF16): a lane widens to float32 as lane << 16 (k) and
     lane & 0xffff0000 (k+1); a tile is two 8-wide halves; x is widened to float32 once per call.
   - NEON: the same widening (vshl / vand) and vfmaq, four outputs a register.
   - plain C: the same arithmetic, left to the compiler's vectorizer.

   Each output is accumulated in float32 over k in one fixed order (pair 0, 1, 2, ...; within a
   pair k then k+1 outside AVX512-BF16), which depends neither on how many rows share the call
   nor on how threads split the tiles: a row's result is the same alone or in any batch
   (rillet's batch invariance rests on this). Rounded to bf16 once at the end, nearest-even.

   Built and loaded by rillet/models/cpu_kernels.py; rillet_linear_part (linear.c) calls it. */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rillet_kernels.h"

#define TILE 16     /* output features per tile */
#define MAX_TILES 4 /* tiles per block handed to a thread */

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define PATH_AVX512BF16 1
#elif defined(__AVX2__) && defined(__FMA__)
#define PATH_AVX2 1
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define PATH_NEON 1
#endif

int64_t rillet_bf16_packed_bytes(int64_t n, int64_t k) {
    return ((n + TILE - 1) / TILE) * ((k + 1) / 2) * TILE * 2 * (int64_t)sizeof(uint16_t);
}

/* w: [n, k] bf16 row-major (nn.Linear's weight) -> packed [tiles][k/2][TILE][2]; padding is 0. */
void rillet_bf16_pack(const uint16_t *w, void *packed_bytes, int64_t n, int64_t k) {
    uint16_t *packed = (uint16_t *)packed_bytes;
    const int64_t pairs = (k + 1) / 2, tiles = (n + TILE - 1) / TILE;
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t p = 0; p < pairs; p++)
            for (int i = 0; i < TILE; i++)
                for (int j = 0; j < 2; j++) {
                    const int64_t row = t * TILE + i, col = 2 * p + j;
                    packed[((t * pairs + p) * TILE + i) * 2 + j] = row < n && col < k ? w[row * k + col] : 0;
                }
}

/* Rows of float32 results -> bf16 y, adding the bias; `left` outputs of the tile are real. */
static inline void store_tile(const float *acc, const uint16_t *bias, uint16_t *y, int64_t left) {
    const int count = left < TILE ? (int)left : TILE;
    for (int i = 0; i < count; i++) y[i] = f32_to_bf16(acc[i] + (bias != NULL ? bf16_to_f32(bias[i]) : 0.0f));
}

#ifndef PATH_AVX512BF16
/* x rows as float32, row stride 2 * pairs (odd k padded with 0), in a per-thread buffer that
   grows to the largest call and lives as long as the thread (OpenMP's pool threads persist). */
static const float *widen_rows(const uint16_t *x, int64_t x_stride, int64_t m, int64_t k) {
    static _Thread_local float *buffer = NULL;
    static _Thread_local size_t capacity = 0;
    const int64_t width = 2 * ((k + 1) / 2);
    const size_t need = (size_t)(m * width);
    if (need > capacity) {
        free(buffer);
        buffer = (float *)malloc(need * sizeof(float));
        capacity = buffer != NULL ? need : 0;
        if (buffer == NULL) return NULL;
    }
    for (int64_t r = 0; r < m; r++) {
        for (int64_t i = 0; i < k; i++) buffer[r * width + i] = bf16_to_f32(x[r * x_stride + i]);
        if (width > k) buffer[r * width + k] = 0.0f;
    }
    return buffer;
}
#endif

#if defined(PATH_AVX512BF16)
#include <immintrin.h>

#define MAX_ROWS 6  /* rows per register block: MAX_ROWS * MAX_TILES accumulators */

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
void rillet_linear_bf16_part(const uint16_t *x, int64_t x_stride, const void *packed_bytes, const uint16_t *bias,
                             uint16_t *y, int64_t m, int64_t n, int64_t k) {
    const uint16_t *packed = (const uint16_t *)packed_bytes;
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

#else /* float32 paths: AVX2, NEON, plain C */

#if defined(PATH_AVX2)
#include <immintrin.h>

#define MAX_ROWS 4  /* more rows per block spill registers (measured slower at 6) */
#define PREFETCH_PAIRS 32

/* ROWS rows x NT tiles, each output one accumulator updated by k then k+1 of every pair: the
   order within an output is the same for every (ROWS, NT), so is its result. */
static inline __attribute__((always_inline)) void block(
    const uint32_t *w, int64_t tile_stride, const float *xf, int64_t xf_stride, int64_t pairs,
    float *out, const int ROWS, const int NT)
{
    __m256 acc[MAX_ROWS][4][2];
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < NT; t++) acc[r][t][0] = acc[r][t][1] = _mm256_setzero_ps();
    if (NT == 1) {  /* many rows: widen the tile's pair once, broadcast each row's x once */
        for (int64_t p = 0; p < pairs; p++) {
            __m256 we[2], wo[2];
            for (int h = 0; h < 2; h++) {
                const __m256i lane = _mm256_loadu_si256((const __m256i *)(w + p * TILE + h * 8));
                we[h] = _mm256_castsi256_ps(_mm256_slli_epi32(lane, 16));
                wo[h] = _mm256_castsi256_ps(_mm256_and_si256(lane, high));
            }
            for (int r = 0; r < ROWS; r++) {
                const __m256 xe = _mm256_broadcast_ss(xf + r * xf_stride + 2 * p);
                const __m256 xo = _mm256_broadcast_ss(xf + r * xf_stride + 2 * p + 1);
                for (int h = 0; h < 2; h++) {
                    acc[r][0][h] = _mm256_fmadd_ps(xe, we[h], acc[r][0][h]);
                    acc[r][0][h] = _mm256_fmadd_ps(xo, wo[h], acc[r][0][h]);
                }
            }
        }
    } else {  /* few rows, several tiles: one half at a time keeps fewer registers live */
        for (int64_t p = 0; p < pairs; p++)
            for (int t = 0; t < NT; t++) {
                /* A pair of a tile is one cache line: with few rows the loop streams weights
                   from memory, and ~14 instructions a line leave too few misses in flight
                   without this (+30-50% on one row, measured). */
                _mm_prefetch((const char *)(w + t * tile_stride + (p + PREFETCH_PAIRS) * TILE), _MM_HINT_T0);
                for (int h = 0; h < 2; h++) {
                    const __m256i lane = _mm256_loadu_si256((const __m256i *)(w + t * tile_stride + p * TILE + h * 8));
                    const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(lane, 16));
                    const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(lane, high));
                    for (int r = 0; r < ROWS; r++) {
                        const float *xr = xf + r * xf_stride + 2 * p;
                        acc[r][t][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr), even, acc[r][t][h]);
                        acc[r][t][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + 1), odd, acc[r][t][h]);
                    }
                }
            }
    }
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < NT; t++)
            for (int h = 0; h < 2; h++) _mm256_storeu_ps(out + (r * 4 + t) * TILE + h * 8, acc[r][t][h]);
}

#elif defined(PATH_NEON)
#include <arm_neon.h>

#define MAX_ROWS 4  /* 4 rows x one tile = 16 q-register accumulators (of 32) */

static inline __attribute__((always_inline)) void block(
    const uint32_t *w, int64_t tile_stride, const float *xf, int64_t xf_stride, int64_t pairs,
    float *out, const int ROWS, const int NT)
{
    float32x4_t acc[MAX_ROWS][4][4];
    const uint32x4_t high = vdupq_n_u32(0xffff0000u);
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < NT; t++)
            for (int q = 0; q < 4; q++) acc[r][t][q] = vdupq_n_f32(0.0f);
    for (int64_t p = 0; p < pairs; p++) {
        for (int t = 0; t < NT; t++) {
            for (int q = 0; q < 4; q++) {
                const uint32x4_t lane = vld1q_u32(w + t * tile_stride + p * TILE + q * 4);
                const float32x4_t even = vreinterpretq_f32_u32(vshlq_n_u32(lane, 16));
                const float32x4_t odd = vreinterpretq_f32_u32(vandq_u32(lane, high));
                for (int r = 0; r < ROWS; r++) {
                    const float *xr = xf + r * xf_stride + 2 * p;
                    acc[r][t][q] = vfmaq_n_f32(acc[r][t][q], even, xr[0]);
                    acc[r][t][q] = vfmaq_n_f32(acc[r][t][q], odd, xr[1]);
                }
            }
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < NT; t++)
            for (int q = 0; q < 4; q++) vst1q_f32(out + (r * 4 + t) * TILE + q * 4, acc[r][t][q]);
}

#else /* plain C */

#define MAX_ROWS 4

static inline float low_half(uint32_t lane) {
    union { uint32_t u; float f; } v = {lane << 16};
    return v.f;
}

static inline float high_half(uint32_t lane) {
    union { uint32_t u; float f; } v = {lane & 0xffff0000u};
    return v.f;
}

static inline __attribute__((always_inline)) void block(
    const uint32_t *w, int64_t tile_stride, const float *xf, int64_t xf_stride, int64_t pairs,
    float *out, const int ROWS, const int NT)
{
    float acc[MAX_ROWS][4][TILE];
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < NT; t++)
            for (int i = 0; i < TILE; i++) acc[r][t][i] = 0.0f;
    for (int64_t p = 0; p < pairs; p++)
        for (int t = 0; t < NT; t++) {
            const uint32_t *wp = w + t * tile_stride + p * TILE;
            for (int r = 0; r < ROWS; r++) {
                const float xe = xf[r * xf_stride + 2 * p], xo = xf[r * xf_stride + 2 * p + 1];
                for (int i = 0; i < TILE; i++) {
                    acc[r][t][i] += xe * low_half(wp[i]);
                    acc[r][t][i] += xo * high_half(wp[i]);
                }
            }
        }
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < NT; t++) memcpy(out + (r * 4 + t) * TILE, acc[r][t], sizeof(float) * TILE);
}
#endif

/* Tiles per register block for a row count: enough independent accumulators for the FMA
   latency at few rows, within the register file at many. */
static inline int tiles_for(int rows) { return rows == 1 ? 4 : rows == 2 ? 2 : 1; }

#define BLOCK(R, T) block(w, tile_stride, xf, xf_stride, pairs, out, R, T)

static void dispatch(const uint32_t *w, int64_t tile_stride, const float *xf, int64_t xf_stride, int64_t pairs,
                     float *out, int rows, int nt) {
    switch (rows * 8 + nt) {
        case 1 * 8 + 1: BLOCK(1, 1); break;
        case 1 * 8 + 2: BLOCK(1, 2); break;
        case 1 * 8 + 3: BLOCK(1, 3); break;
        case 1 * 8 + 4: BLOCK(1, 4); break;
        case 2 * 8 + 1: BLOCK(2, 1); break;
        case 2 * 8 + 2: BLOCK(2, 2); break;
        case 3 * 8 + 1: BLOCK(3, 1); break;
        case 4 * 8 + 1: BLOCK(4, 1); break;
#if MAX_ROWS > 4
        case 5 * 8 + 1: BLOCK(5, 1); break;
        case 6 * 8 + 1: BLOCK(6, 1); break;
#endif
        default: break;
    }
}

/* The calling thread's share inside a parallel region (an orphaned `omp for`, ending in a
   barrier): blocks of MAX_TILES tiles handed out dynamically (a thread the OS pauses does not
   hold up the others; which thread computes a block never changes its result). */
void rillet_linear_bf16_part(const uint16_t *x, int64_t x_stride, const void *packed_bytes, const uint16_t *bias,
                             uint16_t *y, int64_t m, int64_t n, int64_t k) {
    const uint32_t *packed = (const uint32_t *)packed_bytes;
    const int64_t pairs = (k + 1) / 2, tiles = (n + TILE - 1) / TILE;
    const int64_t tile_stride = pairs * TILE;  /* in 32-bit lanes */
    const int64_t blocks = (tiles + MAX_TILES - 1) / MAX_TILES;
    const int64_t xf_stride = 2 * pairs;
    const float *xf = widen_rows(x, x_stride, m, k);
    if (xf == NULL) abort();  /* out of memory: no way to report it from inside the region */
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t t0 = b * MAX_TILES;
        const int block_tiles = (int)(tiles - t0 < MAX_TILES ? tiles - t0 : MAX_TILES);
        for (int64_t r = 0; r < m; r += MAX_ROWS) {
            const int rows = (int)(m - r < MAX_ROWS ? m - r : MAX_ROWS);
            const int step = tiles_for(rows);
            for (int t = 0; t < block_tiles; t += step) {
                const int nt = block_tiles - t < step ? block_tiles - t : step;
                float out[MAX_ROWS * 4 * TILE];
                dispatch(packed + (t0 + t) * tile_stride, tile_stride, xf + r * xf_stride, xf_stride, pairs, out,
                         rows, nt);
                for (int i = 0; i < rows; i++)
                    for (int j = 0; j < nt; j++) {
                        const int64_t first = (t0 + t + j) * TILE;
                        store_tile(out + (i * 4 + j) * TILE, bias == NULL ? NULL : bias + first,
                                   y + (r + i) * n + first, n - first);
                    }
            }
        }
    }
}
#endif
