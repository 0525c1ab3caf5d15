/* Shared by every CPU kernel family: includes, dtype codes and bf16 conversion, the exp used by the softmaxes,
 * the AVX-512 helpers, AMX enablement and tile configuration, per-thread scratch buffers.
 *
 * Included once, first, by kernels.c: the families are one translation unit, so these static helpers are shared
 * and the compiler still inlines across them. */
#ifndef LLMCTL_CPU_KERNELS_COMMON_H
#define LLMCTL_CPU_KERNELS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>

#define DT_F32 0
#define DT_BF16 1

/* Every exported kernel returns 0 on success. Those that index rows by caller data (token ids, positions, KV
 * slots) return 1 + the index of the first row out of range, having written nothing; anything else that fails
 * (an unsupported shape, memory) is negative. The replay program relies on the 0. */

typedef uint16_t bf16_t;

static inline float bf16_to_f32(bf16_t x) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)x << 16;
    return c.f;
}

static inline bf16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    union { uint32_t u; float f; } c;
    c.f = f;
    uint32_t u = c.u;
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

static inline void load_f32(const void *base, int64_t offset, int dtype, float *restrict dst, int n) {
    if (dtype == DT_F32) {
        memcpy(dst, (const float *)base + offset, (size_t)n * sizeof(float));
    } else {
        const bf16_t *restrict src = (const bf16_t *)base + offset;
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    }
}

static inline void store_f32(void *base, int64_t offset, int dtype, const float *restrict src, int n) {
    if (dtype == DT_F32) {
        memcpy((float *)base + offset, src, (size_t)n * sizeof(float));
    } else {
        bf16_t *restrict dst = (bf16_t *)base + offset;
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
    }
}

/* exp for x <= 0 (softmax after subtracting the max): Cody-Waite range reduction and a degree-6 polynomial,
 * written so the compiler vectorises it (libm's expf would not be). Relative error about 2e-7. */
static inline float softmax_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * c.f;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_AVX512 1
static inline __m512 from_bf16_16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load16(const void *base, int64_t offset, int dtype) {
    if (dtype == DT_F32) return _mm512_loadu_ps((const float *)base + offset);
    return from_bf16_16(_mm256_loadu_si256((const __m256i *)((const bf16_t *)base + offset)));
}

/* softmax_exp for sixteen lanes (the same operations in the same order), reaching 0 below float's range instead
 * of clamping there: SiLU's exp of -|v| then needs no special case at either end. */
static inline __m512 exp_nonpositive16(__m512 x) {
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.5f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_floor_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                                   _mm512_set1_ps(0.5f)));
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps((__mmask16)~underflow, p, _mm512_castsi512_ps(bits));
}

/* exp for x <= 0 with fused multiply-adds, the rounding done by roundscale and 2^n applied by scalef: 30 % fewer
 * instructions than exp_nonpositive16 (whose separate multiplies and adds keep it equal, lane for lane, to the
 * scalar softmax_exp the attention kernels share). Same range reduction and polynomial; 0 below float's range. */
static inline __m512 exp_nonpositive16_fma(__m512 x) {
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.5f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_scalef_ps((__mmask16)~underflow, p, n);
}

/* v / (1 + exp(-v)), written with exp(-|v|) only so it cannot overflow. */
static inline __m512 silu16(__m512 v) {
    const __m512 t = exp_nonpositive16_fma(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v)));
    const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 num = _mm512_mask_mul_ps(v, neg, v, t);
    return _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.0f), t));
}
#else
#define HAVE_AVX512 0
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2_FMA 1
/* Eight-lane helpers for the bf16 GEMM of hosts without bf16 dot products (AVX2 + FMA: Zen 1-3, Haswell to Comet
 * Lake; AVX-512 without bf16: Skylake-X to Ice Lake): the same operations as the sixteen-lane ones above, in the
 * same order, so both round alike. */

/* Eight bf16 -> float32 lanes. */
static inline __m256 from_bf16_8(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Eight float32 -> bf16 lanes, rounded to nearest even as f32_to_bf16 (NaN stays NaN). */
static inline __m128i to_bf16_8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    /* packus works within 128-bit halves: lanes 0-3 and 4-7 land in 64-bit words 0 and 2 */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

/* exp_nonpositive16_fma on eight lanes: 2^n is applied by building its exponent bits (n >= -126 after the clamp,
 * and p * 2^n is exact in float's normal range, as scalef is). 0 below float's range. */
static inline __m256 exp_nonpositive8_fma(__m256 x) {
    const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.5f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

/* silu16 on eight lanes: v / (1 + exp(-v)) from exp(-|v|) only, so it cannot overflow. */
static inline __m256 silu8(__m256 v) {
    const __m256 abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
    const __m256 t = exp_nonpositive8_fma(_mm256_sub_ps(_mm256_setzero_ps(), abs));
    const __m256 neg = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 num = _mm256_blendv_ps(v, _mm256_mul_ps(v, t), neg);
    return _mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0f), t));
}
#else
#define HAVE_AVX2_FMA 0
#endif

#if HAVE_AVX512 && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
/* AMX (Sapphire Rapids and later): the bf16 GEMM and the bf16 decode attention have tile paths, on while amx_on. */
static int amx_on = 0;

/* Linux hands out the 8 KB of tile state only to a process that asks for it (once; then every thread may use it).
 * Returns whether the AMX paths are on after the call. */
int llmctl_use_amx(int on) {
    static int permitted = -1;
    if (permitted < 0) permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    amx_on = on && permitted;
    return amx_on;
}

struct amx_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Every tile 64 bytes wide; tiles 0-3 `rows03` rows, tile 4 `rows4`, tiles 5-7 `rows57`. Per thread. */
static void amx_configure(int rows03, int rows4, int rows57) {
    struct amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = (uint8_t)(t < 4 ? rows03 : t == 4 ? rows4 : rows57);
    }
    _tile_loadconfig(&c);
}
#else
#define HAVE_AMX 0
int llmctl_use_amx(int on) {
    (void)on;
    return 0;
}
#endif

/* The argmax only beats torch with 512-bit vectors (built for AVX2 it measured level with it), so the Python side
 * uses it only where this says 1. */
int llmctl_has_avx512(void) { return HAVE_AVX512; }

/* The bf16 RMSNorm's generic loop, built for AVX2 + FMA, is one pass against torch's three to five (each its own
 * parallel region): on a shared AVX2 host it measured about 2x faster, so it runs where this says 1 too. */
int llmctl_has_avx2_fma(void) { return HAVE_AVX2_FMA; }

/* A growing per-thread buffer: no malloc/free per (sequence, head) task, so the allocator never sees the
 * churn (and OpenMP worker threads never fragment arenas of their own). It lives as long as the thread. */
static float *thread_scratch(size_t floats) {
    static __thread float *buffer = NULL;
    static __thread size_t capacity = 0;
    if (floats > capacity) {
        size_t want = floats < 4096 ? 4096 : floats + floats / 2;
        float *grown = (float *)realloc(buffer, want * sizeof(float));
        if (grown == NULL) return NULL;
        buffer = grown;
        capacity = want;
    }
    return buffer;
}

/* The calling thread's buffer for data its OpenMP workers share (the workers' thread_scratch is theirs alone). */
static inline void *shared_scratch(size_t bytes) {
    static __thread void *buffer = NULL;
    static __thread size_t capacity = 0;
    if (bytes > capacity) {
        size_t want = bytes < 65536 ? 65536 : bytes + bytes / 2;
        void *grown = realloc(buffer, want);
        if (grown == NULL) return NULL;
        buffer = grown;
        capacity = want;
    }
    return buffer;
}

#endif /* LLMCTL_CPU_KERNELS_COMMON_H */
