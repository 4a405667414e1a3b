/* Decode attention straight from the paged bf16 KV cache, for the CPU.

   One query token per sequence attends over its own context, reading K and V where the cache
   keeps them (no gathered copy), in float32. Work is split over (sequence, KV head) pairs on
   torch's own OpenMP pool (this library links the libgomp torch has already loaded).

   Every sum runs in an order fixed by the sequence's own context length: 16 or 8 float lanes,
   then the lanes added in one fixed order. A sequence's result therefore does not depend on its
   batch mates, however many threads share the work.

   Built and loaded by rillet/models/cpu_kernels.py. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rillet_kernels.h"

#define LANES 16  /* partial sums of softmax denominators and norms */
#define MAX_HEAD_DIM 256
#define MAX_GROUP 16

#define EXP_MIN_ARG -87.0f  /* below it exp underflows float32's normal range */
#define LOG2_E 1.44269504088896341f
/* 2^f for f in [0, 1), highest degree first; every lane width evaluates it the same way. */
static const float EXP2_POLY[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                   5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f};

/* exp(x) for x <= 0 (softmax after subtracting the max): 2^(x log2 e), a degree-6 polynomial for
   the fraction (relative error ~2e-7). Unlike libm's expf it vectorizes (floor by truncation:
   t <= 0 here), and it is the same on every row. */
static inline float exp_nonpositive(float x) {
    x = x < EXP_MIN_ARG ? EXP_MIN_ARG : x;
    const float t = x * LOG2_E;
    const int32_t truncated = (int32_t)t;
    const int32_t whole = truncated - (t < (float)truncated);
    const float f = t - (float)whole;
    float p = EXP2_POLY[0];
    for (int i = 1; i < 7; i++) p = p * f + EXP2_POLY[i];
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)(whole + 127) << 23;
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

/* Two kernels per instruction set, for head_dim d a multiple of 8:
     key scores: scores[g * stride + j] = scale * q_g . k_j for the group's queries against the
                 keys of a block (x86: key_run16 / key_run8, a block's keys together; NEON and
                 plain C: key_scores8, one key row at a time);
     value_run:  acc[g * d + i] += p[g * stride + j] * v[j][i] for the n contiguous rows of a block.
   Each dot product sums in 16 (AVX-512, d a multiple of 16) or 8 lanes, then adds the lanes in a
   fixed tree; each acc element adds its rows in order. Neither depends on other sequences. */

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 load_bf16x16(const uint16_t *p) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* value_run with the accumulators in registers (GROUP and D constants at every call site). */
static inline __attribute__((always_inline)) void value_run_fixed16(
    float *acc, const uint16_t *vp, const float *p, size_t stride, int n, const int GROUP, const int D) {
    __m512 a[GROUP * (D / 16)];
    for (int r = 0; r < GROUP * (D / 16); r++) a[r] = _mm512_loadu_ps(acc + r * 16);
    for (int j = 0; j < n; j++) {
        __m512 v[D / 16];
        for (int c = 0; c < D / 16; c++) v[c] = load_bf16x16(vp + (size_t)j * D + c * 16);
        for (int g = 0; g < GROUP; g++) {
            const __m512 pg = _mm512_set1_ps(p[g * stride + j]);
            for (int c = 0; c < D / 16; c++) a[g * (D / 16) + c] = _mm512_fmadd_ps(pg, v[c], a[g * (D / 16) + c]);
        }
    }
    for (int r = 0; r < GROUP * (D / 16); r++) _mm512_storeu_ps(acc + r * 16, a[r]);
}

static inline int value_run16(float *acc, const uint16_t *vp, const float *p, size_t stride, int n, int group, int d) {
    if (d == 64) {
        switch (group) {
            case 1: value_run_fixed16(acc, vp, p, stride, n, 1, 64); return 1;
            case 2: value_run_fixed16(acc, vp, p, stride, n, 2, 64); return 1;
            case 3: value_run_fixed16(acc, vp, p, stride, n, 3, 64); return 1;
            case 4: value_run_fixed16(acc, vp, p, stride, n, 4, 64); return 1;
        }
    } else if (d == 128) {
        switch (group) {
            case 1: value_run_fixed16(acc, vp, p, stride, n, 1, 128); return 1;
            case 2: value_run_fixed16(acc, vp, p, stride, n, 2, 128); return 1;
        }
    }
    return 0;
}

/* exp_nonpositive in 16 lanes (the same steps: floor, fraction, polynomial, exponent bits). */
static inline __m512 exp_nonpositive16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN_ARG));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(LOG2_E));
    const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, whole);
    __m512 p = _mm512_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[i]));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(whole), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

/* Lane j of the result = the sum of v[j]'s 16 lanes, for 16 vectors: pairs of lanes added
   within 128-bit chunks (unpack ps, then pd), then chunks (two 128-bit shuffles), a fixed tree. */
static inline __m512 lane_sums16(const __m512 *v) {
    __m512 t[8], u[4], x[2];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The scores of n contiguous keys, 16 at a time: each key's 16 lanes of products go through one
   transposing tree for 16 keys (lane_sums16) instead of a horizontal sum each, the dominant cost
   of a decode's attention at batch sizes where the projections are cheap. With AVX512-BF16 the
   products come from vdpbf16ps on the cache's bf16 keys as they are (q is bf16 too, so its float
   copy converts back exactly; the products are exact in float32, the sums round as the FMAs'),
   else from FMAs on each key widened once into registers and used by every query of the group
   (a widened copy in memory instead cost ~20%). D constant at the call sites that matter. */
static inline __attribute__((always_inline)) void key_run16(const float *qf, const uint16_t *kp, int n, int group,
                                                            float scale, float *scores, size_t stride, const int D) {
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int j0 = 0; j0 < n; j0 += 16) {
        const int m = n - j0 < 16 ? n - j0 : 16;
        const __mmask16 keep = (__mmask16)((1u << m) - 1);
        const uint16_t *kj = kp + (size_t)j0 * D;
#if defined(__AVX512BF16__)
        if (D % 32 == 0) {
            for (int g = 0; g < group; g++) {
                __m512bh qb[MAX_HEAD_DIM / 32];
                for (int c = 0; c < D / 32; c++)
                    qb[c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qf + g * D + c * 32 + 16), _mm512_loadu_ps(qf + g * D + c * 32));
                __m512 part[16];
                for (int j = 0; j < 16; j++) {
                    __m512 acc = _mm512_setzero_ps();
                    if (j < m)
                        for (int c = 0; c < D / 32; c++)
                            acc = _mm512_dpbf16_ps(acc, qb[c], (__m512bh)_mm512_loadu_si512((const void *)(kj + (size_t)j * D + c * 32)));
                    part[j] = acc;
                }
                _mm512_mask_storeu_ps(scores + g * stride + j0, keep, _mm512_mul_ps(lane_sums16(part), vscale));
            }
            continue;
        }
#endif
        __m512 part[MAX_GROUP][16];
        for (int j = 0; j < 16; j++) {
            if (j < m) {
                __m512 k[MAX_HEAD_DIM / 16];
                for (int c = 0; c < D / 16; c++) k[c] = load_bf16x16(kj + (size_t)j * D + c * 16);
                for (int g = 0; g < group; g++) {
                    const float *qg = qf + g * D;
                    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);
                    for (int c = 1; c < D / 16; c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * 16), k[c], acc);
                    part[g][j] = acc;
                }
            } else {
                for (int g = 0; g < group; g++) part[g][j] = _mm512_setzero_ps();
            }
        }
        for (int g = 0; g < group; g++)
            _mm512_mask_storeu_ps(scores + g * stride + j0, keep, _mm512_mul_ps(lane_sums16(part[g]), vscale));
    }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_SIMD8 1

static inline __m256 load_bf16x8(const uint16_t *p) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* GB queries x CH 8-wide chunks of acc in registers for the block's n rows. */
static inline __attribute__((always_inline)) void value_tile8(
    float *acc, const uint16_t *vp, const float *p, size_t stride, int n, int d, const int GB, const int CH) {
    __m256 a[3][4];
    for (int g = 0; g < GB; g++)
        for (int c = 0; c < CH; c++) a[g][c] = _mm256_loadu_ps(acc + g * d + c * 8);
    for (int j = 0; j < n; j++) {
        __m256 v[4];
        for (int c = 0; c < CH; c++) v[c] = load_bf16x8(vp + (size_t)j * d + c * 8);
        for (int g = 0; g < GB; g++) {
            const __m256 pg = _mm256_set1_ps(p[g * stride + j]);
            for (int c = 0; c < CH; c++) a[g][c] = _mm256_fmadd_ps(pg, v[c], a[g][c]);
        }
    }
    for (int g = 0; g < GB; g++)
        for (int c = 0; c < CH; c++) _mm256_storeu_ps(acc + g * d + c * 8, a[g][c]);
}

#define TILE8(G, C) value_tile8(acc + g * d + c * 8, vp + c * 8, p + g * stride, stride, n, d, G, C)

static inline void value_run8(float *acc, const uint16_t *vp, const float *p, size_t stride, int n, int group, int d) {
    for (int g = 0; g < group; g += 3) {
        const int gb = group - g < 3 ? group - g : 3;
        for (int c = 0; c < d / 8; c += 4) {
            const int ch = d / 8 - c < 4 ? d / 8 - c : 4;
            switch (gb * 4 + ch) {
                case 1 * 4 + 1: TILE8(1, 1); break;
                case 1 * 4 + 2: TILE8(1, 2); break;
                case 1 * 4 + 3: TILE8(1, 3); break;
                case 1 * 4 + 4: TILE8(1, 4); break;
                case 2 * 4 + 1: TILE8(2, 1); break;
                case 2 * 4 + 2: TILE8(2, 2); break;
                case 2 * 4 + 3: TILE8(2, 3); break;
                case 2 * 4 + 4: TILE8(2, 4); break;
                case 3 * 4 + 1: TILE8(3, 1); break;
                case 3 * 4 + 2: TILE8(3, 2); break;
                case 3 * 4 + 3: TILE8(3, 3); break;
                default: TILE8(3, 4); break;
            }
        }
    }
}

/* exp_nonpositive in 8 lanes (see exp_nonpositive16). */
static inline __m256 exp_nonpositive8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN_ARG));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(LOG2_E));
    const __m256 whole = _mm256_floor_ps(t);
    const __m256 f = _mm256_sub_ps(t, whole);
    __m256 p = _mm256_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[i]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(whole), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* Lane j of the result = the sum of v[j]'s 8 lanes, for 8 vectors (a fixed tree, as lane_sums16). */
static inline __m256 lane_sums8(const __m256 *v) {
    __m256 t[4], u[2];
    for (int i = 0; i < 4; i++)
        t[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; i++) {
        const __m256d a = _mm256_castps_pd(t[2 * i]), b = _mm256_castps_pd(t[2 * i + 1]);
        u[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}

/* The scores of n contiguous keys, 8 at a time, summed by lane_sums8 (see key_run16). */
static inline __attribute__((always_inline)) void key_run8(const float *qf, const uint16_t *kp, int n, int group,
                                                           float scale, float *scores, size_t stride, const int D) {
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int j0 = 0; j0 < n; j0 += 8) {
        const int m = n - j0 < 8 ? n - j0 : 8;
        const uint16_t *kj = kp + (size_t)j0 * D;
        __m256 part[MAX_GROUP][8];
        for (int j = 0; j < 8; j++) {
            if (j < m) {
                __m256 k[MAX_HEAD_DIM / 8];
                for (int c = 0; c < D / 8; c++) k[c] = load_bf16x8(kj + (size_t)j * D + c * 8);
                for (int g = 0; g < group; g++) {
                    const float *qg = qf + g * D;
                    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qg), k[0]);
                    for (int c = 1; c < D / 8; c++) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + c * 8), k[c], acc);
                    part[g][j] = acc;
                }
            } else {
                for (int g = 0; g < group; g++) part[g][j] = _mm256_setzero_ps();
            }
        }
        for (int g = 0; g < group; g++) {
            const __m256 sums = _mm256_mul_ps(lane_sums8(part[g]), vscale);
            if (m == 8) {
                _mm256_storeu_ps(scores + g * stride + j0, sums);
            } else {
                float tmp[8];
                _mm256_storeu_ps(tmp, sums);
                memcpy(scores + g * stride + j0, tmp, sizeof(float) * (size_t)m);
            }
        }
    }
}

#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define HAVE_SIMD8 1

static inline float32x4_t load_bf16x4(const uint16_t *p) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
}

static inline void key_scores8(const float *qf, const uint16_t *kp, int group, int d, float scale,
                               float *scores, size_t stride) {
    float kf[MAX_HEAD_DIM];
    for (int c = 0; c < d / 4; c++) vst1q_f32(kf + c * 4, load_bf16x4(kp + c * 4));
    for (int g = 0; g < group; g++) {
        const float *qg = qf + g * d;
        float32x4_t lo = vmulq_f32(vld1q_f32(qg), vld1q_f32(kf));
        float32x4_t hi = vmulq_f32(vld1q_f32(qg + 4), vld1q_f32(kf + 4));
        for (int c = 8; c < d; c += 8) {
            lo = vfmaq_f32(lo, vld1q_f32(qg + c), vld1q_f32(kf + c));
            hi = vfmaq_f32(hi, vld1q_f32(qg + c + 4), vld1q_f32(kf + c + 4));
        }
        const float32x4_t s = vaddq_f32(lo, hi);                    /* lanes (l, l+4) */
        const float32x2_t t = vadd_f32(vget_low_f32(s), vget_high_f32(s));  /* (l, l+2) */
        scores[g * stride] = (vget_lane_f32(t, 0) + vget_lane_f32(t, 1)) * scale;
    }
}

static inline void value_run8(float *acc, const uint16_t *vp, const float *p, size_t stride, int n, int group, int d) {
    for (int j = 0; j < n; j++)
        for (int c = 0; c < d; c += 8) {
            const float32x4_t v0 = load_bf16x4(vp + (size_t)j * d + c), v1 = load_bf16x4(vp + (size_t)j * d + c + 4);
            for (int g = 0; g < group; g++) {
                float *a = acc + g * d + c;
                const float pg = p[g * stride + j];
                vst1q_f32(a, vfmaq_n_f32(vld1q_f32(a), v0, pg));
                vst1q_f32(a + 4, vfmaq_n_f32(vld1q_f32(a + 4), v1, pg));
            }
        }
}
#endif

#ifndef HAVE_SIMD8
/* Plain C, the same 8 lanes and tree as the SIMD paths (the compiler may vectorize it). */
static inline void key_scores8(const float *qf, const uint16_t *kp, int group, int d, float scale,
                               float *scores, size_t stride) {
    float kf[MAX_HEAD_DIM];
    for (int i = 0; i < d; i++) kf[i] = bf16_to_f32(kp[i]);
    for (int g = 0; g < group; g++) {
        float lanes[8];
        for (int l = 0; l < 8; l++) lanes[l] = qf[g * d + l] * kf[l];
        for (int i = 8; i < d; i += 8)
            for (int l = 0; l < 8; l++) lanes[l] += qf[g * d + i + l] * kf[i + l];
        for (int width = 4; width > 0; width /= 2)
            for (int l = 0; l < width; l++) lanes[l] += lanes[l + width];
        scores[g * stride] = lanes[0] * scale;
    }
}

static inline void value_run8(float *acc, const uint16_t *vp, const float *p, size_t stride, int n, int group, int d) {
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
#endif

static inline void value_run(float *acc, const uint16_t *vp, const float *p, size_t stride, int n, int group, int d) {
#if defined(__AVX512F__)
    if (d % 16 == 0 && value_run16(acc, vp, p, stride, n, group, d)) return;
#endif
    value_run8(acc, vp, p, stride, n, group, d);
}

/* s[pos] = exp(s[pos] - m) for pos < n (every s[pos] <= m). A scalar loop with the bit tricks of
   exp_nonpositive does not vectorize, and was a third of a decode's attention time. */
static inline void exp_shifted(float *s, int n, float m) {
    int pos = 0;
#if defined(__AVX512F__)
    const __m512 vm = _mm512_set1_ps(m);
    for (; pos + 16 <= n; pos += 16)
        _mm512_storeu_ps(s + pos, exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(s + pos), vm)));
    if (pos < n) {
        const __mmask16 keep = (__mmask16)((1u << (n - pos)) - 1);
        _mm512_mask_storeu_ps(s + pos, keep, exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, s + pos), vm)));
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 vm = _mm256_set1_ps(m);
    for (; pos + 8 <= n; pos += 8)
        _mm256_storeu_ps(s + pos, exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + pos), vm)));
#endif
#pragma omp simd
    for (int i = pos; i < n; i++) s[i] = exp_nonpositive(s[i] - m);
}

/* Scores of the n contiguous keys of one block: scores[g * stride + j] = scale * q_g . k_j. */
static inline void key_run(const float *qf, const uint16_t *kp, int n, int group, int d, float scale,
                           float *scores, size_t stride) {
#if defined(__AVX512F__)
    if (d == 64) { key_run16(qf, kp, n, group, scale, scores, stride, 64); return; }
    if (d == 128) { key_run16(qf, kp, n, group, scale, scores, stride, 128); return; }
    if (d % 16 == 0) { key_run16(qf, kp, n, group, scale, scores, stride, d); return; }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (d == 64) { key_run8(qf, kp, n, group, scale, scores, stride, 64); return; }
    if (d == 128) { key_run8(qf, kp, n, group, scale, scores, stride, 128); return; }
    key_run8(qf, kp, n, group, scale, scores, stride, d);  /* d is a multiple of 8 */
#else
    for (int j = 0; j < n; j++) key_scores8(qf, kp + (size_t)j * d, group, d, scale, scores + j, stride);
#endif
}

int rillet_max_head_dim(void) { return MAX_HEAD_DIM; }
int rillet_max_group(void) { return MAX_GROUP; }

/* Blocks ahead whose keys are prefetched (0: none, the hardware prefetchers alone; the
   comparison tests/kernels/bench_attention.c makes). One was as fast as two or four here. */
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 1
#endif

/* Ask for `bytes` from p into the cache (locality 3: L1, 2: L2), a 64-byte line at a time. */
static inline void prefetch_block(const uint16_t *p, int64_t bytes, const int locality) {
    for (int64_t at = 0; at < bytes; at += 64) {
        if (locality == 3)
            __builtin_prefetch((const char *)p + at, 0, 3);
        else
            __builtin_prefetch((const char *)p + at, 0, 2);
    }
}

void rillet_paged_attention_task(const uint16_t *q_group, const uint16_t *k_head, const uint16_t *v_head,
                                 const int32_t *table, int32_t ctx, int32_t group, int32_t head_dim,
                                 int32_t block_size, float scale, uint16_t *out_group, float **scores,
                                 size_t *capacity) {
    const int d = head_dim;
    const size_t need = (size_t)group * (size_t)ctx;
    if (need > *capacity) {
        free(*scores);
        *capacity = need;
        *scores = (float *)malloc(need * sizeof(float));
    }
    float *s_all = *scores;
    float qf[MAX_GROUP * MAX_HEAD_DIM];
    float acc[MAX_GROUP * MAX_HEAD_DIM];
    for (int i = 0; i < group * d; i++) qf[i] = bf16_to_f32(q_group[i]);

    /* Blocks are block_size contiguous slots: walk them block by block. A sequence's blocks lie
       apart in the cache, so the hardware prefetchers stop at each block's end; the keys of the
       block PREFETCH_BLOCKS ahead are asked for here, and each block's values (read by the pass
       after the softmax) as its keys are. */
    const int blocks = (ctx + block_size - 1) / block_size;
    const int64_t block_bytes = (int64_t)block_size * d * (int64_t)sizeof(uint16_t);
    for (int b = 0; b < PREFETCH_BLOCKS && b < blocks; b++)
        prefetch_block(k_head + (int64_t)table[b] * block_size * d, block_bytes, 3);
    for (int b = 0, start = 0; start < ctx; b++, start += block_size) {
        if (PREFETCH_BLOCKS > 0 && b + PREFETCH_BLOCKS < blocks)
            prefetch_block(k_head + (int64_t)table[b + PREFETCH_BLOCKS] * block_size * d, block_bytes, 3);
        if (PREFETCH_BLOCKS > 0)
            prefetch_block(v_head + (int64_t)table[b] * block_size * d, block_bytes, 2);
        const uint16_t *kp = k_head + (int64_t)table[b] * block_size * d;
        const int n = ctx - start < block_size ? ctx - start : block_size;
        key_run(qf, kp, n, group, d, scale, s_all + start, (size_t)ctx);
    }
    float inv_sum[MAX_GROUP];
    for (int g = 0; g < group; g++) {
        float *s = s_all + (size_t)g * ctx;
        float m = s[0];
#pragma omp simd reduction(max : m)
        for (int pos = 1; pos < ctx; pos++) m = s[pos] > m ? s[pos] : m;  /* exact in any order */
        exp_shifted(s, ctx, m);
        inv_sum[g] = 1.0f / sum_lanes(s, ctx);
    }
    memset(acc, 0, sizeof(float) * (size_t)group * d);
    for (int start = 0; start < ctx; start += block_size) {
        const uint16_t *vp = v_head + (int64_t)table[start / block_size] * block_size * d;
        const int n = ctx - start < block_size ? ctx - start : block_size;
        value_run(acc, vp, s_all + start, (size_t)ctx, n, group, d);
    }
    for (int g = 0; g < group; g++)
        for (int i = 0; i < d; i++) out_group[g * d + i] = f32_to_bf16(acc[g * d + i] * inv_sum[g]);
}

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
            rillet_paged_attention_task(q + (int64_t)b * q_row_stride + (int64_t)h * group * d,
                                        k_cache + (int64_t)h * num_slots * d, v_cache + (int64_t)h * num_slots * d,
                                        block_tables + (int64_t)b * max_blocks, context_lens[b], group, d,
                                        block_size, scale, out + (int64_t)b * num_heads * d + (int64_t)h * group * d,
                                        &scores, &capacity);
        }
    }
    free(scores);
}

/* q: row b of the step at q + b * q_row_stride, heads of head_dim contiguous (bf16).
   k_cache, v_cache: [num_kv_heads, num_slots, head_dim] bf16.
   block_tables: [num_seqs, max_blocks] int32; context_lens: [num_seqs] int32 (>= 1).
   out: [num_seqs, num_heads * head_dim] bf16. num_threads: torch's (the pool is shared).
   head_dim must be a multiple of 8 and at most MAX_HEAD_DIM; num_heads / num_kv_heads at
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
