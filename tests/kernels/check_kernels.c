/* Check harness for rillet's CPU kernels (every .c in src/rillet/models/kernels), against the
   contract in rillet_kernels.h. A standalone program: build it with every kernel source, for any instruction
   set (the same file for avx512 / avx2 / neon / generic builds, with or without OpenMP), run it,
   read one line per check and a last line `N passed, M failed`; the exit status is 1 on any
   failure. tests/unit/test_kernels_c_harness.py builds and runs it per ISA, and for aarch64
   under qemu-user.

       K=src/rillet/models/kernels
       cc -O2 -fopenmp -I$K tests/kernels/check_kernels.c $K/[a-z]*.c -lm -o check_kernels
       ./check_kernels [--strict] [--only TEXT] [--exclude TEXT]

   Inputs come from a PRNG seeded by each check's name; every kernel result is compared with a
   naive double-precision reference written here. Tolerances are bounds, not guesses (u = 2^-24, the
   float32 unit roundoff; every output is bf16, whose unit roundoff is 2^-8):

     |got - ref| <= 2^-8 |ref| + (1 + 2^-8) E

   where 2^-8 |ref| is the one rounding of the result to bf16 and E bounds the float32 error of
   the computation as the header specifies it (each bound is stated where it is computed).
   Everything the header promises to be order-independent is compared bit for bit instead: a
   row's result alone vs in a batch, and across thread counts. Reads outside the inputs show as
   NaN (strided gaps, unused cache slots), writes outside the outputs as changed sentinels.

   Q8/Q4 scales and mins are float16-exact values in most checks, so that those test the
   arithmetic; the checks named "float32 scales" test the header's float scales apart
   (linear_quant.c packs them as float16: a known deviation the pytest marks xfail).

   Functions the tree does not define yet are declared weak: their checks print SKIP (with
   --strict they FAIL), so the harness builds while the sources are still being written. */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rillet_kernels.h"

/* Public wrappers outside the header (paged_attention.c); called only where defined. */
void rillet_paged_decode_attention_bf16(
    const uint16_t *q, int64_t q_row_stride, const uint16_t *k_cache, const uint16_t *v_cache,
    int64_t num_slots, const int32_t *block_tables, int32_t max_blocks, const int32_t *context_lens,
    int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
    float scale, uint16_t *out, int32_t num_threads);
void rillet_add_rms_norm_bf16(uint16_t *residual, const uint16_t *x, const uint16_t *weight, uint16_t *out,
                              int64_t rows, int32_t dim, float eps, int32_t num_threads);

#pragma weak rillet_weight_packed_bytes
#pragma weak rillet_weight_pack
#pragma weak rillet_linear_scratch_bytes
#pragma weak rillet_linear_part
#pragma weak rillet_linear
#pragma weak rillet_bf16_packed_bytes
#pragma weak rillet_bf16_pack
#pragma weak rillet_linear_bf16_part
#pragma weak rillet_quant_packed_bytes
#pragma weak rillet_quant_pack
#pragma weak rillet_quantize_rows_part
#pragma weak rillet_linear_quant_part
#pragma weak rillet_paged_attention_part
#pragma weak rillet_add_rms_norm_row
#pragma weak rillet_paged_decode_attention_bf16
#pragma weak rillet_add_rms_norm_bf16
#pragma weak rillet_argmax_rows

#define U 0x1p-24     /* float32 unit roundoff */
#define U_BF16 0x1p-8 /* bf16 unit roundoff */
#define BF16_NAN 0x7fc0u

/* ---- Reporting ----------------------------------------------------------------------------- */

static int passed, failed, skipped, strict;
static const char *only, *exclude; /* substrings of check names (--only / --exclude) */

static uint64_t rng_state;

/* Whether a check of this name runs at all under --only / --exclude. A check that runs seeds the
   PRNG from its name, so its inputs do not depend on which other checks ran. */
static int selected(const char *name) {
    if ((only != NULL && strstr(name, only) == NULL) || (exclude != NULL && strstr(name, exclude) != NULL)) return 0;
    rng_state = 0xcbf29ce484222325ull;  /* FNV-1a */
    for (const char *c = name; *c; c++) rng_state = (rng_state ^ (unsigned char)*c) * 0x100000001b3ull;
    return 1;
}

static void report(int ok, const char *name, const char *detail) {
    if (ok) passed++; else failed++;
    printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name, detail[0] ? ": " : "", detail);
    fflush(stdout);
}

/* A check whose kernel this build does not define: SKIP, or FAIL under --strict. */
static void missing(const char *name, const char *symbols) {
    if (strict) {
        char detail[256];
        snprintf(detail, sizeof detail, "not defined by the kernel sources: %s", symbols);
        report(0, name, detail);
        return;
    }
    skipped++;
    printf("SKIP %s: not defined by the kernel sources: %s\n", name, symbols);
    fflush(stdout);
}

/* ---- Inputs -------------------------------------------------------------------------------- */

static uint64_t next_u64(void) {  /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double uniform(double lo, double hi) {  /* [lo, hi) */
    return lo + (hi - lo) * (double)(next_u64() >> 11) * 0x1p-53;
}

static int64_t randint(int64_t lo, int64_t hi) {  /* [lo, hi] */
    return lo + (int64_t)(next_u64() % (uint64_t)(hi - lo + 1));
}

static uint16_t bf(double v) { return f32_to_bf16((float)v); }
static double fb(uint16_t h) { return (double)bf16_to_f32(h); }

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (p == NULL) { fprintf(stderr, "out of memory\n"); exit(2); }
    return p;
}

/* 64-byte aligned, `bytes` rounded up, with `guard` bytes of 0xA5 after them to catch overruns. */
static void *guarded(size_t bytes, size_t guard) {
    size_t total = (bytes + guard + 63) / 64 * 64;
    unsigned char *p = (unsigned char *)aligned_alloc(64, total);
    if (p == NULL) { fprintf(stderr, "out of memory\n"); exit(2); }
    memset(p, 0, bytes);
    memset(p + bytes, 0xA5, total - bytes);
    return p;
}

static int guard_intact(const void *p, size_t bytes, size_t guard) {
    const unsigned char *c = (const unsigned char *)p + bytes;
    for (size_t i = 0; i < guard; i++)
        if (c[i] != 0xA5) return 0;
    return 1;
}

/* Outputs live inside a buffer of sentinels: Y_PAD elements before and after must stay put. */
#define Y_PAD 64
#define Y_SENTINEL 0x7bcdu

static uint16_t *y_alloc(int64_t count) {
    uint16_t *b = (uint16_t *)xmalloc(sizeof(uint16_t) * (size_t)(count + 2 * Y_PAD));
    for (int64_t i = 0; i < count + 2 * Y_PAD; i++) b[i] = Y_SENTINEL;
    return b + Y_PAD;
}

static int y_sentinels_intact(const uint16_t *y, int64_t count) {
    for (int i = 1; i <= Y_PAD; i++)
        if (y[-i] != Y_SENTINEL || y[count + i - 1] != Y_SENTINEL) return 0;
    return 1;
}

static void y_free(uint16_t *y) { free(y - Y_PAD); }

/* ---- Comparison ---------------------------------------------------------------------------- */

/* got (bf16) vs ref within tol, element by element; NaN never passes. Describes the first
   failure in detail, else the worst err/tol. Returns 1 when all pass. */
static int compare(const uint16_t *got, const double *ref, const double *tol, int64_t rows, int64_t cols,
                   char *detail, size_t size) {
    int64_t bad = 0, first = -1;
    double worst = 0.0;
    for (int64_t i = 0; i < rows * cols; i++) {
        const double g = fb(got[i]), err = fabs(g - ref[i]);
        if (!(err <= tol[i])) {
            if (first < 0) first = i;
            bad++;
        } else if (tol[i] > 0 && err / tol[i] > worst) {
            worst = err / tol[i];
        }
    }
    if (bad) {
        snprintf(detail, size, "%lld of %lld wrong, first at row %lld col %lld: got %.9g (0x%04x), expected %.9g, tol %.3g",
                 (long long)bad, (long long)(rows * cols), (long long)(first / cols), (long long)(first % cols),
                 fb(got[first]), got[first], ref[first], tol[first]);
        return 0;
    }
    snprintf(detail, size, "max err/tol %.3f", worst);
    return 1;
}

/* Bit-exact equality of two bf16 arrays; describes the first difference. */
static int same_bits(const uint16_t *a, const uint16_t *b, int64_t rows, int64_t cols, char *detail, size_t size,
                     const char *what) {
    for (int64_t i = 0; i < rows * cols; i++)
        if (a[i] != b[i]) {
            snprintf(detail, size, "%s: row %lld col %lld differs: 0x%04x (%.9g) vs 0x%04x (%.9g)", what,
                     (long long)(i / cols), (long long)(i % cols), a[i], fb(a[i]), b[i], fb(b[i]));
            return 0;
        }
    return 1;
}

/* ---- Linear: weights, references ----------------------------------------------------------- */

typedef struct {
    int32_t format;
    int64_t n, k;
    uint16_t *w_bf16;    /* [n, k] */
    int8_t *q8;          /* [n, k] */
    uint8_t *q4;         /* [n, k] */
    float *scales, *mins; /* [n, k / 32] */
    uint16_t *bias;      /* [n] or NULL */
} weights;

static const char *format_name(int32_t f) { return f == RILLET_WEIGHT_BF16 ? "bf16" : f == RILLET_WEIGHT_Q8 ? "q8" : "q4"; }

/* v rounded to the nearest value float16 represents (normal range; ties to even): packing stores
   scales and mins so (rillet_kernels.h), and the reference rounds them the same way. Most checks
   use such values already; the "float32 scales" ones check that the rounding is the only change. */
static float f16_exact(double v) {
    if (v == 0.0) return 0.0f;
    int e;
    frexp(v, &e);  /* |v| in [2^(e-1), 2^e): 11 significant bits -> ulp 2^(e-11) */
    return (float)ldexp(nearbyint(ldexp(v, 11 - e)), e - 11);
}

static weights make_weights(int32_t format, int64_t n, int64_t k, int with_bias, int f16_scales) {
    weights w;
    memset(&w, 0, sizeof w);
    w.format = format, w.n = n, w.k = k;
    const int64_t nb = k / RILLET_QBLOCK;
    if (format == RILLET_WEIGHT_BF16) {
        w.w_bf16 = (uint16_t *)xmalloc(sizeof(uint16_t) * (size_t)(n * k));
        for (int64_t i = 0; i < n * k; i++) w.w_bf16[i] = bf(uniform(-0.1, 0.1));
    } else if (format == RILLET_WEIGHT_Q8) {
        w.q8 = (int8_t *)xmalloc((size_t)(n * k));
        w.scales = (float *)xmalloc(sizeof(float) * (size_t)(n * nb));
        for (int64_t i = 0; i < n * k; i++) w.q8[i] = (int8_t)randint(-127, 127);
        w.q8[0] = 127;  /* the extremes, for the integer paths' saturation */
        if (n * k > 1) w.q8[1] = -127;
        for (int64_t i = 0; i < n * nb; i++) {
            w.scales[i] = (float)uniform(0.0005, 0.002);
            if (f16_scales) w.scales[i] = f16_exact(w.scales[i]);
        }
    } else {
        w.q4 = (uint8_t *)xmalloc((size_t)(n * k));
        w.scales = (float *)xmalloc(sizeof(float) * (size_t)(n * nb));
        w.mins = (float *)xmalloc(sizeof(float) * (size_t)(n * nb));
        for (int64_t i = 0; i < n * k; i++) w.q4[i] = (uint8_t)randint(0, 15);
        w.q4[0] = 15;
        if (n * k > 1) w.q4[1] = 0;
        for (int64_t i = 0; i < n * nb; i++) {
            w.scales[i] = (float)uniform(0.005, 0.02);
            w.mins[i] = (float)(-8.0 * w.scales[i] * uniform(0.5, 1.5));  /* around Q4_0's m = -8 s */
            if (f16_scales) w.scales[i] = f16_exact(w.scales[i]), w.mins[i] = f16_exact(w.mins[i]);
        }
    }
    if (with_bias) {
        w.bias = (uint16_t *)xmalloc(sizeof(uint16_t) * (size_t)n);
        for (int64_t i = 0; i < n; i++) w.bias[i] = bf(uniform(-0.5, 0.5));
    }
    return w;
}

static void free_weights(weights *w) {
    free(w->w_bf16), free(w->q8), free(w->q4), free(w->scales), free(w->mins), free(w->bias);
}

static double weight_value(const weights *w, int64_t o, int64_t j) {
    const int64_t b = o * (w->k / RILLET_QBLOCK) + j / RILLET_QBLOCK;
    if (w->format == RILLET_WEIGHT_BF16) return fb(w->w_bf16[o * w->k + j]);
    if (w->format == RILLET_WEIGHT_Q8) return (double)f16_exact(w->scales[b]) * w->q8[o * w->k + j];
    return (double)f16_exact(w->scales[b]) * w->q4[o * w->k + j] + (double)f16_exact(w->mins[b]);
}

/* Activations: uniform, each RILLET_QBLOCK block scaled by 2^[-3, 3] (so blocks differ in dx),
   then row 1 gets an outlier (its block's dx is 40 / 127: a per-row or unquantized kernel misses
   the reference by far more than the tolerance), row 2 an all-zero block, row 4 all zeros
   (dx = 0 must give 0, not NaN). The gaps of a strided x hold NaN: reading them shows. */
static uint16_t *make_x(int64_t m, int64_t k, int64_t stride) {
    uint16_t *x = (uint16_t *)xmalloc(sizeof(uint16_t) * (size_t)(m * stride + 8));
    for (int64_t i = 0; i < m * stride + 8; i++) x[i] = BF16_NAN;
    for (int64_t r = 0; r < m; r++)
        for (int64_t j0 = 0; j0 < k; j0 += RILLET_QBLOCK) {
            const double s = ldexp(1.0, (int)randint(-3, 3));
            for (int64_t j = j0; j < j0 + RILLET_QBLOCK && j < k; j++) x[r * stride + j] = bf(s * uniform(-1, 1));
        }
    if (m > 1) x[1 * stride + k / 2] = bf(40.0);
    if (m > 2 && k >= 2 * RILLET_QBLOCK)
        for (int64_t j = RILLET_QBLOCK; j < 2 * RILLET_QBLOCK; j++) x[2 * stride + j] = 0;
    if (m > 4)
        for (int64_t j = 0; j < k; j++) x[4 * stride + j] = 0;
    return x;
}

/* The header's activation quantization of one block, in double: dx = max|x| / 127,
   xq = round(x / dx) (halves away from zero here). near_tie[j]: x / dx within 1e-3 of a
   rounding boundary, where a kernel computing in float (or with x * (127 / max)) may round the
   other way; the reference allows that one step. */
static double quantize_block(const uint16_t *x, int n, int32_t *xq, int *near_tie) {
    double amax = 0.0;
    for (int j = 0; j < n; j++) {  /* not fmax(): GCC 12 for aarch64 has an internal error vectorizing it */
        const double a = fabs(fb(x[j]));
        if (a > amax) amax = a;
    }
    const double dx = amax / 127.0;
    for (int j = 0; j < n; j++) {
        if (dx == 0.0) { xq[j] = 0, near_tie[j] = 0; continue; }
        const double t = fb(x[j]) / dx;
        xq[j] = (int32_t)lround(t);
        near_tie[j] = fabs(fabs(t - floor(t)) - 0.5) < 1e-3;
    }
    return dx;
}

/* y_ref [m, n] and its tolerance, for x [m, k] with row stride xs. Bounds:
   BF16: y = sum_j x_j w_j + b in float32, any order: E = (k + 2) u sum_j |x_j w_j| (each
     product is exact in float32; at most k + 1 roundings, each at most u times a partial sum).
   Q8/Q4 (header): y = sum_b dx_b (s_b dot(q_b, xq_b) + m_b sum(xq_b)) + bias, integer dots
     exact: E = (nb + 8) u A with A = sum_b dx_b (|s_b dot| + |m_b sum|) (a few roundings per
     block term, dx and s themselves float, nb + 1 additions), plus dx_b |w_j| for each
     activation whose rounding is a near tie (see quantize_block). */
static void reference_linear(const weights *w, const uint16_t *x, int64_t xs, int64_t m, double *ref, double *tol) {
    const int64_t n = w->n, k = w->k, nb = k / RILLET_QBLOCK;
    int32_t *xq = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)(m * k));
    int *tie = (int *)xmalloc(sizeof(int) * (size_t)(m * k));
    double *dx = (double *)xmalloc(sizeof(double) * (size_t)(m * (nb + 1)));
    if (w->format != RILLET_WEIGHT_BF16)
        for (int64_t r = 0; r < m; r++)
            for (int64_t b = 0; b < nb; b++)
                dx[r * nb + b] = quantize_block(x + r * xs + b * RILLET_QBLOCK, RILLET_QBLOCK, xq + r * k + b * RILLET_QBLOCK,
                                                tie + r * k + b * RILLET_QBLOCK);
    for (int64_t r = 0; r < m; r++)
        for (int64_t o = 0; o < n; o++) {
            double y = w->bias ? fb(w->bias[o]) : 0.0, e = 0.0;
            if (w->format == RILLET_WEIGHT_BF16) {
                double a = 0.0;
                for (int64_t j = 0; j < k; j++) {
                    const double p = fb(x[r * xs + j]) * fb(w->w_bf16[o * k + j]);
                    y += p, a += fabs(p);
                }
                e = (double)(k + 2) * U * (a + (w->bias ? fabs(fb(w->bias[o])) : 0.0));
            } else {
                double a = 0.0, ties = 0.0;
                for (int64_t b = 0; b < nb; b++) {
                    const double d = dx[r * nb + b];
                    const double s = f16_exact(w->scales[o * nb + b]), mn = w->mins ? f16_exact(w->mins[o * nb + b]) : 0.0;
                    int64_t dot = 0, sum = 0;
                    for (int64_t j = b * RILLET_QBLOCK; j < (b + 1) * RILLET_QBLOCK; j++) {
                        const int32_t q = w->format == RILLET_WEIGHT_Q8 ? w->q8[o * k + j] : w->q4[o * k + j];
                        dot += (int64_t)q * xq[r * k + j], sum += xq[r * k + j];
                        if (tie[r * k + j]) ties += d * fabs(weight_value(w, o, j));
                    }
                    y += d * (s * (double)dot + mn * (double)sum);
                    a += d * (fabs(s * (double)dot) + fabs(mn * (double)sum));
                }
                e = (double)(nb + 8) * U * (a + (w->bias ? fabs(fb(w->bias[o])) : 0.0)) + ties;
            }
            ref[r * n + o] = y;
            tol[r * n + o] = U_BF16 * fabs(y) + (1.0 + U_BF16) * e;
        }
    free(xq), free(tie), free(dx);
}

/* ---- Linear: calls ------------------------------------------------------------------------- */

static int have_public_linear(void) {
    return rillet_weight_packed_bytes && rillet_weight_pack && rillet_linear;
}

static void linear_part_call(const rillet_weight *w, const uint16_t *x, int64_t xs, uint16_t *y, int64_t m,
                             int threads, void *scratch) {
    (void)threads;
#pragma omp parallel num_threads(threads)
    rillet_linear_part(w, x, xs, y, m, scratch);
}

static void bf16_part_call(const uint16_t *x, int64_t xs, const void *packed, const uint16_t *bias, uint16_t *y,
                           int64_t m, int64_t n, int64_t k, int threads) {
    (void)threads;
#pragma omp parallel num_threads(threads)
    rillet_linear_bf16_part(x, xs, packed, bias, y, m, n, k);
}

static void quant_parts_call(int32_t format, const void *packed, const uint16_t *bias, const uint16_t *x, int64_t xs,
                             uint16_t *y, int64_t m, int64_t n, int64_t k, int threads, int8_t *xq, float *xscale,
                             int32_t *xsum) {
    (void)threads;
#pragma omp parallel num_threads(threads)
    {
        rillet_quantize_rows_part(x, xs, m, k, xq, xscale, xsum);
        rillet_linear_quant_part(format, packed, bias, xq, xscale, xsum, y, m, n, k);
    }
}

static void quantize_rows_call(const uint16_t *x, int64_t xs, int64_t m, int64_t k, int8_t *xq, float *xscale,
                               int32_t *xsum, int threads) {
    (void)threads;
#pragma omp parallel num_threads(threads)
    rillet_quantize_rows_part(x, xs, m, k, xq, xscale, xsum);
}

static const void *values_of(const weights *w) {
    return w->format == RILLET_WEIGHT_BF16 ? (const void *)w->w_bf16
         : w->format == RILLET_WEIGHT_Q8 ? (const void *)w->q8 : (const void *)w->q4;
}

#define MAX_M 33
static const int64_t M_LIST[] = {1, 3, 7, 16, 33};

/* One shape: accuracy at m = 33 against the reference; m = 1, 3, 7, 16 bit-identical to the
   first rows of m = 33; 1, 2, 3 threads bit-identical; the `_part` entry points (own parallel
   region + scratch) and the per-format functions bit-identical to rillet_linear. */
static void check_linear_shape(int32_t format, int64_t n, int64_t k, int with_bias, int strided, int f16_scales) {
    char name[200], detail[512];
    snprintf(name, sizeof name, "linear %s n=%lld k=%lld %s %s%s", format_name(format), (long long)n, (long long)k,
             with_bias ? "bias" : "no-bias", strided ? "strided-x" : "contiguous-x",
             format == RILLET_WEIGHT_BF16 ? "" : f16_scales ? " (scales float16-exact)"
                                                            : " float32 scales (packed as float16, as the header states)");
    if (!selected(name)) return;
    if (!have_public_linear()) {
        missing(name, "rillet_weight_packed_bytes / rillet_weight_pack / rillet_linear");
        return;
    }
    if (format != RILLET_WEIGHT_BF16 && !(rillet_quant_packed_bytes && rillet_quant_pack)) {
        missing(name, "rillet_quant_packed_bytes / rillet_quant_pack (linear_quant.c)");
        return;
    }
    weights w = make_weights(format, n, k, with_bias, f16_scales);
    const int64_t xs = strided ? k + 40 : k;
    uint16_t *xbuf = make_x(MAX_M, k, xs);
    const uint16_t *x = xbuf;

    const int64_t bytes = rillet_weight_packed_bytes(format, n, k);
    if (bytes <= 0) {
        snprintf(detail, sizeof detail, "rillet_weight_packed_bytes returned %lld", (long long)bytes);
        report(0, name, detail);
        goto done0;
    }
    void *packed = guarded((size_t)bytes, 256);
    const int rc = rillet_weight_pack(format, values_of(&w), w.scales, w.mins, n, k, packed);
    if (rc != 0) {
        snprintf(detail, sizeof detail, "rillet_weight_pack returned %d", rc);
        report(0, name, detail);
        goto done1;
    }
    if (!guard_intact(packed, (size_t)bytes, 256)) {
        snprintf(detail, sizeof detail, "rillet_weight_pack wrote past rillet_weight_packed_bytes = %lld", (long long)bytes);
        report(0, name, detail);
        goto done1;
    }
    const rillet_weight rw = {format, 0, n, k, packed, w.bias};

    double *ref = (double *)xmalloc(sizeof(double) * (size_t)(MAX_M * n));
    double *tol = (double *)xmalloc(sizeof(double) * (size_t)(MAX_M * n));
    reference_linear(&w, x, xs, MAX_M, ref, tol);
    uint16_t *full = y_alloc(MAX_M * n), *y = y_alloc(MAX_M * n);
    int ok = 1;
    char acc[512] = "";

    rillet_linear(&rw, x, xs, full, MAX_M, 2);
    if (!y_sentinels_intact(full, MAX_M * n)) {
        ok = 0, snprintf(detail, sizeof detail, "rillet_linear wrote outside y [%d, %lld]", MAX_M, (long long)n);
    } else if (!compare(full, ref, tol, MAX_M, n, detail, sizeof detail)) {
        ok = 0;
        char tmp[600];
        snprintf(tmp, sizeof tmp, "m=%d threads=2: %.480s", MAX_M, detail);
        snprintf(detail, sizeof detail, "%.500s", tmp);
    } else {
        snprintf(acc, sizeof acc, "%s", detail);
    }
    /* Rows alone vs in the batch, and thread counts: bit for bit (1 and 3 threads alternate over
       m = 1, 3, 7, 16; m = 33 takes both, against its own run with 2). */
    for (size_t i = 0; ok && i < sizeof M_LIST / sizeof M_LIST[0]; i++)
        for (int threads = 1 + 2 * (int)(i % 2); ok && threads <= 3; threads += M_LIST[i] == MAX_M ? 2 : 3) {
            const int64_t m = M_LIST[i];
            for (int64_t j = 0; j < MAX_M * n; j++) y[j] = Y_SENTINEL;
            rillet_linear(&rw, x, xs, y, m, threads);
            char what[64];
            snprintf(what, sizeof what, "m=%lld threads=%d vs m=%d threads=2", (long long)m, threads, MAX_M);
            if (!y_sentinels_intact(y, m * n) || y[m * n] != Y_SENTINEL) {
                ok = 0, snprintf(detail, sizeof detail, "%s: wrote outside y [%lld, %lld]", what, (long long)m, (long long)n);
            } else if (!same_bits(y, full, m, n, detail, sizeof detail, what)) {
                ok = 0;
            }
        }
    /* The parallel-region entry point with its scratch. */
    if (ok && rillet_linear_part && rillet_linear_scratch_bytes) {
        const int64_t sb = rillet_linear_scratch_bytes(&rw, MAX_M);
        if (format == RILLET_WEIGHT_BF16 && sb != 0) {
            ok = 0, snprintf(detail, sizeof detail, "rillet_linear_scratch_bytes(bf16) = %lld, header says 0", (long long)sb);
        } else if (sb < 0) {
            ok = 0, snprintf(detail, sizeof detail, "rillet_linear_scratch_bytes = %lld", (long long)sb);
        } else {
            void *scratch = guarded((size_t)sb, 256);
            for (int threads = 1; ok && threads <= 2; threads++) {
                char what[64];
                snprintf(what, sizeof what, "rillet_linear_part threads=%d vs rillet_linear", threads);
                linear_part_call(&rw, x, xs, y, MAX_M, threads, scratch);
                if (!guard_intact(scratch, (size_t)sb, 256))
                    ok = 0, snprintf(detail, sizeof detail, "%s: wrote past its scratch of %lld bytes", what, (long long)sb);
                else if (!same_bits(y, full, MAX_M, n, detail, sizeof detail, what))
                    ok = 0;
            }
            free(scratch);
        }
    }
    /* The per-format entry points, packed by their own pack functions. */
    if (ok && format == RILLET_WEIGHT_BF16 && rillet_bf16_packed_bytes && rillet_bf16_pack && rillet_linear_bf16_part) {
        const int64_t b2 = rillet_bf16_packed_bytes(n, k);
        void *p2 = guarded((size_t)(b2 > 0 ? b2 : 0), 256);
        rillet_bf16_pack(w.w_bf16, p2, n, k);
        if (!guard_intact(p2, (size_t)(b2 > 0 ? b2 : 0), 256)) {
            ok = 0, snprintf(detail, sizeof detail, "rillet_bf16_pack wrote past rillet_bf16_packed_bytes = %lld", (long long)b2);
        } else {
            bf16_part_call(x, xs, p2, w.bias, y, MAX_M, n, k, 2);
            ok = same_bits(y, full, MAX_M, n, detail, sizeof detail, "rillet_linear_bf16_part vs rillet_linear");
        }
        free(p2);
    }
    if (ok && format != RILLET_WEIGHT_BF16 && rillet_quant_packed_bytes && rillet_quant_pack &&
        rillet_quantize_rows_part && rillet_linear_quant_part) {
        const int64_t b2 = rillet_quant_packed_bytes(format, n, k);
        void *p2 = guarded((size_t)(b2 > 0 ? b2 : 0), 256);
        rillet_quant_pack(format, values_of(&w), w.scales, w.mins, n, k, p2);
        int8_t *xq = (int8_t *)xmalloc((size_t)(MAX_M * k));
        float *xscale = (float *)xmalloc(sizeof(float) * (size_t)(MAX_M * k / RILLET_QBLOCK));
        int32_t *xsum = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)(MAX_M * k / RILLET_QBLOCK));
        if (!guard_intact(p2, (size_t)(b2 > 0 ? b2 : 0), 256)) {
            ok = 0, snprintf(detail, sizeof detail, "rillet_quant_pack wrote past rillet_quant_packed_bytes = %lld", (long long)b2);
        } else {
            quant_parts_call(format, p2, w.bias, x, xs, y, MAX_M, n, k, 2, xq, xscale, xsum);
            ok = same_bits(y, full, MAX_M, n, detail, sizeof detail,
                           "rillet_quantize_rows_part + rillet_linear_quant_part vs rillet_linear");
        }
        free(p2), free(xq), free(xscale), free(xsum);
    }
    if (ok) snprintf(detail, sizeof detail, "%.400s; m=1,3,7,16 and 1-3 threads bit-exact", acc);
    report(ok, name, detail);
    y_free(full), y_free(y), free(ref), free(tol);
done1:
    free(packed);
done0:
    free(xbuf);
    free_weights(&w);
}

/* Integer paths at their limits: Q8 weights all +-127 and Q4 all 0 or 15, against activation
   blocks of one magnitude (every xq = +-127), signs aligned with output 0's (every product of a
   block +127 * 127 for it: int16 pair sums of maddubs reach 32258), against it, all positive and
   alternating. Same reference and bound as check_linear_shape; m = 0 must write nothing. */
static void check_linear_extremes(int32_t format) {
    char name[128], detail[512] = "";
    snprintf(name, sizeof name, "linear %s extreme values (all |q| max, all |xq| = 127; m=0 writes nothing)", format_name(format));
    if (!selected(name)) return;
    if (!have_public_linear() || !(rillet_quant_packed_bytes && rillet_quant_pack)) {
        missing(name, "rillet_weight_packed_bytes / rillet_weight_pack / rillet_linear / rillet_quant_pack");
        return;
    }
    const int64_t n = 19, k = 1536, m = 4, nb = k / RILLET_QBLOCK;
    weights w = make_weights(format, n, k, 0, 1);
    for (int64_t i = 0; i < n * k; i++) {
        if (format == RILLET_WEIGHT_Q8) w.q8[i] = next_u64() & 1 ? 127 : -127;
        else w.q4[i] = i < k || next_u64() & 1 ? 15 : 0;  /* output 0: all 15 */
    }
    if (format == RILLET_WEIGHT_Q4)
        for (int64_t i = 0; i < n * nb; i++) w.mins[i] = 0;  /* the dot alone, no cancellation */
    uint16_t *x = (uint16_t *)xmalloc(sizeof(uint16_t) * (size_t)(m * k));
    for (int64_t j = 0; j < k; j++) {
        const double sign = format == RILLET_WEIGHT_Q8 ? (w.q8[j] > 0 ? 1.0 : -1.0) : 1.0;
        const double scale = ldexp(1.0, (int)(j / RILLET_QBLOCK % 5) - 2);
        x[0 * k + j] = bf(sign * scale), x[1 * k + j] = bf(-sign * scale);
        x[2 * k + j] = bf(scale), x[3 * k + j] = bf(j % 2 ? scale : -scale);
    }
    const int64_t bytes = rillet_weight_packed_bytes(format, n, k);
    void *packed = guarded((size_t)(bytes > 0 ? bytes : 0), 64);
    int ok = bytes > 0 && rillet_weight_pack(format, values_of(&w), w.scales, w.mins, n, k, packed) == 0;
    if (!ok) snprintf(detail, sizeof detail, "packing failed (bytes %lld)", (long long)bytes);
    const rillet_weight rw = {format, 0, n, k, packed, NULL};
    double *ref = (double *)xmalloc(sizeof(double) * (size_t)(m * n)), *tol = (double *)xmalloc(sizeof(double) * (size_t)(m * n));
    uint16_t *y = y_alloc(m * n);
    if (ok) {
        rillet_linear(&rw, x, k, y, 0, 2);
        if (!y_sentinels_intact(y, 0) || y[0] != Y_SENTINEL)
            ok = 0, snprintf(detail, sizeof detail, "m=0 wrote to y");
    }
    if (ok) {
        reference_linear(&w, x, k, m, ref, tol);
        rillet_linear(&rw, x, k, y, m, 2);
        ok = compare(y, ref, tol, m, n, detail, sizeof detail);
    }
    report(ok, name, detail);
    free(x), free(packed), free(ref), free(tol), y_free(y);
    free_weights(&w);
}

/* rillet_weight_pack refuses what it cannot take (the header: -1). */
static void check_pack_refusals(void) {
    const char *name = "linear pack refuses unknown format and k not a multiple of 32 (q8, q4)";
    if (!selected(name)) return;
    if (!rillet_weight_pack || !rillet_quant_pack) {
        missing(name, "rillet_weight_pack / rillet_quant_pack");
        return;
    }
    int8_t values[4 * 64] = {0};
    float scales[4 * 2] = {1, 1, 1, 1, 1, 1, 1, 1}, mins[4 * 2] = {0};
    void *buf = guarded(1 << 16, 0);
    char detail[256] = "";
    int ok = 1, rc;
    if ((rc = rillet_weight_pack(7, values, scales, mins, 4, 64, buf)) != -1)
        ok = 0, snprintf(detail, sizeof detail, "format 7 returned %d", rc);
    else if ((rc = rillet_weight_pack(RILLET_WEIGHT_Q8, values, scales, NULL, 4, 48, buf)) != -1)
        ok = 0, snprintf(detail, sizeof detail, "q8 k=48 returned %d", rc);
    else if ((rc = rillet_weight_pack(RILLET_WEIGHT_Q4, values, scales, mins, 4, 48, buf)) != -1)
        ok = 0, snprintf(detail, sizeof detail, "q4 k=48 returned %d", rc);
    report(ok, name, detail);
    free(buf);
}

/* rillet_quantize_rows_part against the header: xscale = max|x| / 127 (float: relative 2^-22),
   xq = round(x / xscale) (exact, but either neighbour at a near tie), xsum = sum of its own xq
   (exact), all-zero blocks give xq = 0 and a finite xscale. Strided rows, 1 and 2 threads
   bit-identical. */
static void check_quantize_rows(int64_t k) {
    char name[96], detail[512] = "";
    snprintf(name, sizeof name, "quantize_rows k=%lld m=%d strided-x (xq, xscale, xsum as the header states)", (long long)k, MAX_M);
    if (!selected(name)) return;
    if (!rillet_quantize_rows_part) {
        missing(name, "rillet_quantize_rows_part");
        return;
    }
    const int64_t xs = k + 40, nb = k / RILLET_QBLOCK;
    uint16_t *x = make_x(MAX_M, k, xs);
    int8_t *xq = (int8_t *)guarded((size_t)(MAX_M * k), 64), *xq2 = (int8_t *)guarded((size_t)(MAX_M * k), 64);
    float *xscale = (float *)guarded(sizeof(float) * (size_t)(MAX_M * nb), 64);
    float *xscale2 = (float *)guarded(sizeof(float) * (size_t)(MAX_M * nb), 64);
    int32_t *xsum = (int32_t *)guarded(sizeof(int32_t) * (size_t)(MAX_M * nb), 64);
    int32_t *xsum2 = (int32_t *)guarded(sizeof(int32_t) * (size_t)(MAX_M * nb), 64);
    quantize_rows_call(x, xs, MAX_M, k, xq, xscale, xsum, 1);
    quantize_rows_call(x, xs, MAX_M, k, xq2, xscale2, xsum2, 2);
    int ok = 1;
    if (!guard_intact(xq, (size_t)(MAX_M * k), 64) || !guard_intact(xscale, sizeof(float) * (size_t)(MAX_M * nb), 64) ||
        !guard_intact(xsum, sizeof(int32_t) * (size_t)(MAX_M * nb), 64)) {
        ok = 0, snprintf(detail, sizeof detail, "wrote past xq [m, k] / xscale / xsum [m, k/32]");
    } else if (memcmp(xq, xq2, (size_t)(MAX_M * k)) || memcmp(xscale, xscale2, sizeof(float) * (size_t)(MAX_M * nb)) ||
               memcmp(xsum, xsum2, sizeof(int32_t) * (size_t)(MAX_M * nb))) {
        ok = 0, snprintf(detail, sizeof detail, "1 and 2 threads differ");
    }
    int32_t rq[RILLET_QBLOCK];
    int tie[RILLET_QBLOCK];
    for (int64_t r = 0; ok && r < MAX_M; r++)
        for (int64_t b = 0; ok && b < nb; b++) {
            const double dx = quantize_block(x + r * xs + b * RILLET_QBLOCK, RILLET_QBLOCK, rq, tie);
            const float got = xscale[r * nb + b];
            if (!isfinite(got) || fabs((double)got - dx) > 0x1p-22 * dx) {
                ok = 0, snprintf(detail, sizeof detail, "row %lld block %lld: xscale %.9g, expected max|x|/127 = %.9g",
                                 (long long)r, (long long)b, (double)got, dx);
                break;
            }
            int32_t sum = 0;
            for (int j = 0; j < RILLET_QBLOCK; j++) {
                const int32_t g = xq[r * k + b * RILLET_QBLOCK + j];
                sum += g;
                if (g != rq[j] && !(tie[j] && abs(g - rq[j]) == 1)) {
                    ok = 0, snprintf(detail, sizeof detail, "row %lld col %lld: x %.9g xq %d, expected round(x / %.9g) = %d",
                                     (long long)r, (long long)(b * RILLET_QBLOCK + j), fb(x[r * xs + b * RILLET_QBLOCK + j]),
                                     g, dx, rq[j]);
                    break;
                }
            }
            if (ok && sum != xsum[r * nb + b])
                ok = 0, snprintf(detail, sizeof detail, "row %lld block %lld: xsum %d, sum of xq %d", (long long)r,
                                 (long long)b, xsum[r * nb + b], sum);
        }
    report(ok, name, detail);
    free(x), free(xq), free(xq2), free(xscale), free(xscale2), free(xsum), free(xsum2);
}

/* ---- Paged decode attention ---------------------------------------------------------------- */

typedef struct {
    int32_t num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks;
    int64_t num_slots, q_stride;
    float scale;
    uint16_t *q, *k_cache, *v_cache;
    int32_t *tables, *contexts;
} attention_case;

static void attention_part_call(const attention_case *c, const uint16_t *q, const int32_t *tables,
                                const int32_t *contexts, int32_t num_seqs, uint16_t *out, int threads) {
    (void)threads;
#pragma omp parallel num_threads(threads)
    rillet_paged_attention_part(q, c->q_stride, c->k_cache, c->v_cache, c->num_slots, tables, c->max_blocks,
                                contexts, num_seqs, c->num_heads, c->num_kv_heads, c->head_dim, c->block_size,
                                c->scale, out);
}

/* Sequences' blocks are a shuffled subset of the cache's blocks, interleaved between sequences;
   every slot no sequence reads (unused blocks, the tail of a last block) and unused table
   entries' blocks hold NaN, and q's gaps (q_stride > num_heads * head_dim) too. */
static attention_case make_attention(int32_t d, int32_t group, int32_t nkv, int32_t block_size, const int32_t *ctx,
                                     int32_t num_seqs, int strided_q, double q_range) {
    attention_case c;
    memset(&c, 0, sizeof c);
    c.num_seqs = num_seqs, c.num_heads = group * nkv, c.num_kv_heads = nkv, c.head_dim = d, c.block_size = block_size;
    int32_t longest = 0, used = 0;
    for (int i = 0; i < num_seqs; i++) {
        longest = ctx[i] > longest ? ctx[i] : longest;
        used += (ctx[i] + block_size - 1) / block_size;
    }
    c.max_blocks = (longest + block_size - 1) / block_size + 2;
    const int32_t blocks = used + 7;  /* spare blocks, left NaN */
    c.num_slots = (int64_t)blocks * block_size;
    c.q_stride = strided_q ? (int64_t)(c.num_heads + 2 * nkv) * d : (int64_t)c.num_heads * d;
    c.scale = (float)(1.0 / sqrt((double)d));
    c.q = (uint16_t *)xmalloc(sizeof(uint16_t) * (size_t)(num_seqs * c.q_stride));
    for (int64_t i = 0; i < num_seqs * c.q_stride; i++) c.q[i] = BF16_NAN;
    for (int b = 0; b < num_seqs; b++)
        for (int64_t i = 0; i < (int64_t)c.num_heads * d; i++) c.q[b * c.q_stride + i] = bf(uniform(-q_range, q_range));
    const size_t cache = (size_t)nkv * (size_t)c.num_slots * (size_t)d;
    c.k_cache = (uint16_t *)xmalloc(sizeof(uint16_t) * cache);
    c.v_cache = (uint16_t *)xmalloc(sizeof(uint16_t) * cache);
    for (size_t i = 0; i < cache; i++) c.k_cache[i] = c.v_cache[i] = BF16_NAN;
    int32_t *perm = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)blocks);
    for (int i = 0; i < blocks; i++) perm[i] = i;
    for (int i = blocks - 1; i > 0; i--) {
        const int j = (int)randint(0, i);
        const int32_t t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    c.tables = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)(num_seqs * c.max_blocks));
    c.contexts = (int32_t *)xmalloc(sizeof(int32_t) * (size_t)num_seqs);
    int next = 0;
    for (int b = 0; b < num_seqs; b++) {
        c.contexts[b] = ctx[b];
        for (int i = 0; i < c.max_blocks; i++) c.tables[b * c.max_blocks + i] = perm[blocks - 1 - (b + i) % 7];
    }
    /* Interleave: block i of every sequence before block i + 1 of any. */
    for (int i = 0; i < c.max_blocks; i++)
        for (int b = 0; b < num_seqs; b++)
            if (i * block_size < ctx[b]) c.tables[b * c.max_blocks + i] = perm[next++];
    for (int b = 0; b < num_seqs; b++)
        for (int pos = 0; pos < ctx[b]; pos++) {
            const int64_t slot = (int64_t)c.tables[b * c.max_blocks + pos / block_size] * block_size + pos % block_size;
            for (int h = 0; h < nkv; h++)
                for (int i = 0; i < d; i++) {
                    c.k_cache[((int64_t)h * c.num_slots + slot) * d + i] = bf(uniform(-1, 1));
                    c.v_cache[((int64_t)h * c.num_slots + slot) * d + i] = bf(uniform(-1, 1));
                }
        }
    free(perm);
    return c;
}

static void free_attention(attention_case *c) {
    free(c->q), free(c->k_cache), free(c->v_cache), free(c->tables), free(c->contexts);
}

/* out [num_seqs, num_heads * d]: softmax(scale q.k) v per head, over the sequence's context, in
   double. Bound for a float32 kernel (S = max_j scale sum_i |q_i k_ji|, V_i = sum_j p_j |v_ji|):
   each score is off by at most (d + 2) u S, so each exp argument (after subtracting the max) by
   (2d + 6) u S; with the exp itself (rillet's polynomial: 2e-7 relative, < 4u) and its product,
   each unnormalized weight is relatively off by e_p = (2d + 6) u S + 8u; the normalizing sum
   adds (ctx + 16) u, the weighted sum of v (ctx + 2) u V_i, the final scaling u:
   E_i = 2 [2 e_p + (2 ctx + 20) u] V_i, doubled for the second-order terms. */
static void reference_attention(const attention_case *c, double *ref, double *tol) {
    const int d = c->head_dim, group = c->num_heads / c->num_kv_heads;
    for (int b = 0; b < c->num_seqs; b++) {
        const int ctx = c->contexts[b];
        double *s = (double *)xmalloc(sizeof(double) * (size_t)ctx);
        for (int hq = 0; hq < c->num_heads; hq++) {
            const int h = hq / group;
            const uint16_t *q = c->q + (int64_t)b * c->q_stride + (int64_t)hq * d;
            double S = 0.0, mx = -INFINITY;
            for (int j = 0; j < ctx; j++) {
                const int64_t slot = (int64_t)c->tables[b * c->max_blocks + j / c->block_size] * c->block_size + j % c->block_size;
                const uint16_t *kr = c->k_cache + ((int64_t)h * c->num_slots + slot) * d;
                double dot = 0.0, mag = 0.0;
                for (int i = 0; i < d; i++) dot += fb(q[i]) * fb(kr[i]), mag += fabs(fb(q[i]) * fb(kr[i]));
                s[j] = c->scale * dot;
                S = fmax(S, c->scale * mag);
                mx = fmax(mx, s[j]);
            }
            double sum = 0.0;
            for (int j = 0; j < ctx; j++) s[j] = exp(s[j] - mx), sum += s[j];
            const double e_p = (2.0 * d + 6.0) * U * S + 8.0 * U;
            const double rel = 2.0 * (2.0 * e_p + (2.0 * ctx + 20.0) * U);
            for (int i = 0; i < d; i++) {
                double o = 0.0, v_abs = 0.0;
                for (int j = 0; j < ctx; j++) {
                    const int64_t slot = (int64_t)c->tables[b * c->max_blocks + j / c->block_size] * c->block_size + j % c->block_size;
                    const double v = fb(c->v_cache[((int64_t)h * c->num_slots + slot) * d + i]);
                    o += s[j] / sum * v, v_abs += s[j] / sum * fabs(v);
                }
                const int64_t at = (int64_t)b * c->num_heads * d + (int64_t)hq * d + i;
                ref[at] = o;
                tol[at] = U_BF16 * fabs(o) + (1.0 + U_BF16) * rel * v_abs;
            }
        }
        free(s);
    }
}

/* Accuracy of the whole batch; each sequence alone bit-identical to its row in the batch;
   1, 2, 3 threads bit-identical; the public wrapper (where defined) bit-identical to the part. */
static void check_attention_q(int32_t d, int32_t group, int32_t nkv, int32_t block_size, const int32_t *ctx,
                              int32_t num_seqs, int strided_q, double q_range) {
    char name[200], detail[600] = "", ctxs[96] = "";
    for (int i = 0, at = 0; i < num_seqs && at < (int)sizeof ctxs - 8; i++)
        at += snprintf(ctxs + at, sizeof ctxs - (size_t)at, "%s%d", i ? "," : "", ctx[i]);
    snprintf(name, sizeof name, "paged_attention d=%d group=%d kv_heads=%d block=%d contexts=%s %s%s", d, group, nkv,
             block_size, ctxs, strided_q ? "strided-q" : "contiguous-q",
             q_range > 4 ? " peaked softmax (q in +-256: score gaps past exp underflow)" : "");
    if (!selected(name)) return;
    if (!rillet_paged_attention_part) {
        missing(name, "rillet_paged_attention_part");
        return;
    }
    attention_case c = make_attention(d, group, nkv, block_size, ctx, num_seqs, strided_q, q_range);
    const int64_t width = (int64_t)c.num_heads * d, count = (int64_t)num_seqs * width;
    double *ref = (double *)xmalloc(sizeof(double) * (size_t)count), *tol = (double *)xmalloc(sizeof(double) * (size_t)count);
    reference_attention(&c, ref, tol);
    uint16_t *full = y_alloc(count), *out = y_alloc(count);
    int ok = 1;
    char acc[128] = "";
    attention_part_call(&c, c.q, c.tables, c.contexts, num_seqs, full, 2);
    if (!y_sentinels_intact(full, count))
        ok = 0, snprintf(detail, sizeof detail, "wrote outside out [%d, %lld]", num_seqs, (long long)width);
    else if (!compare(full, ref, tol, num_seqs, width, detail, sizeof detail))
        ok = 0;
    else
        snprintf(acc, sizeof acc, "%s", detail);
    for (int threads = 1; ok && threads <= 3; threads += 2) {
        attention_part_call(&c, c.q, c.tables, c.contexts, num_seqs, out, threads);
        char what[48];
        snprintf(what, sizeof what, "threads=%d vs threads=2", threads);
        ok = same_bits(out, full, num_seqs, width, detail, sizeof detail, what);
    }
    for (int b = 0; ok && b < num_seqs; b++) {
        attention_part_call(&c, c.q + (int64_t)b * c.q_stride, c.tables + (int64_t)b * c.max_blocks, c.contexts + b, 1, out, 2);
        char what[64];
        snprintf(what, sizeof what, "sequence %d alone vs in the batch", b);
        ok = same_bits(out, full + (int64_t)b * width, 1, width, detail, sizeof detail, what);
    }
    if (ok && rillet_paged_decode_attention_bf16) {
        rillet_paged_decode_attention_bf16(c.q, c.q_stride, c.k_cache, c.v_cache, c.num_slots, c.tables, c.max_blocks,
                                           c.contexts, num_seqs, c.num_heads, nkv, d, block_size, c.scale, out, 2);
        ok = same_bits(out, full, num_seqs, width, detail, sizeof detail, "rillet_paged_decode_attention_bf16 vs part");
    }
    if (ok) snprintf(detail, sizeof detail, "%s; alone/batch and 1-3 threads bit-exact", acc);
    report(ok, name, detail);
    y_free(full), y_free(out), free(ref), free(tol);
    free_attention(&c);
}

static void check_attention(int32_t d, int32_t group, int32_t nkv, int32_t block_size, const int32_t *ctx, int32_t num_seqs,
                            int strided_q) {
    check_attention_q(d, group, nkv, block_size, ctx, num_seqs, strided_q, 4.0);
}

/* ---- Argmax (sampling.c) ------------------------------------------------------------------- */

/* out[r] = the first index of row r's maximum, a NaN counting as the maximum (torch's argmax),
   exact: rows with a tie, a NaN after +inf, all -inf, signed zeros, the max last; a strided
   row whose gap holds a larger value that must not be read; 1 and 2 threads. */
static void check_argmax(int64_t cols) {
    char name[96], detail[256] = "";
    snprintf(name, sizeof name, "argmax_rows cols=%lld", (long long)cols);
    if (!selected(name)) return;
    if (!rillet_argmax_rows) {
        missing(name, "rillet_argmax_rows");
        return;
    }
    enum { ROWS = 6 };
    const int64_t stride = cols + 3;
    float *x = (float *)xmalloc(sizeof(float) * (size_t)(ROWS * stride));
    int64_t expect[ROWS], got[ROWS];
    for (int64_t i = 0; i < ROWS * stride; i++) x[i] = (float)(next_u64() % 1000) - 500.0f;
    for (int r = 0; r < ROWS; r++)
        for (int64_t i = cols; i < stride; i++) x[r * stride + i] = 1e30f;  /* the gap */
    float *row = x;
    row[cols / 3] = row[cols / 2] = 600.0f, expect[0] = cols / 3;  /* a tie */
    row = x + stride, row[0] = INFINITY, row[cols - 1] = NAN, expect[1] = cols - 1;
    row = x + 2 * stride;
    for (int64_t i = 0; i < cols; i++) row[i] = -INFINITY;
    expect[2] = 0;
    row = x + 3 * stride;
    for (int64_t i = 0; i < cols; i++) row[i] = i % 2 ? -0.0f : 0.0f;
    expect[3] = 0;
    row = x + 4 * stride, row[cols - 1] = 700.0f, expect[4] = cols - 1;
    row = x + 5 * stride, row[cols / 2] = NAN, row[cols - 1] = NAN, row[0] = 800.0f, expect[5] = cols / 2;
    int ok = 1;
    for (int threads = 1; threads <= 2 && ok; threads++) {
        rillet_argmax_rows(x, ROWS, cols, stride, got, threads);
        for (int r = 0; r < ROWS && ok; r++)
            if (got[r] != expect[r])
                ok = 0, snprintf(detail, sizeof detail, "threads=%d row %d: got %lld, expected %lld", threads, r,
                                 (long long)got[r], (long long)expect[r]);
    }
    report(ok, name, detail);
    free(x);
}

/* ---- Residual add + RMSNorm ---------------------------------------------------------------- */

/* residual' = bf16(residual + x) (torch's bf16 add: the float32 sum rounded) must be exact;
   out = residual' / sqrt(mean(residual'^2) + eps) * weight, rounded once. Bound: the sum of
   squares (positive terms) is relatively off by at most dim u, the mean, +eps, sqrt, the
   reciprocal and two products add 6u: E = 2 (dim / 2 + 6) u |out|, doubled for safety. */
static void check_norm(int32_t dim, int with_x, float eps) {
    char name[96], detail[512] = "";
    snprintf(name, sizeof name, "add_rms_norm_row dim=%d %s eps=%g", dim, with_x ? "residual+x" : "x=NULL", (double)eps);
    if (!selected(name)) return;
    if (!rillet_add_rms_norm_row) {
        missing(name, "rillet_add_rms_norm_row");
        return;
    }
    enum { ROWS = 3 };
    uint16_t *res = (uint16_t *)xmalloc(sizeof(uint16_t) * (size_t)(ROWS * dim)), *res0 = (uint16_t *)xmalloc(sizeof(uint16_t) * (size_t)(ROWS * dim));
    uint16_t *x = (uint16_t *)xmalloc(sizeof(uint16_t) * (size_t)(ROWS * dim)), *w = (uint16_t *)xmalloc(sizeof(uint16_t) * (size_t)dim);
    uint16_t *out = y_alloc(ROWS * dim);
    double *ref = (double *)xmalloc(sizeof(double) * (size_t)(ROWS * dim)), *tol = (double *)xmalloc(sizeof(double) * (size_t)(ROWS * dim));
    uint16_t *want_res = (uint16_t *)xmalloc(sizeof(uint16_t) * (size_t)(ROWS * dim));
    for (int i = 0; i < dim; i++) w[i] = bf(uniform(0.5, 1.5));
    for (int r = 0; r < ROWS; r++) {
        const double s = ldexp(1.0, 3 * r - 3);  /* rows of different magnitude */
        for (int i = 0; i < dim; i++) res0[r * dim + i] = bf(s * uniform(-2, 2)), x[r * dim + i] = bf(s * uniform(-2, 2));
    }
    for (int r = 0; r < ROWS; r++) {
        double ss = 0.0;
        for (int i = 0; i < dim; i++) {
            const uint16_t v = with_x ? f32_to_bf16(bf16_to_f32(res0[r * dim + i]) + bf16_to_f32(x[r * dim + i])) : res0[r * dim + i];
            want_res[r * dim + i] = v;
            ss += fb(v) * fb(v);
        }
        const double inv = 1.0 / sqrt(ss / dim + (double)eps);
        for (int i = 0; i < dim; i++) {
            const double o = fb(want_res[r * dim + i]) * inv * fb(w[i]);
            ref[r * dim + i] = o;
            tol[r * dim + i] = U_BF16 * fabs(o) + (1.0 + U_BF16) * 2.0 * (dim / 2.0 + 6.0) * U * fabs(o);
        }
    }
    memcpy(res, res0, sizeof(uint16_t) * (size_t)(ROWS * dim));
    for (int r = 0; r < ROWS; r++)
        rillet_add_rms_norm_row(res + r * dim, with_x ? x + r * dim : NULL, w, out + r * dim, dim, eps);
    int ok = 1;
    if (!y_sentinels_intact(out, ROWS * dim))
        ok = 0, snprintf(detail, sizeof detail, "wrote outside out [%d]", dim);
    else if (!same_bits(res, want_res, ROWS, dim, detail, sizeof detail, "residual vs bf16(residual + x)"))
        ok = 0;
    else if (!compare(out, ref, tol, ROWS, dim, detail, sizeof detail))
        ok = 0;
    if (ok && with_x && rillet_add_rms_norm_bf16) {
        uint16_t *out2 = y_alloc(ROWS * dim);
        memcpy(res, res0, sizeof(uint16_t) * (size_t)(ROWS * dim));
        rillet_add_rms_norm_bf16(res, x, w, out2, ROWS, dim, eps, 2);
        ok = same_bits(out2, out, ROWS, dim, detail, sizeof detail, "rillet_add_rms_norm_bf16 vs rows") &&
             same_bits(res, want_res, ROWS, dim, detail, sizeof detail, "rillet_add_rms_norm_bf16 residual");
        y_free(out2);
    }
    if (ok) {
        char tmp[600];
        snprintf(tmp, sizeof tmp, "residual exact, out %.480s", detail);
        snprintf(detail, sizeof detail, "%.500s", tmp);
    }
    report(ok, name, detail);
    free(res), free(res0), free(x), free(w), y_free(out), free(ref), free(tol), free(want_res);
}

/* ---- Main ---------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--strict")) strict = 1;
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
        else if (!strcmp(argv[i], "--exclude") && i + 1 < argc) exclude = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--strict] [--only TEXT] [--exclude TEXT]\n"
                    "  --strict: a kernel the sources do not define fails its checks instead of skipping\n"
                    "  --only / --exclude TEXT: run only / leave out the checks whose name contains TEXT\n", argv[0]);
            return 2;
        }
    }
    printf("rillet kernel checks: build for %s, %s\n",
#if defined(__AVX512F__)
           "avx512"
#if defined(__AVX512BF16__)
           "+bf16"
#endif
#if defined(__AVX512VNNI__)
           "+vnni"
#endif
#elif defined(__AVX2__)
           "avx2"
#elif defined(__ARM_NEON)
           "neon"
#if defined(__ARM_FEATURE_DOTPROD)
           "+dotprod"
#endif
#else
           "generic"
#endif
           ,
#if defined(_OPENMP)
           "OpenMP"
#else
           "no OpenMP"
#endif
    );

    /* Linear: every format, shapes with n not a multiple of 16, k of the default model. */
    static const struct { int64_t n, k; int bias, strided; } shapes[] = {
        {40, 576, 1, 0}, {40, 576, 0, 1}, {37, 1536, 1, 1}, {16, 64, 0, 0}, {1, 64, 1, 1},
        {100, 64, 0, 1}, {129, 576, 1, 1}, {3, 1536, 0, 0},
    };
    static const int32_t formats[] = {RILLET_WEIGHT_BF16, RILLET_WEIGHT_Q8, RILLET_WEIGHT_Q4};
    for (size_t f = 0; f < sizeof formats / sizeof formats[0]; f++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            check_linear_shape(formats[f], shapes[s].n, shapes[s].k, shapes[s].bias, shapes[s].strided, 1);
    /* BF16 takes any k (the header restricts only Q8/Q4): an odd one and a small one. */
    check_linear_shape(RILLET_WEIGHT_BF16, 24, 67, 1, 1, 1);
    check_linear_shape(RILLET_WEIGHT_BF16, 33, 6, 0, 0, 1);
    /* Q8/Q4 scales and mins as the float32 the header gives (not float16-exact). */
    check_linear_shape(RILLET_WEIGHT_Q8, 40, 576, 1, 1, 0);
    check_linear_shape(RILLET_WEIGHT_Q4, 40, 576, 1, 1, 0);
    check_pack_refusals();
    check_linear_extremes(RILLET_WEIGHT_Q8);
    check_linear_extremes(RILLET_WEIGHT_Q4);
    check_quantize_rows(576);
    check_quantize_rows(64);

    /* Attention: head_dim 64 and 128, GQA groups 1-4, scattered blocks, contexts 1-300, block
       sizes 16, 32, 7 and 1. */
    static const int32_t ctx_a[] = {1, 16, 17, 300, 129}, ctx_b[] = {300, 2, 63, 64, 65, 200};
    for (int d = 64; d <= 128; d *= 2)
        for (int32_t group = 1; group <= 4; group++)
            check_attention(d, group, 2, 16, group % 2 ? ctx_a : ctx_b, group % 2 ? 5 : 6, group >= 3);
    check_attention(64, 3, 3, 32, ctx_b, 6, 1);
    check_attention(128, 2, 1, 7, ctx_a, 5, 0);
    check_attention(64, 1, 1, 1, ctx_b + 1, 2, 0);
    /* The edges paged_attention.c documents: head_dim a multiple of 8 up to 256, groups up to 16. */
    static const int32_t ctx_c[] = {1, 40, 97};
    check_attention(8, 2, 2, 16, ctx_c, 3, 1);
    check_attention(40, 3, 1, 16, ctx_c, 3, 0);
    check_attention(256, 1, 2, 16, ctx_c, 3, 1);
    check_attention(64, 16, 1, 16, ctx_c, 3, 0);
    check_attention_q(64, 2, 2, 16, ctx_a, 5, 0, 256.0);

    check_argmax(1);
    check_argmax(5);
    check_argmax(49152);

    /* Residual add + RMSNorm. */
    static const int32_t dims[] = {1, 17, 64, 576, 1536};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++) {
        check_norm(dims[i], 1, 1e-5f);
        check_norm(dims[i], 0, 1e-6f);
    }

    if (skipped) printf("%d skipped\n", skipped);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
