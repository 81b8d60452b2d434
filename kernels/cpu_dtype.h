/*
 * Activation/cache dtype codes and bf16 <-> fp32 conversions shared by the
 * CPU kernels (cpu_*.c). Rounding is nearest-even and NaN stays NaN, as in
 * torch; integer-only, so -ffast-math does not change it.
 */
#ifndef SPLITSERVE_CPU_DTYPE_H
#define SPLITSERVE_CPU_DTYPE_H

#include <stdint.h>
#include <string.h>

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#endif
