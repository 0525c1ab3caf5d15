/* bf16 prefill attention in query tiles of 16 rows (AVX512-BF16 dot products, AMX tiles, or AVX2 + FMA in float32).
 *
 * Part of kernels.c's single translation unit (included from there, after common.h): not compiled alone. */

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

/* e^x for x <= 0 to a few parts in a million, which is enough for a value rounded to bf16 next (P, whose rounding
 * step is 2^-9): e^x = 2^n 2^f with n = round(x log2 e) and f = x log2 e - n in [-1/2, 1/2], 2^f by a degree-4
 * polynomial (relative error under 3e-6, fitted for this range), 2^n applied by scalef. About half the
 * instructions of exp_nonpositive16_fma, whose full float32 accuracy the softmax throws away; at 8192 keys the
 * exponentials are most of this kernel's time. Below -87 (and NaN) the result is 0. */
static inline __m512 exp_nonpositive16_for_bf16(__m512 x) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.009570068679749966f), f, _mm512_set1_ps(0.055917806923389435f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240247443318367f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931218504905701f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999992847442627f));
    return _mm512_maskz_scalef_ps(keep, p, n);
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
        /* softmax numerators over each row's own keys, rounded to bf16 in place. The maximum is taken over the raw
         * scores and scaled once (rounding is monotonic, so it equals the maximum of the scaled scores), and each
         * score is scaled where its exponential is taken: one pass fewer of stores over the row. */
        float sums[16];
        const __m512 scale16 = _mm512_set1_ps(scale);
        for (int r = 0; r < nr; r++) {
            const int n_r = first_row_keys + r;
            float *sv = scores + (size_t)r * kp;
            __m512 mv = _mm512_set1_ps(-INFINITY);
            for (int t = 0; t < n_r; t += 16) {
                const __mmask16 k = n_r - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n_r - t)) - 1);
                mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, sv + t));
            }
            const __m512 m = _mm512_mul_ps(_mm512_set1_ps(_mm512_reduce_max_ps(mv)), scale16);
            __m512 sum = _mm512_setzero_ps();
            bf16_t *pb = (bf16_t *)sv;
            int t = 0;
            for (; t < n_r; t += 16) {
                const __mmask16 k = n_r - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n_r - t)) - 1);
                const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(sv + t), scale16);
                const __m512 e = _mm512_maskz_mov_ps(k, exp_nonpositive16_for_bf16(_mm512_sub_ps(v, m)));
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
#elif HAVE_AVX2_FMA
/* ---- the same query tiles with AVX2 + FMA (no bf16 dot products) ---------------------------------------------
 *
 * Why: without bf16 dot products the tiles above do not build, and bf16 prefill chunks ran as per-row decodes
 * (every key re-read per query row) up to NATIVE_PREFILL_MAX_LEN keys and on torch's flash kernel past it, at a
 * fraction of the GEMM ceiling on a long prompt (docs/performance.md, the AVX2 host). Here, as in AMX's two
 * passes, each (chunk, KV head)'s keys and values are converted to float32 once: the keys transposed in blocks
 * of 16 (one block feeds 16 keys' scores from one broadcast of a query element, no sum crosses lanes), the values
 * row by row. Then a task is (chunk, KV head, up to PREFILL_TILE query rows): S = Q.K^T in 6 query heads x 16 keys
 * register tiles, the softmax eight keys at a time with the probabilities rounded to bf16 (as the AVX-512 tile and
 * torch's flash kernel round them), and P.V in 6 query heads x 16 dims tiles over blocks of keys, each output one
 * FMA chain over the keys in order (the partial sums parked in float32 between key blocks). A row's result depends
 * on its own query, keys and values only (lanes follow the absolute key index), not on the tile or the chunking. */
int llmctl_has_prefill_bf16(void) { return 1; }

#define P2_QB 6      /* query heads per register tile: 6 x 2 accumulators, 2 key or value vectors, 1 broadcast */
#define P2_TBLOCK 128 /* keys per P.V block: its float32 values stay in L2 across the tile's query heads */

/* One (chunk, KV head)'s keys [0, kp) as float32 blocks of 16 transposed, kt[t / 16][dim][16], and its values as
 * float32 rows vf[t][dim]; zero past n_keys (kp = n_keys rounded up to 16). */
static void p2_convert(const bf16_t *k_cache, const bf16_t *v_cache, const int32_t *table, int block_size,
                       int kv_heads, int kh, int d, int n_keys, float *kt, float *vf) {
    const int kp = (n_keys + 15) / 16 * 16;
    for (int t = 0; t < kp; t++) {
        float *kdst = kt + (size_t)(t / 16) * 16 * d + t % 16, *vdst = vf + (size_t)t * d;
        if (t >= n_keys) {
            for (int j = 0; j < d; j++) kdst[j * 16] = 0.0f, vdst[j] = 0.0f;
            continue;
        }
        const int64_t row = cache_row(table, t, block_size, kv_heads, kh, d);
        for (int j = 0; j < d; j += 8) {
            float tmp[8];
            _mm256_storeu_ps(tmp, from_bf16_8(_mm_loadu_si128((const __m128i *)(k_cache + row + j))));
            for (int x = 0; x < 8; x++) kdst[(j + x) * 16] = tmp[x];
            _mm256_storeu_ps(vdst + j, from_bf16_8(_mm_loadu_si128((const __m128i *)(v_cache + row + j))));
        }
    }
}

/* dst[b * ds + 0..16) = scale * (q_b . keys of the transposed block kb), for NB query heads (qf rows of d). */
static inline __attribute__((always_inline)) void p2_qk(int NB, const float *qf, int d, const float *kb, float *dst,
                                                        int64_t ds, float scale) {
    __m256 acc[P2_QB][2];
#pragma GCC unroll 6
    for (int b = 0; b < NB; b++) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
    for (int j = 0; j < d; j++) {
        const __m256 k0 = _mm256_loadu_ps(kb + j * 16), k1 = _mm256_loadu_ps(kb + j * 16 + 8);
#pragma GCC unroll 6
        for (int b = 0; b < NB; b++) {
            const __m256 a = _mm256_broadcast_ss(qf + (size_t)b * d + j);
            acc[b][0] = _mm256_fmadd_ps(a, k0, acc[b][0]);
            acc[b][1] = _mm256_fmadd_ps(a, k1, acc[b][1]);
        }
    }
    const __m256 sc = _mm256_set1_ps(scale);
#pragma GCC unroll 6
    for (int b = 0; b < NB; b++) {
        _mm256_storeu_ps(dst + b * ds, _mm256_mul_ps(acc[b][0], sc));
        _mm256_storeu_ps(dst + b * ds + 8, _mm256_mul_ps(acc[b][1], sc));
    }
}

/* o_b[0..16) (float32, row stride d) += sum over keys [t0, t1) of p_b[t] * vf[t][0..16), for NB query heads
 * (p rows of stride ps), keys in order: one FMA chain per output, continued from the parked sums. */
static inline __attribute__((always_inline)) void p2_pv(int NB, const float *p, int64_t ps, const float *vf, int d,
                                                        int t0, int t1, float *o) {
    __m256 acc[P2_QB][2];
#pragma GCC unroll 6
    for (int b = 0; b < NB; b++) acc[b][0] = _mm256_loadu_ps(o + b * d), acc[b][1] = _mm256_loadu_ps(o + b * d + 8);
    for (int t = t0; t < t1; t++) {
        const __m256 v0 = _mm256_loadu_ps(vf + (size_t)t * d), v1 = _mm256_loadu_ps(vf + (size_t)t * d + 8);
#pragma GCC unroll 6
        for (int b = 0; b < NB; b++) {
            const __m256 w = _mm256_broadcast_ss(p + b * ps + t);
            acc[b][0] = _mm256_fmadd_ps(w, v0, acc[b][0]);
            acc[b][1] = _mm256_fmadd_ps(w, v1, acc[b][1]);
        }
    }
#pragma GCC unroll 6
    for (int b = 0; b < NB; b++) _mm256_storeu_ps(o + b * d, acc[b][0]), _mm256_storeu_ps(o + b * d + 8, acc[b][1]);
}

#define P2_DISPATCH(FN, NB_, ...)                      \
    switch (NB_) {                                     \
    case 1: FN(1, __VA_ARGS__); break;                 \
    case 2: FN(2, __VA_ARGS__); break;                 \
    case 3: FN(3, __VA_ARGS__); break;                 \
    case 4: FN(4, __VA_ARGS__); break;                 \
    case 5: FN(5, __VA_ARGS__); break;                 \
    default: FN(6, __VA_ARGS__); break;                \
    }

/* Lanes t..t+7 that are below n: all ones, else zero. */
static inline __m256 p2_below(int t, int n) {
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(t), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx));
}

static inline float p2_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float p2_hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Query rows [r0, r0 + nr) of one chunk (its rows start at `start`, at positions ctx..), heads kh * group ..,
 * against the converted keys kt and values vf. */
static int p2_rows(const bf16_t *query, int64_t q_row_stride, bf16_t *out, int64_t o_row_stride, int kh, int d,
                   int group, int start, int ctx, int r0, int nr, float scale, const float *kt, const float *vf) {
    const int nq = nr * group, n_keys = ctx + r0 + nr, kp = (n_keys + 15) / 16 * 16;
    /* scratch: scores [nq][kp] (probabilities over them), queries [nq][d], outputs [nq][d], sums [nq] */
    float *scores = thread_scratch((size_t)nq * kp + (size_t)2 * nq * d + (size_t)nq);
    if (scores == NULL) return -1;
    float *qf = scores + (size_t)nq * kp, *o = qf + (size_t)nq * d, *sums = o + (size_t)nq * d;
    for (int v = 0; v < nq; v++) {
        const bf16_t *src = query + (int64_t)(start + r0 + v / group) * q_row_stride + (int64_t)(kh * group + v % group) * d;
        for (int j = 0; j < d; j += 8)
            _mm256_storeu_ps(qf + (size_t)v * d + j, from_bf16_8(_mm_loadu_si128((const __m128i *)(src + j))));
    }
    memset(o, 0, (size_t)nq * d * sizeof(float));
    /* S = Q.K^T, 16 keys a block (its 4 KB of transposed keys stay in L1 across the query heads) */
    for (int t0 = 0; t0 < kp; t0 += 16)
        for (int v0 = 0; v0 < nq; v0 += P2_QB) {
            const int nb = nq - v0 < P2_QB ? nq - v0 : P2_QB;
            P2_DISPATCH(p2_qk, nb, qf + (size_t)v0 * d, d, kt + (size_t)t0 * d, scores + (size_t)v0 * kp + t0, kp, scale)
        }
    /* softmax numerators over each row's own keys, rounded to bf16; zero past them; sums of the rounded values */
    for (int v = 0; v < nq; v++) {
        const int n_r = ctx + r0 + v / group + 1;
        float *sv = scores + (size_t)v * kp;
        __m256 mv = _mm256_set1_ps(-INFINITY);
        for (int t = 0; t < n_r; t += 8)
            mv = _mm256_max_ps(mv, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(sv + t), p2_below(t, n_r)));
        const __m256 m = _mm256_set1_ps(p2_hmax(mv));
        __m256 sum = _mm256_setzero_ps();
        for (int t = 0; t < kp; t += 8) {
            const __m256 e = _mm256_and_ps(p2_below(t, n_r), exp_nonpositive8_fma(_mm256_sub_ps(_mm256_loadu_ps(sv + t), m)));
            const __m256 r = from_bf16_8(to_bf16_8(e));
            sum = _mm256_add_ps(sum, r);
            _mm256_storeu_ps(sv + t, r);
        }
        sums[v] = p2_hsum(sum);
    }
    /* O = P.V over blocks of keys, 16 dims a pass, each group of query heads up to the last key its rows see */
    for (int tb = 0; tb < n_keys; tb += P2_TBLOCK)
        for (int v0 = 0; v0 < nq; v0 += P2_QB) {
            const int nb = nq - v0 < P2_QB ? nq - v0 : P2_QB;
            const int t_end = ctx + r0 + (v0 + nb - 1) / group + 1;
            const int t1 = tb + P2_TBLOCK < t_end ? tb + P2_TBLOCK : t_end;
            if (t1 <= tb) continue;
            for (int x = 0; x < d; x += 16)
                P2_DISPATCH(p2_pv, nb, scores + (size_t)v0 * kp, kp, vf + x, d, tb, t1, o + (size_t)v0 * d + x)
        }
    for (int v = 0; v < nq; v++) {
        const __m256 inv = _mm256_set1_ps(1.0f / sums[v]);
        bf16_t *dst = out + (int64_t)(start + r0 + v / group) * o_row_stride + (int64_t)(kh * group + v % group) * d;
        for (int j = 0; j < d; j += 8)
            _mm_storeu_si128((__m128i *)(dst + j), to_bf16_8(_mm256_mul_ps(_mm256_loadu_ps(o + (size_t)v * d + j), inv)));
    }
    return 0;
}

/* chunks: n_chunks entries of (table index, first query row, query length, sequence length) as int32 quadruples;
 * the chunk's query rows are rows [start, start + ql) of query/out, at positions [sl - ql, sl). head_size 64 or
 * 128, no sliding window. Returns 0, or -1 for another head size, a block id outside the cache or no scratch. */
int llmctl_prefill_attention_bf16(const bf16_t *query, int64_t q_row_stride, bf16_t *out, int64_t o_row_stride,
                                  const bf16_t *k_cache, const bf16_t *v_cache, int block_size, int kv_heads,
                                  int head_size, int heads, const int32_t *block_tables, int64_t bt_stride,
                                  const int32_t *chunks, int n_chunks, float scale, int64_t num_blocks,
                                  int num_threads) {
    const int group = heads / kv_heads, d = head_size;
    if ((d != 64 && d != 128) || group < 1) return -1;
    /* per chunk and KV head: kp * d floats of transposed keys, then as many of values */
    int64_t total = 0, n_row_tasks = 0;
    for (int c = 0; c < n_chunks; c++) {
        const int sl = chunks[4 * c + 3], ql = chunks[4 * c + 2];
        const int32_t *table = block_tables + (int64_t)chunks[4 * c] * bt_stride;
        if (sl - ql < 0 || ql < 1) return -1;
        for (int b = 0; b <= (sl - 1) / block_size; b++)
            if (table[b] < 0 || table[b] >= num_blocks) return -1;
        total += (int64_t)(sl + 15) / 16 * 16 * d * 2 * kv_heads;
        n_row_tasks += (int64_t)kv_heads * ((ql + PREFILL_TILE - 1) / PREFILL_TILE);
    }
    float *conv = (float *)shared_scratch((size_t)total * sizeof(float) + 64);
    if (conv == NULL) return -1;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < (int64_t)n_chunks * kv_heads; task++) {
            const int c = (int)(task / kv_heads), kh = (int)(task % kv_heads);
            int64_t off = 0;
            for (int i = 0; i < c; i++) off += (int64_t)(chunks[4 * i + 3] + 15) / 16 * 16 * d * 2 * kv_heads;
            const int sl = chunks[4 * c + 3];
            const int64_t kpd = (int64_t)(sl + 15) / 16 * 16 * d;
            float *kt = conv + off + 2 * kh * kpd;
            p2_convert(k_cache, v_cache, block_tables + (int64_t)chunks[4 * c] * bt_stride, block_size, kv_heads, kh,
                       d, sl, kt, kt + kpd);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n_row_tasks; task++) {
            int64_t rem = task, off = 0;
            int c = 0;
            for (;; c++) {
                const int64_t here = (int64_t)kv_heads * ((chunks[4 * c + 2] + PREFILL_TILE - 1) / PREFILL_TILE);
                if (rem < here) break;
                rem -= here;
                off += (int64_t)(chunks[4 * c + 3] + 15) / 16 * 16 * d * 2 * kv_heads;
            }
            const int start = chunks[4 * c + 1], ql = chunks[4 * c + 2], sl = chunks[4 * c + 3];
            const int tiles_c = (ql + PREFILL_TILE - 1) / PREFILL_TILE;
            const int kh = (int)(rem / tiles_c), r0 = (int)(rem % tiles_c) * PREFILL_TILE;
            const int nr = ql - r0 < PREFILL_TILE ? ql - r0 : PREFILL_TILE;
            const int64_t kpd = (int64_t)(sl + 15) / 16 * 16 * d;
            const float *kt = conv + off + 2 * kh * kpd;
            failed |= p2_rows(query, q_row_stride, out, o_row_stride, kh, d, group, start, sl - ql, r0, nr, scale, kt,
                              kt + kpd) != 0;
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
