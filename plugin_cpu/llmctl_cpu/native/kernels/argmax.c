/* Greedy sampling: each row's argmax.
 *
 * Part of kernels.c's single translation unit (included from there, after common.h): not compiled alone. */

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

#if HAVE_AVX512 || HAVE_AVX2_FMA
/* Combine the vector lanes' winners (value and first index each; ties to the smaller index), then scan the tail
 * from j on: the argmax of the whole row, or the scalar pass's answer when the tail holds a NaN. */
static int64_t argmax_finish(const void *row, int dtype, int n, int j, const float *vals, const int32_t *ids,
                             int lanes) {
    float bv = vals[0];
    int64_t bi = ids[0];
    for (int l = 1; l < lanes; l++)
        if (vals[l] > bv || (vals[l] == bv && ids[l] < bi)) {
            bv = vals[l];
            bi = ids[l];
        }
    for (; j < n; j++) {
        const float v = value_at(row, dtype, j);
        if (v != v) return argmax_row_scalar(row, dtype, n);
        if (v > bv) {
            bv = v;
            bi = j;
        }
    }
    return bi;
}
#endif

#if HAVE_AVX2_FMA && !HAVE_AVX512
static inline __m256 load8_any(const void *row, int j, int dtype) {
    return dtype == DT_F32 ? _mm256_loadu_ps((const float *)row + j)
                           : from_bf16_8(_mm_loadu_si128((const __m128i *)((const bf16_t *)row + j)));
}
#endif

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
            out[r] = argmax_finish(row, dtype, n, j, vals, ids, 16);
            continue;
        }
#elif HAVE_AVX2_FMA
        if (n >= 8) {
            /* the same scan on eight lanes (lane l: indices = l mod 8); torch's argmax has no AVX2 path for bf16 */
            __m256 best = load8_any(row, 0, dtype);
            __m256i best_i = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
            __m256i idx = best_i;
            __m256 nan = _mm256_cmp_ps(best, best, _CMP_UNORD_Q);
            int j = 8;
            for (; j + 8 <= n; j += 8) {
                idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
                const __m256 v = load8_any(row, j, dtype);
                nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
                const __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
                best = _mm256_blendv_ps(best, v, gt);
                best_i = _mm256_castps_si256(
                    _mm256_blendv_ps(_mm256_castsi256_ps(best_i), _mm256_castsi256_ps(idx), gt));
            }
            if (_mm256_movemask_ps(nan)) {
                out[r] = argmax_row_scalar(row, dtype, n);
                continue;
            }
            float vals[8];
            int32_t ids[8];
            _mm256_storeu_ps(vals, best);
            _mm256_storeu_si256((__m256i *)ids, best_i);
            out[r] = argmax_finish(row, dtype, n, j, vals, ids, 8);
            continue;
        }
#endif
        out[r] = argmax_row_scalar(row, dtype, n);
    }
}
