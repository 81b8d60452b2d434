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
SIMD_INLINE vf v_div(vf a, vf b) { return _mm512_div_ps(a, b); }
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
/* Lane j = the sum of a[j]'s lanes: VW horizontal sums in 15 adds and 30
 * shuffles (a transpose as it reduces) instead of VW reductions. */
SIMD_INLINE vf v_sums(const vf a[VW]) {
#define SUMS_C1(x, y) _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE))
#define SUMS_C2(x, y) _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD))
#define SUMS_C3(x, y) _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xEE))
#define SUMS_C4(x, y) _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x88), _mm512_shuffle_ps(x, y, 0xDD))
    /* Slot p holds a[4 * (p % 4) + p / 4], so that lane j ends up with a[j]. */
    const vf s0 = SUMS_C2(SUMS_C1(a[0], a[4]), SUMS_C1(a[8], a[12]));
    const vf s1 = SUMS_C2(SUMS_C1(a[1], a[5]), SUMS_C1(a[9], a[13]));
    const vf s2 = SUMS_C2(SUMS_C1(a[2], a[6]), SUMS_C1(a[10], a[14]));
    const vf s3 = SUMS_C2(SUMS_C1(a[3], a[7]), SUMS_C1(a[11], a[15]));
    return SUMS_C4(SUMS_C3(s0, s1), SUMS_C3(s2, s3));
#undef SUMS_C1
#undef SUMS_C2
#undef SUMS_C3
#undef SUMS_C4
}
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

/* Round VW fp32 lanes to bf16 (nearest-even, NaN stays a quiet NaN, as
 * cpu_dtype.h's f32_to_bf16) and store them at p. With AVX512_BF16 one
 * instruction does it (it also flushes fp32 denormals, below 1.2e-38, to 0). */
SIMD_INLINE void v_store_bf16(uint16_t *p, vf x) {
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(x));
    return;
#endif
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

/* x rounded to bf16 and widened back (the activation dtype's rounding). */
SIMD_INLINE vf v_round_bf16(vf x) {
#if defined(__AVX512BF16__)
    return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(x));
#else
    uint16_t r[VW];
    v_store_bf16(r, x);
    return v_load_kv(r, 0, 1);
#endif
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
SIMD_INLINE vf v_div(vf a, vf b) { return _mm256_div_ps(a, b); }
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
/* Lane j = the sum of a[j]'s lanes (as the AVX-512 one). */
SIMD_INLINE vf v_sums(const vf a[VW]) {
#define SUMS_C1(x, y) _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31))
#define SUMS_C3(x, y) _mm256_add_ps(_mm256_shuffle_ps(x, y, 0x44), _mm256_shuffle_ps(x, y, 0xEE))
#define SUMS_C4(x, y) _mm256_add_ps(_mm256_shuffle_ps(x, y, 0x88), _mm256_shuffle_ps(x, y, 0xDD))
    /* Slot p holds a[4 * (p % 2) + p / 2], so that lane j ends up with a[j]. */
    const vf u = SUMS_C3(SUMS_C1(a[0], a[4]), SUMS_C1(a[1], a[5]));
    const vf w = SUMS_C3(SUMS_C1(a[2], a[6]), SUMS_C1(a[3], a[7]));
    return SUMS_C4(u, w);
#undef SUMS_C1
#undef SUMS_C3
#undef SUMS_C4
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

SIMD_INLINE void v_store_bf16(uint16_t *p, vf x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000)), nan);
    const __m256i shifted = _mm256_srli_epi32(rounded, 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(shifted, shifted), 0x08);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

SIMD_INLINE vf v_round_bf16(vf x) {
    uint16_t r[VW];
    v_store_bf16(r, x);
    return v_load_kv(r, 0, 1);
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
