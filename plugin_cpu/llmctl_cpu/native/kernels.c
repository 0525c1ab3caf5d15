/* llmctl CPU kernels: the few ops where a torch composition costs more in dispatch and copies than in math.
 *
 * Plain C compiled on the host that runs it (gcc/clang -O3 -march=native), loaded through ctypes, so there is
 * no build step at install time and no dependency on torch's C++ headers. Every function takes raw pointers,
 * element strides and a dtype code; the Python side (llmctl_cpu.native) checks shapes, dtypes and contiguity
 * before calling, so nothing here validates twice.
 *
 * Batch invariance: each (sequence, kv head) pair of a decode is computed by one thread from that sequence's
 * data alone, in a fixed order, so a row's result never depends on the rest of the batch or the thread count.
 * The file is compiled with -ffp-contract=off so the rotary kernel rounds exactly where torch's reference does;
 * the attention kernel asks for fused multiply-adds explicitly where it wants them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>

#define DT_F32 0
#define DT_BF16 1

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

/* The row-wise kernels (RMSNorm, argmax) only beat torch with 512-bit vectors: built for AVX2 they measured level
 * with it, so the Python side uses them only where this says 1. */
int llmctl_has_avx512(void) { return HAVE_AVX512; }

static inline int64_t cache_row(const int32_t *table, int t, int block_size, int kv_heads, int kh, int d) {
    return (((int64_t)table[t / block_size] * block_size + t % block_size) * kv_heads + kh) * d;
}

/* The per-key loops below run over keys [t0, t1) of one block, so a key's row is the first one's plus whole slots:
 * block_size is only known at run time, and a division per key and head (cache_row) cost ~9 ms of a 64-sequence
 * decode step's attention. */
#define ROW_OF(t) (row0 + (int64_t)((t) - t0) * slot)

/* At the first key of a block, ask for the next block's rows of this head: blocks are scattered in memory, so
 * the hardware prefetcher cannot see the jump coming. */
static inline void prefetch_next_block(const void *cache, int elem, const int32_t *table, int t, int len,
                                       int block_size, int kv_heads, int kh, int d) {
    if (t % block_size != 0 || t + block_size >= len) return;
    const char *base = (const char *)cache + cache_row(table, t + block_size, block_size, kv_heads, kh, d) * elem;
    const int64_t row_bytes = (int64_t)kv_heads * d * elem;
    for (int r = 0; r < block_size; r++)
        for (int off = 0; off < d * elem; off += 64) __builtin_prefetch(base + r * row_bytes + off, 0, 1);
}

/* scores[g * n + j] = q_g . k_(first + j) for the group's query rows (q already scaled). Inlined with a constant
 * dtype at each call site, so the per-key loads are not branching. */
static inline __attribute__((always_inline)) void qk_scores(int dtype, const float *q, int group, int d,
                                                            const void *k_cache, const int32_t *table, int block_size,
                                                            int kv_heads, int kh, int first, int len, int t0,
                                                            int t1, float *restrict scores) {
    const int n = len - first;
#if HAVE_AVX512
    if (d % 16 == 0 && d <= 256) {
        const int nv = d / 16;
        __m512 kv[16];
        const int64_t row0 = cache_row(table, t0, block_size, kv_heads, kh, d), slot = (int64_t)kv_heads * d;
        for (int t = t0; t < t1; t++) {
            const int64_t base = ROW_OF(t);
            for (int v = 0; v < nv; v++) kv[v] = load16(k_cache, base + 16 * v, dtype);
            for (int g = 0; g < group; g++) {
                const float *qg = q + (size_t)g * d;
                __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), kv[0]);
                for (int v = 1; v < nv; v++) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * v), kv[v], a);
                scores[(size_t)g * n + (t - first)] = _mm512_reduce_add_ps(a);
            }
        }
        return;
    }
#endif
    float row[1024];
    const int64_t row0 = cache_row(table, t0, block_size, kv_heads, kh, d), slot = (int64_t)kv_heads * d;
    for (int t = t0; t < t1; t++) {
        load_f32(k_cache, ROW_OF(t), dtype, row, d);
        for (int g = 0; g < group; g++) {
            const float *restrict qg = q + (size_t)g * d;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int x = 0; x < d; x++) s = fmaf(qg[x], row[x], s);
            scores[(size_t)g * n + (t - first)] = s;
        }
    }
}

#if HAVE_AVX512
/* Specialised inner loops for the common shapes (group <= 8 query rows per KV head, head_size 64 or 128), with
 * the accumulators in registers: inlined with constant G and NV, the loops unroll fully. */
static inline __attribute__((always_inline)) void qk_fixed(int dtype, int G, int NV, const float *q, float scale_bf16,
                                                           const bf16_t *q_bf16, const void *k_cache,
                                                           const int32_t *table, int block_size, int kv_heads,
                                                           int kh, int first, int len, int t0, int t1,
                                                           float *restrict scores) {
    const int n = len - first;
    const int d = NV * 16;
#if defined(__AVX512BF16__)
    if (dtype == DT_BF16) { /* bf16 dot products straight on the cache: no conversion, exact products */
        __m512bh qb[8][4];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++)
#pragma GCC unroll 4
            for (int v = 0; v < NV / 2; v++)
                qb[g][v] = (__m512bh)_mm512_loadu_si512((const void *)(q_bf16 + (size_t)g * d + 32 * v));
        prefetch_next_block(k_cache, 2, table, t0, len, block_size, kv_heads, kh, d);
        const int64_t row0 = cache_row(table, t0, block_size, kv_heads, kh, d), slot = (int64_t)kv_heads * d;
        for (int t = t0; t < t1; t++) {
            const bf16_t *kr = (const bf16_t *)k_cache + ROW_OF(t);
            __m512bh kb[4];
#pragma GCC unroll 4
            for (int v = 0; v < NV / 2; v++) kb[v] = (__m512bh)_mm512_loadu_si512((const void *)(kr + 32 * v));
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
                __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[g][0], kb[0]);
#pragma GCC unroll 4
                for (int v = 1; v < NV / 2; v++) a = _mm512_dpbf16_ps(a, qb[g][v], kb[v]);
                scores[(size_t)g * n + (t - first)] = _mm512_reduce_add_ps(a) * scale_bf16;
            }
        }
        return;
    }
#else
    (void)scale_bf16;
    (void)q_bf16;
#endif
    __m512 qv[8][8];
#pragma GCC unroll 8
    for (int g = 0; g < G; g++)
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) qv[g][v] = _mm512_loadu_ps(q + (size_t)g * d + 16 * v);
    prefetch_next_block(k_cache, dtype == DT_F32 ? 4 : 2, table, t0, len, block_size, kv_heads, kh, d);
    const int64_t row0 = cache_row(table, t0, block_size, kv_heads, kh, d), slot = (int64_t)kv_heads * d;
    for (int t = t0; t < t1; t++) {
        const int64_t base = ROW_OF(t);
        __m512 kv[8];
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) kv[v] = load16(k_cache, base + 16 * v, dtype);
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
#pragma GCC unroll 8
            for (int v = 1; v < NV; v++) a = _mm512_fmadd_ps(qv[g][v], kv[v], a);
            scores[(size_t)g * n + (t - first)] = _mm512_reduce_add_ps(a);
        }
    }
}

static inline __attribute__((always_inline)) void pv_fixed(int dtype, int G, int NV, const float *p,
                                                           const void *v_cache, const int32_t *table, int block_size,
                                                           int kv_heads, int kh, int first, int len, int t0,
                                                           int t1, float *restrict acc) {
    const int n = len - first;
    const int d = NV * 16;
    __m512 a[8][8];
#pragma GCC unroll 8
    for (int g = 0; g < G; g++)
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) a[g][v] = _mm512_loadu_ps(acc + (size_t)g * d + 16 * v);
    prefetch_next_block(v_cache, dtype == DT_F32 ? 4 : 2, table, t0, len, block_size, kv_heads, kh, d);
    const int64_t row0 = cache_row(table, t0, block_size, kv_heads, kh, d), slot = (int64_t)kv_heads * d;
    for (int t = t0; t < t1; t++) {
        const int64_t base = ROW_OF(t);
        __m512 vv[8];
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) vv[v] = load16(v_cache, base + 16 * v, dtype);
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            const __m512 w = _mm512_set1_ps(p[(size_t)g * n + (t - first)]);
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) a[g][v] = _mm512_fmadd_ps(w, vv[v], a[g][v]);
        }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; g++)
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(acc + (size_t)g * d + 16 * v, a[g][v]);
}

#define FIXED_CASES(X, DT, NV) \
    X(DT, 1, NV) X(DT, 2, NV) X(DT, 3, NV) X(DT, 4, NV) X(DT, 5, NV) X(DT, 6, NV) X(DT, 7, NV) X(DT, 8, NV)

#define QK_CASE(DT, G, NV)                                                                                      \
    case (DT) * 1000 + (G) * 10 + (NV):                                                                        \
        qk_fixed(DT, G, NV, q, scale, q_bf16, k_cache, table, block_size, kv_heads, kh, first, len, t0, t1, scores);  \
        return 1;
#define PV_CASE(DT, G, NV)                                                                                      \
    case (DT) * 1000 + (G) * 10 + (NV):                                                                        \
        pv_fixed(DT, G, NV, p, v_cache, table, block_size, kv_heads, kh, first, len, t0, t1, acc);                    \
        return 1;

/* 1 when a specialised loop handled the shape, 0 to use the general one. */
static int qk_dispatch(int dtype, int group, int d, const float *q, float scale, const bf16_t *q_bf16,
                       const void *k_cache, const int32_t *table, int block_size, int kv_heads, int kh, int first,
                       int len, int t0, int t1, float *restrict scores) {
    if ((d != 64 && d != 128) || group > 8) return 0;
    switch (dtype * 1000 + group * 10 + d / 16) {
        FIXED_CASES(QK_CASE, DT_BF16, 4)
        FIXED_CASES(QK_CASE, DT_BF16, 8)
        FIXED_CASES(QK_CASE, DT_F32, 4)
        FIXED_CASES(QK_CASE, DT_F32, 8)
        default:
            return 0;
    }
}

static int pv_dispatch(int dtype, int group, int d, const float *p, const void *v_cache, const int32_t *table,
                       int block_size, int kv_heads, int kh, int first, int len, int t0, int t1,
                       float *restrict acc) {
    if ((d != 64 && d != 128) || group > 8) return 0;
    switch (dtype * 1000 + group * 10 + d / 16) {
        FIXED_CASES(PV_CASE, DT_BF16, 4)
        FIXED_CASES(PV_CASE, DT_BF16, 8)
        FIXED_CASES(PV_CASE, DT_F32, 4)
        FIXED_CASES(PV_CASE, DT_F32, 8)
        default:
            return 0;
    }
}
#else
static int qk_dispatch(int dtype, int group, int d, const float *q, float scale, const bf16_t *q_bf16,
                       const void *k_cache, const int32_t *table, int block_size, int kv_heads, int kh, int first,
                       int len, int t0, int t1, float *restrict scores) {
    (void)dtype, (void)group, (void)d, (void)q, (void)scale, (void)q_bf16, (void)k_cache, (void)table;
    (void)block_size, (void)kv_heads, (void)kh, (void)first, (void)len, (void)t0, (void)t1, (void)scores;
    return 0;
}

static int pv_dispatch(int dtype, int group, int d, const float *p, const void *v_cache, const int32_t *table,
                       int block_size, int kv_heads, int kh, int first, int len, int t0, int t1,
                       float *restrict acc) {
    (void)dtype, (void)group, (void)d, (void)p, (void)v_cache, (void)table, (void)block_size, (void)kv_heads;
    (void)kh, (void)first, (void)len, (void)t0, (void)t1, (void)acc;
    return 0;
}
#endif


static float row_max(const float *x, int n) {
#if HAVE_AVX512
    /* sixteen lanes: the scalar loop is one dependent compare per key (the maximum itself is order-free) */
    __m512 mv = _mm512_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + j));
    if (j < n) {
        const __mmask16 k = (__mmask16)((1u << (n - j)) - 1);
        mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, x + j));
    }
    return _mm512_reduce_max_ps(mv);
#else
    float m = -INFINITY;
    for (int j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
    return m;
#endif
}

/* The sum in sixteen lanes, then across them: one dependent add per key cost ~4 cycles each (a few ms per decode
 * step at 64 sequences). The order depends on n only, so a row's result still depends on its own sequence only. */
static float row_sum(const float *x, int n) {
#if HAVE_AVX512
    __m512 sv = _mm512_setzero_ps();
    int j = 0;
    for (; j + 16 <= n; j += 16) sv = _mm512_add_ps(sv, _mm512_loadu_ps(x + j));
    if (j < n) sv = _mm512_add_ps(sv, _mm512_maskz_loadu_ps((__mmask16)((1u << (n - j)) - 1), x + j));
    return _mm512_reduce_add_ps(sv);
#else
    float s = 0.0f;
    for (int j = 0; j < n; j++) s += x[j];
    return s;
#endif
}

/* In place: each row of scores becomes exp(score - row max) (the softmax numerators). */
static void softmax_numerators(float *scores, int group, int n) {
    for (int g = 0; g < group; g++) {
        float *restrict sg = scores + (size_t)g * n;
        const float m = row_max(sg, n);
#pragma omp simd
        for (int j = 0; j < n; j++) sg[j] = softmax_exp(sg[j] - m);
    }
}

/* acc[g] += sum_j p[g][j] * v_(first + j). */
static inline __attribute__((always_inline)) void pv_accumulate(int dtype, const float *p, int group, int d,
                                                                const void *v_cache, const int32_t *table,
                                                                int block_size, int kv_heads, int kh, int first,
                                                                int len, int t0, int t1, float *restrict acc) {
    const int n = len - first;
#if HAVE_AVX512
    if (d % 16 == 0 && d <= 256) {
        const int nv = d / 16;
        __m512 vv[16];
        const int64_t row0 = cache_row(table, t0, block_size, kv_heads, kh, d), slot = (int64_t)kv_heads * d;
        for (int t = t0; t < t1; t++) {
            const int64_t base = ROW_OF(t);
            for (int v = 0; v < nv; v++) vv[v] = load16(v_cache, base + 16 * v, dtype);
            for (int g = 0; g < group; g++) {
                const __m512 w = _mm512_set1_ps(p[(size_t)g * n + (t - first)]);
                float *ag = acc + (size_t)g * d;
                for (int v = 0; v < nv; v++)
                    _mm512_storeu_ps(ag + 16 * v, _mm512_fmadd_ps(w, vv[v], _mm512_loadu_ps(ag + 16 * v)));
            }
        }
        return;
    }
#endif
    float row[1024];
    const int64_t row0 = cache_row(table, t0, block_size, kv_heads, kh, d), slot = (int64_t)kv_heads * d;
    for (int t = t0; t < t1; t++) {
        load_f32(v_cache, ROW_OF(t), dtype, row, d);
        for (int g = 0; g < group; g++) {
            const float w = p[(size_t)g * n + (t - first)];
            float *restrict ag = acc + (size_t)g * d;
#pragma omp simd
            for (int x = 0; x < d; x++) ag[x] = fmaf(w, row[x], ag[x]);
        }
    }
}

/* The general loops for shapes the specialised ones do not take, instantiated once per dtype. */
static void qk_general(int dtype, const float *q, int group, int d, const void *k_cache, const int32_t *table,
                       int block_size, int kv_heads, int kh, int first, int len, int t0, int t1, float *restrict scores) {
    if (dtype == DT_BF16)
        qk_scores(DT_BF16, q, group, d, k_cache, table, block_size, kv_heads, kh, first, len, t0, t1, scores);
    else
        qk_scores(DT_F32, q, group, d, k_cache, table, block_size, kv_heads, kh, first, len, t0, t1, scores);
}

static void pv_general(int dtype, const float *p, int group, int d, const void *v_cache, const int32_t *table,
                       int block_size, int kv_heads, int kh, int first, int len, int t0, int t1,
                       float *restrict acc) {
    if (dtype == DT_BF16)
        pv_accumulate(DT_BF16, p, group, d, v_cache, table, block_size, kv_heads, kh, first, len, t0, t1, acc);
    else
        pv_accumulate(DT_F32, p, group, d, v_cache, table, block_size, kv_heads, kh, first, len, t0, t1, acc);
}

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

#if HAVE_AMX
/* The calling thread's buffer for data its OpenMP workers share (the workers' thread_scratch is theirs alone). */
static void *shared_scratch(size_t bytes) {
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
#endif

/* A cursor over another sequence's key and value blocks (whole blocks: every head), for prefetching it into L2
 * a few lines at a time while the current sequence computes. The attention was as slow again from memory as from
 * cache (13.8 vs 6.7 ms for 30 layers at 64 sequences): its stalls were not hidden behind the arithmetic, and
 * prefetching within the current sequence (one block ahead, further ahead, whole blocks) did not change that. In
 * the engine this cut the attention at 64 sequences from 13.3-13.8 to 10.0-11.2 ms per decode step. */
struct ahead {
    const char *k, *v;
    const int32_t *table;
    int b, b_last, in_v;
    int64_t off, block_bytes, num_blocks;
};

static inline void ahead_step(struct ahead *a, int lines) {
    while (lines > 0 && a->k != NULL && a->b <= a->b_last) {
        const int32_t blk = a->table[a->b];
        const char *base = (a->in_v ? a->v : a->k) + (int64_t)blk * a->block_bytes + a->off;
        const int64_t left = (a->block_bytes - a->off + 63) / 64;
        const int n = lines < left ? lines : (int)left;
        if (blk >= 0 && blk < a->num_blocks)
            for (int i = 0; i < n; i++) __builtin_prefetch(base + 64 * i, 0, 1);
        a->off += 64 * (int64_t)n;
        lines -= n;
        if (a->off >= a->block_bytes) {
            a->off = 0;
            a->b += a->in_v;
            a->in_v = !a->in_v;
        }
    }
}

/* The first key a query at position len - 1 sees: everything, or the last `window` keys. */
static inline int first_key(int len, int window) { return (window > 0 && len > window) ? len - window : 0; }

#if HAVE_AMX
/* ---- bf16 decode attention on AMX tiles -----------------------------------------------------------------------
 *
 * Why: with the GEMMs on AMX, the AVX-512 decode attention became the largest part of a decode step. The first
 * tile version was 15-20 % faster at 64 sequences of 192 keys (cold cache, 30 layers: 18.2-19.7 against 21.9-23.2
 * ms); taking the values from the cache as they lie (below) made that 15.0 -> 13.4 ms in the same harness, against
 * ~11 ms for reading the keys and values alone: the memory stalls and the tile operations, which wait on each
 * other in long chains at these sizes (a group of 3 query rows per KV head), still mostly do not overlap.
 *
 * Per sequence, for its KV heads [kh0, kh1), on its own data only (batch invariance as before):
 *   scores: S^T = K . Q^T, every head of a 16-key tile before the next tile, so each block's keys are read front
 *     to back. K's cache rows load as an A tile as they lie (row stride = the slot stride); Q^T (the group's query
 *     rows, pair-interleaved) is the B tile.
 *   then per head, softmax: the head's column of S^T gathered into a row, masked to [first, len), exp(s - max) in
 *     sixteen lanes, rounded to bf16 into P (as torch's flash kernel rounds P before P.V); the sum adds the
 *     rounded P.
 *   and P.V: 16 keys by 32 dims of the cache rows are a B tile as they lie, whose rows AMX reads as pairs of
 *     adjacent dims; P as (p, 0) pairs gives the even dims, as (0, p) the odd ones (see amx_attend). Tiles with
 *     keys outside [first, len) are copied with those rows zeroed, since a stale slot may hold anything and
 *     0 * NaN is NaN.
 * Measured and dropped: pair-interleaving 32 value rows per step into B tiles in L1 (the earlier P.V: 4.7 vs
 * 6.6 ms hot without it), interleaving all heads' values of a step first (the 72 KB it wrote went to L2: slower),
 * double-buffered value tiles, prefetching the next key tile, alternating two registers for the key tiles,
 * reading the whole sequence into L2 before computing, and (prototyped) a cache layout made for AMX, keys
 * transposed and values paired as written: 15.5 vs 17.1 ms. */

/* The prefill attention's P.V pass: C tiles 0..nt-1 (nt = 2 or 4) hold 16 output dims each, P is the A tile
 * (4), and a step's value pairs come as nt B tiles `tile_bytes` apart (5-7, then 5 again). */
static inline void amx_pv_zero(int nt) {
    _tile_zero(0);
    _tile_zero(1);
    if (nt > 2) {
        _tile_zero(2);
        _tile_zero(3);
    }
}

static inline void amx_pv_step(int nt, const void *p, int64_t p_stride, const char *v, int64_t tile_bytes,
                               int64_t v_stride) {
    _tile_loadd(4, p, p_stride);
    _tile_loadd(5, v, v_stride);
    _tile_loadd(6, v + tile_bytes, v_stride);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 6);
    if (nt > 2) {
        _tile_loadd(7, v + 2 * tile_bytes, v_stride);
        _tile_loadd(5, v + 3 * tile_bytes, v_stride);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 4, 5);
    }
}

/* O's nt x 16 dims into acc (rows `stride` bytes apart). */
static inline void amx_pv_store(int nt, float *acc, int64_t stride) {
    _tile_stored(0, acc, stride);
    _tile_stored(1, acc + 16, stride);
    if (nt > 2) {
        _tile_stored(2, acc + 32, stride);
        _tile_stored(3, acc + 48, stride);
    }
}

/* qt[j][r][g] (a bf16 pair as int32) = q[g][32j + 2r], q[g][32j + 2r + 1] for g < group; 0 beyond. */
static void amx_query_tiles(const bf16_t *q, int group, int d, int32_t *qt) {
    memset(qt, 0, (size_t)(d / 32) * 1024);
    for (int g = 0; g < group; g++)
        for (int j = 0; j < d / 32; j++)
            for (int r = 0; r < 16; r++) memcpy(&qt[(j * 16 + r) * 16 + g], q + (size_t)g * d + 32 * j + 2 * r, 4);
}

/* Tiles of the decode attention: 0-1 O (group rows), 2 S^T and 3 Q^T (16 rows, group columns), 4-5 P (group rows),
 * 6-7 K or V (16 rows). */
static void amx_configure_decode(int group) {
    struct amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    static const int group_rows[8] = {1, 1, 0, 0, 1, 1, 0, 0};
    for (int t = 0; t < 8; t++) { /* S^T and Q^T only `group` columns wide: S^T is stored compact */
        c.colsb[t] = (uint16_t)(t == 2 || t == 3 ? 4 * group : 64);
        c.rows[t] = (uint8_t)(group_rows[t] ? group : 16);
    }
    _tile_loadconfig(&c);
}

/* Scratch layout of one sequence's attention (nh heads, n keys from its first block's start), in floats. */
struct amx_scratch {
    size_t st, srow, acc, qt, peven, podd, vpart, total;
};

static struct amx_scratch amx_scratch_layout(int n, int nh, int group, int d) {
    const size_t rows = (size_t)(n + 15) / 16 * 16;
    struct amx_scratch l;
    l.st = 0;                                               /* nh x rows x group float: S^T per head */
    l.srow = l.st + (size_t)nh * rows * group;              /* rows float: one head's scores */
    l.acc = l.srow + rows;                                  /* 2 x group x 16 float: O's even and odd dims */
    l.qt = l.acc + (size_t)2 * group * 16;                  /* nh x d/32 B tiles of Q^T (1 KB each) */
    l.peven = l.qt + (size_t)nh * (d / 32) * 256;           /* group x rows words: P as (p, 0) bf16 pairs */
    l.podd = l.peven + (size_t)group * rows;                /* group x rows words: P as (0, p) */
    l.vpart = l.podd + (size_t)group * rows;                /* a 16-key V tile with keys outside the range zeroed */
    l.total = l.vpart + 256 + 16;
    return l;
}

/* One sequence's heads [kh0, kh1): out gets each head group's outputs ([group][d] bf16 at head kh's offset).
 *
 * P.V takes the value rows as they lie in the cache, 16 keys by 32 dims per B tile: AMX reads a B row as 16 pairs,
 * so a cache row gives dims (2j, 2j + 1) of one key. With P's A tile as (p, 0) pairs the products land in the even
 * dims, with (0, p) in the odd ones: two products per tile where pair-interleaved values needed one per 32 keys,
 * and no interleaving pass (which had cost more than the products it saved: 30 layers at 64 sequences of 192 keys,
 * hot, 6.6 -> 4.7 ms without it). */
static void amx_attend(const bf16_t *query, bf16_t *out, const bf16_t *k_cache, const bf16_t *v_cache,
                       const int32_t *table, int block_size, int kv_heads, int kh0, int kh1, int d, int group,
                       int first, int len, float scale, float *scratch, struct ahead *ahead, int lines_per_call) {
    const int nh = kh1 - kh0, t_base = first / block_size * block_size;
    const int n_rows = (len - t_base + 15) / 16 * 16;
    const struct amx_scratch l = amx_scratch_layout(len - t_base, nh, group, d);
    float *st = scratch + l.st, *srow = scratch + l.srow, *acc = scratch + l.acc;
    int32_t *qt = (int32_t *)(scratch + l.qt), *peven = (int32_t *)(scratch + l.peven);
    int32_t *podd = (int32_t *)(scratch + l.podd);
    bf16_t *vpart = (bf16_t *)(scratch + l.vpart);
    const int64_t slot_bytes = (int64_t)kv_heads * d * (int64_t)sizeof(bf16_t);
    const int64_t p_bytes = (int64_t)n_rows * 4;

    for (int h = 0; h < nh; h++) amx_query_tiles(query + (size_t)(kh0 + h) * group * d, group, d, qt + (size_t)h * (d / 32) * 256);
    for (int u = 0; u < n_rows / 16; u++) {
        const bf16_t *kr = k_cache + cache_row(table, t_base + 16 * u, block_size, kv_heads, kh0, d);
        for (int h = 0; h < nh; h++) {
            _tile_zero(2);
            for (int j = 0; j < d / 32; j++) {
                _tile_loadd(7, kr + (size_t)h * d + 32 * j, slot_bytes);
                _tile_loadd(3, qt + ((size_t)h * (d / 32) + j) * 256, 64);
                _tile_dpbf16ps(2, 7, 3);
                ahead_step(ahead, lines_per_call);
            }
            _tile_stored(2, st + ((size_t)h * n_rows + (size_t)u * 16) * group, 4 * group);
        }
    }

    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(group));
    const __m512i even_first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i even_second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const int lo = first - t_base, hi = len - t_base;
    for (int h = 0; h < nh; h++) {
        float inv[16];
        for (int g = 0; g < group; g++) {
            const float *sth = st + (size_t)h * n_rows * group;
            __m512 mv = _mm512_set1_ps(-INFINITY);
            for (int c = 0; c < n_rows; c += 16) {
                const __mmask16 valid = (__mmask16)((c + 16 <= hi ? 0xffffu : c >= hi ? 0u : (1u << (hi - c)) - 1u) &
                                                    (c >= lo ? 0xffffu : c + 16 <= lo ? 0u : ~((1u << (lo - c)) - 1u)));
                const __m512 v = _mm512_mask_i32gather_ps(_mm512_set1_ps(-INFINITY), valid, column,
                                                          sth + (size_t)c * group + g, 4);
                const __m512 sv = _mm512_mask_mul_ps(v, valid, v, _mm512_set1_ps(scale));
                _mm512_storeu_ps(srow + c, sv);
                mv = _mm512_max_ps(mv, sv);
            }
            const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
            __m512 sum = _mm512_setzero_ps();
            for (int c = 0; c < n_rows; c += 16) {
                const __m512 e = exp_nonpositive16_fma(_mm512_sub_ps(_mm512_loadu_ps(srow + c), m)); /* -inf -> 0 */
                const __m256i pb = (__m256i)_mm512_cvtneps_pbh(e);
                const __m512 pf = from_bf16_16(pb); /* P rounded to bf16, as a float: the (0, p) pair */
                _mm512_storeu_si512((void *)(podd + (size_t)g * n_rows + c), _mm512_castps_si512(pf));
                _mm512_storeu_si512((void *)(peven + (size_t)g * n_rows + c), _mm512_cvtepu16_epi32(pb));
                sum = _mm512_add_ps(sum, pf);
            }
            inv[g] = 1.0f / _mm512_reduce_add_ps(sum);
        }

        bf16_t *o = out + (size_t)(kh0 + h) * group * d;
        for (int dbase = 0; dbase < d; dbase += 32) {
            _tile_zero(0);
            _tile_zero(1);
            for (int u = 0; u < n_rows / 16; u++) {
                const int c = 16 * u;
                const bf16_t *vr = v_cache + cache_row(table, t_base + c, block_size, kv_heads, kh0 + h, d) + dbase;
                int64_t v_stride = slot_bytes;
                if (c < lo || c + 16 > hi) { /* a stale or out-of-window slot may hold anything, and 0 * NaN is NaN */
                    for (int r = 0; r < 16; r++) {
                        const __m512i row = c + r >= lo && c + r < hi
                                                ? _mm512_loadu_si512((const void *)(vr + r * (slot_bytes / 2)))
                                                : _mm512_setzero_si512();
                        _mm512_storeu_si512((void *)(vpart + 32 * r), row);
                    }
                    vr = vpart;
                    v_stride = 64;
                }
                const int vt = 6 + (u & 1); /* alternate registers: the next load need not wait for these products */
                if (vt == 6) _tile_loadd(6, vr, v_stride); else _tile_loadd(7, vr, v_stride);
                _tile_loadd(4, peven + c, p_bytes);
                _tile_loadd(5, podd + c, p_bytes);
                if (vt == 6) {
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 5, 6);
                } else {
                    _tile_dpbf16ps(0, 4, 7);
                    _tile_dpbf16ps(1, 5, 7);
                }
                ahead_step(ahead, lines_per_call);
            }
            _tile_stored(0, acc, 64);
            _tile_stored(1, acc + (size_t)group * 16, 64);
            for (int g = 0; g < group; g++) {
                const __m512 ev = _mm512_loadu_ps(acc + (size_t)g * 16), od = _mm512_loadu_ps(acc + (size_t)(group + g) * 16);
                const __m512 sc = _mm512_set1_ps(inv[g]);
                const __m512 a = _mm512_mul_ps(_mm512_permutex2var_ps(ev, even_first, od), sc);
                const __m512 b = _mm512_mul_ps(_mm512_permutex2var_ps(ev, even_second, od), sc);
                _mm256_storeu_si256((__m256i *)(o + (size_t)g * d + dbase), (__m256i)_mm512_cvtneps_pbh(a));
                _mm256_storeu_si256((__m256i *)(o + (size_t)g * d + dbase + 16), (__m256i)_mm512_cvtneps_pbh(b));
            }
        }
    }
}
#endif

/* Decode attention straight from the paged cache: one query token per sequence, no gather, no padding.
 *
 * query/out: row r of sequence i is query + rows[i] * q_row_stride, its heads contiguous ([heads, head_size]).
 * k_cache/v_cache: [num_blocks, block_size, kv_heads, head_size] contiguous. block_tables: [*, bt_stride] int32,
 * sequence i uses row tables[i]. Keys [first, seq_len) are read, first = max(0, seq_len - window) when
 * window > 0; a sequence of length 0 (a padded row) gets a zero output. Returns 0, or -1 when a length is negative,
 * a block id is outside [0, num_blocks) or a scratch allocation failed (the caller raises or falls back). */
int llmctl_decode_attention(int dtype, const void *query, int64_t q_row_stride, void *out, int64_t o_row_stride,
                            const void *k_cache, const void *v_cache, int block_size, int kv_heads, int head_size,
                            int heads, const int32_t *block_tables, int64_t bt_stride, const int32_t *tables,
                            const int64_t *rows, const int32_t *seq_lens, int num_seqs, int window, float scale,
                            int64_t num_blocks, int num_threads) {
    const int group = heads / kv_heads;
    const int d = head_size;
    int failed = 0;
    /* One task per sequence when there are enough of them: its KV heads share cache lines ([block, slot, head]
     * layout), so one core reading all of them streams each line once. Small batches split by head as well. */
    const int per_seq = num_seqs >= 4 * num_threads;
    const int num_tasks = per_seq ? num_seqs : num_seqs * kv_heads;
#if HAVE_AMX
    const int amx = amx_on && dtype == DT_BF16 && block_size % 16 == 0 && d % 32 == 0 && d <= 256 && group <= 16;
#else
    const int amx = 0;
#endif
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
#if HAVE_AMX
    int configured = 0;
#endif
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < num_tasks; task++) {
        const int i = per_seq ? task : task / kv_heads;
        const int kh_begin = per_seq ? 0 : task % kv_heads;
        const int kh_end = per_seq ? kv_heads : kh_begin + 1;
        const int len = seq_lens[i];
        if (len == 0) { /* a padded row of a recorded step: no keys, a zero output */
            const size_t elem = dtype == DT_F32 ? 4 : 2;
            char *o = (char *)out + (size_t)(rows[i] * o_row_stride + (int64_t)kh_begin * group * d) * elem;
            memset(o, 0, (size_t)(kh_end - kh_begin) * group * d * elem);
            continue;
        }
        const int first = first_key(len, window);
        const int n_keys = len - first;
        const int b_first = first / block_size, b_last = (len - 1) / block_size;
        const int32_t *table = block_tables + (int64_t)tables[i] * bt_stride;
        int bad = len < 1;
        for (int b = b_first; !bad && b <= b_last; b++) bad |= table[b] < 0 || table[b] >= num_blocks;
        if (bad) {
            failed = 1;
            continue;
        }
        /* The next sequence this thread will likely take (dynamic schedule, threads move in step): its keys and
         * values are requested a few lines per block call while this one computes. */
        struct ahead ahead = {0};
        int lines_per_call = 0;
        if (per_seq && task + num_threads < num_tasks && seq_lens[task + num_threads] >= 1) {
            const int j = task + num_threads;
            ahead.k = (const char *)k_cache;
            ahead.v = (const char *)v_cache;
            ahead.table = block_tables + (int64_t)tables[j] * bt_stride;
            ahead.b = first_key(seq_lens[j], window) / block_size;
            ahead.b_last = (seq_lens[j] - 1) / block_size;
            ahead.block_bytes = (int64_t)block_size * kv_heads * d * (dtype == DT_F32 ? 4 : 2);
            ahead.num_blocks = num_blocks;
            const int64_t lines = 2 * (ahead.b_last - ahead.b + 1) * ((ahead.block_bytes + 63) / 64);
            /* K and V passes per head: a call per block each, or (AMX) one per tile product of the scores and of
             * P.V, so the requests spread evenly over all of this sequence's arithmetic: in bursts of ~100 lines
             * per 16 keys they had stalled it on the core's few outstanding misses (30 layers x 64 x 192 keys
             * with weight-like traffic between layers: 15.9-16.5 -> 14.6-14.9 ms) */
            const int64_t keys = (int64_t)(b_last - b_first + 1) * block_size;
            const int64_t calls = amx ? keys / 16 * (kh_end - kh_begin) * (d / 32) * 2
                                      : (int64_t)kv_heads * 2 * (b_last - b_first + 1);
            lines_per_call = (int)((lines + calls - 1) / calls);
        }
#if HAVE_AMX
        if (amx) {
            float *scratch = thread_scratch(amx_scratch_layout(len - b_first * block_size, kh_end - kh_begin, group,
                                                               d).total);
            if (scratch == NULL) {
                failed = 1;
                continue;
            }
            if (!configured) {
                amx_configure_decode(group);
                configured = 1;
            }
            amx_attend((const bf16_t *)query + rows[i] * q_row_stride, (bf16_t *)out + rows[i] * o_row_stride,
                       (const bf16_t *)k_cache, (const bf16_t *)v_cache, table, block_size, kv_heads, kh_begin, kh_end,
                       d, group, first, len, scale, scratch, &ahead, lines_per_call);
            continue;
        }
#endif
        /* scratch: q (group*d), acc (group*d), scores (group*n_keys); per thread, kept */
        float *scratch = thread_scratch((size_t)group * d * 2 + (size_t)group * n_keys);
        if (scratch == NULL) {
            failed = 1;
            continue;
        }
        float *q = scratch, *acc = q + (size_t)group * d;
        float *scores = acc + (size_t)group * d;
        for (int kh = kh_begin; kh < kh_end; kh++) {
            const int64_t q_off = rows[i] * q_row_stride + (int64_t)kh * group * d;
            load_f32(query, q_off, dtype, q, group * d);
            for (int j = 0; j < group * d; j++) q[j] *= scale;
            memset(acc, 0, sizeof(float) * (size_t)group * d);
            /* the bf16 dot-product loop takes the query unscaled and scales each score instead */
            const bf16_t *q_bf16 = dtype == DT_BF16 ? (const bf16_t *)query + q_off : NULL;
            for (int b = b_first; b <= b_last; b++) {
                const int t0 = b == b_first ? first : b * block_size, t1 = b == b_last ? len : (b + 1) * block_size;
                if (!qk_dispatch(dtype, group, d, q, scale, q_bf16, k_cache, table, block_size, kv_heads, kh, first,
                                 len, t0, t1, scores))
                    qk_general(dtype, q, group, d, k_cache, table, block_size, kv_heads, kh, first, len, t0, t1,
                               scores);
                ahead_step(&ahead, lines_per_call);
            }
            softmax_numerators(scores, group, n_keys);
            for (int b = b_first; b <= b_last; b++) {
                const int t0 = b == b_first ? first : b * block_size, t1 = b == b_last ? len : (b + 1) * block_size;
                if (!pv_dispatch(dtype, group, d, scores, v_cache, table, block_size, kv_heads, kh, first, len, t0, t1,
                                 acc))
                    pv_general(dtype, scores, group, d, v_cache, table, block_size, kv_heads, kh, first, len, t0, t1,
                               acc);
                ahead_step(&ahead, lines_per_call);
            }
            for (int g = 0; g < group; g++) {
                const float *sg = scores + (size_t)g * n_keys;
                const float inv = 1.0f / row_sum(sg, n_keys);
                float *ag = acc + (size_t)g * d;
                for (int x = 0; x < d; x++) ag[x] *= inv;
            }
            store_f32(out, rows[i] * o_row_stride + (int64_t)kh * group * d, dtype, acc, group * d);
        }
    }
#if HAVE_AMX
    if (configured) _tile_release();
#endif
    }
    return failed ? -1 : 0;
}

/* Row-wise kernels (KV write, rotary, RMSNorm, argmax) split rows over threads only when a call has this many
 * elements: below it the fork/join costs more than it saves. 8192 takes in a 64-sequence decode step's calls, whose
 * inputs come from both cores' caches (per step: RMSNorm 1.4 -> 0.9 ms, rotary 0.64 -> 0.44, KV write 0.58 ->
 * 0.36); a single stream's stay on one thread. */
#define ROWWISE_PARALLEL_MIN_ELEMS 8192

/* Store new keys/values into the paged cache. key/value rows are [kv_heads * head_size] contiguous with a row
 * stride (they are usually views into the fused qkv projection); slot -1 skips a token. Same dtype as the cache.
 * Returns the index of the first token whose slot is >= num_slots (nothing is written then), or -1. */
int llmctl_write_kv(int dtype, const void *key, int64_t k_row_stride, const void *value, int64_t v_row_stride,
                    void *k_cache, void *v_cache, const int64_t *slots, int num_tokens, int row_elems,
                    int64_t num_slots, int num_threads) {
    const size_t elem = dtype == DT_F32 ? 4 : 2;
    const size_t bytes = elem * (size_t)row_elems;
    for (int i = 0; i < num_tokens; i++)
        if (slots[i] >= num_slots) return i;
    /* a prefill's rows land in fresh cache pages: their first-touch faults are most of this, and split too */
    const int threads = (int64_t)num_tokens * row_elems >= ROWWISE_PARALLEL_MIN_ELEMS ? num_threads : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < num_tokens; i++) {
        const int64_t s = slots[i];
        if (s < 0) continue;
        memcpy((char *)k_cache + (size_t)s * bytes, (const char *)key + (size_t)i * k_row_stride * elem, bytes);
        memcpy((char *)v_cache + (size_t)s * bytes, (const char *)value + (size_t)i * v_row_stride * elem, bytes);
    }
    return -1;
}

/* Rotary embedding of one tensor ([tokens, heads, head_size], heads contiguous within a row), out of place.
 * cos_sin: [max_position, rot] float32 (cos in the first half, sin in the second). The math mirrors the torch
 * reference step by step in float32 (no fused multiply-adds), so results are bit-identical to it. Returns the
 * index of the first position outside [0, max_position) (nothing is written then), or -1. */
int llmctl_rotary(int dtype, const int64_t *positions, int num_tokens, const float *cos_sin, int rot,
                  int64_t max_position, const void *src, int64_t src_row_stride, void *dst, int64_t dst_row_stride,
                  int heads, int head_size, int neox, int num_threads) {
    const int half = rot / 2;
    for (int i = 0; i < num_tokens; i++)
        if (positions[i] < 0 || positions[i] >= max_position) return i;
    const int threads = (int64_t)num_tokens * heads * head_size >= ROWWISE_PARALLEL_MIN_ELEMS ? num_threads : 1;
#if HAVE_AVX512 && defined(__AVX512BF16__)
    if (neox && dtype == DT_BF16 && half % 16 == 0) {
        /* sixteen lanes, the reference's operations in its order (multiplies, then one subtract or add): the
         * same bits, ~4x faster than the scalar loop below (12 -> 3 us for 64 tokens x 9 heads of 64) */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int i = 0; i < num_tokens; i++) {
            const float *cos = cos_sin + positions[i] * rot;
            const float *sin = cos + half;
            for (int h = 0; h < heads; h++) {
                const bf16_t *sr = (const bf16_t *)src + i * src_row_stride + (int64_t)h * head_size;
                bf16_t *dr = (bf16_t *)dst + i * dst_row_stride + (int64_t)h * head_size;
                for (int x = 0; x < half; x += 16) {
                    const __m512 x1 = from_bf16_16(_mm256_loadu_si256((const __m256i *)(sr + x)));
                    const __m512 x2 = from_bf16_16(_mm256_loadu_si256((const __m256i *)(sr + x + half)));
                    const __m512 c = _mm512_loadu_ps(cos + x), sn = _mm512_loadu_ps(sin + x);
                    const __m512 lo = _mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, sn));
                    const __m512 hi = _mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, sn));
                    _mm256_storeu_si256((__m256i *)(dr + x), (__m256i)_mm512_cvtneps_pbh(lo));
                    _mm256_storeu_si256((__m256i *)(dr + x + half), (__m256i)_mm512_cvtneps_pbh(hi));
                }
                if (rot < head_size && dr != sr) memcpy(dr + rot, sr + rot, (size_t)(head_size - rot) * sizeof(bf16_t));
            }
        }
        return -1;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < num_tokens; i++) {
        const float *cos = cos_sin + positions[i] * rot;
        const float *sin = cos + half;
        float buf[512];
        for (int h = 0; h < heads; h++) {
            const int64_t so = i * src_row_stride + (int64_t)h * head_size;
            const int64_t dof = i * dst_row_stride + (int64_t)h * head_size;
            load_f32(src, so, dtype, buf, head_size);
            float outv[512];
            if (neox) {
                for (int x = 0; x < half; x++) {
                    const float x1 = buf[x], x2 = buf[x + half];
                    const float a = x1 * cos[x], b = x2 * sin[x];
                    const float c = x2 * cos[x], e = x1 * sin[x];
                    outv[x] = a - b;
                    outv[x + half] = c + e;
                }
            } else {
                for (int x = 0; x < half; x++) {
                    const float x1 = buf[2 * x], x2 = buf[2 * x + 1];
                    const float a = x1 * cos[x], b = x2 * sin[x];
                    const float c = x2 * cos[x], e = x1 * sin[x];
                    outv[2 * x] = a - b;
                    outv[2 * x + 1] = c + e;
                }
            }
            for (int x = rot; x < head_size; x++) outv[x] = buf[x];
            store_f32(dst, dof, dtype, outv, head_size);
        }
    }
    return -1;
}

/* ---- RMSNorm, optionally after the residual add --------------------------------------------------------------
 *
 * torch runs it as three to five passes with a temporary per pass (about 35 us for 64 rows of 576 at bfloat16,
 * 0.17-0.3 ms for 1024 rows): one pass here. The math rounds where the reference does (the residual sum and the
 * normalised row are rounded to the dtype before the weight multiplies), so the only difference left is the order
 * of the float32 sum of squares: in rare elements the normalised row is one unit in the last place off, and after
 * the weight's multiply the output one or two.
 * Rows split over threads only when a call has enough of them. */

static inline float round_to(int dtype, float v) { return dtype == DT_F32 ? v : bf16_to_f32(f32_to_bf16(v)); }

/* out[r] = rms_norm(h) * weight with h = x[r], or h = x[r] + res[r] (stored to res_out[r]) when res is given;
 * rows of d elements with row strides. out may alias x, res_out may alias res. Returns -1 when scratch memory
 * could not be had, else 0. */
#if defined(__AVX512BF16__)
/* One bf16 row in sixteen lanes: h = bf16(x + res) (stored to res_out), then bf16(w * bf16(h * inv)). The same
 * roundings as the scalar loop below; the sum of squares adds in sixteen lanes. h is re-read from res_out (or x),
 * which the first pass just wrote or read, so it comes from L1. */
static void rms_norm_row_bf16(const bf16_t *x, const bf16_t *res, bf16_t *res_out, const bf16_t *weight, bf16_t *out,
                              int d, float eps) {
    __m512 sq = _mm512_setzero_ps();
    for (int j = 0; j < d; j += 16) {
        const __mmask16 m = d - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (d - j)) - 1);
        __m512 h = from_bf16_16(_mm256_maskz_loadu_epi16(m, x + j));
        if (res != NULL) {
            const __m256i hb = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(h, from_bf16_16(_mm256_maskz_loadu_epi16(m, res + j))));
            _mm256_mask_storeu_epi16(res_out + j, m, hb);
            h = from_bf16_16(hb);
        }
        sq = _mm512_fmadd_ps(h, h, sq);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)d + eps));
    const bf16_t *hs = res != NULL ? res_out : x;
    for (int j = 0; j < d; j += 16) {
        const __mmask16 m = d - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (d - j)) - 1);
        const __m512 h = from_bf16_16(_mm256_maskz_loadu_epi16(m, hs + j));
        const __m512 n = from_bf16_16((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(h, inv)));
        const __m512 w = from_bf16_16(_mm256_maskz_loadu_epi16(m, weight + j));
        _mm256_mask_storeu_epi16(out + j, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(w, n)));
    }
}
#endif

int llmctl_rms_norm(int dtype, const void *x, int64_t xs, const void *res, int64_t rs, void *res_out, int64_t ros,
                    const void *weight, void *out, int64_t os, int rows, int d, float eps, int num_threads) {
    const int threads = (int64_t)rows * d >= ROWWISE_PARALLEL_MIN_ELEMS ? num_threads : 1;
#if defined(__AVX512BF16__)
    if (dtype == DT_BF16) {
#define RMS_NORM_ROW_BF16(r)                                                                                          \
    rms_norm_row_bf16((const bf16_t *)x + (r) * xs, res == NULL ? NULL : (const bf16_t *)res + (r) * rs,              \
                      res == NULL ? NULL : (bf16_t *)res_out + (r) * ros, (const bf16_t *)weight,                     \
                      (bf16_t *)out + (r) * os, d, eps)
        if (threads == 1) { /* no parallel region at all (an if(0) one still doubled a one-row call: 0.18 -> 0.37 us) */
            for (int r = 0; r < rows; r++) RMS_NORM_ROW_BF16(r);
            return 0;
        }
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int r = 0; r < rows; r++) RMS_NORM_ROW_BF16(r);
#undef RMS_NORM_ROW_BF16
        return 0;
    }
#endif
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *h = thread_scratch((size_t)d * 2);
        float *w = h == NULL ? NULL : h + d;
        failed = h == NULL;
        if (h != NULL) load_f32(weight, 0, dtype, w, d);
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            if (h == NULL) continue;
            load_f32(x, r * xs, dtype, h, d);
            if (res != NULL) {
                if (dtype == DT_F32) {
                    const float *rp = (const float *)res + r * rs;
#pragma omp simd
                    for (int j = 0; j < d; j++) h[j] += rp[j];
                } else {
                    const bf16_t *rp = (const bf16_t *)res + r * rs;
#pragma omp simd
                    for (int j = 0; j < d; j++) h[j] = round_to(DT_BF16, h[j] + bf16_to_f32(rp[j]));
                }
                store_f32(res_out, r * ros, dtype, h, d);
            }
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < d; j++) sum += h[j] * h[j];
            const float inv = 1.0f / sqrtf(sum / (float)d + eps);
            if (dtype == DT_F32) {
                float *o = (float *)out + r * os;
#pragma omp simd
                for (int j = 0; j < d; j++) o[j] = w[j] * (h[j] * inv);
            } else {
                bf16_t *o = (bf16_t *)out + r * os;
#pragma omp simd
                for (int j = 0; j < d; j++) o[j] = f32_to_bf16(w[j] * round_to(DT_BF16, h[j] * inv));
            }
        }
    }
    return failed ? -1 : 0;
}


/* ---- bf16 GEMM on prepacked panels: y[M][N] = x[M][K] . w[N][K]^T (+ bias) -------------------------------------
 *
 * Why not oneDNN: at decode row counts the GEMM streams its weights once per step, and oneDNN's primitive call
 * plus its tiling for small M left half the memory bandwidth unused (SmolLM2-135M shapes, 30 layers, cold
 * weights, 2 Zen 4 cores: 1.2-1.8x faster here for 1-64 rows, 1.09x at 256). Each output element is summed by
 * one thread over k in a fixed order from its own row only, so a row's result does not depend on the batch.
 *
 * Packed layout: 16-column panels, k in pairs: panel p holds w[16p + c][2j + h] at ((p * K2 + j) * 16 + c) * 2 + h,
 * K2 = ceil(K / 2), zero padded past N and K, so one 64-byte load feeds one bf16 dot-product instruction. */
#define GEMM_ROWS 4   /* rows per register tile */
#define GEMM_PANELS 4 /* 16-column panels per register tile: 16 fp32 accumulators */

void llmctl_pack_bf16_panels(const bf16_t *w, int64_t w_row_stride, int n, int k, bf16_t *out) {
    const int k2 = (k + 1) / 2, panels = (n + 15) / 16;
    memset(out, 0, (size_t)panels * k2 * 32 * sizeof(bf16_t));
#pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++)
        for (int c = 0; c < 16 && 16 * p + c < n; c++) {
            const bf16_t *row = w + (int64_t)(16 * p + c) * w_row_stride;
            bf16_t *dst = out + (size_t)p * k2 * 32 + (size_t)c * 2;
            for (int j = 0; j < k; j++) dst[(size_t)(j / 2) * 32 + j % 2] = row[j];
        }
}

#if defined(__AVX512BF16__)
int llmctl_has_gemm_bf16(void) { return 1; }

/* The epilogue of 16 output columns of one row: bias, rounding to bf16, and (silu) SiLU-and-mul of a gate/up pair,
 * rounded where the unfused GEMM and silu_and_mul round. Shared by the AVX-512 and AMX paths so the two differ
 * only in how the float32 sums are formed. */
static inline __attribute__((always_inline)) void store_cols16(__m512 v, const bf16_t *bias, __mmask16 m, bf16_t *y) {
    if (bias != NULL) v = _mm512_add_ps(v, from_bf16_16(_mm256_maskz_loadu_epi16(m, bias)));
    _mm256_mask_storeu_epi16(y, m, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __attribute__((always_inline)) void store_silu16(__m512 gate, __m512 up, const bf16_t *bias,
                                                               bf16_t *y) {
    if (bias != NULL) {
        gate = _mm512_add_ps(gate, from_bf16_16(_mm256_loadu_si256((const __m256i *)bias)));
        up = _mm512_add_ps(up, from_bf16_16(_mm256_loadu_si256((const __m256i *)(bias + 16))));
    }
    const __m512 g = from_bf16_16((__m256i)_mm512_cvtneps_pbh(gate));
    const __m512 u = from_bf16_16((__m256i)_mm512_cvtneps_pbh(up));
    const __m512 sg = from_bf16_16((__m256i)_mm512_cvtneps_pbh(silu16(g)));
    _mm256_storeu_si256((__m256i *)y, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sg, u)));
}

static inline __attribute__((always_inline)) void gemm_tile(int ROWS, int NPAN, int SILU, const bf16_t *x,
                                                            int64_t xs, int k, const bf16_t *w, size_t panel_stride,
                                                            const bf16_t *bias, bf16_t *y, int64_t ys, int last_cols,
                                                            const bf16_t *next, int pf0, int pf1) {
    __m512 acc[GEMM_ROWS][GEMM_PANELS];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
        for (int p = 0; p < NPAN; p++) acc[r][p] = _mm512_setzero_ps();
    const int pairs = k / 2;
    for (int j = 0; j < pairs; j++) {
        if (next != NULL) {
#pragma GCC unroll 4
            for (int p = pf0; p < pf1; p++) __builtin_prefetch(next + p * panel_stride + (size_t)j * 32, 0, 3);
        }
        __m512bh b[GEMM_PANELS];
#pragma GCC unroll 4
        for (int p = 0; p < NPAN; p++) b[p] = (__m512bh)_mm512_loadu_si512(w + p * panel_stride + (size_t)j * 32);
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            int32_t pair;
            memcpy(&pair, x + r * xs + 2 * j, sizeof(pair));
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
            for (int p = 0; p < NPAN; p++) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], a, b[p]);
        }
    }
    if (k % 2) { /* the last k alone: its partner in the packed pair is zero, and so is the one given here */
        __m512bh b[GEMM_PANELS];
#pragma GCC unroll 4
        for (int p = 0; p < NPAN; p++) b[p] = (__m512bh)_mm512_loadu_si512(w + p * panel_stride + (size_t)pairs * 32);
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int32_t)x[r * xs + k - 1]);
#pragma GCC unroll 4
            for (int p = 0; p < NPAN; p++) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], a, b[p]);
        }
    }
    if (SILU) { /* panels (2q, 2q + 1) are (gate, up) of the same 16 output columns */
#pragma GCC unroll 2
        for (int q = 0; q < NPAN / 2; q++)
#pragma GCC unroll 4
            for (int r = 0; r < ROWS; r++)
                store_silu16(acc[r][2 * q], acc[r][2 * q + 1], bias == NULL ? NULL : bias + 32 * q, y + r * ys + 16 * q);
        return;
    }
#pragma GCC unroll 4
    for (int p = 0; p < NPAN; p++) {
        const __mmask16 m = p == NPAN - 1 ? (__mmask16)((1u << last_cols) - 1) : (__mmask16)0xffff;
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) store_cols16(acc[r][p], bias == NULL ? NULL : bias + 16 * p, m, y + r * ys + 16 * p);
    }
}

#define GEMM_TILE(R_, P_, S_)                                                                                \
    if (rows == (R_) && npan == (P_) && silu == (S_)) {                                                      \
        gemm_tile(R_, P_, S_, x, xs, k, w, panel_stride, bias, y, ys, last_cols, next, pf0, pf1);            \
        return;                                                                                              \
    }
#define GEMM_TILE_ROWS(R_) \
    GEMM_TILE(R_, 1, 0) GEMM_TILE(R_, 2, 0) GEMM_TILE(R_, 3, 0) GEMM_TILE(R_, 4, 0) GEMM_TILE(R_, 2, 1) GEMM_TILE(R_, 4, 1)

static void gemm_tile_any(int rows, int npan, int silu, const bf16_t *x, int64_t xs, int k, const bf16_t *w,
                          size_t panel_stride, const bf16_t *bias, bf16_t *y, int64_t ys, int last_cols,
                          const bf16_t *next, int pf0, int pf1) {
    GEMM_TILE_ROWS(1) GEMM_TILE_ROWS(2) GEMM_TILE_ROWS(3) GEMM_TILE_ROWS(4)
}

#if HAVE_AMX
/* ---- the same GEMM on AMX tiles ------------------------------------------------------------------------------
 *
 * Why: one tile instruction does 16 x 16 x 32 multiply-adds. On two Sapphire Rapids cores the AVX-512 loop above
 * reached ~200 GFLOP/s and oneDNN (AMX) 0.7-2.5 TFLOP/s; this reaches 1.1-2.3 TFLOP/s from 16 rows up, and on
 * SmolLM2-135M's 30 layers with cold weights it beats oneDNN at every decode batch (m=64: 19 vs 21 ms). The panels
 * need no new layout: a panel's 16 consecutive k pairs (1 KB) are exactly a B tile in AMX's pair-interleaved
 * format, so the same packed weights serve both paths and the decode-step recording does not care which runs.
 *
 * Tiles 0-3 accumulate a 2 x 2 grid of 16-row blocks by 16-column panels, 4-5 hold x's row blocks, 6-7 the panels.
 * Batch invariance holds as in the AVX-512 path: an output element is summed over k in a fixed order from its
 * own row and column only. Rows not filling the last 16-row block are not padded: that block starts 16 rows
 * earlier and recomputes (bit-identically) a few rows of the previous one, so x is never read past row m. Only
 * k a multiple of 32 is taken (every hidden size in use is); other shapes stay on the AVX-512 path.
 *
 * Measured and dropped (SmolLM2 shapes, 30 layers, m=64): software prefetch of the next column block (1-32 lines
 * per k block, to L1 or L2: 0-30 % slower; what helps is the same panels a few k blocks ahead, below), one pass
 * over each panel with four 16-row blocks (x re-read per block: 23 vs 19 ms), and splitting rows instead of
 * columns between the two cores at this size (26 ms). */

#define AMX_SLAB_BYTES (768 * 1024)
#define AMX_PREFETCH_KBLOCKS 4 /* 4 KB ahead per panel; 2 and 8-12 measured no better */

/* The epilogue of one finished block (bias, bf16 rounding, SiLU-and-mul for gated weights), pending while the
 * next block's products run: its rows are written a few per k block from inside the next amx_block, where the
 * vector units are otherwise idle while the tiles multiply. Why: run after its block, the SiLU epilogue alone cost a
 * quarter of a prefill-sized gate/up GEMM (1024 rows: 1.70 -> 1.27 ms with it removed). */
struct amx_epilogue {
    const float *acc; /* [2][16][32] float32 sums of the finished block */
    bf16_t *y;
    const bf16_t *bias;
    int64_t ys, r[2];
    int rows, total, next, p0, pb, panels, last_cols, silu;
};

/* Row items [e->next, e->next + count) of the pending epilogue (item = one row of one 16-row block). */
static inline __attribute__((always_inline)) void amx_epilogue_rows(struct amx_epilogue *e, int count) {
    const int stop = e->next + count < e->total ? e->next + count : e->total;
    for (; e->next < stop; e->next++) {
        const int i = e->next / e->rows, j = e->next % e->rows;
        const float *a = e->acc + ((size_t)i * 16 + j) * 32;
        bf16_t *yr = e->y + (e->r[i] + j) * e->ys;
        if (e->silu) {
            store_silu16(_mm512_load_ps(a), _mm512_load_ps(a + 16), e->bias == NULL ? NULL : e->bias + 16 * e->p0,
                         yr + 8 * e->p0);
            continue;
        }
        for (int q = 0; q < e->pb; q++) {
            const int cols = e->p0 + q == e->panels - 1 ? e->last_cols : 16;
            store_cols16(_mm512_load_ps(a + 16 * q), e->bias == NULL ? NULL : e->bias + 16 * (e->p0 + q),
                         (__mmask16)((1u << cols) - 1), yr + 16 * (e->p0 + q));
        }
    }
}

/* RB row blocks (x0, x1) by PB panels (w0, w1) over kb k blocks of 32, stored as float32 into out[RB][16][32];
 * meanwhile the previous block's pending epilogue is written, a share per k block. With `prefetch`, each k block
 * also requests the panels' tiles AMX_PREFETCH_KBLOCKS k blocks ahead into L2. */
static inline __attribute__((always_inline)) void amx_block(int RB, int PB, const bf16_t *x0, const bf16_t *x1,
                                                            int64_t x_bytes, const bf16_t *w0, const bf16_t *w1,
                                                            int kblocks, int prefetch, float *out,
                                                            struct amx_epilogue *pending) {
    const int share = (pending->total - pending->next + kblocks - 1) / kblocks;
    _tile_zero(0);
    if (PB == 2) _tile_zero(1);
    if (RB == 2) _tile_zero(2);
    if (RB == 2 && PB == 2) _tile_zero(3);
    for (int kb = 0; kb < kblocks; kb++) {
        if (prefetch) { /* past a panel's end this reaches the next panel: a prefetch never faults */
            const char *p0 = (const char *)(w0 + (size_t)(kb + AMX_PREFETCH_KBLOCKS) * 512);
            const char *p1 = (const char *)(w1 + (size_t)(kb + AMX_PREFETCH_KBLOCKS) * 512);
            for (int line = 0; line < 1024; line += 64) {
                _mm_prefetch(p0 + line, _MM_HINT_T1);
                if (PB == 2) _mm_prefetch(p1 + line, _MM_HINT_T1);
            }
        }
        _tile_loadd(6, w0 + (size_t)kb * 512, 64);
        if (PB == 2) _tile_loadd(7, w1 + (size_t)kb * 512, 64);
        _tile_loadd(4, x0 + (size_t)kb * 32, x_bytes);
        _tile_dpbf16ps(0, 4, 6);
        if (PB == 2) _tile_dpbf16ps(1, 4, 7);
        if (RB == 2) {
            _tile_loadd(5, x1 + (size_t)kb * 32, x_bytes);
            _tile_dpbf16ps(2, 5, 6);
            if (PB == 2) _tile_dpbf16ps(3, 5, 7);
        }
        if (pending->next < pending->total) amx_epilogue_rows(pending, share);
    }
    _tile_stored(0, out, 128);
    if (PB == 2) _tile_stored(1, out + 16, 128);
    if (RB == 2) _tile_stored(2, out + 512, 128);
    if (RB == 2 && PB == 2) _tile_stored(3, out + 512 + 16, 128);
}

/* Column block cb (panels 2cb, 2cb + 1) for row blocks [rb0, rb_end): each block's products run while the previous
 * block's epilogue is written; this one's is left pending in *pending, its sums in acc[flip]. The caller flushes the
 * last one (amx_epilogue_rows with its total). */
static inline void amx_column_block(const bf16_t *x, int64_t xs, int m, int kblocks, const bf16_t *packed,
                                    size_t panel_stride, int panels, int last_cols, const bf16_t *bias, bf16_t *y,
                                    int64_t ys, int silu, int rows, int cb, int rb0, int rb_end, int prefetch,
                                    float acc[2][2][16][32], int *flip, struct amx_epilogue *pending) {
    const int p0 = 2 * cb, pb = panels - p0 < 2 ? 1 : 2;
    const bf16_t *w0 = packed + (size_t)p0 * panel_stride, *w1 = w0 + panel_stride;
    const int64_t x_bytes = xs * (int64_t)sizeof(bf16_t);
    for (int rb = rb0; rb < rb_end; rb += 2) {
        const int nrb = rb_end - rb < 2 ? 1 : 2;
        int r[2] = {16 * rb, 16 * (rb + 1)};
        for (int i = 0; i < 2; i++)
            if (r[i] + rows > m) r[i] = m - rows;
        const bf16_t *x0 = x + r[0] * xs, *x1 = x + r[1] * xs;
        const int pf = prefetch && rb == rb0; /* the first row pass reads the panels from memory */
        float *out = &acc[*flip][0][0][0];
        if (nrb == 2 && pb == 2) amx_block(2, 2, x0, x1, x_bytes, w0, w1, kblocks, pf, out, pending);
        else if (nrb == 2) amx_block(2, 1, x0, x1, x_bytes, w0, w1, kblocks, pf, out, pending);
        else if (pb == 2) amx_block(1, 2, x0, x1, x_bytes, w0, w1, kblocks, pf, out, pending);
        else amx_block(1, 1, x0, x1, x_bytes, w0, w1, kblocks, pf, out, pending);
        amx_epilogue_rows(pending, pending->total); /* what the k blocks did not cover (short k) */
        const struct amx_epilogue e = {out, y, bias, ys, {r[0], r[1]}, rows, nrb * rows, 0, p0, pb, panels,
                                       last_cols, silu};
        *pending = e;
        *flip ^= 1;
    }
}

#define AMX_ROW_SPLIT_BLOCKS 16 /* from this many 16-row blocks (256 rows) threads split rows, not columns */

static int gemm_amx(const bf16_t *x, int64_t xs, int m, int k, const bf16_t *packed, int n, const bf16_t *bias,
                    bf16_t *y, int64_t ys, int num_threads, int silu) {
    const int panels = (n + 15) / 16, kblocks = k / 32, col_blocks = (panels + 1) / 2;
    const int rows = m < 16 ? m : 16, row_blocks = (m + 15) / 16;
    const size_t panel_stride = (size_t)(k / 2) * 32;
    const int last_cols = n - 16 * (panels - 1);
    /* Prefill-sized m runs in slabs of row blocks whose x stays in L2 while every column block passes over it
     * (x is re-read once per column block; 1024 x 1536 bf16 is 3 MB, more than a core's L2). */
    const int slab = (int)(AMX_SLAB_BYTES / ((int64_t)k * 32 * (int64_t)sizeof(bf16_t))) * 2;
    const int slab_blocks = slab < 2 ? 2 : slab;
    /* Prefill-sized m splits rows between the threads (each streams every weight panel, which its rows then reuse
     * from L2): a thread reads the rows the previous row-wise kernel wrote on the same core instead of half of
     * them from the other core's cache. Decode-sized m splits columns (the weights are read once in all). */
    const int split_rows = row_blocks >= AMX_ROW_SPLIT_BLOCKS && num_threads > 1;
    /* Decode sizes past one row block spend long enough on a tile's products that the next tiles can come from
     * memory meanwhile, if asked for: a tile load cannot start before the products reading its register are done,
     * so without the prefetch every tile load waits out memory latency between products (SmolLM2's 30 layers at
     * 64 rows, cold: 11.7 -> 10.6 ms). At one row block it gained nothing; prefill sizes reuse panels from L2. */
    const int prefetch = !split_rows && row_blocks >= 2;
#pragma omp parallel num_threads(num_threads)
    {
        float acc[2][2][16][32] __attribute__((aligned(64)));
        struct amx_epilogue pending = {0};
        int flip = 0;
        amx_configure(rows, rows, 16);
        if (split_rows) {
            const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
            const int pairs = (row_blocks + 1) / 2, per = (pairs + nth - 1) / nth;
            const int lo = 2 * (tid * per < pairs ? tid * per : pairs);
            const int hi_pair = (tid + 1) * per < pairs ? (tid + 1) * per : pairs;
            const int hi = 2 * hi_pair < row_blocks ? 2 * hi_pair : row_blocks;
            for (int rb0 = lo; rb0 < hi; rb0 += slab_blocks)
                for (int cb = 0; cb < col_blocks; cb++)
                    amx_column_block(x, xs, m, kblocks, packed, panel_stride, panels, last_cols, bias, y, ys, silu,
                                     rows, cb, rb0, rb0 + slab_blocks < hi ? rb0 + slab_blocks : hi, 0, acc, &flip,
                                     &pending);
        } else {
            for (int rb0 = 0; rb0 < row_blocks; rb0 += slab_blocks) {
                const int rb_end = rb0 + slab_blocks < row_blocks ? rb0 + slab_blocks : row_blocks;
#pragma omp for schedule(static)
                for (int cb = 0; cb < col_blocks; cb++)
                    amx_column_block(x, xs, m, kblocks, packed, panel_stride, panels, last_cols, bias, y, ys, silu,
                                     rows, cb, rb0, rb_end, prefetch, acc, &flip, &pending);
            }
        }
        amx_epilogue_rows(&pending, pending.total);
        _tile_release();
    }
    return 0;
}
#endif

/* silu: the panels alternate gate and up (n a multiple of 32) and y gets silu(gate) * up, [m, n / 2]. */
static int gemm_driver(const bf16_t *x, int64_t xs, int m, int k, const bf16_t *packed, int n, const bf16_t *bias,
                       bf16_t *y, int64_t ys, int num_threads, int silu) {
#if HAVE_AMX
    if (amx_on && k % 32 == 0) return gemm_amx(x, xs, m, k, packed, n, bias, y, ys, num_threads, silu);
#endif
    const int k2 = (k + 1) / 2, panels = (n + 15) / 16;
    const int groups = (panels + GEMM_PANELS - 1) / GEMM_PANELS;
    const size_t panel_stride = (size_t)k2 * 32;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int g = 0; g < groups; g++) {
        const int p0 = g * GEMM_PANELS;
        const int npan = panels - p0 < GEMM_PANELS ? panels - p0 : GEMM_PANELS;
        const int tail = n - 16 * (p0 + npan - 1);
        const int last_cols = tail > 16 ? 16 : tail;
        const bf16_t *w = packed + (size_t)p0 * panel_stride;
        const bf16_t *b = bias == NULL ? NULL : bias + 16 * p0;
        /* With several row tiles per panel group the group is compute-bound, so the next group's panels (this
         * thread's next under the static schedule: they follow in memory) are pulled in while this one computes,
         * spread evenly over its row tiles (tile i of T asks for panels [4i/T, 4(i+1)/T)), each at the rate the
         * tile consumes its own: 16 rows ~20 % faster, 64 rows ~8 %. A single row tile is bandwidth-bound and
         * the extra stream only slowed it. */
        const bf16_t *next = m > GEMM_ROWS && g + 1 < groups ? w + (size_t)GEMM_PANELS * panel_stride : NULL;
        const int tiles = (m + GEMM_ROWS - 1) / GEMM_ROWS;
        for (int r = 0, tile = 0; r < m; r += GEMM_ROWS, tile++) {
            const int rows = m - r < GEMM_ROWS ? m - r : GEMM_ROWS;
            const int pf0 = tile * GEMM_PANELS / tiles, pf1 = (tile + 1) * GEMM_PANELS / tiles;
            gemm_tile_any(rows, npan, silu, x + r * xs, xs, k, w, panel_stride, b,
                          y + r * ys + (silu ? 8 : 16) * p0, ys, last_cols, pf0 < pf1 ? next : NULL, pf0, pf1);
        }
    }
    return 0;
}

/* x: [m, k] bf16, unit stride along k, row stride xs; y: [m, n] bf16, row stride ys; bias: n bf16 or NULL (added
 * in float32 before the one rounding). */
int llmctl_gemm_bf16(const bf16_t *x, int64_t xs, int m, int k, const bf16_t *packed, int n, const bf16_t *bias,
                     bf16_t *y, int64_t ys, int num_threads) {
    return gemm_driver(x, xs, m, k, packed, n, bias, y, ys, num_threads, 0);
}

/* The SwiGLU projection in one pass: packed holds the gate and up projections' panels interleaved (gate panel p,
 * then up panel p; n = 2 * width, width a multiple of 16) and y [m, width] gets silu(gate) * up, each of gate, up
 * and silu rounded to bf16 where the unfused GEMM and silu_and_mul round them. The [m, n] intermediate is never
 * written or read back. Returns -1 when the width is not a multiple of 16. */
int llmctl_gemm_bf16_silu(const bf16_t *x, int64_t xs, int m, int k, const bf16_t *packed, int n,
                          const bf16_t *bias, bf16_t *y, int64_t ys, int num_threads) {
    if (n % 32 != 0) return -1;
    return gemm_driver(x, xs, m, k, packed, n, bias, y, ys, num_threads, 1);
}
#else
int llmctl_has_gemm_bf16(void) { return 0; }

int llmctl_gemm_bf16(const bf16_t *x, int64_t xs, int m, int k, const bf16_t *packed, int n, const bf16_t *bias,
                     bf16_t *y, int64_t ys, int num_threads) {
    (void)x, (void)xs, (void)m, (void)k, (void)packed, (void)n, (void)bias, (void)y, (void)ys, (void)num_threads;
    return -1;
}

int llmctl_gemm_bf16_silu(const bf16_t *x, int64_t xs, int m, int k, const bf16_t *packed, int n,
                          const bf16_t *bias, bf16_t *y, int64_t ys, int num_threads) {
    return llmctl_gemm_bf16(x, xs, m, k, packed, n, bias, y, ys, num_threads);
}
#endif

/* ---- float32 GEMM ---------------------------------------------------------------------------------------------
 *
 * Why our own: float32 batch invariance (a row's bits never depend on the rest of the batch) is a promise on every
 * host, and no library GEMM makes it. MKL's packed GEMM kept it on Sapphire Rapids but not on AMD EPYC, where MKL
 * picks other kernels; oneDNN changes kernels with the row count. Here an output element is summed by one thread
 * over k in order, one fused multiply-add per k from zero, whatever tile (1-4 rows, 1-4 panels) or thread computes
 * it, and the bias is added once after the sum, so the same row gives the same bits at every batch size.
 *
 * Packed layout: 16-column panels, panel p holds w[16p + c][j] at (p * K + j) * 16 + c, zero padded past N, so one
 * 64-byte load feeds 16 columns. On AVX-512 a 16-column vector is one register; on AVX2 + FMA it is two. */
#define GEMM_F32_ROWS 4
#define GEMM_F32_PANELS 4

void llmctl_pack_f32_panels(const float *w, int64_t w_row_stride, int n, int k, float *out) {
    const int panels = (n + 15) / 16;
    memset(out, 0, (size_t)panels * k * 16 * sizeof(float));
#pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++)
        for (int c = 0; c < 16 && 16 * p + c < n; c++) {
            const float *row = w + (int64_t)(16 * p + c) * w_row_stride;
            float *dst = out + (size_t)p * k * 16 + c;
            for (int j = 0; j < k; j++) dst[(size_t)j * 16] = row[j];
        }
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#if !defined(__AVX512F__)
#include <immintrin.h>
#endif
int llmctl_has_gemm_f32(void) { return 1; }

#if defined(__AVX512F__)
typedef __m512 f32x16;
static inline f32x16 f32x16_zero(void) { return _mm512_setzero_ps(); }
static inline f32x16 f32x16_load(const float *p) { return _mm512_loadu_ps(p); }
static inline f32x16 f32x16_set1(float x) { return _mm512_set1_ps(x); }
static inline f32x16 f32x16_fma(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline f32x16 f32x16_add(f32x16 a, f32x16 b) { return _mm512_add_ps(a, b); }
static inline void f32x16_store(float *p, f32x16 v) { _mm512_storeu_ps(p, v); }
#else
typedef struct { __m256 lo, hi; } f32x16;
static inline f32x16 f32x16_zero(void) { return (f32x16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline f32x16 f32x16_load(const float *p) { return (f32x16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline f32x16 f32x16_set1(float x) { return (f32x16){_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
static inline f32x16 f32x16_fma(f32x16 a, f32x16 b, f32x16 c) {
    return (f32x16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline f32x16 f32x16_add(f32x16 a, f32x16 b) {
    return (f32x16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
static inline void f32x16_store(float *p, f32x16 v) { _mm256_storeu_ps(p, v.lo), _mm256_storeu_ps(p + 8, v.hi); }
#endif

/* Stores 16 (or the last panel's `cols`) sums of one row, plus the bias. */
static inline __attribute__((always_inline)) void store_f32_cols(f32x16 v, const float *bias, int cols, float *y) {
    float tmp[16];
    if (cols == 16) {
        if (bias != NULL) v = f32x16_add(v, f32x16_load(bias));
        f32x16_store(y, v);
        return;
    }
    if (bias != NULL) {
        memset(tmp, 0, sizeof(tmp));
        memcpy(tmp, bias, (size_t)cols * sizeof(float));
        v = f32x16_add(v, f32x16_load(tmp));
    }
    f32x16_store(tmp, v);
    memcpy(y, tmp, (size_t)cols * sizeof(float));
}

static inline __attribute__((always_inline)) void gemm_f32_tile(int ROWS, int NPAN, const float *x, int64_t xs,
                                                                int k, const float *w, size_t panel_stride,
                                                                const float *bias, float *y, int64_t ys,
                                                                int last_cols) {
    f32x16 acc[GEMM_F32_ROWS][GEMM_F32_PANELS];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
        for (int p = 0; p < NPAN; p++) acc[r][p] = f32x16_zero();
    for (int j = 0; j < k; j++) {
        f32x16 b[GEMM_F32_PANELS];
#pragma GCC unroll 4
        for (int p = 0; p < NPAN; p++) b[p] = f32x16_load(w + p * panel_stride + (size_t)j * 16);
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            const f32x16 a = f32x16_set1(x[r * xs + j]);
#pragma GCC unroll 4
            for (int p = 0; p < NPAN; p++) acc[r][p] = f32x16_fma(a, b[p], acc[r][p]);
        }
    }
#pragma GCC unroll 4
    for (int p = 0; p < NPAN; p++)
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++)
            store_f32_cols(acc[r][p], bias == NULL ? NULL : bias + 16 * p, p == NPAN - 1 ? last_cols : 16,
                           y + r * ys + 16 * p);
}

#define GEMM_F32_TILE(R_, P_)                                                                      \
    if (rows == (R_) && npan == (P_)) {                                                            \
        gemm_f32_tile(R_, P_, x, xs, k, w, panel_stride, bias, y, ys, last_cols);                  \
        return;                                                                                    \
    }
#define GEMM_F32_TILE_ROWS(R_) GEMM_F32_TILE(R_, 1) GEMM_F32_TILE(R_, 2) GEMM_F32_TILE(R_, 3) GEMM_F32_TILE(R_, 4)

static void gemm_f32_tile_any(int rows, int npan, const float *x, int64_t xs, int k, const float *w,
                              size_t panel_stride, const float *bias, float *y, int64_t ys, int last_cols) {
    GEMM_F32_TILE_ROWS(1) GEMM_F32_TILE_ROWS(2) GEMM_F32_TILE_ROWS(3) GEMM_F32_TILE_ROWS(4)
}

/* x: [m, k] float32, unit stride along k, row stride xs; y: [m, n], row stride ys; bias: n floats or NULL. The
 * threads split the columns (groups of 4 panels), each walking all rows of its groups 4 at a time. */
int llmctl_gemm_f32(const float *x, int64_t xs, int m, int k, const float *packed, int n, const float *bias,
                    float *y, int64_t ys, int num_threads) {
    const int panels = (n + 15) / 16;
    const int groups = (panels + GEMM_F32_PANELS - 1) / GEMM_F32_PANELS;
    const size_t panel_stride = (size_t)k * 16;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int g = 0; g < groups; g++) {
        const int p0 = g * GEMM_F32_PANELS;
        const int npan = panels - p0 < GEMM_F32_PANELS ? panels - p0 : GEMM_F32_PANELS;
        const int tail = n - 16 * (p0 + npan - 1);
        const int last_cols = tail > 16 ? 16 : tail;
        const float *w = packed + (size_t)p0 * panel_stride;
        const float *b = bias == NULL ? NULL : bias + 16 * p0;
        for (int r = 0; r < m; r += GEMM_F32_ROWS) {
            const int rows = m - r < GEMM_F32_ROWS ? m - r : GEMM_F32_ROWS;
            gemm_f32_tile_any(rows, npan, x + r * xs, xs, k, w, panel_stride, b, y + r * ys + 16 * p0, ys,
                              last_cols);
        }
    }
    return 0;
}
#else
int llmctl_has_gemm_f32(void) { return 0; }

int llmctl_gemm_f32(const float *x, int64_t xs, int m, int k, const float *packed, int n, const float *bias,
                    float *y, int64_t ys, int num_threads) {
    (void)x, (void)xs, (void)m, (void)k, (void)packed, (void)n, (void)bias, (void)y, (void)ys, (void)num_threads;
    return -1;
}
#endif

/* ---- greedy sampling: each row's argmax -----------------------------------------------------------------------
 *
 * torch's argmax over bfloat16 runs scalar (5.4 ms for 64 rows of 49152 logits), and converting to float32 first
 * costs a write and a re-read of the logits (1.0 ms together); one vectorised pass here reads them once. Ties go
 * to the first index and a NaN counts as the largest value (its first index wins), as torch.argmax decides. */
static inline float value_at(const void *row, int dtype, int j) {
    return dtype == DT_F32 ? ((const float *)row)[j] : bf16_to_f32(((const bf16_t *)row)[j]);
}

static int64_t argmax_row_scalar(const void *row, int dtype, int n) {
    int64_t best = 0;
    float best_v = value_at(row, dtype, 0);
    if (best_v != best_v) return 0;
    for (int j = 1; j < n; j++) {
        const float v = value_at(row, dtype, j);
        if (v != v) return j;
        if (v > best_v) {
            best_v = v;
            best = j;
        }
    }
    return best;
}

void llmctl_argmax_rows(int dtype, const void *x, int64_t xs, int rows, int n, int64_t *out, int num_threads) {
    const int threads = (int64_t)rows * n >= ROWWISE_PARALLEL_MIN_ELEMS ? num_threads : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        const int64_t off = r * xs;
        const void *row = dtype == DT_F32 ? (const void *)((const float *)x + off) : (const void *)((const bf16_t *)x + off);
#if HAVE_AVX512
        if (n >= 16) {
            /* lane l keeps the largest value it has seen at indices = l mod 16, and the first index holding it */
            __m512 best = load16(row, 0, dtype);
            __m512i best_i = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            __m512i idx = best_i;
            __mmask16 nan = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
            int j = 16;
            for (; j + 16 <= n; j += 16) {
                idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
                const __m512 v = load16(row, j, dtype);
                nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
                best = _mm512_mask_mov_ps(best, gt, v);
                best_i = _mm512_mask_mov_epi32(best_i, gt, idx);
            }
            if (nan) {
                out[r] = argmax_row_scalar(row, dtype, n);
                continue;
            }
            float vals[16];
            int32_t ids[16];
            _mm512_storeu_ps(vals, best);
            _mm512_storeu_si512(ids, best_i);
            float bv = vals[0];
            int64_t bi = ids[0];
            for (int l = 1; l < 16; l++)
                if (vals[l] > bv || (vals[l] == bv && ids[l] < bi)) {
                    bv = vals[l];
                    bi = ids[l];
                }
            for (; j < n; j++) {
                const float v = value_at(row, dtype, j);
                if (v != v) {
                    bi = argmax_row_scalar(row, dtype, n);
                    break;
                }
                if (v > bv) {
                    bv = v;
                    bi = j;
                }
            }
            out[r] = bi;
            continue;
        }
#endif
        out[r] = argmax_row_scalar(row, dtype, n);
    }
}

/* ---- prefill attention in query tiles (bf16) ----------------------------------------------------------------------
 *
 * A prefill chunk run as per-row decodes re-reads every key once per query row and spends most of its time in the
 * per-key horizontal sums of the dot products (125 GFLOP/s on a 2048-token prompt, two thirds of its prefill).
 * Here a task is (chunk, KV head, up to PREFILL_TILE consecutive query rows): each tile of 16 keys is transposed
 * once into k-pair-major order, so one bf16 dot-product instruction scores 16 keys for one query head and no sum
 * crosses lanes; the softmax runs sixteen keys at a time, and P.V in bf16 dot products over pairs of keys with the
 * probabilities rounded to bf16 (as torch's own flash kernel rounds them). On a 2048-token prompt this is 3.1x the
 * per-row decodes (0.37 against 1.16 s of attention); the scalar softmax alone had cost as much as the rest. A
 * row's result depends on its own query, keys and values only (lanes and pairs follow the absolute key index),
 * not on the tile or the chunking around it. */
#define PREFILL_TILE 16

#if defined(__AVX512BF16__)
int llmctl_has_prefill_bf16(void) { return 1; }

#define PREFILL_QB 8 /* query heads scored together: independent dot-product chains, one key-tile load */

/* dst[b][0..16) = scale * q_b . keys of the transposed tile kt ([pairs][16] k pairs), for PREFILL_QB query heads
 * (callers pad with repeats of a valid one). */
static inline __attribute__((always_inline)) void prefill_qk(int PAIRS, const int32_t *const *qp, const int32_t *kt,
                                                             float *const *dst, float scale) {
    __m512 acc[PREFILL_QB];
#pragma GCC unroll 8
    for (int b = 0; b < PREFILL_QB; b++) acc[b] = _mm512_setzero_ps();
    for (int j = 0; j < PAIRS; j++) {
        const __m512bh k = (__m512bh)_mm512_loadu_si512(kt + j * 16);
#pragma GCC unroll 8
        for (int b = 0; b < PREFILL_QB; b++)
            acc[b] = _mm512_dpbf16_ps(acc[b], (__m512bh)_mm512_set1_epi32(qp[b][j]), k);
    }
#pragma GCC unroll 8
    for (int b = 0; b < PREFILL_QB; b++) _mm512_storeu_ps(dst[b], _mm512_mul_ps(acc[b], _mm512_set1_ps(scale)));
}

/* o_b = sum over key pairs tp < tp_end of the bf16 dot product of p_b's pair (p_2tp, p_2tp+1) with the values of
 * keys 2tp and 2tp+1 interleaved (vp: [pairs][NV][16] dwords), keys in order, for VB query heads (padded). */
static inline __attribute__((always_inline)) void prefill_pv(int NV, int VB, const int32_t *const *pp, int tp_end,
                                                             const int32_t *vp, __m512 *out) {
    __m512 acc[6][8];
#pragma GCC unroll 6
    for (int b = 0; b < VB; b++)
#pragma GCC unroll 8
        for (int x = 0; x < NV; x++) acc[b][x] = _mm512_setzero_ps();
    for (int tp = 0; tp < tp_end; tp++) {
        __m512bh vv[8];
#pragma GCC unroll 8
        for (int x = 0; x < NV; x++) vv[x] = (__m512bh)_mm512_loadu_si512(vp + ((int64_t)tp * NV + x) * 16);
#pragma GCC unroll 6
        for (int b = 0; b < VB; b++) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32(pp[b][tp]);
#pragma GCC unroll 8
            for (int x = 0; x < NV; x++) acc[b][x] = _mm512_dpbf16_ps(acc[b][x], w, vv[x]);
        }
    }
#pragma GCC unroll 6
    for (int b = 0; b < VB; b++)
#pragma GCC unroll 8
        for (int x = 0; x < NV; x++) out[b * NV + x] = acc[b][x];
}

#if HAVE_AMX
/* ---- the same tile on AMX -----------------------------------------------------------------------------------------
 *
 * The AVX-512 tile spends its time in dot products that AMX does 16 x 16 x 32 at a time: here S = Q.K^T and O = P.V
 * are tile products (a 16-row query tile per head of the group), with the same softmax, the same bf16 P and the
 * same value pairs in between. Each 16-key tile of K is transposed into a B tile once (shared by the group's heads)
 * with 48 shuffles per 32 dims. A row's result still depends on its own query, keys and values only: keys past a
 * row's last add P = 0 to its sums, and an AMX product adds each row's terms in a fixed order. */
static inline void transpose16_epi32(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int k = 0; k < 4; k++) { /* u[4i + k] holds rows 4i..4i+3 of columns 4L + k in its 128-bit lane L */
        const __m512i v1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88), v2 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xDD);
        const __m512i w1 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88);
        const __m512i w2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xDD);
        r[k] = _mm512_shuffle_i32x4(v1, w1, 0x88);
        r[8 + k] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
        r[4 + k] = _mm512_shuffle_i32x4(v2, w2, 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(v2, w2, 0xDD);
    }
}

/* The keys of (chunk, KV head) [0, n_keys) as B tiles for S = Q.K^T: kt[t / 16][j][pair][key] (int32 bf16 pairs,
 * dims 32j..), and its values as B tiles for P.V: vp[key pair][d / 16][16] (keys 2tp, 2tp + 1 interleaved); both
 * zero past the last key, n_keys rounded up to 32. */
static void amx_prefill_kv(const bf16_t *k_cache, const bf16_t *v_cache, const int32_t *table, int block_size,
                           int kv_heads, int kh, int d, int t0, int t1, int n_keys, int32_t *kt, int32_t *vp) {
    const int64_t row_elems = (int64_t)kv_heads * d;
    const int nv = d / 16;
    for (int tt = t0; tt < t1; tt += 16) { /* 16 keys never straddle blocks */
        const int kn = n_keys - tt < 16 ? (n_keys - tt > 0 ? n_keys - tt : 0) : 16;
        const bf16_t *base = kn > 0 ? k_cache + cache_row(table, tt, block_size, kv_heads, kh, d) : NULL;
        for (int j = 0; j < d / 32; j++) {
            __m512i r[16];
            for (int l = 0; l < 16; l++)
                r[l] = l < kn ? _mm512_loadu_si512((const void *)(base + l * row_elems + 32 * j)) : _mm512_setzero_si512();
            transpose16_epi32(r);
            int32_t *dst = kt + ((size_t)(tt / 16) * (d / 32) + j) * 256;
            for (int l = 0; l < 16; l++) _mm512_storeu_si512(dst + l * 16, r[l]);
        }
        const bf16_t *vbase = kn > 0 ? v_cache + cache_row(table, tt, block_size, kv_heads, kh, d) : NULL;
        for (int tp = tt / 2; tp < tt / 2 + 8; tp++) {
            const int l = 2 * tp - tt;
            const bf16_t *va = l < kn ? vbase + l * row_elems : NULL, *vb = l + 1 < kn ? vbase + (l + 1) * row_elems : NULL;
            for (int x = 0; x < nv; x++) {
                const __m512i lo = va == NULL ? _mm512_setzero_si512()
                                              : _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(va + 16 * x)));
                const __m512i hi = vb == NULL ? _mm512_setzero_si512()
                                              : _mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                                                      _mm256_loadu_si256((const __m256i *)(vb + 16 * x))), 16);
                _mm512_storeu_si512(vp + ((int64_t)tp * nv + x) * 16, _mm512_or_si512(lo, hi));
            }
        }
    }
}

/* Query rows [row0, row0 + nr) of a chunk (nr <= 16), heads kh * group .. + group, against keys [0, n_keys) of
 * amx_prefill_kv's tiles; row r sees keys [0, first_row_keys + r). Needs every tile configured 16 x 64 bytes. */
static void amx_prefill_rows(const bf16_t *query, int64_t q_row_stride, bf16_t *out, int64_t o_row_stride, int kh,
                             int d, int group, int row0, int nr, int first_row_keys, int n_keys, float scale,
                             const int32_t *kt, const int32_t *vp, float *scratch) {
    const int kp = (n_keys + 31) / 32 * 32, nv = d / 16;
    float *scores = scratch;                                           /* 16 x kp: S, then P over it */
    bf16_t *qs = (bf16_t *)(scores + (size_t)16 * kp);                 /* 16 x d: one head's query tile */
    float *acc = (float *)(qs + (size_t)16 * d);                       /* 16 x d: O */
    for (int g = 0; g < group; g++) {
        for (int r = 0; r < 16; r++) {
            bf16_t *dst = qs + (size_t)r * d;
            if (r < nr) memcpy(dst, query + (int64_t)(row0 + r) * q_row_stride + (int64_t)(kh * group + g) * d, (size_t)d * 2);
            else memset(dst, 0, (size_t)d * 2);
        }
        /* S = Q.K^T, 32 keys at a time: C tiles 0-1, Q in tiles 2-3 (d = 64) or reloaded, K^T in tiles 4-5 */
        for (int t0 = 0; t0 < n_keys; t0 += 32) {
            const int two = t0 + 16 < n_keys;
            _tile_zero(0);
            if (two) _tile_zero(1);
            for (int j = 0; j < d / 32; j++) {
                _tile_loadd(2, qs + 32 * j, (int64_t)d * 2);
                _tile_loadd(4, kt + ((size_t)(t0 / 16) * (d / 32) + j) * 256, 64);
                _tile_dpbf16ps(0, 2, 4);
                if (two) {
                    _tile_loadd(5, kt + ((size_t)(t0 / 16 + 1) * (d / 32) + j) * 256, 64);
                    _tile_dpbf16ps(1, 2, 5);
                }
            }
            _tile_stored(0, scores + t0, (int64_t)kp * 4);
            if (two) _tile_stored(1, scores + t0 + 16, (int64_t)kp * 4);
        }
        /* softmax numerators over each row's own keys, rounded to bf16 in place (as the AVX-512 tile) */
        float sums[16];
        for (int r = 0; r < nr; r++) {
            const int n_r = first_row_keys + r;
            float *sv = scores + (size_t)r * kp;
            __m512 mv = _mm512_set1_ps(-INFINITY);
            for (int t = 0; t < n_r; t += 16) {
                const __mmask16 k = n_r - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n_r - t)) - 1);
                const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sv + t), _mm512_set1_ps(scale));
                _mm512_mask_storeu_ps(sv + t, k, v);
                mv = _mm512_mask_max_ps(mv, k, mv, v);
            }
            const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
            __m512 sum = _mm512_setzero_ps();
            bf16_t *pb = (bf16_t *)sv;
            int t = 0;
            for (; t < n_r; t += 16) {
                const __mmask16 k = n_r - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n_r - t)) - 1);
                const __m512 e = _mm512_maskz_mov_ps(k, exp_nonpositive16_fma(_mm512_sub_ps(_mm512_loadu_ps(sv + t), m)));
                const __m256i h = (__m256i)_mm512_cvtneps_pbh(e);
                sum = _mm512_add_ps(sum, from_bf16_16(h));
                _mm256_storeu_si256((__m256i *)(pb + t), h);
            }
            for (; t < kp; t += 16) _mm256_storeu_si256((__m256i *)(pb + t), _mm256_setzero_si256()); /* causal: P = 0 */
            sums[r] = _mm512_reduce_add_ps(sum);
        }
        /* O = P.V, 32 keys a step, 64 dims a pass: C tiles 0-3, P in tile 4, value pairs in 5-7 */
        for (int dbase = 0; dbase < d; dbase += 64) {
            const int nt = d - dbase < 64 ? (d - dbase) / 16 : 4;
            amx_pv_zero(nt);
            for (int t = 0; t < kp; t += 32) /* P row r: bf16 over its float row; value pairs nv x 64 bytes a row */
                amx_pv_step(nt, (const bf16_t *)scores + t, (int64_t)kp * 4,
                            (const char *)(vp + ((int64_t)(t / 2) * nv + dbase / 16) * 16), 64, (int64_t)nv * 64);
            amx_pv_store(nt, acc + dbase, (int64_t)d * 4);
        }
        for (int r = 0; r < nr; r++) {
            const __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
            bf16_t *dst = out + (int64_t)(row0 + r) * o_row_stride + (int64_t)(kh * group + g) * d;
            for (int x = 0; x < nv; x++)
                _mm256_storeu_si256((__m256i *)(dst + 16 * x),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)r * d + 16 * x), inv)));
        }
    }
}

/* llmctl_prefill_attention_bf16 on AMX, in two parallel passes: every (chunk, KV head)'s keys and values into B
 * tiles once (in 32-key pieces), then every (chunk, KV head, 16 query rows) against them. The AVX-512 tile rebuilt
 * its transposed keys and value pairs for every query tile. */
static int amx_prefill(const bf16_t *query, int64_t q_row_stride, bf16_t *out, int64_t o_row_stride,
                       const bf16_t *k_cache, const bf16_t *v_cache, int block_size, int kv_heads, int d, int heads,
                       const int32_t *block_tables, int64_t bt_stride, const int32_t *chunks, int n_chunks, float scale,
                       int64_t num_blocks, int num_threads) {
    const int group = heads / kv_heads;
    /* per chunk and KV head, kp * d int32 words: the keys' B tiles (kp * d / 2) and then the value pairs (as many) */
    int64_t total = 0, n_kv_tasks = 0, n_row_tasks = 0, max_kp = 0;
    for (int c = 0; c < n_chunks; c++) {
        const int sl = chunks[4 * c + 3], ql = chunks[4 * c + 2];
        const int32_t *table = block_tables + (int64_t)chunks[4 * c] * bt_stride;
        if (sl - ql < 0 || ql < 1) return -1;
        for (int b = 0; b <= (sl - 1) / block_size; b++)
            if (table[b] < 0 || table[b] >= num_blocks) return -1;
        const int64_t kp = (sl + 31) / 32 * 32;
        total += kp * d * kv_heads;
        n_kv_tasks += kv_heads * (kp / 32);
        n_row_tasks += (int64_t)kv_heads * ((ql + PREFILL_TILE - 1) / PREFILL_TILE);
        if (kp > max_kp) max_kp = kp;
    }
    int32_t *tiles = (int32_t *)shared_scratch((size_t)total * sizeof(int32_t) + 64);
    if (tiles == NULL) return -1;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        amx_configure(16, 16, 16);
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < n_kv_tasks; task++) {
            int64_t rem = task, off = 0;
            int c = 0;
            for (;; c++) {
                const int64_t kp = (chunks[4 * c + 3] + 31) / 32 * 32;
                if (rem < kv_heads * (kp / 32)) break;
                rem -= kv_heads * (kp / 32);
                off += kp * d * kv_heads;
            }
            const int sl = chunks[4 * c + 3];
            const int64_t kp = (sl + 31) / 32 * 32;
            const int kh = (int)(rem / (kp / 32)), piece = (int)(rem % (kp / 32));
            int32_t *kt = tiles + off + (int64_t)kh * kp * d, *vp = kt + kp * d / 2;
            amx_prefill_kv(k_cache, v_cache, block_tables + (int64_t)chunks[4 * c] * bt_stride, block_size, kv_heads,
                           kh, d, 32 * piece, 32 * piece + 32, sl, kt, vp);
        }
        float *scratch = thread_scratch((size_t)16 * max_kp + (size_t)16 * d / 2 + (size_t)16 * d + 16);
        failed = scratch == NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n_row_tasks; task++) {
            if (scratch == NULL) continue;
            int64_t rem = task, off = 0;
            int c = 0;
            for (;; c++) {
                const int64_t here = (int64_t)kv_heads * ((chunks[4 * c + 2] + PREFILL_TILE - 1) / PREFILL_TILE);
                if (rem < here) break;
                rem -= here;
                off += (int64_t)(chunks[4 * c + 3] + 31) / 32 * 32 * d * kv_heads;
            }
            const int start = chunks[4 * c + 1], ql = chunks[4 * c + 2], sl = chunks[4 * c + 3];
            const int tiles_c = (ql + PREFILL_TILE - 1) / PREFILL_TILE;
            const int kh = (int)(rem / tiles_c), r0 = (int)(rem % tiles_c) * PREFILL_TILE;
            const int nr = ql - r0 < PREFILL_TILE ? ql - r0 : PREFILL_TILE;
            const int64_t kp = (sl + 31) / 32 * 32;
            const int32_t *kt = tiles + off + (int64_t)kh * kp * d, *vp = kt + kp * d / 2;
            amx_prefill_rows(query, q_row_stride, out, o_row_stride, kh, d, group, start + r0, nr, sl - ql + r0 + 1,
                             sl - ql + r0 + nr, scale, kt, vp, scratch);
        }
        _tile_release();
    }
    return failed ? -1 : 0;
}
#endif

/* chunks: n_chunks entries of (table index, first query row, query length, sequence length) as int32 quadruples;
 * the chunk's query rows are rows [start, start + ql) of query/out, at positions [sl - ql, sl). head_size 64 or
 * 128, no sliding window. Returns 0, or -1 for another head size, a block id outside the cache or no scratch. */
int llmctl_prefill_attention_bf16(const bf16_t *query, int64_t q_row_stride, bf16_t *out, int64_t o_row_stride,
                                  const bf16_t *k_cache, const bf16_t *v_cache, int block_size, int kv_heads,
                                  int head_size, int heads, const int32_t *block_tables, int64_t bt_stride,
                                  const int32_t *chunks, int n_chunks, float scale, int64_t num_blocks,
                                  int num_threads) {
    const int group = heads / kv_heads, d = head_size, pairs = head_size / 2;
    if ((d != 64 && d != 128) || group < 1) return -1;
    int64_t n_tasks = 0;
    for (int c = 0; c < n_chunks; c++)
        n_tasks += (int64_t)kv_heads * ((chunks[4 * c + 2] + PREFILL_TILE - 1) / PREFILL_TILE);
#if HAVE_AMX
    if (amx_on && block_size % 16 == 0)
        return amx_prefill(query, q_row_stride, out, o_row_stride, k_cache, v_cache, block_size, kv_heads, d, heads,
                           block_tables, bt_stride, chunks, n_chunks, scale, num_blocks, num_threads);
#endif
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : failed)
    for (int64_t task = 0; task < n_tasks; task++) {
        /* the task's chunk, KV head and tile: chunks are few, a linear walk is cheap */
        int64_t rem = task;
        int c = 0;
        for (;; c++) {
            const int64_t here = (int64_t)kv_heads * ((chunks[4 * c + 2] + PREFILL_TILE - 1) / PREFILL_TILE);
            if (rem < here) break;
            rem -= here;
        }
        const int tiles = (chunks[4 * c + 2] + PREFILL_TILE - 1) / PREFILL_TILE;
        const int kh = (int)(rem / tiles), tile = (int)(rem % tiles);
        const int32_t *table = block_tables + (int64_t)chunks[4 * c] * bt_stride;
        const int start = chunks[4 * c + 1], ql = chunks[4 * c + 2], sl = chunks[4 * c + 3];
        const int ctx = sl - ql, r0 = tile * PREFILL_TILE;
        const int nr = ql - r0 < PREFILL_TILE ? ql - r0 : PREFILL_TILE;
        const int n_keys = ctx + r0 + nr; /* keys the tile's last row sees */
        int bad = ctx < 0 || ql < 1;
        for (int b = 0; !bad && b <= (n_keys - 1) / block_size; b++) bad |= table[b] < 0 || table[b] >= num_blocks;
        if (bad) {
            failed = 1;
            continue;
        }
        const int nq = nr * group;
        const int keys_pad = (n_keys + 15) / 16 * 16, key_pairs = keys_pad / 2;
        const int nv = d / 16;
        /* scratch (4-byte words): scores [nq][keys_pad] (turned into bf16 probability pairs in place), the
         * transposed key tile [pairs][16], sums [nq], values of key pairs interleaved [key_pairs][nv][16] */
        float *scores = thread_scratch((size_t)nq * keys_pad + (size_t)pairs * 16 + (size_t)nq +
                                       (size_t)key_pairs * nv * 16);
        if (scores == NULL) {
            failed = 1;
            continue;
        }
        int32_t *kt = (int32_t *)(scores + (size_t)nq * keys_pad);
        float *sums = scores + (size_t)nq * keys_pad + (size_t)pairs * 16;
        int32_t *vp = (int32_t *)(sums + nq);
        const int64_t row_elems = (int64_t)kv_heads * d, head_off = (int64_t)kh * d;
        /* Q.K^T, 16 keys at a time, PREFILL_QB query heads at a time */
        for (int t0 = 0; t0 < n_keys; t0 += 16) {
            const int kn = n_keys - t0 < 16 ? n_keys - t0 : 16;
            for (int l = 0; l < 16; l++) {
                if (l < kn) {
                    const int t = t0 + l;
                    const int32_t *kr = (const int32_t *)(k_cache + ((int64_t)table[t / block_size] * block_size +
                                                                     t % block_size) * row_elems + head_off);
                    for (int j = 0; j < pairs; j++) kt[j * 16 + l] = kr[j];
                } else {
                    for (int j = 0; j < pairs; j++) kt[j * 16 + l] = 0;
                }
            }
            for (int v0 = 0; v0 < nq; v0 += PREFILL_QB) {
                const int32_t *qp[PREFILL_QB];
                float *dst[PREFILL_QB];
                for (int b = 0; b < PREFILL_QB; b++) {
                    const int v = v0 + b < nq ? v0 + b : v0; /* padding repeats the first: computed, overwritten */
                    qp[b] = (const int32_t *)(query + (int64_t)(start + r0 + v / group) * q_row_stride +
                                              (int64_t)(kh * group + v % group) * d);
                    dst[b] = scores + (size_t)v * keys_pad + t0;
                }
                if (pairs == 32)
                    prefill_qk(32, qp, kt, dst, scale);
                else
                    prefill_qk(64, qp, kt, dst, scale);
            }
        }
        /* softmax numerators over each row's own keys (row r sees ctx + r0 + r + 1 keys), sixteen at a time,
         * rounded to bf16 and packed over the row's float32 scores (bf16 t at byte 2t: every store lands on
         * floats already loaded); the sum is of the rounded values, so the weights P.V uses sum to one */
        for (int v = 0; v < nq; v++) {
            const int n_r = ctx + r0 + v / group + 1;
            float *sv = scores + (size_t)v * keys_pad;
            const __m512 m = _mm512_set1_ps(row_max(sv, n_r));
            __m512 sum = _mm512_setzero_ps();
            bf16_t *pb = (bf16_t *)sv;
            for (int t = 0; t < keys_pad; t += 16) {
                const __mmask16 k = n_r - t >= 16 ? (__mmask16)0xffff
                                                  : (n_r <= t ? (__mmask16)0 : (__mmask16)((1u << (n_r - t)) - 1));
                const __m512 e = _mm512_maskz_mov_ps(k, exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(sv + t), m)));
                const __m256i h = (__m256i)_mm512_cvtneps_pbh(e);
                sum = _mm512_add_ps(sum, from_bf16_16(h));
                _mm256_storeu_si256((__m256i *)(pb + t), h);
            }
            sums[v] = _mm512_reduce_add_ps(sum);
        }
        /* the values of keys (2tp, 2tp + 1) interleaved, 16 dims per dword vector, zero past the last key */
        const int tp_all = (n_keys + 1) / 2;
        for (int tp = 0; tp < tp_all; tp++) {
            const int t = 2 * tp;
            const bf16_t *va = v_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * row_elems +
                               head_off;
            const bf16_t *vb_ = t + 1 < n_keys ? v_cache + ((int64_t)table[(t + 1) / block_size] * block_size +
                                                            (t + 1) % block_size) * row_elems + head_off
                                               : NULL;
            for (int x = 0; x < nv; x++) {
                const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(va + 16 * x)));
                const __m512i hi = vb_ == NULL ? _mm512_setzero_si512()
                                               : _mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                                                       _mm256_loadu_si256((const __m256i *)(vb_ + 16 * x))),
                                                                   16);
                _mm512_storeu_si512(vp + ((int64_t)tp * nv + x) * 16, _mm512_or_si512(lo, hi));
            }
        }
        /* P.V in bf16 dot products over key pairs (as torch's flash kernel rounds P to bf16), keys in order */
        const int vb = nv == 4 ? 6 : 3;
        for (int v0 = 0; v0 < nq; v0 += vb) {
            const int nb = nq - v0 < vb ? nq - v0 : vb;
            const int32_t *pp[6];
            for (int b = 0; b < vb; b++) pp[b] = (const int32_t *)(scores + (size_t)(v0 + (b < nb ? b : 0)) * keys_pad);
            const int t_end = ctx + r0 + (v0 + nb - 1) / group + 1; /* the last of these rows' key count */
            __m512 o[24];
            if (nv == 4)
                prefill_pv(4, 6, pp, (t_end + 1) / 2, vp, o);
            else
                prefill_pv(8, 3, pp, (t_end + 1) / 2, vp, o);
            for (int b = 0; b < nb; b++) {
                const int v = v0 + b, r = v / group, g = v % group;
                const __m512 inv = _mm512_set1_ps(1.0f / sums[v]);
                bf16_t *dst = out + (int64_t)(start + r0 + r) * o_row_stride + (int64_t)(kh * group + g) * d;
                for (int x = 0; x < nv; x++)
                    _mm256_storeu_si256((__m256i *)(dst + 16 * x),
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[b * nv + x], inv)));
            }
        }
    }
    return failed ? -1 : 0;
}
#else
int llmctl_has_prefill_bf16(void) { return 0; }

int llmctl_prefill_attention_bf16(const bf16_t *query, int64_t q_row_stride, bf16_t *out, int64_t o_row_stride,
                                  const bf16_t *k_cache, const bf16_t *v_cache, int block_size, int kv_heads,
                                  int head_size, int heads, const int32_t *block_tables, int64_t bt_stride,
                                  const int32_t *chunks, int n_chunks, float scale, int64_t num_blocks,
                                  int num_threads) {
    (void)query, (void)q_row_stride, (void)out, (void)o_row_stride, (void)k_cache, (void)v_cache, (void)block_size;
    (void)kv_heads, (void)head_size, (void)heads, (void)block_tables, (void)bt_stride, (void)chunks, (void)n_chunks;
    (void)scale, (void)num_blocks, (void)num_threads;
    return -1;
}
#endif

/* ---- replaying a recorded decode step ------------------------------------------------------------------------
 *
 * A decode step of a 30-layer model is ~270 kernel calls; from Python each costs a module call, shape checks,
 * an output allocation and a ctypes conversion of ten to twenty arguments, ~3 ms per step in all (8 % of a
 * 64-sequence step, 30 % of a single stream's). llmctl_cpu.graph records the calls of one step against fixed
 * buffers and hands them here as a program: PROGRAM_SLOTS int64 words per call, the opcode then the arguments
 * in the kernel's own order (pointers as addresses, floats as their bits). The row count and the thread count
 * are not taken from the record but from this call, so one program serves every batch up to the one it was
 * recorded at: each kernel's rows depend on their own inputs only, so the leading rows come out as they would
 * from a smaller step. */
#define PROGRAM_SLOTS 24
enum { OP_GATHER = 1, OP_RMS_NORM, OP_GEMM, OP_GEMM_SILU, OP_ROTARY, OP_WRITE_KV, OP_DECODE_ATTENTION, OP_GEMM_F32,
       OP_LAST = OP_GEMM_F32 };

/* dst row i = src row ids[i] (row_bytes each): the embedding lookup. Returns the first i whose id is outside
 * [0, num_rows) (nothing is copied then), or -1. */
int llmctl_gather_rows(const void *src, int64_t row_bytes, int64_t num_rows, const int64_t *ids, int n, void *dst) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= num_rows) return i;
    for (int i = 0; i < n; i++)
        memcpy((char *)dst + (size_t)i * row_bytes, (const char *)src + (size_t)ids[i] * row_bytes, (size_t)row_bytes);
    return -1;
}

static inline float bits_to_float(int64_t bits) {
    const uint32_t u = (uint32_t)bits;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define P(i) ((void *)(intptr_t)a[i])
#define I(i) ((int)a[i])

/* Per-opcode wall time of replayed calls, for benchmarks/profile_decode.py: a replayed step is one C call, so no
 * Python-side timer can see inside it. Off unless asked for (one clock read per call when on). */
static int program_timing = 0;
static int64_t program_ns[OP_LAST + 1];

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Turns the timing on or off; copies the nanoseconds accumulated per opcode since the last call into out
 * (OP_DECODE_ATTENTION + 1 entries, index = opcode) when out is not NULL, and starts counting from zero. */
void llmctl_program_timing(int on, int64_t *out) {
    if (out != NULL) memcpy(out, program_ns, sizeof program_ns);
    memset(program_ns, 0, sizeof program_ns);
    program_timing = on;
}

/* Runs n_ops recorded calls at `rows` rows. Returns -1 when all succeeded, else the index of the call that failed
 * (its kernel's own return code in *code): nothing after it runs. */
int llmctl_run_program(const int64_t *program, int n_ops, int rows, int num_threads, int *code) {
    int64_t t_prev = program_timing ? now_ns() : 0;
    for (int i = 0; i < n_ops; i++) {
        const int64_t *a = program + (int64_t)i * PROGRAM_SLOTS + 1;
        int rc, ok;
        switch (program[(int64_t)i * PROGRAM_SLOTS]) {
            case OP_GATHER:
                rc = llmctl_gather_rows(P(0), a[1], a[2], P(3), rows, P(5));
                ok = rc == -1;
                break;
            case OP_RMS_NORM:
                rc = llmctl_rms_norm(I(0), P(1), a[2], P(3), a[4], P(5), a[6], P(7), P(8), a[9], rows, I(11),
                                     bits_to_float(a[12]), num_threads);
                ok = rc == 0;
                break;
            case OP_GEMM:
                rc = llmctl_gemm_bf16(P(0), a[1], rows, I(3), P(4), I(5), P(6), P(7), a[8], num_threads);
                ok = rc == 0;
                break;
            case OP_GEMM_SILU:
                rc = llmctl_gemm_bf16_silu(P(0), a[1], rows, I(3), P(4), I(5), P(6), P(7), a[8], num_threads);
                ok = rc == 0;
                break;
            case OP_ROTARY:
                rc = llmctl_rotary(I(0), P(1), rows, P(3), I(4), a[5], P(6), a[7], P(8), a[9], I(10), I(11), I(12),
                                   num_threads);
                ok = rc == -1;
                break;
            case OP_WRITE_KV:
                rc = llmctl_write_kv(I(0), P(1), a[2], P(3), a[4], P(5), P(6), P(7), rows, I(9), a[10], num_threads);
                ok = rc == -1;
                break;
            case OP_DECODE_ATTENTION:
                rc = llmctl_decode_attention(I(0), P(1), a[2], P(3), a[4], P(5), P(6), I(7), I(8), I(9), I(10), P(11),
                                             a[12], P(13), P(14), P(15), rows, I(17), bits_to_float(a[18]), a[19],
                                             num_threads);
                ok = rc == 0;
                break;
            case OP_GEMM_F32:
                rc = llmctl_gemm_f32(P(0), a[1], rows, I(3), P(4), I(5), P(6), P(7), a[8], num_threads);
                ok = rc == 0;
                break;
            default:
                rc = -2;
                ok = 0;
        }
        if (program_timing) {
            const int64_t t = now_ns();
            const int64_t op = program[(int64_t)i * PROGRAM_SLOTS];
            if (op >= 0 && op <= OP_LAST) program_ns[op] += t - t_prev;
            t_prev = t;
        }
        if (!ok) {
            *code = rc;
            return i;
        }
    }
    return -1;
}
#undef P
#undef I
