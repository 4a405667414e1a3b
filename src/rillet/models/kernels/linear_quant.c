/* y = x W^T (+ bias) for the Q8 and Q4 weight formats (rillet_kernels.h), llama.cpp style:
   activations are quantized per row and per 32-input block to int8 (rillet_quantize_rows_part),
   each block's dot product is exact integer arithmetic, and float only scales and sums blocks.

   Packed layout (private to each build; rillet_quant_pack writes it, cached per build):
     tiles of 16 outputs (n padded with zero quants and zero scales), each tile contiguous:
       quants  [k/32 blocks][8 groups of 4 inputs][16 outputs][4 inputs]      Q8: 512 B/block
               Q4: [4][16][4] bytes, low nibble = group g, high nibble = group g+4: 256 B/block
       meta    [k/32 blocks][16 float16 scales] (+ [16 float16 mins] for Q4)   32 / 64 B/block
   so one 64-byte load is 16 outputs x 4 inputs: one vpdpbusd against a broadcast 4-byte slice of
   the activation row (AVX-512 VNNI), two 32-byte vpmaddubsw halves (AVX2), four 16-byte sdot /
   smull (NEON), with no horizontal sums anywhere. Quants and meta sit in two runs per tile so
   every quant load is 64-byte aligned (Q8's 544-byte blocks would split lines otherwise).
   Scales as float16 (as llama.cpp): Q4 costs 5 bits a weight, Q8 8.5. Stored values per ISA:
     Q8, AVX-512 VNNI: q + 128 as u8 (vpdpbusd is u8 x s8); the dot starts at -128 * sum(xq).
     Q8, elsewhere:    q as s8 (AVX2: maddubs(|q|, sign(xq, q)), llama.cpp's trick, no saturation
                       as |q|, |xq| <= 127).
     Q4, everywhere:   q in 0..15 (AVX2: 8 maddubs of one block summed in int16 stay below 32767:
                       8 * 2 * 15 * 127 = 30480; NEON uses q - 8 signed, the dot starting at
                       8 * sum(xq)).
   Every output accumulates its blocks in order 0, 1, 2, ... as
       acc = fma(dx, fma(m, (float)xsum, s * (float)dot), acc)       (Q8: no m term)
   whatever the number of rows, the register blocking or the thread split: a row's result is
   the same alone or in any batch. The integer dots are exact, so builds for different ISAs
   differ only by float rounding (fma contraction). Rounded to bf16 once, nearest-even.

   Register blocks: 4 rows x 2 tiles (VNNI) or 4 rows x 2 half tiles (AVX2: 16 ymm registers),
   so a weight load and its nibble unpacking serve 4 rows; one row takes 4 half tiles (AVX2) so
   its add chains overlap. Timed with tests/kernels/bench_quant.c, 2 threads of a quiet Xeon
   (SPR), SmolLM2-135M's 5 shapes (1 layer + the head): Q4 at 1 row 1.1-1.2 ms (bf16 2.7-3.2),
   at 32 rows VNNI ~450-520 GFLOP/s, AVX2 ~210-250 (bf16 AVX-512 ~160, bf16 AVX2 ~100). */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "rillet_kernels.h"

#define QT 16             /* outputs per tile */
#define QB RILLET_QBLOCK  /* inputs per block */

/* RILLET_QUANT_PLAIN_C: the plain C path whatever the target (tests/kernels/check_quant_simd.c
   builds it next to the SIMD one to compare them). */
#if defined(RILLET_QUANT_PLAIN_C)
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__) && defined(__FMA__) && defined(__F16C__)
#define RQ_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define RQ_AVX2 1
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define RQ_NEON 1
#endif

#ifndef RQ_PREFETCH_NEXT
#define RQ_PREFETCH_NEXT 1 /* the next unit's weights during this one's later row blocks: 4-6% off an AVX2 decode step at 16 rows, 0 to disable */
#endif
#ifndef RQ_PREFETCH
#define RQ_PREFETCH 1024 /* bytes ahead in a tile's quant run (x86): +5-25% at one row, 0 to disable */
#endif

#if defined(RQ_VNNI) || defined(RQ_AVX2)
#include <immintrin.h>
#elif defined(RQ_NEON)
#include <arm_neon.h>
#endif

#ifdef RQ_VNNI
#define Q8_XOR 0x80 /* stored byte = q ^ 0x80 = q + 128 as u8 */
#else
#define Q8_XOR 0x00
#endif

/* ---- float16 <-> float32 in plain C (F. Giesen's round-to-nearest-even conversion) ---- */

static inline uint32_t rq_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float rq_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static uint16_t rq_f32_to_f16(float f) {
    uint32_t x = rq_bits(f);
    const uint32_t sign = x & 0x80000000u;
    x ^= sign;
    uint32_t o;
    if (x >= (uint32_t)(127 + 16) << 23) {
        o = x > 0x7f800000u ? 0x7e00u : 0x7c00u;  /* NaN, or too large: inf */
    } else if (x < (uint32_t)113 << 23) {         /* subnormal or zero: let float addition round */
        const uint32_t magic = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
        o = rq_bits(rq_float(x) + rq_float(magic)) - magic;
    } else {
        const uint32_t odd = (x >> 13) & 1u;
        x -= (uint32_t)(127 - 15) << 23;
        x += 0xfffu + odd;
        o = x >> 13;
    }
    return (uint16_t)(o | (sign >> 16));
}

static inline float rq_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (e == 0) {
        const float f = (float)mant * (1.0f / 16777216.0f);  /* exact */
        return sign ? -f : f;
    }
    if (e == 31) return rq_float(sign | 0x7f800000u | (mant << 13));
    return rq_float(sign | ((e + 112u) << 23) | (mant << 13));
}

/* ---- packing ---- */

static inline int64_t rq_qbytes(int32_t format) { return format == RILLET_WEIGHT_Q8 ? QB * QT : QB * QT / 2; }
static inline int64_t rq_mbytes(int32_t format) { return format == RILLET_WEIGHT_Q8 ? 2 * QT : 4 * QT; }
static inline int64_t rq_tile_bytes(int32_t format, int64_t k) {
    return (k / QB) * (rq_qbytes(format) + rq_mbytes(format));
}

/* Bytes of the packed [n, k] weight; -1 for an unknown format or a k that is not a positive
   multiple of RILLET_QBLOCK. */
int64_t rillet_quant_packed_bytes(int32_t format, int64_t n, int64_t k) {
    if ((format != RILLET_WEIGHT_Q8 && format != RILLET_WEIGHT_Q4) || k <= 0 || k % QB || n < 0) return -1;
    return ((n + QT - 1) / QT) * rq_tile_bytes(format, k);
}

/* values [n, k] (Q8: int8, -128 taken as -127; Q4: uint8 0..15, higher bits ignored), scales and
   mins (Q4 only; NULL means 0) float32 [n, k / 32] -> packed (rillet_quant_packed_bytes). */
void rillet_quant_pack(int32_t format, const void *values, const float *scales, const float *mins,
                       int64_t n, int64_t k, void *packed) {
    if (rillet_quant_packed_bytes(format, n, k) < 0) return;
    const int64_t nb = k / QB, tiles = (n + QT - 1) / QT, qbytes = rq_qbytes(format), tile_bytes = rq_tile_bytes(format, k);
    for (int64_t t = 0; t < tiles; t++) {
        uint8_t *tile = (uint8_t *)packed + t * tile_bytes;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *q = tile + b * qbytes;
            uint16_t meta[4 * QT];
            for (int o = 0; o < QT; o++) {
                const int64_t row = t * QT + o;
                const int live = row < n;
                meta[o] = rq_f32_to_f16(live ? scales[row * nb + b] : 0.0f);
                if (format == RILLET_WEIGHT_Q4)
                    meta[QT + o] = rq_f32_to_f16(live && mins != NULL ? mins[row * nb + b] : 0.0f);
                for (int i = 0; i < QB; i++) {
                    const int g = i / 4, j = i % 4;
                    if (format == RILLET_WEIGHT_Q8) {
                        int v = live ? ((const int8_t *)values)[row * k + b * QB + i] : 0;
                        if (v < -127) v = -127;
                        q[(g * QT + o) * 4 + j] = (uint8_t)((uint8_t)(int8_t)v ^ Q8_XOR);
                    } else {
                        const uint8_t v = live ? (uint8_t)(((const uint8_t *)values)[row * k + b * QB + i] & 0x0f) : 0;
                        uint8_t *dst = &q[((g % 4) * QT + o) * 4 + j];
                        if (g < 4) *dst = (uint8_t)((*dst & 0xf0) | v);
                        else *dst = (uint8_t)((*dst & 0x0f) | (v << 4));
                    }
                }
            }
            memcpy(tile + nb * qbytes + b * rq_mbytes(format), meta, (size_t)rq_mbytes(format));
        }
    }
}

/* ---- activation quantization ---- */

/* Round to nearest even for |v| < 2^22, without libm or the rounding mode's help. */
static inline float rq_rint(float v) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return v >= 0 ? (v + magic) - magic : -((-v + magic) - magic);
}

#if !(defined(RQ_VNNI) || defined(RQ_AVX2))
static void quantize_block_c(const uint16_t *x, int8_t *xq, float *dx_out, int32_t *sum_out) {
    float v[QB], amax = 0.0f;
    for (int i = 0; i < QB; i++) {
        v[i] = bf16_to_f32(x[i]);
        const float a = v[i] < 0 ? -v[i] : v[i];
        amax = a > amax ? a : amax;
    }
    const float d = amax / 127.0f;
    int32_t sum = 0;
    for (int i = 0; i < QB; i++) {
        float r = d > 0.0f ? rq_rint(v[i] / d) : 0.0f;
        r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
        xq[i] = (int8_t)r;
        sum += xq[i];
    }
    *dx_out = d;
    *sum_out = sum;
}
#endif

#if defined(RQ_VNNI) || defined(RQ_AVX2)
/* 32 bf16 -> int8, same arithmetic as quantize_block_c (max, one division, round half even). */
static inline void quantize_block_avx2(const uint16_t *x, int8_t *xq, float *dx_out, int32_t *sum_out) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int i = 0; i < 4; i++) {
        const __m128i h = _mm_loadu_si128((const __m128i *)(x + 8 * i));
        v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], absmask));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float d = _mm_cvtss_f32(m4) / 127.0f;
    *dx_out = d;
    if (!(d > 0.0f)) {
        memset(xq, 0, QB);
        *sum_out = 0;
        return;
    }
    const __m256 vd = _mm256_set1_ps(d), lim = _mm256_set1_ps(127.0f), nlim = _mm256_set1_ps(-127.0f);
    __m256i iv[4];
    for (int i = 0; i < 4; i++) {
        __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_min_ps(_mm256_max_ps(r, nlim), lim);
        iv[i] = _mm256_cvtps_epi32(r);
    }
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *sum_out = _mm_cvtsi128_si32(s4);
    /* packs interleave 128-bit lanes: undo with one permute */
    const __m256i p16a = _mm256_packs_epi32(iv[0], iv[1]), p16b = _mm256_packs_epi32(iv[2], iv[3]);
    __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)xq, p8);
}
#endif

/* `blocks` consecutive RILLET_QBLOCKs of one row: x bf16 -> xq int8, xscale and xsum per block. */
void rillet_quantize_blocks(const uint16_t *x, int64_t blocks, int8_t *xq, float *xscale, int32_t *xsum) {
    for (int64_t b = 0; b < blocks; b++) {
#if defined(RQ_VNNI) || defined(RQ_AVX2)
        quantize_block_avx2(x + b * QB, xq + b * QB, xscale + b, xsum + b);
#else
        quantize_block_c(x + b * QB, xq + b * QB, xscale + b, xsum + b);
#endif
    }
}

/* x [m, k] bf16 (row stride x_stride) -> xq [m, k] int8, xscale and xsum [m, k/32]: an orphaned
   `omp for` over rows, ending in its barrier. */
void rillet_quantize_rows_part(const uint16_t *x, int64_t x_stride, int64_t m, int64_t k, int8_t *xq,
                               float *xscale, int32_t *xsum) {
    const int64_t nb = k / QB;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m; r++)
        rillet_quantize_blocks(x + r * x_stride, nb, xq + r * k, xscale + r * nb, xsum + r * nb);
}

/* ---- the output store: float accumulators (+ bias) -> bf16, nearest even ---- */

static inline void store_outputs(const float *acc, const uint16_t *bias, uint16_t *y, int count) {
    for (int o = 0; o < count; o++) y[o] = f32_to_bf16(acc[o] + (bias != NULL ? bf16_to_f32(bias[o]) : 0.0f));
}

#if defined(RQ_VNNI) || defined(RQ_AVX2)
/* 8 floats (+ bias) -> 8 bf16, nearest even, NaN kept quiet: f32_to_bf16 in lanes. */
static inline void store8_bf16(__m256 v, const uint16_t *bias, uint16_t *y, int count) {
    if (count < 8) {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        store_outputs(tmp, bias, y, count);
        return;
    }
    if (bias != NULL)
        v = _mm256_add_ps(v, _mm256_castsi256_ps(_mm256_slli_epi32(
                                 _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)bias)), 16)));
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128((__m128i *)y, packed);
}
#endif

/* ======================================================================================== */
#if defined(RQ_VNNI)

#ifndef MAX_NT
#define MAX_NT 2         /* tiles per register block */
#endif
#ifndef MAX_ROWS
#define MAX_ROWS 4       /* rows per register block */
#endif

static inline __attribute__((always_inline)) void micro(
    const int FMT, const uint8_t *w, int64_t tile_bytes, int64_t nb, const int8_t *xq, int64_t k,
    const float *xs, const int32_t *xsum, const uint16_t *bias, uint16_t *y, int64_t n, int64_t n_left,
    const int ROWS, const int NT)
{
    const int64_t qbytes = FMT == RILLET_WEIGHT_Q8 ? 512 : 256, mbytes = FMT == RILLET_WEIGHT_Q8 ? 32 : 64;
    const uint8_t *meta = w + nb * qbytes;
    __m512 tot[MAX_ROWS][4];
    for (int r = 0; r < ROWS; r++)
        for (int t = 0; t < NT; t++) tot[r][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qb = w + b * qbytes;
        const int8_t *xb = xq + b * QB;
#if RQ_PREFETCH
        for (int t = 0; t < NT; t++)
            for (int64_t l = 0; l < qbytes; l += 64) _mm_prefetch((const char *)(qb + t * tile_bytes + RQ_PREFETCH + l), _MM_HINT_T0);
#endif
        __m512i acc[MAX_ROWS][4], acc2[MAX_ROWS][4]; /* two dependency chains, summed after */
        for (int r = 0; r < ROWS; r++)
            for (int t = 0; t < NT; t++) acc2[r][t] = _mm512_setzero_si512();
        if (FMT == RILLET_WEIGHT_Q8) {
            for (int r = 0; r < ROWS; r++) {
                const __m512i init = _mm512_set1_epi32(-128 * xsum[r * nb + b]);
                for (int t = 0; t < NT; t++) acc[r][t] = init;
            }
            for (int g = 0; g < 8; g++) {
                __m512i wv[4];
                for (int t = 0; t < NT; t++) wv[t] = _mm512_loadu_si512((const void *)(qb + t * tile_bytes + g * 64));
                for (int r = 0; r < ROWS; r++) {
                    int32_t x4;
                    memcpy(&x4, xb + r * k + 4 * g, 4);
                    const __m512i xv = _mm512_set1_epi32(x4);
                    for (int t = 0; t < NT; t++) {
                        if (g & 1) acc2[r][t] = _mm512_dpbusd_epi32(acc2[r][t], wv[t], xv);
                        else acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], wv[t], xv);
                    }
                }
            }
        } else {
            const __m512i low = _mm512_set1_epi8(0x0f);
            for (int r = 0; r < ROWS; r++)
                for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_si512();
            for (int g = 0; g < 4; g++) {
                __m512i lo[4], hi[4];
                for (int t = 0; t < NT; t++) {
                    const __m512i v = _mm512_loadu_si512((const void *)(qb + t * tile_bytes + g * 64));
                    lo[t] = _mm512_and_si512(v, low);
                    hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                }
                for (int r = 0; r < ROWS; r++) {
                    int32_t xl, xh;
                    memcpy(&xl, xb + r * k + 4 * g, 4);
                    memcpy(&xh, xb + r * k + 16 + 4 * g, 4);
                    const __m512i vl = _mm512_set1_epi32(xl), vh = _mm512_set1_epi32(xh);
                    for (int t = 0; t < NT; t++) {
                        acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], lo[t], vl);
                        acc2[r][t] = _mm512_dpbusd_epi32(acc2[r][t], hi[t], vh);
                    }
                }
            }
        }
        __m512 s[4], mn[4];
        for (int t = 0; t < NT; t++) {
            const uint8_t *mt = meta + t * tile_bytes + b * mbytes;
            s[t] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)mt));
            if (FMT == RILLET_WEIGHT_Q4) mn[t] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mt + 32)));
        }
        for (int r = 0; r < ROWS; r++) {
            const __m512 dx = _mm512_set1_ps(xs[r * nb + b]);
            const __m512 sx = _mm512_set1_ps((float)xsum[r * nb + b]);
            for (int t = 0; t < NT; t++) {
                __m512 v = _mm512_mul_ps(s[t], _mm512_cvtepi32_ps(_mm512_add_epi32(acc[r][t], acc2[r][t])));
                if (FMT == RILLET_WEIGHT_Q4) v = _mm512_fmadd_ps(mn[t], sx, v);
                tot[r][t] = _mm512_fmadd_ps(dx, v, tot[r][t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) {
        const int64_t left = n_left - (int64_t)t * QT;
        const int count = left >= QT ? QT : (int)left;
        for (int r = 0; r < ROWS; r++) {
            store8_bf16(_mm512_castps512_ps256(tot[r][t]), bias ? bias + t * QT : NULL, y + r * n + t * QT, count < 8 ? count : 8);
            if (count > 8)
                store8_bf16(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(tot[r][t]), 1)),
                            bias ? bias + t * QT + 8 : NULL, y + r * n + t * QT + 8, count - 8);
        }
    }
}

#elif defined(RQ_AVX2)

/* Integer adds are associative, so GCC may reorder the unrolled groups of a block into "all
   products first, then a sum tree", spilling dozens of registers. An empty asm that takes each
   accumulator in a register ends every group: the sums then run in program order. */
#define RQ_KEEP(ACC, ROWS, UNITS)                                       \
    for (int r_ = 0; r_ < (ROWS); r_++)                                 \
        for (int u_ = 0; u_ < (UNITS); u_++) __asm__("" : "+x"(ACC[r_][u_]))

/* AVX2 works on half tiles (8 outputs, one ymm): NH halves x ROWS rows per register block. */
#ifndef MAX_NH
#define MAX_NH 2
#endif
#ifndef MAX_ROWS
#define MAX_ROWS 4
#endif

static inline __attribute__((always_inline)) void micro_halves(
    const int FMT, const uint8_t *w, int64_t tile_bytes, int64_t nb, const int8_t *xq, int64_t k,
    const float *xs, const int32_t *xsum, const uint16_t *bias, uint16_t *y, int64_t n, int64_t n_left,
    int h0, const int ROWS, const int NH)
{
    const int64_t qbytes = FMT == RILLET_WEIGHT_Q8 ? 512 : 256, mbytes = FMT == RILLET_WEIGHT_Q8 ? 32 : 64;
    const uint8_t *qbase[4], *mbase[4];
    for (int h = 0; h < NH; h++) {
        qbase[h] = w + ((h0 + h) / 2) * tile_bytes + ((h0 + h) % 2) * 32;
        mbase[h] = w + ((h0 + h) / 2) * tile_bytes + nb * qbytes + ((h0 + h) % 2) * 16;
    }
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256 tot[MAX_ROWS][4];
    for (int r = 0; r < ROWS; r++)
        for (int h = 0; h < NH; h++) tot[r][h] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *xb = xq + b * QB;
#if RQ_PREFETCH
        for (int h = 0; h < NH; h++)
            if (h == 0 || (h0 + h) % 2 == 0)  /* a 64-byte line holds both halves of a group */
                for (int64_t l = 0; l < qbytes; l += 64) _mm_prefetch((const char *)(qbase[h] + b * qbytes + RQ_PREFETCH + l), _MM_HINT_T0);
#endif
        __m256i acc[MAX_ROWS][4]; /* Q8: int32 dots; Q4: int16 pair sums */
        for (int r = 0; r < ROWS; r++)
            for (int h = 0; h < NH; h++) acc[r][h] = _mm256_setzero_si256();
        if (FMT == RILLET_WEIGHT_Q8) {
            for (int g = 0; g < 8; g += 2) { /* two groups a step: a shorter add chain */
                __m256i w0[4], a0[4], w1[4], a1[4];
                for (int h = 0; h < NH; h++) {
                    w0[h] = _mm256_loadu_si256((const __m256i *)(qbase[h] + b * qbytes + g * 64));
                    w1[h] = _mm256_loadu_si256((const __m256i *)(qbase[h] + b * qbytes + g * 64 + 64));
                    a0[h] = _mm256_abs_epi8(w0[h]);
                    a1[h] = _mm256_abs_epi8(w1[h]);
                }
                for (int r = 0; r < ROWS; r++) {
                    int32_t x0, x1;
                    memcpy(&x0, xb + r * k + 4 * g, 4);
                    memcpy(&x1, xb + r * k + 4 * g + 4, 4);
                    const __m256i v0 = _mm256_set1_epi32(x0), v1 = _mm256_set1_epi32(x1);
                    for (int h = 0; h < NH; h++) {
                        const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(a0[h], _mm256_sign_epi8(v0, w0[h])), ones16);
                        const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(a1[h], _mm256_sign_epi8(v1, w1[h])), ones16);
                        acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_add_epi32(p0, p1));
                    }
                }
                RQ_KEEP(acc, ROWS, NH);
            }
        } else {
            const __m256i low = _mm256_set1_epi8(0x0f);
            for (int g = 0; g < 4; g++) {
                __m256i lo[4], hi[4];
                for (int h = 0; h < NH; h++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(qbase[h] + b * qbytes + g * 64));
                    lo[h] = _mm256_and_si256(v, low);
                    hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                }
                for (int r = 0; r < ROWS; r++) {
                    int32_t xl, xh;
                    memcpy(&xl, xb + r * k + 4 * g, 4);
                    memcpy(&xh, xb + r * k + 16 + 4 * g, 4);
                    const __m256i vl = _mm256_set1_epi32(xl), vh = _mm256_set1_epi32(xh);
                    for (int h = 0; h < NH; h++)
                        acc[r][h] = _mm256_add_epi16(acc[r][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], vl),
                                                                                 _mm256_maddubs_epi16(hi[h], vh)));
                }
                RQ_KEEP(acc, ROWS, NH);
            }
        }
        __m256 s[4], mn[4];
        for (int h = 0; h < NH; h++) {
            const uint8_t *mt = mbase[h] + b * mbytes;
            s[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)mt));
            if (FMT == RILLET_WEIGHT_Q4) mn[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mt + 32)));
        }
        for (int r = 0; r < ROWS; r++) {
            const __m256 dx = _mm256_set1_ps(xs[r * nb + b]);
            const __m256 sx = _mm256_set1_ps((float)xsum[r * nb + b]);
            for (int h = 0; h < NH; h++) {
                const __m256i d32 = FMT == RILLET_WEIGHT_Q8 ? acc[r][h] : _mm256_madd_epi16(acc[r][h], ones16);
                __m256 v = _mm256_mul_ps(s[h], _mm256_cvtepi32_ps(d32));
                if (FMT == RILLET_WEIGHT_Q4) v = _mm256_fmadd_ps(mn[h], sx, v);
                tot[r][h] = _mm256_fmadd_ps(dx, v, tot[r][h]);
            }
        }
    }
    for (int h = 0; h < NH; h++) {
        const int64_t left = n_left - (int64_t)h * 8;
        if (left <= 0) break;
        const int count = left >= 8 ? 8 : (int)left;
        for (int r = 0; r < ROWS; r++)
            store8_bf16(tot[r][h], bias ? bias + h * 8 : NULL, y + r * n + h * 8, count);
    }
}

#elif defined(RQ_NEON)

#define MAX_NT 1
#define MAX_ROWS 3

static inline __attribute__((always_inline)) void micro(
    const int FMT, const uint8_t *w, int64_t tile_bytes, int64_t nb, const int8_t *xq, int64_t k,
    const float *xs, const int32_t *xsum, const uint16_t *bias, uint16_t *y, int64_t n, int64_t n_left,
    const int ROWS, const int NT)
{
    (void)NT;
    const int64_t qbytes = FMT == RILLET_WEIGHT_Q8 ? 512 : 256, mbytes = FMT == RILLET_WEIGHT_Q8 ? 32 : 64;
    const uint8_t *meta = w + nb * qbytes;
    float32x4_t tot[MAX_ROWS][4];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < 4; c++) tot[r][c] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qb = w + b * qbytes;
        const int8_t *xb = xq + b * QB;
        int32x4_t acc[MAX_ROWS][4]; /* outputs 4c .. 4c+3 */
#if defined(__ARM_FEATURE_DOTPROD)
        for (int r = 0; r < ROWS; r++) {
            /* Q4 runs on q - 8: dot(q, x) = dot(q - 8, x) + 8 sum(x) */
            const int32x4_t init = vdupq_n_s32(FMT == RILLET_WEIGHT_Q4 ? 8 * xsum[r * nb + b] : 0);
            for (int c = 0; c < 4; c++) acc[r][c] = init;
        }
        int8x16_t xv[MAX_ROWS][2];
        for (int r = 0; r < ROWS; r++) {
            xv[r][0] = vld1q_s8(xb + r * k);
            xv[r][1] = vld1q_s8(xb + r * k + 16);
        }
#define RQ_DOT_LANE(A, W, X, L) vdotq_laneq_s32(A, W, X, L)
        if (FMT == RILLET_WEIGHT_Q8) {
            for (int g = 0; g < 8; g++) {
                int8x16_t wv[4];
                for (int c = 0; c < 4; c++) wv[c] = vld1q_s8((const int8_t *)qb + g * 64 + c * 16);
                for (int r = 0; r < ROWS; r++)
                    for (int c = 0; c < 4; c++) {
                        switch (g & 3) {
                            case 0: acc[r][c] = RQ_DOT_LANE(acc[r][c], wv[c], xv[r][g >> 2], 0); break;
                            case 1: acc[r][c] = RQ_DOT_LANE(acc[r][c], wv[c], xv[r][g >> 2], 1); break;
                            case 2: acc[r][c] = RQ_DOT_LANE(acc[r][c], wv[c], xv[r][g >> 2], 2); break;
                            default: acc[r][c] = RQ_DOT_LANE(acc[r][c], wv[c], xv[r][g >> 2], 3); break;
                        }
                    }
            }
        } else {
            const uint8x16_t low = vdupq_n_u8(0x0f);
            const int8x16_t eight = vdupq_n_s8(8);
            for (int g = 0; g < 4; g++) {
                int8x16_t lo[4], hi[4];
                for (int c = 0; c < 4; c++) {
                    const uint8x16_t v = vld1q_u8(qb + g * 64 + c * 16);
                    lo[c] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, low)), eight);
                    hi[c] = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), eight);
                }
                for (int r = 0; r < ROWS; r++)
                    for (int c = 0; c < 4; c++) {
                        switch (g) {
                            case 0: acc[r][c] = RQ_DOT_LANE(acc[r][c], lo[c], xv[r][0], 0);
                                    acc[r][c] = RQ_DOT_LANE(acc[r][c], hi[c], xv[r][1], 0); break;
                            case 1: acc[r][c] = RQ_DOT_LANE(acc[r][c], lo[c], xv[r][0], 1);
                                    acc[r][c] = RQ_DOT_LANE(acc[r][c], hi[c], xv[r][1], 1); break;
                            case 2: acc[r][c] = RQ_DOT_LANE(acc[r][c], lo[c], xv[r][0], 2);
                                    acc[r][c] = RQ_DOT_LANE(acc[r][c], hi[c], xv[r][1], 2); break;
                            default: acc[r][c] = RQ_DOT_LANE(acc[r][c], lo[c], xv[r][0], 3);
                                     acc[r][c] = RQ_DOT_LANE(acc[r][c], hi[c], xv[r][1], 3); break;
                        }
                    }
            }
        }
#undef RQ_DOT_LANE
#else
        /* No sdot: smull of 8 bytes (2 outputs x 4 inputs) into int16, pairwise-added into int32
           (2 partial sums per output), folded with one vpaddq per 4 outputs at the block end. */
        int32x4_t part[MAX_ROWS][8];
        for (int r = 0; r < ROWS; r++)
            for (int c = 0; c < 8; c++) part[r][c] = vdupq_n_s32(0);
        if (FMT == RILLET_WEIGHT_Q8) {
            for (int g = 0; g < 8; g++) {
                int8x16_t wv[4];
                for (int c = 0; c < 4; c++) wv[c] = vld1q_s8((const int8_t *)qb + g * 64 + c * 16);
                for (int r = 0; r < ROWS; r++) {
                    int32_t x4;
                    memcpy(&x4, xb + r * k + 4 * g, 4);
                    const int8x8_t xd = vreinterpret_s8_s32(vdup_n_s32(x4));
                    for (int c = 0; c < 4; c++) {
                        part[r][2 * c] = vpadalq_s16(part[r][2 * c], vmull_s8(vget_low_s8(wv[c]), xd));
                        part[r][2 * c + 1] = vpadalq_s16(part[r][2 * c + 1], vmull_s8(vget_high_s8(wv[c]), xd));
                    }
                }
            }
        } else {
            /* (q - 8) * x <= 8 * 127: the 8 groups of a block sum in int16 (|sum| <= 8128) */
            int16x8_t p16[MAX_ROWS][8];
            for (int r = 0; r < ROWS; r++)
                for (int c = 0; c < 8; c++) p16[r][c] = vdupq_n_s16(0);
            const uint8x16_t low = vdupq_n_u8(0x0f);
            const int8x16_t eight = vdupq_n_s8(8);
            for (int g = 0; g < 4; g++) {
                int8x16_t lo[4], hi[4];
                for (int c = 0; c < 4; c++) {
                    const uint8x16_t v = vld1q_u8(qb + g * 64 + c * 16);
                    lo[c] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, low)), eight);
                    hi[c] = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), eight);
                }
                for (int r = 0; r < ROWS; r++) {
                    int32_t xl, xh;
                    memcpy(&xl, xb + r * k + 4 * g, 4);
                    memcpy(&xh, xb + r * k + 16 + 4 * g, 4);
                    const int8x8_t dl = vreinterpret_s8_s32(vdup_n_s32(xl)), dh = vreinterpret_s8_s32(vdup_n_s32(xh));
                    for (int c = 0; c < 4; c++) {
                        p16[r][2 * c] = vmlal_s8(p16[r][2 * c], vget_low_s8(lo[c]), dl);
                        p16[r][2 * c] = vmlal_s8(p16[r][2 * c], vget_low_s8(hi[c]), dh);
                        p16[r][2 * c + 1] = vmlal_s8(p16[r][2 * c + 1], vget_high_s8(lo[c]), dl);
                        p16[r][2 * c + 1] = vmlal_s8(p16[r][2 * c + 1], vget_high_s8(hi[c]), dh);
                    }
                }
            }
            for (int r = 0; r < ROWS; r++)
                for (int c = 0; c < 8; c++) part[r][c] = vpaddlq_s16(p16[r][c]);
        }
        for (int r = 0; r < ROWS; r++) {
            const int32x4_t init = vdupq_n_s32(FMT == RILLET_WEIGHT_Q4 ? 8 * xsum[r * nb + b] : 0);
            for (int c = 0; c < 4; c++) acc[r][c] = vaddq_s32(vpaddq_s32(part[r][2 * c], part[r][2 * c + 1]), init);
        }
#endif
        const uint8_t *mt = meta + b * mbytes;
        float32x4_t s[4], mn[4];
        for (int c = 0; c < 4; c++) {
            s[c] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)mt + 4 * c)));
            if (FMT == RILLET_WEIGHT_Q4) mn[c] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)(mt + 32) + 4 * c)));
        }
        for (int r = 0; r < ROWS; r++) {
            const float32x4_t dx = vdupq_n_f32(xs[r * nb + b]);
            const float32x4_t sx = vdupq_n_f32((float)xsum[r * nb + b]);
            for (int c = 0; c < 4; c++) {
                float32x4_t v = vmulq_f32(s[c], vcvtq_f32_s32(acc[r][c]));
                if (FMT == RILLET_WEIGHT_Q4) v = vfmaq_f32(v, mn[c], sx);
                tot[r][c] = vfmaq_f32(tot[r][c], dx, v);
            }
        }
    }
    const int count = n_left >= QT ? QT : (int)n_left;
    for (int r = 0; r < ROWS; r++) {
        float tmp[QT];
        for (int c = 0; c < 4; c++) vst1q_f32(tmp + 4 * c, tot[r][c]);
        store_outputs(tmp, bias, y + r * n, count);
    }
}

#else /* plain C */

#define MAX_NT 1
#define MAX_ROWS 4

static inline void micro(
    const int FMT, const uint8_t *w, int64_t tile_bytes, int64_t nb, const int8_t *xq, int64_t k,
    const float *xs, const int32_t *xsum, const uint16_t *bias, uint16_t *y, int64_t n, int64_t n_left,
    const int ROWS, const int NT)
{
    (void)NT;
    (void)tile_bytes;
    const int64_t qbytes = FMT == RILLET_WEIGHT_Q8 ? 512 : 256, mbytes = FMT == RILLET_WEIGHT_Q8 ? 32 : 64;
    const uint8_t *meta = w + nb * qbytes;
    for (int r = 0; r < ROWS; r++) {
        float tot[QT];
        for (int o = 0; o < QT; o++) tot[o] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *qb = w + b * qbytes;
            const int8_t *x = xq + r * k + b * QB;
            int32_t dot[QT];
            for (int o = 0; o < QT; o++) dot[o] = 0;
            if (FMT == RILLET_WEIGHT_Q8) {
                for (int g = 0; g < 8; g++)
                    for (int o = 0; o < QT; o++)
                        for (int j = 0; j < 4; j++)
                            dot[o] += (int32_t)(int8_t)(qb[(g * QT + o) * 4 + j] ^ Q8_XOR) * x[4 * g + j];
            } else {
                for (int g = 0; g < 4; g++)
                    for (int o = 0; o < QT; o++)
                        for (int j = 0; j < 4; j++) {
                            const uint8_t v = qb[(g * QT + o) * 4 + j];
                            dot[o] += (int32_t)(v & 0x0f) * x[4 * g + j] + (int32_t)(v >> 4) * x[16 + 4 * g + j];
                        }
            }
            const uint16_t *sc = (const uint16_t *)(meta + b * mbytes);
            const float dx = xs[r * nb + b], sx = (float)xsum[r * nb + b];
            for (int o = 0; o < QT; o++) {
                float v = rq_f16_to_f32(sc[o]) * (float)dot[o];
                if (FMT == RILLET_WEIGHT_Q4) v = v + rq_f16_to_f32(sc[QT + o]) * sx;
                tot[o] = tot[o] + dx * v;
            }
        }
        store_outputs(tot, bias, y + r * n, n_left >= QT ? QT : (int)n_left);
    }
}

#endif

/* ---- dispatch: constant ROWS and tile counts at every call of the always-inline kernels ---- */

#if defined(RQ_AVX2)
#define RQ_CALL(FMT, R, U) micro_halves(FMT, w, tile_bytes, nb, xq, k, xs, xsum, bias, y, n, n_left, h0, R, U)
#define RQ_UNIT 8
#define RQ_MAX_UNITS MAX_NH
#ifndef UNITS_M1
#define UNITS_M1 4 /* one row: more independent chains per weight stream */
#endif
#define RQ_UNITS_M1 UNITS_M1
#else
#define RQ_CALL(FMT, R, U) micro(FMT, w, tile_bytes, nb, xq, k, xs, xsum, bias, y, n, n_left, R, U)
#define RQ_UNIT QT
#define RQ_MAX_UNITS MAX_NT
#ifndef UNITS_M1
#define UNITS_M1 MAX_NT
#endif
#define RQ_UNITS_M1 UNITS_M1
#endif

#if MAX_ROWS > 6 || RQ_MAX_UNITS > 4 || RQ_UNITS_M1 > 4
#error "the dispatch below covers up to 6 rows and 4 units"
#endif

#define RQ_UNITS_CAP (RQ_MAX_UNITS > RQ_UNITS_M1 ? RQ_MAX_UNITS : RQ_UNITS_M1)
#define RQ_UNITS(FMT, R)                                  \
    switch (units) {                                      \
        case 1: RQ_CALL(FMT, R, 1); break;               \
        case 2: RQ_CALL(FMT, R, (RQ_UNITS_CAP < 2 ? 1 : 2)); break; \
        case 3: RQ_CALL(FMT, R, (RQ_UNITS_CAP < 3 ? 1 : 3)); break; \
        default: RQ_CALL(FMT, R, RQ_UNITS_CAP); break;   \
    }

#define RQ_ROWS(FMT)                                      \
    switch (rows) {                                       \
        case 1: RQ_UNITS(FMT, 1); break;                 \
        case 2: RQ_UNITS(FMT, (MAX_ROWS < 2 ? 1 : 2)); break; \
        case 3: RQ_UNITS(FMT, (MAX_ROWS < 3 ? 1 : 3)); break; \
        case 4: RQ_UNITS(FMT, (MAX_ROWS < 4 ? 1 : 4)); break; \
        case 5: RQ_UNITS(FMT, (MAX_ROWS < 5 ? 1 : 5)); break; \
        default: RQ_UNITS(FMT, MAX_ROWS); break;         \
    }

static void run_q8(const uint8_t *w, int64_t tile_bytes, int64_t nb, const int8_t *xq, int64_t k, const float *xs,
                   const int32_t *xsum, const uint16_t *bias, uint16_t *y, int64_t n, int64_t n_left, int rows,
                   int units, int h0) {
    (void)units;
    (void)h0;
    RQ_ROWS(RILLET_WEIGHT_Q8)
}

static void run_q4(const uint8_t *w, int64_t tile_bytes, int64_t nb, const int8_t *xq, int64_t k, const float *xs,
                   const int32_t *xsum, const uint16_t *bias, uint16_t *y, int64_t n, int64_t n_left, int rows,
                   int units, int h0) {
    (void)units;
    (void)h0;
    RQ_ROWS(RILLET_WEIGHT_Q4)
}

/* The calling thread's share (an orphaned `omp for`, ending in its barrier): tasks of
   whole tiles handed out one at a time; within a task, register blocks of RQ_MAX_UNITS
   units (tiles, or AVX2 half tiles) x MAX_ROWS rows, all rows of one unit block before the next
   so its weights stay in L1/L2. Which thread or block computes an output never changes it. */
void rillet_linear_quant_part(int32_t format, const void *packed, const uint16_t *bias, const int8_t *xq,
                              const float *xscale, const int32_t *xsum, uint16_t *y, int64_t m, int64_t n,
                              int64_t k) {
    if (format != RILLET_WEIGHT_Q8 && format != RILLET_WEIGHT_Q4) return;
    const int64_t nb = k / QB, tiles = (n + QT - 1) / QT, tile_bytes = rq_tile_bytes(format, k);
    /* ~8 tasks a thread (whole register blocks, 2 to 16 tiles): small layers still split evenly,
       the output head does not pay a scheduling step per tile */
#ifdef _OPENMP
    const int64_t threads = omp_get_num_threads();
#else
    const int64_t threads = 1;
#endif
    int64_t per_task = tiles / (8 * threads);
    per_task = per_task < 2 ? 2 : per_task > 16 ? 16 : per_task;
    const int64_t tasks = (tiles + per_task - 1) / per_task;
    const int64_t units_total = (n + RQ_UNIT - 1) / RQ_UNIT;
    const int64_t units_per_tile = QT / RQ_UNIT;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t u_begin = task * per_task * units_per_tile;
        int64_t u_end = u_begin + per_task * units_per_tile;
        if (u_end > units_total) u_end = units_total;
        const int64_t step = m == 1 ? RQ_UNITS_M1 : RQ_MAX_UNITS;
        for (int64_t u = u_begin; u < u_end; u += step) {
            const int units = (int)(u_end - u < step ? u_end - u : step);
            /* unit u starts at tile u / units_per_tile, half u % units_per_tile (AVX2) */
            const uint8_t *w = (const uint8_t *)packed + (u / units_per_tile) * tile_bytes;
            const int64_t col = u * RQ_UNIT;
            /* Several row blocks: the first streams this unit's weights from memory and the others
               find them in L1. The next unit's weights (this task's next tiles) are asked for into
               L2 meanwhile, a share at each row block, so no row block waits on memory alone. */
            const int64_t next = u + step, row_blocks = (m + MAX_ROWS - 1) / MAX_ROWS;
            const int64_t next_units = next < u_end ? (u_end - next < step ? u_end - next : step) : 0;
            const int64_t next_bytes = (next_units + units_per_tile - 1) / units_per_tile * tile_bytes;
            const uint8_t *ahead = (const uint8_t *)packed + (next / units_per_tile) * tile_bytes;
            const int64_t share = RQ_PREFETCH_NEXT && row_blocks > 1 ? (next_bytes / row_blocks + 63) & ~(int64_t)63 : 0;
            for (int64_t r = 0; r < m; r += MAX_ROWS) {
                const int rows = (int)(m - r < MAX_ROWS ? m - r : MAX_ROWS);
                const int64_t from = (r / MAX_ROWS) * share, to = from + share < next_bytes ? from + share : next_bytes;
                for (int64_t at = from; at < to; at += 64) __builtin_prefetch(ahead + at, 0, 2);
                if (format == RILLET_WEIGHT_Q8)
                    run_q8(w, tile_bytes, nb, xq + r * k, k, xscale + r * nb, xsum + r * nb,
                           bias ? bias + col : NULL, y + r * n + col, n, n - col, rows, units, (int)(u % units_per_tile));
                else
                    run_q4(w, tile_bytes, nb, xq + r * k, k, xscale + r * nb, xsum + r * nb,
                           bias ? bias + col : NULL, y + r * n + col, n, n - col, rows, units, (int)(u % units_per_tile));
            }
        }
    }
}
