/* Row-wise kernels: the KV-cache write, rotary embedding, RMSNorm with its residual add.
 *
 * Part of kernels.c's single translation unit (included from there, after common.h): not compiled alone. */

/* Row-wise kernels (KV write, rotary, RMSNorm, argmax) split rows over threads only when a call has this many
 * elements: below it the fork/join costs more than it saves. 8192 takes in a 64-sequence decode step's calls, whose
 * inputs come from both cores' caches (per step: RMSNorm 1.4 -> 0.9 ms, rotary 0.64 -> 0.44, KV write 0.58 ->
 * 0.36); a single stream's stay on one thread. */
#define ROWWISE_PARALLEL_MIN_ELEMS 8192

/* Store new keys/values into the paged cache. key/value rows are [kv_heads * head_size] contiguous with a row
 * stride (they are usually views into the fused qkv projection); slot -1 skips a token. Same dtype as the cache.
 * Returns 0, or 1 + the index of the first token whose slot is >= num_slots (nothing is written then). */
int llmctl_write_kv(int dtype, const void *key, int64_t k_row_stride, const void *value, int64_t v_row_stride,
                    void *k_cache, void *v_cache, const int64_t *slots, int num_tokens, int row_elems,
                    int64_t num_slots, int num_threads) {
    const size_t elem = dtype == DT_F32 ? 4 : 2;
    const size_t bytes = elem * (size_t)row_elems;
    for (int i = 0; i < num_tokens; i++)
        if (slots[i] >= num_slots) return i + 1;
    /* a prefill's rows land in fresh cache pages: their first-touch faults are most of this, and split too */
    const int threads = (int64_t)num_tokens * row_elems >= ROWWISE_PARALLEL_MIN_ELEMS ? num_threads : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < num_tokens; i++) {
        const int64_t s = slots[i];
        if (s < 0) continue;
        memcpy((char *)k_cache + (size_t)s * bytes, (const char *)key + (size_t)i * k_row_stride * elem, bytes);
        memcpy((char *)v_cache + (size_t)s * bytes, (const char *)value + (size_t)i * v_row_stride * elem, bytes);
    }
    return 0;
}

/* Rotary embedding of one tensor ([tokens, heads, head_size], heads contiguous within a row), out of place.
 * cos_sin: [max_position, rot] float32 (cos in the first half, sin in the second). The math mirrors the torch
 * reference step by step in float32 (no fused multiply-adds), so results are bit-identical to it. Returns 0, or
 * 1 + the index of the first position outside [0, max_position) (nothing is written then). */
int llmctl_rotary(int dtype, const int64_t *positions, int num_tokens, const float *cos_sin, int rot,
                  int64_t max_position, const void *src, int64_t src_row_stride, void *dst, int64_t dst_row_stride,
                  int heads, int head_size, int neox, int num_threads) {
    const int half = rot / 2;
    for (int i = 0; i < num_tokens; i++)
        if (positions[i] < 0 || positions[i] >= max_position) return i + 1;
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
        return 0;
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
    return 0;
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

/* silu(v) = v / (1 + exp(-v)) from exp(-|v|) only, as silu8 / silu16 compute it lane for lane. */
static inline float silu_scalar(float v) {
    const float t = softmax_exp(-fabsf(v));
    return (v < 0.0f ? v * t : v) / (1.0f + t);
}

/* SiLU-and-mul of gate/up rows: out[i][j] = silu(x[i][j]) * x[i][d + j], rounded where torch's silu_and_mul rounds
 * (bf16: SiLU's result, then the product). Why a kernel of its own: the quantized gate/up GEMMs have no SiLU epilogue,
 * and torch's silu and mul between them and the down projection would keep their decode step from being recorded
 * for replay (llmctl_cpu.graph). x rows [2 * d] and out rows [d] have unit column stride. */
int llmctl_silu_and_mul(int dtype, const void *x, int64_t xs, void *out, int64_t os, int rows, int d,
                        int num_threads) {
    const int threads = (int64_t)rows * d >= ROWWISE_PARALLEL_MIN_ELEMS ? num_threads : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        int j = 0;
        if (dtype == DT_F32) {
            const float *g = (const float *)x + r * xs, *u = g + d;
            float *o = (float *)out + r * os;
#if HAVE_AVX2_FMA
            for (; j + 8 <= d; j += 8)
                _mm256_storeu_ps(o + j, _mm256_mul_ps(silu8(_mm256_loadu_ps(g + j)), _mm256_loadu_ps(u + j)));
#endif
            for (; j < d; j++) o[j] = silu_scalar(g[j]) * u[j];
        } else {
            const bf16_t *g = (const bf16_t *)x + r * xs, *u = g + d;
            bf16_t *o = (bf16_t *)out + r * os;
#if HAVE_AVX2_FMA
            for (; j + 8 <= d; j += 8) {
                const __m256 s = from_bf16_8(to_bf16_8(silu8(from_bf16_8(_mm_loadu_si128((const __m128i *)(g + j))))));
                const __m256 p = _mm256_mul_ps(s, from_bf16_8(_mm_loadu_si128((const __m128i *)(u + j))));
                _mm_storeu_si128((__m128i *)(o + j), to_bf16_8(p));
            }
#endif
            for (; j < d; j++) o[j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(silu_scalar(bf16_to_f32(g[j])))) *
                                                  bf16_to_f32(u[j]));
        }
    }
    return 0;
}
