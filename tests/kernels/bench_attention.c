/* Timing of paged_attention.c's decode attention as a decode step runs it: every layer's own
   cache (so K and V come from memory, not from the last layer's reads), sequences whose blocks
   interleave in the cache as they do when many sequences grow together, one parallel region a
   layer. Reports ms a step and GB/s of K/V read. Build with any ISA flags:

       K=src/rillet/models/kernels
       cc -O3 -fopenmp -mavx2 -mfma -mf16c -I$K tests/kernels/bench_attention.c $K/paged_attention.c -lm -o /tmp/ba
       /tmp/ba [threads] [context,context,...] [sequences]

   SmolLM2-135M's shape: 30 layers, 9 query heads over 3 KV heads of 64, blocks of 16 slots. */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_common.h"
#include "rillet_kernels.h"

void rillet_paged_decode_attention_bf16(
    const uint16_t *q, int64_t q_row_stride, const uint16_t *k_cache, const uint16_t *v_cache,
    int64_t num_slots, const int32_t *block_tables, int32_t max_blocks, const int32_t *context_lens,
    int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
    float scale, uint16_t *out, int32_t num_threads);

enum { LAYERS = 30, NH = 9, NKV = 3, D = 64, BS = 16 };

int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 2;
    const int seqs = argc > 3 ? atoi(argv[3]) : 16;
    int ctxs[16], nc = 0;
    {
        char buf[256];
        snprintf(buf, sizeof buf, "%s", argc > 2 ? argv[2] : "128,512,2048");
        for (char *t = strtok(buf, ","); t && nc < 16; t = strtok(NULL, ",")) ctxs[nc++] = atoi(t);
    }
    for (int c = 0; c < nc; c++) {
        const int ctx = ctxs[c], max_blocks = (ctx + BS - 1) / BS, num_blocks = seqs * max_blocks;
        const int64_t num_slots = (int64_t)num_blocks * BS, cache = NKV * num_slots * D;
        /* block j of sequence s is block j * seqs + s: the sequences' blocks interleave */
        int32_t *tables = malloc(sizeof(int32_t) * (size_t)seqs * (size_t)max_blocks), *lens = malloc(sizeof(int32_t) * (size_t)seqs);
        for (int s = 0; s < seqs; s++) {
            lens[s] = ctx;
            for (int j = 0; j < max_blocks; j++) tables[s * max_blocks + j] = j * seqs + s;
        }
        uint16_t *k = malloc(sizeof(uint16_t) * (size_t)(LAYERS * cache)), *v = malloc(sizeof(uint16_t) * (size_t)(LAYERS * cache));
        for (int64_t i = 0; i < LAYERS * cache; i++) {
            k[i] = (uint16_t)(0x3c00 + (next() & 0x3ff) - 0x200);  /* bf16 values near +-1 */
            v[i] = (uint16_t)(0x3c00 + (next() & 0x3ff) - 0x200);
        }
        uint16_t *q = malloc(sizeof(uint16_t) * (size_t)(seqs * NH * D)), *out = malloc(sizeof(uint16_t) * (size_t)(seqs * NH * D));
        for (int i = 0; i < seqs * NH * D; i++) q[i] = (uint16_t)(0x3c00 + (next() & 0x3ff) - 0x200);
        double best = 1e9;
        for (int rep = 0; rep < 7; rep++) {
            const double t = now();
            for (int l = 0; l < LAYERS; l++)
                rillet_paged_decode_attention_bf16(q, NH * D, k + l * cache, v + l * cache, num_slots, tables, max_blocks,
                                                   lens, seqs, NH, NKV, D, BS, 0.125f, out, threads);
            const double dt = now() - t;
            best = dt < best ? dt : best;
        }
        const double bytes = 2.0 * LAYERS * seqs * NKV * (double)ctx * D * 2;
        printf("%d seqs x ctx %5d: %7.3f ms a step, %5.1f GB/s of K/V\n", seqs, ctx, best * 1e3, bytes / best / 1e9);
        free(k); free(v); free(q); free(out); free(tables); free(lens);
    }
    return 0;
}
