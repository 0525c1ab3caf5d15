/* 8-bit KV caches (int8, fp8 e4m3, fp8 e5m2): the quantizing KV write and attention that reads the codes and their
 * scales in place, dequantizing in registers.
 *
 * Layout (llmctl.kv.cache_dtype): each (slot, KV head) row is head_size one-byte codes followed by the row's float32
 * scale, so a slot is kv_heads * (head_size + 4) bytes and a block carries its scales wherever it goes. The write
 * reproduces the torch reference operation for operation (scale = amax / qmax, code = x / scale rounded half to even,
 * fp8 clamped first), so the C and torch writes give the same bytes.
 *
 * Attention: one task per (query row, KV head), a prefill row being a decode over its own prefix, so a row's bits
 * depend on its sequence's cache alone (batch invariance, and the same bits whether a token was computed in a
 * prefill, a later chunk or a decode). Scores are q . codes times the key's scale; P.V accumulates codes times
 * p * the value's scale, so dequantization costs one multiply per key, not per element.
 *
 * Part of kernels.c's single translation unit (included from there, after common.h): not compiled alone. */

#define KV8_INT8 0
#define KV8_E4M3 1
#define KV8_E5M2 2

static const float kv8_qmax[3] = {127.0f, 448.0f, 57344.0f};

/* float -> fp8 code, round to nearest even, for |x| already clamped to the format's largest finite value. */
static inline uint8_t f32_to_fp8(float x, int fmt) {
    union { uint32_t u; float f; } c;
    c.f = x;
    const uint8_t sign = (uint8_t)((c.u >> 24) & 0x80u);
    c.u &= 0x7fffffffu;
    const int mant = fmt == KV8_E4M3 ? 3 : 2, bias = fmt == KV8_E4M3 ? 7 : 15;
    const float min_normal = fmt == KV8_E4M3 ? 0.015625f : 6.103515625e-05f; /* 2^-6, 2^-14 */
    if (c.f < min_normal) { /* subnormal codes: multiples of 2^(1 - bias - mant), an exact scaling */
        const float steps = nearbyintf(c.f * (fmt == KV8_E4M3 ? 512.0f : 65536.0f));
        return (uint8_t)(sign | (uint8_t)steps); /* a carry into the exponent field is the smallest normal */
    }
    const int drop = 23 - mant;
    uint32_t u = c.u + ((1u << (drop - 1)) - 1u) + ((c.u >> drop) & 1u);
    const int e = (int)(u >> 23) - 127 + bias;
    const uint32_t m = (u >> drop) & ((1u << mant) - 1u);
    return (uint8_t)(sign | (uint8_t)((uint32_t)e << mant) | (uint8_t)m);
}

/* code -> float without the scale (the generic path; the vector path converts sixteen at a time). */
static inline float fp8_to_f32(uint8_t b, int fmt) {
    const int mant = fmt == KV8_E4M3 ? 3 : 2, bias = fmt == KV8_E4M3 ? 7 : 15;
    const int e = (b & 0x7f) >> mant, m = b & ((1 << mant) - 1);
    const float v = e == 0 ? ldexpf((float)m, 1 - bias - mant) : ldexpf((float)((1 << mant) + m), e - bias - mant);
    return b & 0x80 ? -v : v;
}

/* code -> float tables for the generic path, filled before the parallel region (idempotent). */
static float kv8_table[3][256];
static int kv8_table_ready = 0;

static void kv8_init_tables(void) {
    if (kv8_table_ready) return;
    for (int b = 0; b < 256; b++) {
        kv8_table[KV8_INT8][b] = (float)(int8_t)b;
        kv8_table[KV8_E4M3][b] = fp8_to_f32((uint8_t)b, KV8_E4M3);
        kv8_table[KV8_E5M2][b] = fp8_to_f32((uint8_t)b, KV8_E5M2);
    }
    kv8_table_ready = 1;
}

/* Quantize one head's row: codes then the float32 scale, as llmctl.kv.cache_dtype.quantize_rows does. */
static void kv8_quantize_row(const float *restrict x, int d, int fmt, uint8_t *restrict dst) {
    float amax = 0.0f;
    for (int i = 0; i < d; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float qmax = kv8_qmax[fmt];
    float scale = amax / qmax;
    if (!(scale > 0.0f)) scale = 1.0f;
    for (int i = 0; i < d; i++) {
        float y = x[i] / scale;
        if (fmt == KV8_INT8) {
            y = nearbyintf(y);
            y = y > qmax ? qmax : y < -qmax ? -qmax : y;
            dst[i] = (uint8_t)(int8_t)y;
        } else {
            y = y > qmax ? qmax : y < -qmax ? -qmax : y;
            dst[i] = f32_to_fp8(y, fmt);
        }
    }
    memcpy(dst + d, &scale, sizeof scale);
}

/* Store new keys/values (float32 or bf16 rows of kv_heads * head_size, with a row stride) into an 8-bit cache;
 * slot -1 skips a token. Returns 0, or 1 + the index of the first token whose slot is >= num_slots (nothing is
 * written then). */
int llmctl_write_kv8(int fmt, int dtype, const void *key, int64_t k_row_stride, const void *value,
                     int64_t v_row_stride, void *k_cache, void *v_cache, const int64_t *slots, int num_tokens,
                     int kv_heads, int head_size, int64_t num_slots, int num_threads) {
    for (int i = 0; i < num_tokens; i++)
        if (slots[i] >= num_slots) return i + 1;
    const int64_t row_bytes = head_size + 4, slot_bytes = (int64_t)kv_heads * row_bytes;
    const int threads = (int64_t)num_tokens * kv_heads * head_size >= ROWWISE_PARALLEL_MIN_ELEMS ? num_threads : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < num_tokens; i++) {
        const int64_t s = slots[i];
        if (s < 0) continue;
        float row[1024];
        for (int h = 0; h < kv_heads; h++) {
            load_f32(key, i * k_row_stride + (int64_t)h * head_size, dtype, row, head_size);
            kv8_quantize_row(row, head_size, fmt, (uint8_t *)k_cache + s * slot_bytes + h * row_bytes);
            load_f32(value, i * v_row_stride + (int64_t)h * head_size, dtype, row, head_size);
            kv8_quantize_row(row, head_size, fmt, (uint8_t *)v_cache + s * slot_bytes + h * row_bytes);
        }
    }
    return 0;
}

#if HAVE_AVX512
/* Sixteen codes -> floats, unscaled except e4m3, which comes out 2^-8 too small (kv8_scale_fix puts it back). */
static inline __attribute__((always_inline)) __m512 kv8_load16(const uint8_t *p, int fmt) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    if (fmt == KV8_INT8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    const __m256i h = _mm256_cvtepu8_epi16(b);
    if (fmt == KV8_E5M2) return _mm512_cvtph_ps(_mm256_slli_epi16(h, 8)); /* e5m2 is a half's top byte */
    /* e4m3: the sign to bit 15, exponent and mantissa to half's bits 13..7 (an arithmetic shift of the byte in the
     * high half copies the sign into bit 14, which the mask clears), read as a half with bias 15, not 7 */
    const __m256i bits = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(h, 8), 1), _mm256_set1_epi16(-16512));
    return _mm512_cvtph_ps(bits);
}

/* The factor kv8_load16 leaves out of an e4m3 code (2^(15 - 7)); exact, so folding it into the row's scale changes
 * no bits. */
static inline float kv8_scale_fix(int fmt) { return fmt == KV8_E4M3 ? 256.0f : 1.0f; }
#elif HAVE_AVX2_FMA
/* Eight codes -> floats, as kv8_load16 does sixteen (e4m3 2^-8 too small where F16C converts; kv8_scale_fix8). */
static inline __attribute__((always_inline)) __m256 kv8_load8(const uint8_t *p, int fmt) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)p);
    if (fmt == KV8_INT8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
#if defined(__F16C__)
    const __m128i h = _mm_cvtepu8_epi16(b);
    if (fmt == KV8_E5M2) return _mm256_cvtph_ps(_mm_slli_epi16(h, 8));
    return _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(_mm_slli_epi16(h, 8), 1), _mm_set1_epi16(-16512)));
#else
    const float *lut = kv8_table[fmt];
    return _mm256_setr_ps(lut[p[0]], lut[p[1]], lut[p[2]], lut[p[3]], lut[p[4]], lut[p[5]], lut[p[6]], lut[p[7]]);
#endif
}

static inline float kv8_scale_fix8(int fmt) {
#if defined(__F16C__)
    return fmt == KV8_E4M3 ? 256.0f : 1.0f;
#else
    (void)fmt;
    return 1.0f;
#endif
}

static inline float kv8_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#define KV8_TILE_ROWS 16 /* consecutive query rows of one sequence (a prefill chunk) that share key loads */

#if HAVE_AVX512
/* r[i] <- column i of the 16 x 16 matrix whose rows were r[0..15]. */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i + 1]),
                                                           _mm512_castps_pd(t[4 * i + 3])));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i + 1]),
                                                           _mm512_castps_pd(t[4 * i + 3])));
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}

/* The common shapes (group <= 8, head size 64 or 128), for a tile of R consecutive rows of one sequence (row r sees
 * keys [first_r, L0 + r)); a decode is a tile of one row. Keys go into vector lanes, 16 at a time: the chunk's
 * codes are dequantized once and transposed (kt[x] holds dimension x of its 16 keys), and each row's scores are
 * sixteen dot products at once, summed over x in four interleaved chains that are added in a fixed order. A key's
 * score is thus the same arithmetic whatever the tile, the chunk or the batch, so a prefill row gives the bits of
 * the decode of the same position. P.V runs per row with the accumulators in registers; a tile of several rows
 * dequantizes its values once into scratch (the same floats, so the same bits). Inlined with constant FMT, G and
 * NV. scratch: d*16 + R*G*(span + 32) + (R > 1 ? span*(d + 1) : 0) floats, span = L0 + R - 1 - first_0. */
static inline __attribute__((always_inline)) void kv8_tile_fixed(int FMT, int G, int NV, const float *q, int R,
                                                                 int L0, int window, const uint8_t *k_cache,
                                                                 const uint8_t *v_cache, const int32_t *table,
                                                                 int block_size, int kv_heads, int kh,
                                                                 float *restrict scratch, float *restrict out_rows) {
    const int d = NV * 16;
    const int64_t row_bytes = d + 4, slot_bytes = (int64_t)kv_heads * row_bytes;
    const float fix = kv8_scale_fix(FMT);
    const int t_begin = first_key(L0, window), t_end = L0 + R - 1;
    const int span = t_end - t_begin;
    const int stride = span + 32; /* per (row, group) score segment: 16 floats of slack on each side */
    float *kt = scratch, *sc = kt + (size_t)d * 16, *vd = sc + (size_t)R * G * stride, *vsb = vd + (size_t)span * d;
    for (int c = t_begin / 16 * 16; c < t_end; c += 16) {
        float ks[16];
        const uint8_t *kr[16];
        for (int k = 0; k < 16; k++) {
            const int t = c + k;
            kr[k] = NULL;
            ks[k] = 0.0f;
            if (t < t_begin || t >= t_end) continue;
            kr[k] = k_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_bytes
                    + kh * row_bytes;
            memcpy(&ks[k], kr[k] + d, sizeof(float));
            ks[k] *= fix;
        }
        for (int v = 0; v < NV; v++) { /* dims 16v .. 16v + 15 of the chunk's keys, transposed into kt */
            __m512 r[16];
            for (int k = 0; k < 16; k++) r[k] = kr[k] == NULL ? _mm512_setzero_ps() : kv8_load16(kr[k] + 16 * v, FMT);
            transpose16(r);
            for (int j = 0; j < 16; j++) _mm512_storeu_ps(kt + 16 * (16 * v + j), r[j]);
        }
        const __m512 ksv = _mm512_loadu_ps(ks);
        for (int r = 0; r < R; r++) {
            const int len = L0 + r, first = first_key(len, window);
            if (c + 16 <= first || c >= len) continue;
            const int lo = first > c ? first - c : 0, hi = len < c + 16 ? len - c : 16;
            const __mmask16 valid = (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
            const float *qr = q + (size_t)r * G * d;
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
                const float *qg = qr + (size_t)g * d;
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int x = 0; x < d; x += 4) {
                    a0 = _mm512_fmadd_ps(_mm512_set1_ps(qg[x]), _mm512_loadu_ps(kt + 16 * x), a0);
                    a1 = _mm512_fmadd_ps(_mm512_set1_ps(qg[x + 1]), _mm512_loadu_ps(kt + 16 * (x + 1)), a1);
                    a2 = _mm512_fmadd_ps(_mm512_set1_ps(qg[x + 2]), _mm512_loadu_ps(kt + 16 * (x + 2)), a2);
                    a3 = _mm512_fmadd_ps(_mm512_set1_ps(qg[x + 3]), _mm512_loadu_ps(kt + 16 * (x + 3)), a3);
                }
                const __m512 s = _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), ksv);
                /* lane k is key c + k, at index c + k - first of the row's segment (16 floats of slack before) */
                _mm512_mask_storeu_ps(sc + ((size_t)r * G + g) * stride + 16 + (c - first), valid, s);
            }
        }
    }
    if (R > 1)
        for (int t = t_begin; t < t_end; t++) {
            const uint8_t *vr = v_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_bytes
                                + kh * row_bytes;
            memcpy(&vsb[t - t_begin], vr + d, sizeof(float));
            vsb[t - t_begin] *= fix;
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++)
                _mm512_storeu_ps(vd + (size_t)(t - t_begin) * d + 16 * v, kv8_load16(vr + 16 * v, FMT));
        }
    for (int r = 0; r < R; r++) {
        const int len = L0 + r, first = first_key(len, window), n = len - first;
        float *sr = sc + (size_t)r * G * stride + 16;
        for (int g = 0; g < G; g++) softmax_numerators(sr + (size_t)g * stride, 1, n);
        __m512 av[8][8];
#pragma GCC unroll 8
        for (int g = 0; g < G; g++)
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) av[g][v] = _mm512_setzero_ps();
        for (int t = first; t < len; t++) {
            float vs;
            __m512 vv[8];
            if (R > 1) {
                vs = vsb[t - t_begin];
#pragma GCC unroll 8
                for (int v = 0; v < NV; v++) vv[v] = _mm512_loadu_ps(vd + (size_t)(t - t_begin) * d + 16 * v);
            } else {
                const uint8_t *vr = v_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) *
                                    slot_bytes + kh * row_bytes;
                memcpy(&vs, vr + d, sizeof vs);
                vs *= fix;
#pragma GCC unroll 8
                for (int v = 0; v < NV; v++) vv[v] = kv8_load16(vr + 16 * v, FMT);
            }
#pragma GCC unroll 8
            for (int g = 0; g < G; g++) {
                const __m512 w = _mm512_set1_ps(sr[(size_t)g * stride + (t - first)] * vs);
#pragma GCC unroll 8
                for (int v = 0; v < NV; v++) av[g][v] = _mm512_fmadd_ps(w, vv[v], av[g][v]);
            }
        }
#pragma GCC unroll 8
        for (int g = 0; g < G; g++) {
            const __m512 inv = _mm512_set1_ps(1.0f / row_sum(sr + (size_t)g * stride, n));
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++)
                _mm512_storeu_ps(out_rows + ((size_t)r * G + g) * d + 16 * v, _mm512_mul_ps(av[g][v], inv));
        }
    }
}

#define KV8_GROUPS(X, F, NV) X(F, 1, NV) X(F, 2, NV) X(F, 3, NV) X(F, 4, NV) X(F, 5, NV) X(F, 6, NV) X(F, 7, NV) \
    X(F, 8, NV)
#define KV8_CASE(F, G, NV)                                                                                     \
    case (F) * 1000 + (G) * 10 + (NV):                                                                        \
        kv8_tile_fixed(F, G, NV, q, R, L0, window, k_cache, v_cache, table, block_size, kv_heads, kh, scratch, \
                       out_rows);                                                                             \
        return;

static void kv8_tile_dispatch(int fmt, int group, int d, const float *q, int R, int L0, int window,
                              const uint8_t *k_cache, const uint8_t *v_cache, const int32_t *table, int block_size,
                              int kv_heads, int kh, float *restrict scratch, float *restrict out_rows) {
    switch (fmt * 1000 + group * 10 + d / 16) {
        KV8_GROUPS(KV8_CASE, KV8_INT8, 4)
        KV8_GROUPS(KV8_CASE, KV8_INT8, 8)
        KV8_GROUPS(KV8_CASE, KV8_E4M3, 4)
        KV8_GROUPS(KV8_CASE, KV8_E4M3, 8)
        KV8_GROUPS(KV8_CASE, KV8_E5M2, 4)
        KV8_GROUPS(KV8_CASE, KV8_E5M2, 8)
        default:
            break;
    }
}
#endif

/* kv8_attend's per-row loop, one body for both vector widths: the AVX-512 build's sixteen lanes, the AVX2 build's
 * eight (the same operations in the same order per lane; KV8_ROW_LANES 0: the generic loop only). */
#if HAVE_AVX512
#define KV8_ROW_LANES 16
typedef __m512 kv8_vec;
#define KV8_ROW_LOAD kv8_load16
#define KV8_ROW_FIX kv8_scale_fix
#define KV8_LOADU _mm512_loadu_ps
#define KV8_STOREU _mm512_storeu_ps
#define KV8_MUL _mm512_mul_ps
#define KV8_FMADD _mm512_fmadd_ps
#define KV8_SET1 _mm512_set1_ps
#define KV8_HSUM _mm512_reduce_add_ps
#elif HAVE_AVX2_FMA
#define KV8_ROW_LANES 8
typedef __m256 kv8_vec;
#define KV8_ROW_LOAD kv8_load8
#define KV8_ROW_FIX kv8_scale_fix8
#define KV8_LOADU _mm256_loadu_ps
#define KV8_STOREU _mm256_storeu_ps
#define KV8_MUL _mm256_mul_ps
#define KV8_FMADD _mm256_fmadd_ps
#define KV8_SET1 _mm256_set1_ps
#define KV8_HSUM kv8_hsum8
#else
#define KV8_ROW_LANES 0
#endif

/* Whether kv8_tile_fixed takes this shape (AVX-512 builds). */
static inline int kv8_tiled(int group, int d) { return (d == 64 || d == 128) && group <= 8; }

/* One (row, KV head) task: q [group][d] float32 already scaled by the softmax scale; out [group][d]. */
static void kv8_attend(int fmt, const float *q, int group, int d, const uint8_t *k_cache, const uint8_t *v_cache,
                       const int32_t *table, int block_size, int kv_heads, int kh, int first, int len,
                       float *restrict scores, float *restrict acc) {
    const int64_t row_bytes = d + 4, slot_bytes = (int64_t)kv_heads * row_bytes;
    const int n = len - first;
#if KV8_ROW_LANES
    /* Codes widened in registers, one key's scale per score and one value's per weight. */
    if (d % KV8_ROW_LANES == 0 && d <= 256) {
        const float fix = KV8_ROW_FIX(fmt);
        const int nv = d / KV8_ROW_LANES;
        for (int t = first; t < len; t++) {
            const uint8_t *kr = k_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_bytes
                                + kh * row_bytes;
            float ks;
            memcpy(&ks, kr + d, sizeof ks);
            ks *= fix;
            kv8_vec kv[256 / KV8_ROW_LANES];
            for (int v = 0; v < nv; v++) kv[v] = KV8_ROW_LOAD(kr + KV8_ROW_LANES * v, fmt);
            for (int g = 0; g < group; g++) {
                const float *qg = q + (size_t)g * d;
                kv8_vec a = KV8_MUL(KV8_LOADU(qg), kv[0]);
                for (int v = 1; v < nv; v++) a = KV8_FMADD(KV8_LOADU(qg + KV8_ROW_LANES * v), kv[v], a);
                scores[(size_t)g * n + (t - first)] = KV8_HSUM(a) * ks;
            }
        }
        softmax_numerators(scores, group, n);
        memset(acc, 0, sizeof(float) * (size_t)group * d);
        for (int t = first; t < len; t++) {
            const uint8_t *vr = v_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_bytes
                                + kh * row_bytes;
            float vs;
            memcpy(&vs, vr + d, sizeof vs);
            vs *= fix;
            kv8_vec vv[256 / KV8_ROW_LANES];
            for (int v = 0; v < nv; v++) vv[v] = KV8_ROW_LOAD(vr + KV8_ROW_LANES * v, fmt);
            for (int g = 0; g < group; g++) {
                const kv8_vec w = KV8_SET1(scores[(size_t)g * n + (t - first)] * vs);
                float *ag = acc + (size_t)g * d;
                for (int v = 0; v < nv; v++)
                    KV8_STOREU(ag + KV8_ROW_LANES * v, KV8_FMADD(w, vv[v], KV8_LOADU(ag + KV8_ROW_LANES * v)));
            }
        }
        return;
    }
#endif
    const float *lut = kv8_table[fmt];
    float row[1024];
    for (int t = first; t < len; t++) {
        const uint8_t *kr = k_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_bytes
                            + kh * row_bytes;
        float ks;
        memcpy(&ks, kr + d, sizeof ks);
        for (int x = 0; x < d; x++) row[x] = lut[kr[x]];
        for (int g = 0; g < group; g++) {
            const float *restrict qg = q + (size_t)g * d;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int x = 0; x < d; x++) s = fmaf(qg[x], row[x], s);
            scores[(size_t)g * n + (t - first)] = s * ks;
        }
    }
    softmax_numerators(scores, group, n);
    memset(acc, 0, sizeof(float) * (size_t)group * d);
    for (int t = first; t < len; t++) {
        const uint8_t *vr = v_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * slot_bytes
                            + kh * row_bytes;
        float vs;
        memcpy(&vs, vr + d, sizeof vs);
        for (int x = 0; x < d; x++) row[x] = lut[vr[x]];
        for (int g = 0; g < group; g++) {
            const float w = scores[(size_t)g * n + (t - first)] * vs;
            float *restrict ag = acc + (size_t)g * d;
#pragma omp simd
            for (int x = 0; x < d; x++) ag[x] = fmaf(w, row[x], ag[x]);
        }
    }
}

/* Attention over an 8-bit cache for query rows given as decodes (a prefill row is a decode over its prefix):
 * the arguments of llmctl_decode_attention, after the cache's format code. query/out are float32 or bf16 (dtype);
 * k_cache/v_cache are [num_blocks, block_size, kv_heads, head_size + 4] bytes. Keys [first, seq_len) are read,
 * first = max(0, seq_len - window) when window > 0; a row of length 0 gets a zero output. Returns 0, or -1 when a
 * block id is outside [0, num_blocks), head_size exceeds 1024 or scratch could not be had. */
int llmctl_decode_attention_kv8(int fmt, int dtype, const void *query, int64_t q_row_stride, void *out,
                                int64_t o_row_stride, const void *k_cache, const void *v_cache, int block_size,
                                int kv_heads, int head_size, int heads, const int32_t *block_tables, int64_t bt_stride,
                                const int32_t *tables, const int64_t *rows, const int32_t *seq_lens, int num_seqs,
                                int window, float scale, int64_t num_blocks, int num_threads) {
    const int group = heads / kv_heads;
    const int d = head_size;
    if (d > 1024 || fmt < 0 || fmt > 2) return -1;
    kv8_init_tables();
    int failed = 0;
#if HAVE_AVX512
    if (kv8_tiled(group, d)) {
        /* tiles: runs of up to KV8_TILE_ROWS entries that are consecutive rows of one sequence (a prefill chunk) */
        int *starts = (int *)malloc(sizeof(int) * (size_t)(num_seqs + 1));
        if (starts == NULL) return -1;
        int n_tiles = 0;
        for (int i = 0; i < num_seqs; i++)
            if (i == 0 || i - starts[n_tiles - 1] >= KV8_TILE_ROWS || tables[i] != tables[i - 1] ||
                rows[i] != rows[i - 1] + 1 || seq_lens[i] != seq_lens[i - 1] + 1)
                starts[n_tiles++] = i;
        starts[n_tiles] = num_seqs;
        const size_t elem = dtype == DT_F32 ? 4 : 2;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : failed)
        for (int task = 0; task < n_tiles * kv_heads; task++) {
            const int i0 = starts[task / kv_heads], R = starts[task / kv_heads + 1] - i0, kh = task % kv_heads;
            const int L0 = seq_lens[i0];
            if (L0 <= 0) { /* padded rows of a recorded step (each its own tile): no keys, a zero output */
                for (int r = 0; r < R; r++)
                    memset((char *)out + (size_t)(rows[i0 + r] * o_row_stride + (int64_t)kh * group * d) * elem, 0,
                           (size_t)group * d * elem);
                failed |= L0 < 0;
                continue;
            }
            const int32_t *table = block_tables + (int64_t)tables[i0] * bt_stride;
            const int t_begin = first_key(L0, window), t_end = L0 + R - 1;
            int bad = 0;
            for (int b = t_begin / block_size; !bad && b <= (t_end - 1) / block_size; b++)
                bad |= table[b] < 0 || table[b] >= num_blocks;
            const size_t rgd = (size_t)R * group * d;
            const size_t span = (size_t)(t_end - t_begin);
            float *scratch = bad ? NULL : thread_scratch(2 * rgd + (size_t)d * 16 + (size_t)R * group * (span + 32) +
                                                         (R > 1 ? span * (size_t)(d + 1) : 0));
            if (scratch == NULL) {
                failed = 1;
                continue;
            }
            float *q = scratch, *res = q + rgd, *work = res + rgd;
            for (int r = 0; r < R; r++) {
                load_f32(query, rows[i0 + r] * q_row_stride + (int64_t)kh * group * d, dtype, q + (size_t)r * group * d,
                         group * d);
            }
            for (size_t j = 0; j < rgd; j++) q[j] *= scale;
            kv8_tile_dispatch(fmt, group, d, q, R, L0, window, (const uint8_t *)k_cache, (const uint8_t *)v_cache,
                              table, block_size, kv_heads, kh, work, res);
            for (int r = 0; r < R; r++)
                store_f32(out, rows[i0 + r] * o_row_stride + (int64_t)kh * group * d, dtype, res + (size_t)r * group * d,
                          group * d);
        }
        free(starts);
        return failed ? -1 : 0;
    }
#endif
    const int num_tasks = num_seqs * kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : failed)
    for (int task = 0; task < num_tasks; task++) {
        const int i = task / kv_heads, kh = task % kv_heads;
        const int len = seq_lens[i];
        const int64_t o_off = rows[i] * o_row_stride + (int64_t)kh * group * d;
        if (len <= 0) {
            memset((char *)out + o_off * (dtype == DT_F32 ? 4 : 2), 0, (size_t)group * d * (dtype == DT_F32 ? 4 : 2));
            failed |= len < 0;
            continue;
        }
        const int first = first_key(len, window);
        const int32_t *table = block_tables + (int64_t)tables[i] * bt_stride;
        int bad = 0;
        for (int b = first / block_size; !bad && b <= (len - 1) / block_size; b++)
            bad |= table[b] < 0 || table[b] >= num_blocks;
        float *scratch = bad ? NULL : thread_scratch((size_t)group * d * 2 + (size_t)group * (len - first));
        if (scratch == NULL) {
            failed = 1;
            continue;
        }
        float *q = scratch, *acc = q + (size_t)group * d, *scores = acc + (size_t)group * d;
        load_f32(query, rows[i] * q_row_stride + (int64_t)kh * group * d, dtype, q, group * d);
        for (int j = 0; j < group * d; j++) q[j] *= scale;
        kv8_attend(fmt, q, group, d, (const uint8_t *)k_cache, (const uint8_t *)v_cache, table, block_size, kv_heads,
                   kh, first, len, scores, acc);
        for (int g = 0; g < group; g++) {
            const float inv = 1.0f / row_sum(scores + (size_t)g * (len - first), len - first);
            float *ag = acc + (size_t)g * d;
            for (int x = 0; x < d; x++) ag[x] *= inv;
        }
        store_f32(out, o_off, dtype, acc, group * d);
    }
    return failed ? -1 : 0;
}
