/* Multi-LoRA shrink and expand by adapter slot: y[t] += B[s] @ (A[s] @ x[t]) with s = token_slots[t].
 *
 * Part of kernels.c's single translation unit (included from there, after common.h): not compiled alone.
 *
 * The slots hold every adapter padded to max_rank (A [slots, max_rank, in], B transposed [slots, max_rank, out],
 * zeros past the adapter's rank); ranks[s] is slot s's real rank (0: the slot's adapter does not target this
 * projection), so only the first ranks[s] rows of A and of B are read. Rows of slot < 0 (the base model) are skipped.
 * Rounding follows the torch reference: the shrunk vector and the expanded delta are rounded to the dtype, then
 * added to y and rounded again; only the order of each dot product's float32 sum differs. Each row is computed
 * from its own data alone, so a row's result does not depend on the batch. */

#if HAVE_AVX512 && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LORA_AVX512 1
static inline __m512 lora_load_masked(const void *base, int64_t offset, int dtype, __mmask16 m) {
    if (dtype == DT_F32) return _mm512_maskz_loadu_ps(m, (const float *)base + offset);
    return from_bf16_16(_mm256_maskz_loadu_epi16(m, (const bf16_t *)base + offset));
}
#else
#define LORA_AVX512 0
#endif

/* sum_i u[offset + i] * v[i]: u in the dtype, v float32 (the shrink's dot products). */
static inline float lora_dot(const void *u, int64_t offset, int dtype, const float *restrict v, int n) {
#if LORA_AVX512
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(load16(u, offset + i, dtype), _mm512_loadu_ps(v + i), acc);
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        acc = _mm512_fmadd_ps(lora_load_masked(u, offset + i, dtype, m), _mm512_maskz_loadu_ps(m, v + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0.0f;
    if (dtype == DT_F32) {
        const float *restrict p = (const float *)u + offset;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < n; i++) s += p[i] * v[i];
    } else {
        const bf16_t *restrict p = (const bf16_t *)u + offset;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < n; i++) s += bf16_to_f32(p[i]) * v[i];
    }
    return s;
#endif
}

static inline float lora_round(int dtype, float v) { return dtype == DT_F32 ? v : bf16_to_f32(f32_to_bf16(v)); }

/* Output columns per expand task: a task is (row, block of columns), so one decode row over a vocabulary-wide
 * LM head still splits over threads. */
#define LORA_COL_BLOCK 256

/* x [tokens, in] and y [tokens, out] with unit column stride and the given row strides (y may be a column view
 * of a merged projection's output); a, b contiguous as above; ranks int32 [num_slots]. Returns 0 on success,
 * 1 + the index of the first token whose slot is >= num_slots (nothing is written then), -2 when scratch memory
 * could not be had, or -3 when a rank is outside [0, max_rank] (nothing is written then). */
int llmctl_lora_shrink_expand(int dtype, const void *x, int64_t x_stride, void *y, int64_t y_stride, const void *a,
                              const void *b, const int64_t *token_slots, const int32_t *ranks, int num_tokens,
                              int in_features, int out_features, int max_rank, int num_slots, int num_threads) {
    for (int s = 0; s < num_slots; s++)
        if (ranks[s] < 0 || ranks[s] > max_rank) return -3;
    for (int t = 0; t < num_tokens; t++)
        if (token_slots[t] >= num_slots) return 1 + t;
    float *h = (float *)malloc((size_t)(num_tokens > 0 ? num_tokens : 1) * (size_t)max_rank * sizeof(float));
    if (h == NULL) return -2;
    int failed = 0;
    const int64_t work = (int64_t)num_tokens * (in_features + out_features) * max_rank;
    const int threads = work >= 64 * ROWWISE_PARALLEL_MIN_ELEMS ? num_threads : 1;
    /* shrink: h[t, :r] = A[s, :r] @ x[t], rounded to the dtype as the reference's first matmul is */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < num_tokens; t++) {
        const int64_t s = token_slots[t];
        const int r = s < 0 ? 0 : ranks[s];
        if (r <= 0) continue;
        float *xf = thread_scratch((size_t)in_features);
        if (xf == NULL) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        load_f32(x, (int64_t)t * x_stride, dtype, xf, in_features);
        for (int j = 0; j < r; j++)
            h[(int64_t)t * max_rank + j] =
                lora_round(dtype, lora_dot(a, (s * max_rank + j) * (int64_t)in_features, dtype, xf, in_features));
    }
    if (failed) {
        free(h);
        return -2;
    }
    /* expand: y[t, lo:hi] += h[t, :r] @ B[s, :r, lo:hi] (B stored transposed: each rank row runs along the
     * outputs), a block of columns accumulated in float32, the delta rounded to the dtype before the add */
    const int blocks = (out_features + LORA_COL_BLOCK - 1) / LORA_COL_BLOCK;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int t = 0; t < num_tokens; t++) {
        for (int blk = 0; blk < blocks; blk++) {
            const int64_t s = token_slots[t];
            const int r = s < 0 ? 0 : ranks[s];
            if (r <= 0) continue;
            const float *ht = h + (int64_t)t * max_rank;
            const int lo = blk * LORA_COL_BLOCK;
            const int n = lo + LORA_COL_BLOCK < out_features ? LORA_COL_BLOCK : out_features - lo;
            float acc[LORA_COL_BLOCK];
            memset(acc, 0, sizeof acc);
            for (int j = 0; j < r; j++) {
                const int64_t row = (s * max_rank + j) * (int64_t)out_features + lo;
                const float hj = ht[j];
#if LORA_AVX512
                const __m512 hv = _mm512_set1_ps(hj);
                int i = 0;
                for (; i + 16 <= n; i += 16)
                    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(load16(b, row + i, dtype), hv, _mm512_loadu_ps(acc + i)));
                if (i < n) {
                    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
                    _mm512_mask_storeu_ps(acc + i, m, _mm512_fmadd_ps(lora_load_masked(b, row + i, dtype, m), hv,
                                                                      _mm512_maskz_loadu_ps(m, acc + i)));
                }
#else
                if (dtype == DT_F32) {
                    const float *restrict p = (const float *)b + row;
#pragma omp simd
                    for (int i = 0; i < n; i++) acc[i] += p[i] * hj;
                } else {
                    const bf16_t *restrict p = (const bf16_t *)b + row;
#pragma omp simd
                    for (int i = 0; i < n; i++) acc[i] += bf16_to_f32(p[i]) * hj;
                }
#endif
            }
            const int64_t at = (int64_t)t * y_stride + lo;
            if (dtype == DT_F32) {
                float *yf = (float *)y + at;
                for (int i = 0; i < n; i++) yf[i] += acc[i];
            } else {
                bf16_t *yb = (bf16_t *)y + at;
                for (int i = 0; i < n; i++) yb[i] = f32_to_bf16(bf16_to_f32(yb[i]) + lora_round(dtype, acc[i]));
            }
        }
    }
    free(h);
    return 0;
}
