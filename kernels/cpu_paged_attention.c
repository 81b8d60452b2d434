/*
 * Paged causal attention on the CPU, reading K/V blocks in place.
 *
 * Cache layout (DESIGN.md section 3), block-major:
 *   kv_cache[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
 * Query rows are the step's flattened batch [num_rows, num_heads, head_dim];
 * sequence s owns rows query_start_loc[s] .. query_start_loc[s + 1] and has
 * seq_lens[s] tokens of context after the step, so its row i sits at position
 * seq_lens[s] - q_len + i and attends to positions 0 .. that position.
 *
 * One task is (row, kv head): the head's query group (num_heads / num_kv_heads
 * heads) shares every K/V row it reads, so GQA costs no extra memory traffic.
 * Scores, softmax and the weighted V sum are fp32 (like the torch reference);
 * K/V and the query may be fp32 or bf16. Sequences with more than
 * max_rows_per_seq rows are skipped (the caller attends those, e.g. with a
 * flash-attention prefill): their output rows are left untouched.
 *
 * Vector paths (cpu_simd.h): AVX-512 or AVX2 + FMA, whichever the build's
 * -march has, else plain C loops the compiler vectorises as it can. Built by
 * splitserve.kernels.cpu_library once per ISA level (-march=x86-64-v4/v3/v2)
 * or -march=native, with -O3 -ffast-math -fopenmp; the OpenMP runtime is the
 * one torch already loaded.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>

#include "cpu_dtype.h"
#include "cpu_simd.h"

/* sh[0..n) = exp(sh - max(sh)) in place; returns their sum. */
static inline float exp_shifted(float *sh, int64_t n) {
    float m = sh[0];
    for (int64_t t = 1; t < n; ++t) m = sh[t] > m ? sh[t] : m;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
        sh[t] = expf(sh[t] - m);
        sum += sh[t];
    }
    return sum;
}

static inline void load_row(const void *base, int64_t index, int dtype, int64_t n, float *dst) {
    if (dtype == DTYPE_F32) {
        memcpy(dst, (const float *)base + index, (size_t)n * sizeof(float));
    } else {
        const uint16_t *src = (const uint16_t *)base + index;
#pragma omp simd
        for (int64_t d = 0; d < n; ++d) dst[d] = bf16_to_f32(src[d]);
    }
}

static inline void store_row(void *base, int64_t index, int dtype, int64_t n, const float *src) {
    if (dtype == DTYPE_F32) {
        memcpy((float *)base + index, src, (size_t)n * sizeof(float));
    } else {
        uint16_t *dst = (uint16_t *)base + index;
#pragma omp simd
        for (int64_t d = 0; d < n; ++d) dst[d] = f32_to_bf16(src[d]);
    }
}

/* scores[h * stride + t] = q[h] . k_t for the tokens of one block. */
static inline void block_scores_f32(const float *k, int64_t token_stride, int64_t num_tokens, const float *q,
                                    int64_t group, int64_t head_dim, float *scores, int64_t stride) {
    for (int64_t t = 0; t < num_tokens; ++t) {
        const float *kt = k + t * token_stride;
        for (int64_t h = 0; h < group; ++h) {
            const float *qh = q + h * head_dim;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < head_dim; ++d) acc += qh[d] * kt[d];
            scores[h * stride + t] = acc;
        }
    }
}

static inline void block_scores_bf16(const uint16_t *k, int64_t token_stride, int64_t num_tokens, const float *q,
                                     int64_t group, int64_t head_dim, float *scores, int64_t stride) {
    for (int64_t t = 0; t < num_tokens; ++t) {
        const uint16_t *kt = k + t * token_stride;
        for (int64_t h = 0; h < group; ++h) {
            const float *qh = q + h * head_dim;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < head_dim; ++d) acc += qh[d] * bf16_to_f32(kt[d]);
            scores[h * stride + t] = acc;
        }
    }
}

/* acc[h] += p[h * stride + t] * v_t for the tokens of one block. */
static inline void block_values_f32(const float *v, int64_t token_stride, int64_t num_tokens, const float *p,
                                    int64_t group, int64_t head_dim, float *acc, int64_t stride) {
    for (int64_t t = 0; t < num_tokens; ++t) {
        const float *vt = v + t * token_stride;
        for (int64_t h = 0; h < group; ++h) {
            const float w = p[h * stride + t];
            float *ah = acc + h * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) ah[d] += w * vt[d];
        }
    }
}

static inline void block_values_bf16(const uint16_t *v, int64_t token_stride, int64_t num_tokens, const float *p,
                                     int64_t group, int64_t head_dim, float *acc, int64_t stride) {
    for (int64_t t = 0; t < num_tokens; ++t) {
        const uint16_t *vt = v + t * token_stride;
        for (int64_t h = 0; h < group; ++h) {
            const float w = p[h * stride + t];
            float *ah = acc + h * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) ah[d] += w * bf16_to_f32(vt[d]);
        }
    }
}

#if defined(SIMD_VF)
/*
 * One (row, kv head) task with head_dim a multiple of VW (up to 256). Scores
 * go a block at a time: per head of the group, VW tokens' dot products are
 * reduced together (v_sums) rather than one horizontal sum per token, and the
 * block's K rows, read from memory for the first head, are in L1 for the
 * others. The weighted V sum reads each V row once for the whole group (the
 * group's accumulators stay in registers) where they fit, else per head.
 * Inlined with head_dim, the group and the cache dtype as constants so the
 * loops unroll.
 */
/* exp_shifted with the inline vector exp (cpu_simd.h) instead of libm's. */
SIMD_INLINE float exp_shifted_simd(float *sh, int64_t n) {
    vf mv = v_set1(-FLT_MAX);
    int64_t t = 0;
    for (; t + VW <= n; t += VW) mv = v_maxv(mv, v_load(sh + t));
    float m = v_max(mv);
    for (; t < n; ++t) m = sh[t] > m ? sh[t] : m;
    const vf shift = v_set1(m);
    vf sums = v_zero();
    for (t = 0; t + VW <= n; t += VW) {
        const vf e = v_exp(v_sub(v_load(sh + t), shift));
        v_store(sh + t, e);
        sums = v_add(sums, e);
    }
    float sum = v_sum(sums);
    for (; t < n; ++t) {
        sh[t] = expf(sh[t] - m);
        sum += sh[t];
    }
    return sum;
}

/* The cache lines of a block's rows for one head: a block is one short run
 * of rows and the next lies elsewhere, too soon for the hardware prefetcher.
 * Rows longer than 256 bytes are left to it (measured: prefetching fp32
 * head_dim 128 rows made the kernel ~20% slower; 64 and bf16 gain 15-30%). */
SIMD_INLINE void prefetch_rows(const void *kv_cache, int64_t first_row, int64_t rows, int64_t token_stride,
                               int64_t head_dim, int bf16) {
    const char *base = (const char *)kv_cache;
    const int64_t elem = bf16 ? 2 : 4;
    if (head_dim * elem > 256) return;
    for (int64_t t = 0; t < rows; ++t)
        for (int64_t off = 0; off < head_dim * elem; off += 64)
            _mm_prefetch(base + (first_row + t * token_stride) * elem + off, _MM_HINT_T0);
}

SIMD_INLINE void attend_simd(
    const void *kv_cache, const int bf16, const int32_t *table, int64_t context, int64_t block_size,
    int64_t block_stride, int64_t k_offset, int64_t kv_stride, int64_t token_stride, const float *q,
    const int64_t group, const int64_t head_dim, float *scores, int64_t score_stride, float *acc) {
    const int64_t num_chunks = head_dim / VW;
    const int64_t used_blocks = (context + block_size - 1) / block_size;
    for (int64_t b = 0; b < used_blocks; ++b) {
        const int64_t first = b * block_size;
        const int64_t n = context - first < block_size ? context - first : block_size;
        const int64_t base = (int64_t)table[b] * block_stride + k_offset;
        if (b + 1 < used_blocks)
            prefetch_rows(kv_cache, (int64_t)table[b + 1] * block_stride + k_offset, block_size, token_stride,
                          head_dim, bf16);
        for (int64_t h = 0; h < group; ++h) {
            const float *qh = q + h * head_dim;
            float *sh = scores + h * score_stride + first;
            int64_t t = 0;
            for (; t + VW <= n; t += VW) {
                vf dots[VW];
                for (int64_t j = 0; j < VW; ++j) {
                    const int64_t row = base + (t + j) * token_stride;
                    vf a = v_mul(v_load(qh), v_load_kv(kv_cache, row, bf16));
                    for (int64_t c = 1; c < num_chunks; ++c)
                        a = v_fmadd(v_load(qh + VW * c), v_load_kv(kv_cache, row + VW * c, bf16), a);
                    dots[j] = a;
                }
                v_store(sh + t, v_sums(dots));
            }
            for (; t < n; ++t) {
                const int64_t row = base + t * token_stride;
                vf a = v_mul(v_load(qh), v_load_kv(kv_cache, row, bf16));
                for (int64_t c = 1; c < num_chunks; ++c)
                    a = v_fmadd(v_load(qh + VW * c), v_load_kv(kv_cache, row + VW * c, bf16), a);
                sh[t] = v_sum(a);
            }
        }
    }
    float inv[256];
    for (int64_t h = 0; h < group; ++h) inv[h] = 1.f / exp_shifted_simd(scores + h * score_stride, context);
    /* Register budget: the group's accumulators plus a V row must fit (V_REGS). */
    const int one_pass = group * num_chunks + num_chunks <= V_REGS - 4;
    for (int64_t h0 = 0; h0 < group; h0 += one_pass ? group : 1) {
        const int64_t heads = one_pass ? group : 1;
        vf av[V_REGS + 256 / VW];
        for (int64_t i = 0; i < heads * num_chunks; ++i) av[i] = v_zero();
        for (int64_t b = 0; b < used_blocks; ++b) {
            const int64_t first = b * block_size;
            const int64_t n = context - first < block_size ? context - first : block_size;
            const int64_t base = (int64_t)table[b] * block_stride + k_offset + kv_stride;
            if (b + 1 < used_blocks)
                prefetch_rows(kv_cache, (int64_t)table[b + 1] * block_stride + k_offset + kv_stride, block_size,
                              token_stride, head_dim, bf16);
            for (int64_t t = 0; t < n; ++t) {
                const int64_t row = base + t * token_stride;
                vf vrow[256 / VW];
                for (int64_t c = 0; c < num_chunks; ++c) vrow[c] = v_load_kv(kv_cache, row + VW * c, bf16);
                for (int64_t h = 0; h < heads; ++h) {
                    const vf w = v_set1(scores[(h0 + h) * score_stride + first + t]);
                    for (int64_t c = 0; c < num_chunks; ++c)
                        av[h * num_chunks + c] = v_fmadd(w, vrow[c], av[h * num_chunks + c]);
                }
            }
        }
        for (int64_t h = 0; h < heads; ++h) {
            const vf scale = v_set1(inv[h0 + h]);
            for (int64_t c = 0; c < num_chunks; ++c)
                v_store(acc + (h0 + h) * head_dim + VW * c, v_mul(av[h * num_chunks + c], scale));
        }
    }
}

/* Dispatch on the constants the inlined body specialises for; 0 if not taken. */
static int attend_fast(const void *kv_cache, int cache_dtype, const int32_t *table, int64_t context,
                       int64_t block_size, int64_t block_stride, int64_t k_offset, int64_t kv_stride,
                       int64_t token_stride, const float *q, int64_t group, int64_t head_dim, float *scores,
                       int64_t score_stride, float *acc) {
#define ATTEND(BF16, G, D) attend_simd(kv_cache, BF16, table, context, block_size, block_stride, k_offset, \
                                       kv_stride, token_stride, q, G, D, scores, score_stride, acc)
#define ATTEND_G(BF16, D)                                          \
    switch (group) {                                               \
        case 1: ATTEND(BF16, 1, D); break;                         \
        case 2: ATTEND(BF16, 2, D); break;                         \
        case 4: ATTEND(BF16, 4, D); break;                         \
        default: ATTEND(BF16, group, D); break;                    \
    }
    const int bf16 = cache_dtype == DTYPE_BF16;
    if (group > 256) return 0;
    switch (head_dim) {
        case 64: if (bf16) { ATTEND_G(1, 64) } else { ATTEND_G(0, 64) } return 1;
        case 128: if (bf16) { ATTEND_G(1, 128) } else { ATTEND_G(0, 128) } return 1;
        default:
            if (head_dim % VW || head_dim > 256) return 0;
            if (bf16) ATTEND(1, group, head_dim); else ATTEND(0, group, head_dim);
            return 1;
    }
#undef ATTEND_G
#undef ATTEND
}
#else
static int attend_fast(const void *kv_cache, int cache_dtype, const int32_t *table, int64_t context,
                       int64_t block_size, int64_t block_stride, int64_t k_offset, int64_t kv_stride,
                       int64_t token_stride, const float *q, int64_t group, int64_t head_dim, float *scores,
                       int64_t score_stride, float *acc) {
    (void)kv_cache; (void)cache_dtype; (void)table; (void)context; (void)block_size; (void)block_stride;
    (void)k_offset; (void)kv_stride; (void)token_stride; (void)q; (void)group; (void)head_dim; (void)scores;
    (void)score_stride; (void)acc;
    return 0;
}
#endif

/* The vector path this build compiled, so a loader can tell a level from a silent fallback. */
const char *splitserve_kernel_simd(void) { return SIMD_PATH; }

/*
 * Returns 0, or a negative code: -1 bad shape arguments, -2 out of memory,
 * -3 a block id outside [0, num_blocks).
 */
int splitserve_paged_attention(
    const void *query, int query_dtype, int64_t query_row_stride, int64_t query_head_stride,
    void *out,  /* [num_rows, num_heads, head_dim] contiguous, query_dtype */
    const void *kv_cache, int cache_dtype, int64_t num_blocks, int64_t num_layers, int64_t layer,
    int64_t block_size, int64_t num_kv_heads, int64_t head_dim, int64_t num_heads,
    const int32_t *block_tables, int64_t block_table_width,
    const int32_t *seq_lens, const int32_t *query_start_loc, int64_t num_seqs,
    int64_t max_rows_per_seq, int64_t max_seq_len, float scale, int num_threads) {
    if (num_seqs < 0 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || head_dim <= 0 || block_size <= 0
        || layer < 0 || layer >= num_layers)
        return -1;
    const int64_t group = num_heads / num_kv_heads;
    const int64_t num_rows = num_seqs > 0 ? query_start_loc[num_seqs] : 0;
    if (num_rows == 0) return 0;

    /* One task per (row, kv head) of the sequences this call attends. */
    int64_t *row_seq = (int64_t *)malloc((size_t)num_rows * sizeof(int64_t));
    if (row_seq == NULL) return -2;
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t q_len = query_start_loc[s + 1] - query_start_loc[s];
        for (int64_t r = query_start_loc[s]; r < query_start_loc[s + 1]; ++r)
            row_seq[r] = q_len > max_rows_per_seq ? -1 : s;
    }

    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t kv_stride = block_size * token_stride;       /* K -> V */
    const int64_t layer_stride = 2 * kv_stride;
    const int64_t block_stride = num_layers * layer_stride;
    const int64_t num_tasks = num_rows * num_kv_heads;
    const int64_t score_stride = max_seq_len;
    /* Chunks of 4 tasks where there are plenty; one at a time for a small
     * batch, so its few (row, kv head) tasks spread over every thread. */
    const int chunk = num_tasks >= 8 * (int64_t)num_threads ? 4 : 1;
    int status = 0;

#pragma omp parallel num_threads(num_threads)
    {
        float *scores = (float *)malloc((size_t)(group * score_stride) * sizeof(float));
        float *q = (float *)malloc((size_t)(group * head_dim) * sizeof(float));
        float *acc = (float *)malloc((size_t)(group * head_dim) * sizeof(float));
        if (scores == NULL || q == NULL || acc == NULL) {
#pragma omp atomic write
            status = -2;
        }
#pragma omp for schedule(dynamic, chunk)
        for (int64_t task = 0; task < num_tasks; ++task) {
            const int64_t row = task / num_kv_heads, kvh = task % num_kv_heads;
            const int64_t s = row_seq[row];
            if (s < 0 || scores == NULL || q == NULL || acc == NULL) continue;
            const int64_t q_len = query_start_loc[s + 1] - query_start_loc[s];
            const int64_t context = seq_lens[s] - q_len + (row - query_start_loc[s]) + 1;
            if (context <= 0 || context > max_seq_len) {
#pragma omp atomic write
                status = -1;
                continue;
            }
            for (int64_t h = 0; h < group; ++h) {
                load_row(query, row * query_row_stride + (kvh * group + h) * query_head_stride, query_dtype,
                         head_dim, q + h * head_dim);
                for (int64_t d = 0; d < head_dim; ++d) q[h * head_dim + d] *= scale;
            }
            const int32_t *table = block_tables + s * block_table_width;
            const int64_t used_blocks = (context + block_size - 1) / block_size;
            int bad_block = 0;
            for (int64_t b = 0; b < used_blocks; ++b)
                if (table[b] < 0 || table[b] >= num_blocks) bad_block = 1;
            if (bad_block) {
#pragma omp atomic write
                status = -3;
                continue;
            }
            if (attend_fast(kv_cache, cache_dtype, table, context, block_size, block_stride,
                            layer * layer_stride + kvh * head_dim, kv_stride, token_stride, q, group, head_dim,
                            scores, score_stride, acc)) {
                for (int64_t h = 0; h < group; ++h)
                    store_row(out, (row * num_heads + kvh * group + h) * head_dim, query_dtype, head_dim,
                              acc + h * head_dim);
                continue;
            }
            for (int64_t b = 0; b < used_blocks; ++b) {
                const int64_t block = table[b];
                const int64_t first = b * block_size;
                const int64_t n = context - first < block_size ? context - first : block_size;
                const int64_t k_index = block * block_stride + layer * layer_stride + kvh * head_dim;
                if (cache_dtype == DTYPE_F32)
                    block_scores_f32((const float *)kv_cache + k_index, token_stride, n, q, group, head_dim,
                                     scores + first, score_stride);
                else
                    block_scores_bf16((const uint16_t *)kv_cache + k_index, token_stride, n, q, group, head_dim,
                                      scores + first, score_stride);
            }
            for (int64_t h = 0; h < group; ++h) {
                float *sh = scores + h * score_stride;
                const float inv = 1.f / exp_shifted(sh, context);
#pragma omp simd
                for (int64_t t = 0; t < context; ++t) sh[t] *= inv;
            }
            memset(acc, 0, (size_t)(group * head_dim) * sizeof(float));
            for (int64_t b = 0; b < used_blocks; ++b) {
                const int64_t first = b * block_size;
                const int64_t n = context - first < block_size ? context - first : block_size;
                const int64_t v_index = (int64_t)table[b] * block_stride + layer * layer_stride + kv_stride
                                        + kvh * head_dim;
                if (cache_dtype == DTYPE_F32)
                    block_values_f32((const float *)kv_cache + v_index, token_stride, n, scores + first, group,
                                     head_dim, acc, score_stride);
                else
                    block_values_bf16((const uint16_t *)kv_cache + v_index, token_stride, n, scores + first,
                                      group, head_dim, acc, score_stride);
            }
            for (int64_t h = 0; h < group; ++h)
                store_row(out, (row * num_heads + kvh * group + h) * head_dim, query_dtype, head_dim,
                          acc + h * head_dim);
        }
        free(scores);
        free(q);
        free(acc);
    }
    free(row_seq);
    return status;
}

/*
 * Prefill chunks: flash attention over (tile of TILE_ROWS query rows) x (chunk
 * of up to KEY_CHUNK keys, one vector: 16 with AVX-512, 8 with AVX2). Each K
 * chunk is transposed once into [head_dim][KEY_CHUNK] fp32 and each V chunk
 * widened once into [KEY_CHUNK][head_dim], then reused by every row and head
 * of the group, so the scores of a chunk are head_dim broadcast FMAs (no
 * horizontal sums) and the softmax is online (running max and sum per row).
 * Sequences with fewer than min_rows rows are skipped (their out rows
 * untouched). Same return codes as splitserve_paged_attention, plus -4 when
 * this build cannot tile (see splitserve_can_tile).
 */
#if defined(SIMD_VF)
enum { TILE_ROWS = 64, KEY_CHUNK = VW };
#endif

int splitserve_can_tile(int64_t head_dim, int64_t block_size) {
#if defined(SIMD_VF)
    return head_dim % VW == 0 && head_dim <= 256 && block_size > 0
           && (block_size <= KEY_CHUNK ? KEY_CHUNK % block_size == 0 : block_size % KEY_CHUNK == 0);
#else
    (void)head_dim; (void)block_size;
    return 0;
#endif
}

#if defined(SIMD_VF)
SIMD_INLINE void attend_tile(
    const void *query, int query_dtype, int64_t query_row_stride, int64_t query_head_stride, void *out,
    const void *kv_cache, const int bf16, const int32_t *table, int64_t seq_len, int64_t q_len,
    int64_t first_row /* of the sequence */, int64_t tile_start /* within the sequence */, int64_t tile_rows,
    int64_t block_size, int64_t block_stride, int64_t k_offset, int64_t kv_stride, int64_t token_stride,
    int64_t kvh, int64_t group, int64_t num_heads, const int64_t head_dim, float scale, float *qbuf,
    float *acc, float *kt, float *vb, float *sc) {
    const int64_t num_chunks = head_dim / VW;
    /* Two FMA chains over the keys where both sets of accumulators fit the registers. */
    const int two_chains = 2 * num_chunks + 2 <= V_REGS;
    const int64_t num_vecs = tile_rows * group;
    float m[TILE_ROWS * 16], l[TILE_ROWS * 16]; /* group <= 16 */
    for (int64_t r = 0; r < tile_rows; ++r)
        for (int64_t h = 0; h < group; ++h) {
            const int64_t row = first_row + tile_start + r, i = r * group + h;
            load_row(query, row * query_row_stride + (kvh * group + h) * query_head_stride, query_dtype, head_dim,
                     qbuf + i * head_dim);
            for (int64_t d = 0; d < head_dim; ++d) qbuf[i * head_dim + d] *= scale;
            m[i] = -1e30f;
            l[i] = 0.f;
            memset(acc + i * head_dim, 0, (size_t)head_dim * sizeof(float));
        }
    const int64_t first_pos = seq_len - q_len + tile_start;        /* position of the tile's first row */
    const int64_t context = first_pos + tile_rows;                 /* keys the last row sees */
    const int64_t chunk = block_size < KEY_CHUNK ? block_size : KEY_CHUNK;
    for (int64_t key0 = 0; key0 < context; key0 += chunk) {
        const int64_t n = context - key0 < chunk ? context - key0 : chunk;
        const int64_t block = table[key0 / block_size], offset = key0 % block_size;
        const int64_t base = block * block_stride + k_offset + offset * token_stride;
        for (int64_t t = 0; t < KEY_CHUNK; ++t)
            for (int64_t c = 0; c < num_chunks; ++c) {
                const vf kv = t < n ? v_load_kv(kv_cache, base + t * token_stride + VW * c, bf16) : v_zero();
                float tmp[VW];
                v_store(tmp, kv);
                for (int64_t j = 0; j < VW; ++j) kt[(VW * c + j) * KEY_CHUNK + t] = tmp[j];
                const vf vv = t < n ? v_load_kv(kv_cache, base + kv_stride + t * token_stride + VW * c, bf16)
                                    : v_zero();
                v_store(vb + t * head_dim + VW * c, vv);
            }
        /* Rows before the chunk's first key see none of it; the others' scores
         * are computed eight query vectors at a time (independent FMA chains). */
        const int64_t first_vec = (key0 > first_pos ? key0 - first_pos : 0) * group;
        int64_t i = first_vec;
        for (; i + 8 <= num_vecs; i += 8) {
            vf s0 = v_zero(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
            const float *q0 = qbuf + i * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) {
                const vf kd = v_load(kt + d * KEY_CHUNK);
                s0 = v_fmadd(v_set1(q0[d]), kd, s0);
                s1 = v_fmadd(v_set1(q0[head_dim + d]), kd, s1);
                s2 = v_fmadd(v_set1(q0[2 * head_dim + d]), kd, s2);
                s3 = v_fmadd(v_set1(q0[3 * head_dim + d]), kd, s3);
                s4 = v_fmadd(v_set1(q0[4 * head_dim + d]), kd, s4);
                s5 = v_fmadd(v_set1(q0[5 * head_dim + d]), kd, s5);
                s6 = v_fmadd(v_set1(q0[6 * head_dim + d]), kd, s6);
                s7 = v_fmadd(v_set1(q0[7 * head_dim + d]), kd, s7);
            }
            v_store(sc + (i + 0) * KEY_CHUNK, s0);
            v_store(sc + (i + 1) * KEY_CHUNK, s1);
            v_store(sc + (i + 2) * KEY_CHUNK, s2);
            v_store(sc + (i + 3) * KEY_CHUNK, s3);
            v_store(sc + (i + 4) * KEY_CHUNK, s4);
            v_store(sc + (i + 5) * KEY_CHUNK, s5);
            v_store(sc + (i + 6) * KEY_CHUNK, s6);
            v_store(sc + (i + 7) * KEY_CHUNK, s7);
        }
        for (; i < num_vecs; ++i) {
            const float *qi = qbuf + i * head_dim;
            vf s0 = v_zero(), s1 = s0;
            int64_t d = 0;
            for (; d + 2 <= head_dim; d += 2) {
                s0 = v_fmadd(v_set1(qi[d]), v_load(kt + d * KEY_CHUNK), s0);
                s1 = v_fmadd(v_set1(qi[d + 1]), v_load(kt + (d + 1) * KEY_CHUNK), s1);
            }
            v_store(sc + i * KEY_CHUNK, v_add(s0, s1));
        }
        for (i = first_vec; i < num_vecs; ++i) {
            const int64_t pos = first_pos + i / group;
            const int64_t visible = pos - key0 + 1 < n ? pos - key0 + 1 : n;
            const vf s = v_first(v_load(sc + i * KEY_CHUNK), visible, -1e30f);
            const float m_new = fmaxf(m[i], v_max(s));
            /* No expf where nothing needs rescaling: a row's first chunk (nothing
             * summed yet) and chunks that leave its running max where it was. */
            const float alpha = m[i] == -1e30f ? 0.f : m_new == m[i] ? 1.f : expf(m[i] - m_new);
            const vf p = v_first(v_exp(v_sub(s, v_set1(m_new))), visible, 0.f);
            l[i] = l[i] * alpha + v_sum(p);
            m[i] = m_new;
            float pt[KEY_CHUNK];
            v_store(pt, p);
            vf av[256 / VW], bv[256 / VW];
            const vf a = v_set1(alpha);
            for (int64_t c = 0; c < num_chunks; ++c) {
                av[c] = v_mul(v_load(acc + i * head_dim + VW * c), a);
                bv[c] = v_zero();
            }
            int64_t t = 0;
            if (two_chains)
                for (; t + 2 <= visible; t += 2) {
                    const vf w0 = v_set1(pt[t]), w1 = v_set1(pt[t + 1]);
                    for (int64_t c = 0; c < num_chunks; ++c) {
                        av[c] = v_fmadd(w0, v_load(vb + t * head_dim + VW * c), av[c]);
                        bv[c] = v_fmadd(w1, v_load(vb + (t + 1) * head_dim + VW * c), bv[c]);
                    }
                }
            for (; t < visible; ++t) {
                const vf w0 = v_set1(pt[t]);
                for (int64_t c = 0; c < num_chunks; ++c) av[c] = v_fmadd(w0, v_load(vb + t * head_dim + VW * c), av[c]);
            }
            for (int64_t c = 0; c < num_chunks; ++c)
                v_store(acc + i * head_dim + VW * c, two_chains ? v_add(av[c], bv[c]) : av[c]);
        }
    }
    for (int64_t i = 0; i < num_vecs; ++i) {
        const float inv = 1.f / l[i];
        for (int64_t d = 0; d < head_dim; ++d) acc[i * head_dim + d] *= inv;
        const int64_t r = i / group, h = i % group;
        store_row(out, ((first_row + tile_start + r) * num_heads + kvh * group + h) * head_dim, query_dtype,
                  head_dim, acc + i * head_dim);
    }
}
#endif

int splitserve_paged_attention_tiled(
    const void *query, int query_dtype, int64_t query_row_stride, int64_t query_head_stride, void *out,
    const void *kv_cache, int cache_dtype, int64_t num_blocks, int64_t num_layers, int64_t layer,
    int64_t block_size, int64_t num_kv_heads, int64_t head_dim, int64_t num_heads,
    const int32_t *block_tables, int64_t block_table_width,
    const int32_t *seq_lens, const int32_t *query_start_loc, int64_t num_seqs,
    int64_t min_rows, float scale, int num_threads) {
    if (!splitserve_can_tile(head_dim, block_size)) return -4;
#if defined(SIMD_VF)
    if (num_seqs < 0 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || layer < 0 || layer >= num_layers)
        return -1;
    const int64_t group = num_heads / num_kv_heads;
    if (group > 16) return -1;
    /* Tasks: (sequence, kv head, tile of rows), listed up front. */
    int64_t num_tasks = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t q_len = query_start_loc[s + 1] - query_start_loc[s];
        if (q_len >= min_rows && q_len > 0) num_tasks += num_kv_heads * ((q_len + TILE_ROWS - 1) / TILE_ROWS);
    }
    if (num_tasks == 0) return 0;
    int64_t *tasks = (int64_t *)malloc((size_t)num_tasks * 3 * sizeof(int64_t));
    if (tasks == NULL) return -2;
    int64_t k = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t q_len = query_start_loc[s + 1] - query_start_loc[s];
        if (q_len < min_rows || q_len == 0) continue;
        for (int64_t tile = 0; tile < q_len; tile += TILE_ROWS)
            for (int64_t h = 0; h < num_kv_heads; ++h) {
                tasks[3 * k] = s;
                tasks[3 * k + 1] = h;
                tasks[3 * k + 2] = tile;
                ++k;
            }
    }
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t kv_stride = block_size * token_stride;
    const int64_t layer_stride = 2 * kv_stride;
    const int64_t block_stride = num_layers * layer_stride;
    const int bf16 = cache_dtype == DTYPE_BF16;
    int status = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *qbuf = (float *)malloc((size_t)(TILE_ROWS * group * head_dim) * sizeof(float));
        float *acc = (float *)malloc((size_t)(TILE_ROWS * group * head_dim) * sizeof(float));
        float *kt = (float *)malloc((size_t)(KEY_CHUNK * head_dim) * sizeof(float));
        float *vb = (float *)malloc((size_t)(KEY_CHUNK * head_dim) * sizeof(float));
        float *sc = (float *)malloc((size_t)(TILE_ROWS * group * KEY_CHUNK) * sizeof(float));
        const int ok = qbuf != NULL && acc != NULL && kt != NULL && vb != NULL && sc != NULL;
        if (!ok) {
#pragma omp atomic write
            status = -2;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_tasks; ++task) {
            if (!ok) continue;
            const int64_t s = tasks[3 * task], kvh = tasks[3 * task + 1], tile = tasks[3 * task + 2];
            const int64_t q_len = query_start_loc[s + 1] - query_start_loc[s];
            const int64_t seq_len = seq_lens[s];
            const int64_t rows = q_len - tile < TILE_ROWS ? q_len - tile : TILE_ROWS;
            if (seq_len < q_len || (seq_len + block_size - 1) / block_size > block_table_width) {
#pragma omp atomic write
                status = -1;
                continue;
            }
            const int32_t *table = block_tables + s * block_table_width;
            const int64_t used_blocks = (seq_len - q_len + tile + rows + block_size - 1) / block_size;
            int bad_block = 0;
            for (int64_t b = 0; b < used_blocks; ++b)
                if (table[b] < 0 || table[b] >= num_blocks) bad_block = 1;
            if (bad_block) {
#pragma omp atomic write
                status = -3;
                continue;
            }
#define TILE(BF16, D) attend_tile(query, query_dtype, query_row_stride, query_head_stride, out, kv_cache, BF16, \
                                  table, seq_len, q_len, query_start_loc[s], tile, rows, block_size, block_stride, \
                                  layer * layer_stride + kvh * head_dim, kv_stride, token_stride, kvh, group, \
                                  num_heads, D, scale, qbuf, acc, kt, vb, sc)
            if (head_dim == 64) { if (bf16) TILE(1, 64); else TILE(0, 64); }
            else if (head_dim == 128) { if (bf16) TILE(1, 128); else TILE(0, 128); }
            else { if (bf16) TILE(1, head_dim); else TILE(0, head_dim); }
#undef TILE
        }
        free(qbuf);
        free(acc);
        free(kt);
        free(vb);
        free(sc);
    }
    free(tasks);
    return status;
#else
    return -4;
#endif
}
