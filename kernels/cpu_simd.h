/*
 * The vector layer of the CPU attention kernel: one fp32 vector type `vf` of
 * VW lanes and the few operations the kernel's bodies use, so one body serves
 * every instruction set (V_REGS: how many vector registers it has). AVX-512 (VW 16) where the build targets it, else
 * AVX2 + FMA (VW 8); bf16 is widened by a zero-extend and a shift, so no BF16
 * instructions are needed. SIMD_VF is defined where `vf` exists; without
 * either ISA SIMD_PATH is "generic" (the kernel then runs its plain C loops).
 */
#ifndef SPLITSERVE_CPU_SIMD_H
#define SPLITSERVE_CPU_SIMD_H

#include <stdint.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define SIMD_INLINE static inline __attribute__((always_inline))
#endif

#if defined(__AVX512F__)
#define SIMD_PATH "avx512"
#define SIMD_VF 1
enum { VW = 16, V_REGS = 32 };
typedef __m512 vf;

SIMD_INLINE vf v_load(const float *p) { return _mm512_loadu_ps(p); }
SIMD_INLINE void v_store(float *p, vf x) { _mm512_storeu_ps(p, x); }
SIMD_INLINE vf v_zero(void) { return _mm512_setzero_ps(); }
SIMD_INLINE vf v_set1(float x) { return _mm512_set1_ps(x); }
SIMD_INLINE vf v_add(vf a, vf b) { return _mm512_add_ps(a, b); }
SIMD_INLINE vf v_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
SIMD_INLINE vf v_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
SIMD_INLINE vf v_minv(vf a, vf b) { return _mm512_min_ps(a, b); }
SIMD_INLINE vf v_maxv(vf a, vf b) { return _mm512_max_ps(a, b); }
SIMD_INLINE vf v_round(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* x * 2^n for integral n in [-126, 127]. */
SIMD_INLINE vf v_ldexp(vf x, vf n) {
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(x, _mm512_castsi512_ps(bits));
}
SIMD_INLINE vf v_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
SIMD_INLINE float v_sum(vf x) { return _mm512_reduce_add_ps(x); }
SIMD_INLINE float v_max(vf x) { return _mm512_reduce_max_ps(x); }
/* Lanes n.. of x replaced by `outside` (0 <= n <= VW). */
SIMD_INLINE vf v_first(vf x, int64_t n, float outside) {
    return _mm512_mask_blend_ps((__mmask16)((1u << n) - 1u), _mm512_set1_ps(outside), x);
}
/* VW fp32 values of an fp32 or bf16 array from element `index`. */
SIMD_INLINE vf v_load_kv(const void *base, int64_t index, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)base + index);
    const __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

#elif defined(__AVX2__) && defined(__FMA__)
#define SIMD_PATH "avx2"
#define SIMD_VF 1
enum { VW = 8, V_REGS = 16 };
typedef __m256 vf;

SIMD_INLINE vf v_load(const float *p) { return _mm256_loadu_ps(p); }
SIMD_INLINE void v_store(float *p, vf x) { _mm256_storeu_ps(p, x); }
SIMD_INLINE vf v_zero(void) { return _mm256_setzero_ps(); }
SIMD_INLINE vf v_set1(float x) { return _mm256_set1_ps(x); }
SIMD_INLINE vf v_add(vf a, vf b) { return _mm256_add_ps(a, b); }
SIMD_INLINE vf v_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
SIMD_INLINE vf v_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
SIMD_INLINE vf v_minv(vf a, vf b) { return _mm256_min_ps(a, b); }
SIMD_INLINE vf v_maxv(vf a, vf b) { return _mm256_max_ps(a, b); }
SIMD_INLINE vf v_round(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
SIMD_INLINE vf v_ldexp(vf x, vf n) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(x, _mm256_castsi256_ps(bits));
}
SIMD_INLINE vf v_fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
SIMD_INLINE float v_sum(vf x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
SIMD_INLINE float v_max(vf x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
SIMD_INLINE vf v_first(vf x, int64_t n, float outside) {
    const __m256 inside = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)n), _CMP_LT_OQ);
    return _mm256_blendv_ps(_mm256_set1_ps(outside), x, inside);
}
SIMD_INLINE vf v_load_kv(const void *base, int64_t index, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)base + index);
    const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + index));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

#else
#define SIMD_PATH "generic"
#endif

#if defined(SIMD_VF)
/*
 * exp(x) per lane, inline: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by
 * Cephes' degree-6 polynomial (about 1 ulp), times 2^n. Inputs below -87.3
 * give ~1e-38 instead of 0 (the kernel masks the lanes that must be 0).
 */
SIMD_INLINE vf v_exp(vf x) {
    x = v_minv(v_maxv(x, v_set1(-87.3f)), v_set1(88.3f));
    const vf n = v_round(v_mul(x, v_set1(1.44269504089f)));
    vf r = v_fmadd(n, v_set1(-0.693359375f), x);
    r = v_fmadd(n, v_set1(2.12194440e-4f), r);
    vf p = v_set1(1.9875691500e-4f);
    p = v_fmadd(p, r, v_set1(1.3981999507e-3f));
    p = v_fmadd(p, r, v_set1(8.3334519073e-3f));
    p = v_fmadd(p, r, v_set1(4.1665795894e-2f));
    p = v_fmadd(p, r, v_set1(1.6666665459e-1f));
    p = v_fmadd(p, r, v_set1(5.0000001201e-1f));
    p = v_fmadd(v_mul(p, r), r, v_add(r, v_set1(1.f)));
    return v_ldexp(p, n);
}
#endif

#endif
