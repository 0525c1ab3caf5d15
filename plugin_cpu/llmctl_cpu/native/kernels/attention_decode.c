/* Paged attention for decode rows (and float32 prefill rows run as decodes over their own prefix): AVX-512
 * and scalar paths, the AMX tile path for bf16, and the prefetch of the next sequence's blocks.
 *
 * Part of kernels.c's single translation unit (included from there, after common.h): not compiled alone. */

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
static int decode_attention(int dtype, const void *query, int64_t q_row_stride, void *out, int64_t o_row_stride,
                            const void *k_cache, const void *v_cache, int block_size, int kv_heads, int head_size,
                            int heads, const int32_t *block_tables, int64_t bt_stride, const int32_t *tables,
                            const int64_t *rows, const int32_t *seq_lens, int num_seqs, int window, float scale,
                            float soft_cap, int64_t num_blocks, int num_threads) {
    const int group = heads / kv_heads;
    const int d = head_size;
    int failed = 0;
    /* One task per sequence when there are enough of them: its KV heads share cache lines ([block, slot, head]
     * layout), so one core reading all of them streams each line once. Small batches split by head as well. */
    const int per_seq = num_seqs >= 4 * num_threads;
    const int num_tasks = per_seq ? num_seqs : num_seqs * kv_heads;
#if HAVE_AMX
    const int amx = amx_on && dtype == DT_BF16 && block_size % 16 == 0 && d % 32 == 0 && d <= 256 && group <= 16 &&
                    soft_cap == 0.0f; /* the tile path's scores never sit in memory as a whole row */
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
            if (soft_cap > 0.0f) /* Gemma 2: the scaled scores squashed as the reference does, tanh(s / cap) * cap */
                for (size_t j = 0; j < (size_t)group * n_keys; j++) scores[j] = tanhf(scores[j] / soft_cap) * soft_cap;
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

int llmctl_decode_attention(int dtype, const void *query, int64_t q_row_stride, void *out, int64_t o_row_stride,
                            const void *k_cache, const void *v_cache, int block_size, int kv_heads, int head_size,
                            int heads, const int32_t *block_tables, int64_t bt_stride, const int32_t *tables,
                            const int64_t *rows, const int32_t *seq_lens, int num_seqs, int window, float scale,
                            int64_t num_blocks, int num_threads) {
    return decode_attention(dtype, query, q_row_stride, out, o_row_stride, k_cache, v_cache, block_size, kv_heads,
                            head_size, heads, block_tables, bt_stride, tables, rows, seq_lens, num_seqs, window, scale,
                            0.0f, num_blocks, num_threads);
}

/* As llmctl_decode_attention with the scores soft-capped (cap * tanh(s / cap), Gemma 2): scale_cap holds {scale,
 * cap}, two floats in memory, so the replay program's one-float-argument records carry this call unchanged. */
int llmctl_decode_attention_capped(int dtype, const void *query, int64_t q_row_stride, void *out,
                                   int64_t o_row_stride, const void *k_cache, const void *v_cache, int block_size,
                                   int kv_heads, int head_size, int heads, const int32_t *block_tables,
                                   int64_t bt_stride, const int32_t *tables, const int64_t *rows,
                                   const int32_t *seq_lens, int num_seqs, int window, const float *scale_cap,
                                   int64_t num_blocks, int num_threads) {
    return decode_attention(dtype, query, q_row_stride, out, o_row_stride, k_cache, v_cache, block_size, kv_heads,
                            head_size, heads, block_tables, bt_stride, tables, rows, seq_lens, num_seqs, window,
                            scale_cap[0], scale_cap[1], num_blocks, num_threads);
}
