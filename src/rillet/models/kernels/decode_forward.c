/* A whole decode step of a Llama-family model in one call, for bf16 on the CPU.

   Decoding one token per sequence is about 300 small operations a step (30 layers of norm,
   projections, rotary embedding, cache write, attention, activation). Dispatched one by one from
   Python they cost more than their arithmetic at small batch sizes; here they run back to back
   inside one OpenMP parallel region, with a barrier between dependent stages (the implicit one
   at the end of each stage's `omp for`).

   Built into every instruction-set variant; the projections may be of any weight format
   (rillet_weight: bf16, q8, q4). The arithmetic is rillet's own kernels (linear.c,
   paged_attention.c) plus row-wise
   stages written below. Every stage treats each row on its own, in an order fixed by that row
   alone, so a sequence's tokens do not depend on its batch mates. Prompt tokens take the torch
   path (models/llama.py), whose rounding differs slightly: decode and prompt rows never share
   KV-cache blocks that the prefix cache reuses (only prompt blocks are cached).

   Built and loaded by rillet/models/cpu_kernels.py; driven by rillet/models/cpu_decode.py. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rillet_kernels.h"

/* Mirrored by ctypes structures in rillet/models/cpu_decode.py: keep the two in step. */
typedef struct {
    const uint16_t *input_norm, *post_attention_norm;          /* [hidden] */
    const rillet_weight *qkv, *o, *gate_up, *down;           /* packed, with their biases */
    const uint16_t *q_norm, *k_norm;                         /* [head_dim] (Qwen3) or NULL */
    uint16_t *k_cache, *v_cache;                             /* [num_kv_heads, num_slots, head_dim] */
} rillet_layer;

typedef struct {
    int32_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size;
    float eps, scale;
    int64_t num_slots;
    const uint16_t *embed;       /* [vocab, hidden] */
    const uint16_t *final_norm;  /* [hidden] */
    const float *cos, *sin;      /* [positions, head_dim]; sin signed for the half rotation below */
    const rillet_layer *layers;
} rillet_model;

/* One head of d features in place: optional RMSNorm (Qwen3's q/k norm), then the rotary
   embedding out[i] = x[i] cos[i] + x[(i + d/2) % d] sin_signed[i], in float32, rounded once. */
static void norm_rope_head(uint16_t *x, const uint16_t *norm, float eps, const float *cos, const float *sin, int d) {
    float v[512];
    for (int i = 0; i < d; i++) v[i] = bf16_to_f32(x[i]);
    if (norm != NULL) {
        float sum = 0.0f;
        for (int i = 0; i < d; i++) sum += v[i] * v[i];
        const float inv = 1.0f / sqrtf(sum / (float)d + eps);
        for (int i = 0; i < d; i++) v[i] = bf16_to_f32(f32_to_bf16(v[i] * inv)) * bf16_to_f32(norm[i]);
    }
    const int half = d / 2;
    for (int i = 0; i < d; i++) x[i] = f32_to_bf16(v[i] * cos[i] + v[(i + half) % d] * sin[i]);
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* tokens, positions, slots: [rows] int64 (slot = where the token's K/V go); block_tables
   [rows, max_blocks] int32 and context_lens [rows] int32 (position + 1) as for the attention
   kernel. out: [rows, hidden] bf16, the final norm's output (the logits' input). */
int rillet_decode_forward(const rillet_model *m, const int64_t *tokens, const int64_t *positions,
                               const int64_t *slots, const int32_t *block_tables, int32_t max_blocks,
                               const int32_t *context_lens, int32_t rows, uint16_t *out, int32_t num_threads) {
    const int64_t H = m->hidden, d = m->head_dim, nh = m->num_heads, nkv = m->num_kv_heads, I = m->intermediate;
    const int64_t qkv_width = (nh + 2 * nkv) * d;
    if (d > 512) return -1;
    /* The linears' shared scratch (quantized activations), the largest any of them needs. */
    int64_t scratch_bytes = 0;
    for (int l = 0; l < m->num_layers; l++) {
        const rillet_weight *ws[4] = {m->layers[l].qkv, m->layers[l].o, m->layers[l].gate_up, m->layers[l].down};
        for (int i = 0; i < 4; i++) {
            const int64_t b = rillet_linear_scratch_bytes(ws[i], rows);
            scratch_bytes = b > scratch_bytes ? b : scratch_bytes;
        }
    }
    void *scratch = scratch_bytes > 0 ? aligned_alloc(64, (size_t)scratch_bytes) : NULL;
    if (scratch_bytes > 0 && scratch == NULL) return -2;
    /* Scratch: the residual stream, a stage's input and output, and the wide activations. */
    const size_t widest = (size_t)(qkv_width > 2 * I ? qkv_width : 2 * I);
    uint16_t *buffer = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)rows * (3 * (size_t)H + widest + (size_t)I + (size_t)nh * d));
    if (buffer == NULL) {
        free(scratch);
        return -2;
    }
    uint16_t *residual = buffer, *normed = residual + rows * H, *x = normed + rows * H;
    uint16_t *wide = x + rows * H, *act = wide + rows * widest, *attn = act + rows * I;

    /* Whether a KV head's attention output (its group of query heads) is whole RILLET_QBLOCKs of
       the o projection's input, so that the attention task can prepare it for the o projection. */
    const int64_t group = nh / nkv;
    const int o_by_group = (group * d) % RILLET_QBLOCK == 0;

#pragma omp parallel num_threads(num_threads)
    {
        float *scores = NULL;  /* this thread's attention scratch */
        size_t capacity = 0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            memcpy(residual + r * H, m->embed + tokens[r] * H, sizeof(uint16_t) * H);
            rillet_add_rms_norm_row(residual + r * H, NULL, m->layers[0].input_norm, normed + r * H, (int32_t)H, m->eps);
            rillet_linear_prepare(m->layers[0].qkv, normed + r * H, r, rows, 0, H, scratch);
        }
        for (int l = 0; l < m->num_layers; l++) {
            const rillet_layer *layer = &m->layers[l];
            /* Each stage prepares its rows for the next projection as it makes them: one barrier
               (the `omp for`'s) between a stage and the projection that reads it. */
            rillet_linear_run_part(layer->qkv, normed, H, wide, rows, scratch);
            /* One task per (row, KV head): norm + rotary of its query heads and its key head, its
               key and value into the cache at the token's slot, then attention over the context.
               Only this task reads or writes that head of that row's cache slot. */
#pragma omp for collapse(2) schedule(dynamic, 1)
            for (int64_t r = 0; r < rows; r++) {
                for (int64_t h = 0; h < nkv; h++) {
                    uint16_t *row = wide + r * qkv_width;
                    const float *cos = m->cos + positions[r] * d, *sin = m->sin + positions[r] * d;
                    for (int64_t g = 0; g < group; g++)
                        norm_rope_head(row + (h * group + g) * d, layer->q_norm, m->eps, cos, sin, (int)d);
                    uint16_t *k = row + (nh + h) * d;
                    norm_rope_head(k, layer->k_norm, m->eps, cos, sin, (int)d);
                    uint16_t *k_head = layer->k_cache + h * m->num_slots * d, *v_head = layer->v_cache + h * m->num_slots * d;
                    memcpy(k_head + slots[r] * d, k, sizeof(uint16_t) * d);
                    memcpy(v_head + slots[r] * d, row + (nh + nkv + h) * d, sizeof(uint16_t) * d);
                    uint16_t *out_group = attn + r * nh * d + h * group * d;
                    rillet_paged_attention_task(row + h * group * d, k_head, v_head, block_tables + r * max_blocks,
                                                context_lens[r], (int32_t)group, (int32_t)d, m->block_size, m->scale,
                                                out_group, &scores, &capacity);
                    if (o_by_group)
                        rillet_linear_prepare(layer->o, attn + r * nh * d, r, rows, h * group * d, group * d, scratch);
                }
            }
            if (!o_by_group) {
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; r++)
                    rillet_linear_prepare(layer->o, attn + r * nh * d, r, rows, 0, nh * d, scratch);
            }
            rillet_linear_run_part(layer->o, attn, nh * d, x, rows, scratch);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                rillet_add_rms_norm_row(residual + r * H, x + r * H, layer->post_attention_norm, normed + r * H,
                                        (int32_t)H, m->eps);
                rillet_linear_prepare(layer->gate_up, normed + r * H, r, rows, 0, H, scratch);
            }
            rillet_linear_run_part(layer->gate_up, normed, H, wide, rows, scratch);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                const uint16_t *gate = wide + r * 2 * I, *up = gate + I;
                uint16_t *a = act + r * I;
                for (int64_t i = 0; i < I; i++)
                    a[i] = f32_to_bf16(silu(bf16_to_f32(gate[i])) * bf16_to_f32(up[i]));
                rillet_linear_prepare(layer->down, a, r, rows, 0, I, scratch);
            }
            rillet_linear_run_part(layer->down, act, I, x, rows, scratch);
            const rillet_layer *next = l + 1 < m->num_layers ? &m->layers[l + 1] : NULL;
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                if (next != NULL) {
                    rillet_add_rms_norm_row(residual + r * H, x + r * H, next->input_norm, normed + r * H, (int32_t)H,
                                            m->eps);
                    rillet_linear_prepare(next->qkv, normed + r * H, r, rows, 0, H, scratch);
                } else {
                    rillet_add_rms_norm_row(residual + r * H, x + r * H, m->final_norm, out + r * H, (int32_t)H, m->eps);
                }
            }
        }
        free(scores);
    }
    free(buffer);
    free(scratch);
    return 0;
}
