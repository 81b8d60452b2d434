/*
 * Per-layer glue of the CPU decoder as one call: rotary embedding of q and k
 * straight out of the fused qkv projection, and the K/V store into the paged
 * cache. In torch that is ~25 small ops per layer, each paying dispatch; here
 * it is one pass over the rows.
 *
 * Built WITHOUT -ffast-math and with -ffp-contract=off: the results must equal
 * Hugging Face's ops bit for bit (q * cos + rotate_half(q) * sin, each product
 * and the sum rounded to the activation dtype, cos/sin rounded to it first).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_dtype.h"
#include "cpu_simd.h"

/* Round to the activation dtype (identity for fp32). */
static inline float to_dtype(float x, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(x)) : x; }

static inline float load(const void *base, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline void store(void *base, int64_t i, int bf16, float x) {
    if (bf16) ((uint16_t *)base)[i] = f32_to_bf16(x);
    else ((float *)base)[i] = x;
}

/* out[0..D) = x * cos + rotate_half(x) * sin, with HF's roundings. */
static inline void rotate(const void *src, int64_t src_index, void *dst, int64_t dst_index, const float *cos_row,
                          const float *sin_row, int64_t head_dim, int bf16) {
    const int64_t half = head_dim / 2;
    for (int64_t d = 0; d < head_dim; ++d) {
        const float x = load(src, src_index + d, bf16);
        const float partner = d < half ? -load(src, src_index + d + half, bf16) : load(src, src_index + d - half, bf16);
        const float c = to_dtype(cos_row[d], bf16), s = to_dtype(sin_row[d], bf16);
        const float a = to_dtype(x * c, bf16), b = to_dtype(partner * s, bf16);
        store(dst, dst_index + d, bf16, a + b);
    }
}

/*
 * qkv: [num_tokens, row_stride] rows of [q (H*D) | k (KVH*D) | v (KVH*D)].
 * cos_table / sin_table: fp32 [table_rows, D]; positions: [num_tokens].
 * query_out: [num_tokens, H, D] contiguous. kv_cache viewed as rows of KVH*D:
 * token t's K goes to row cache_rows[t] + layer * 2 * block_size, its V
 * block_size rows further. All activations and the cache share one dtype.
 * Returns 0, -1 on a position outside the table or a row outside the cache.
 */
int splitserve_rope_store(const void *qkv, int dtype, int64_t num_tokens, int64_t row_stride, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim, const float *cos_table, const float *sin_table,
                          int64_t table_rows, const int64_t *positions, void *query_out, void *kv_cache,
                          int64_t num_cache_rows, const int64_t *cache_rows, int64_t layer, int64_t block_size,
                          int num_threads) {
    const int bf16 = dtype == DTYPE_BF16;
    const int64_t kv_width = num_kv_heads * head_dim;
    int status = 0;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < num_tokens; ++t) {
        const int64_t pos = positions[t];
        const int64_t k_row = cache_rows[t] + layer * 2 * block_size;
        if (pos < 0 || pos >= table_rows || k_row < 0 || k_row + block_size >= num_cache_rows) {
#pragma omp atomic write
            status = -1;
            continue;
        }
        const float *c = cos_table + pos * head_dim, *s = sin_table + pos * head_dim;
        const int64_t row = t * row_stride;
        for (int64_t h = 0; h < num_heads; ++h)
            rotate(qkv, row + h * head_dim, query_out, (t * num_heads + h) * head_dim, c, s, head_dim, bf16);
        const int64_t k_src = row + num_heads * head_dim, v_src = k_src + kv_width;
        for (int64_t h = 0; h < num_kv_heads; ++h)
            rotate(qkv, k_src + h * head_dim, kv_cache, k_row * kv_width + h * head_dim, c, s, head_dim, bf16);
        const int64_t v_row = k_row + block_size;
        const int64_t elem = bf16 ? 2 : 4;
        memcpy((char *)kv_cache + v_row * kv_width * elem, (const char *)qkv + v_src * elem,
               (size_t)(kv_width * elem));
    }
    return status;
}

/* torch.argmax of one row, element by element: the first NaN, else the first maximum. */
static int64_t argmax_scalar(const float *row, int64_t n) {
    int64_t found = 0;
    for (int64_t k = 0; k < n; ++k) {
        if (row[k] != row[k]) return k;
        if (row[k] > row[found]) found = k;
    }
    return found;
}

/*
 * out[r] = the index of row r's largest value, the first on ties (torch.argmax
 * over the last dim of fp32 [num_rows, row_len] rows, row_stride apart); a
 * row holding NaN gives its first NaN, as torch does. Vector builds take the
 * maximum in one pass, then scan for its first index; a row with NaN or inf
 * (x - x is not 0) takes the scalar loop.
 */
void splitserve_argmax_rows(const float *x, int64_t num_rows, int64_t row_len, int64_t row_stride, int64_t *out,
                            int num_threads) {
#pragma omp parallel for num_threads(num_rows > 1 ? num_threads : 1) schedule(static)
    for (int64_t r = 0; r < num_rows; ++r) {
        const float *row = x + r * row_stride;
#if defined(SIMD_VF)
        if (row_len >= 2 * VW) {
            vf m0 = v_load(row), m1 = v_load(row + VW), bad = v_zero();
            int64_t i = 2 * VW;
            for (; i + 2 * VW <= row_len; i += 2 * VW) {
                const vf a = v_load(row + i), b = v_load(row + i + VW);
                m0 = v_maxv(m0, a);
                m1 = v_maxv(m1, b);
                bad = v_add(bad, v_add(v_sub(a, a), v_sub(b, b)));
            }
            float best = v_max(v_maxv(m0, m1));
            float tail_bad = 0.f;
            for (; i < row_len; ++i) {
                best = row[i] > best ? row[i] : best;
                tail_bad += row[i] - row[i];
            }
            const float head_bad = v_sum(v_add(v_sub(v_load(row), v_load(row)),
                                               v_sub(v_load(row + VW), v_load(row + VW))));
            if (v_sum(bad) + tail_bad + head_bad == 0.f) {
                int64_t k = 0;
                while (k + VW <= row_len && v_max(v_load(row + k)) != best) k += VW;
                while (row[k] != best) ++k;
                out[r] = k;
                continue;
            }
        }
#endif
        out[r] = argmax_scalar(row, row_len);
    }
}

/*
 * RMSNorm of bf16 rows as Hugging Face's Llama computes it: in fp32,
 * y = x * 1 / sqrt(mean(x^2) + eps) rounded to bf16, times the bf16 weight
 * (that product rounded to bf16). The sum of squares is taken in another
 * order than torch's, so an output may differ from torch's ops by one bf16
 * ulp where the fp32 value sits next to a rounding boundary. In torch that
 * is seven ops and four passes over the rows; here one pass per row.
 * Returns 0, or -1 for a dtype other than bf16.
 */
int splitserve_rms_norm(const void *x, int dtype, int64_t num_rows, int64_t hidden, int64_t row_stride,
                        const void *weight, float eps, void *out, int num_threads) {
    if (dtype != DTYPE_BF16) return -1;
    const uint16_t *xs = (const uint16_t *)x, *w = (const uint16_t *)weight;
    uint16_t *o = (uint16_t *)out;
#pragma omp parallel for num_threads(num_rows >= 16 ? num_threads : 1) schedule(static)
    for (int64_t r = 0; r < num_rows; ++r) {
        const uint16_t *row = xs + r * row_stride;
        uint16_t *dst = o + r * hidden;
        int64_t i = 0;
        float sum = 0.f;
#if defined(SIMD_VF)
        vf acc = v_zero();
        for (; i + VW <= hidden; i += VW) {
            const vf v = v_load_kv(row, i, 1);
            acc = v_fmadd(v, v, acc);
        }
        sum = v_sum(acc);
#endif
        for (; i < hidden; ++i) {
            const float v = bf16_to_f32(row[i]);
            sum += v * v;
        }
        const float inv = 1.f / sqrtf(sum / (float)hidden + eps);
        i = 0;
#if defined(SIMD_VF)
        const vf vinv = v_set1(inv);
        for (; i + VW <= hidden; i += VW) {
            const vf y = v_round_bf16(v_mul(v_load_kv(row, i, 1), vinv));
            v_store_bf16(dst + i, v_mul(v_load_kv(w, i, 1), y));
        }
#endif
        for (; i < hidden; ++i) {
            const float y = to_dtype(bf16_to_f32(row[i]) * inv, 1);
            dst[i] = f32_to_bf16(bf16_to_f32(w[i]) * y);
        }
    }
    return 0;
}

/*
 * SwiGLU of bf16 rows [gate | up] (each `inter` wide): out = silu(gate) * up
 * with torch's roundings (silu in fp32 as g / (1 + exp(-g)), rounded to
 * bf16; the product rounded to bf16). Vector builds take exp from the inline
 * polynomial of cpu_simd.h (about 1 ulp of fp32); after the bf16 rounding an
 * output may differ from torch's by one bf16 ulp (two where the rounded
 * activation flipped and the product is near the next power of two). Returns 0, or -1 for
 * a dtype other than bf16.
 */
int splitserve_silu_mul(const void *gate_up, int dtype, int64_t num_rows, int64_t inter, int64_t row_stride,
                        void *out, int num_threads) {
    if (dtype != DTYPE_BF16) return -1;
    const uint16_t *in = (const uint16_t *)gate_up;
    uint16_t *o = (uint16_t *)out;
#pragma omp parallel for num_threads(num_rows * inter >= 16384 ? num_threads : 1) schedule(static)
    for (int64_t r = 0; r < num_rows; ++r) {
        const uint16_t *g = in + r * row_stride, *u = g + inter;
        uint16_t *dst = o + r * inter;
        int64_t i = 0;
#if defined(SIMD_VF)
        const vf one = v_set1(1.f), zero = v_zero();
        for (; i + VW <= inter; i += VW) {
            const vf gv = v_load_kv(g, i, 1);
            const vf act = v_round_bf16(v_div(gv, v_add(one, v_exp(v_sub(zero, gv)))));
            v_store_bf16(dst + i, v_mul(act, v_load_kv(u, i, 1)));
        }
#endif
        for (; i < inter; ++i) {
            const float gv = bf16_to_f32(g[i]);
            const float act = to_dtype(gv / (1.f + expf(-gv)), 1);
            dst[i] = f32_to_bf16(act * bf16_to_f32(u[i]));
        }
    }
    return 0;
}
