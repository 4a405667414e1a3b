/* What the kernel timing programs share: a monotonic clock and a small deterministic RNG. */
#ifndef RILLET_BENCH_COMMON_H
#define RILLET_BENCH_COMMON_H

#include <stdint.h>
#include <time.h>

static inline double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static uint64_t state = 88172645463325252ull;
static inline uint32_t next(void) {  /* xorshift64 */
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return (uint32_t)(state >> 16);
}

#endif
