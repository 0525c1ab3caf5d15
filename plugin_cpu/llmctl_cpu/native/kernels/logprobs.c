/* Logprobs of sampled tokens: each row's log-normaliser, the sampled token's rank, and the top k.
 *
 * Part of kernels.c's single translation unit (included from there, after common.h): not compiled alone.
 *
 * The reference (llmctl.ops.reference.sampled_logprobs) makes five passes over rows x vocabulary in torch (the max
 * and the sum of exponentials of logsumexp, a comparison written out as a bool tensor and summed, and topk), each
 * a parallel region of its own. Requests that ask for logprobs pay them every step, so with many such rows they
 * were the largest item of the serving engine's step. Here: one pass for the max and a second for the sum of
 * exponentials, the rank count and the top k, per row on one thread. The top k is kept sorted (descending value,
 * ties to the smaller index, as a stable sort) and most elements are rejected by one comparison with its
 * smallest value. */

/* Insert (v, j) into the sorted best so far (vals descending), at slot p or above it: p is the first free slot
 * while fewer than k are held, else the last (whose entry v beats). Ties keep the earlier index first. */
static inline void topk_insert(float *vals, int64_t *ids, int p, float v, int64_t j) {
    while (p > 0 && v > vals[p - 1]) {
        vals[p] = vals[p - 1];
        ids[p] = ids[p - 1];
        p--;
    }
    vals[p] = v;
    ids[p] = j;
}

/* The row's largest logit into *m; whether it holds a NaN or +inf (rows the callers leave to the reference). */
static inline int row_max_nonfinite(const float *row, int n, float *m) {
    float best = -INFINITY;
    int bad = 0;
#pragma omp simd reduction(max : best) reduction(| : bad)
    for (int j = 0; j < n; j++) {
        best = row[j] > best ? row[j] : best;
        bad |= (row[j] != row[j]) | (row[j] == INFINITY);
    }
    *m = best;
    return bad;
}

/* x float32 [rows, n] (row stride xs), chosen int64 [rows]; out: lse float32 [rows], rank int64 [rows] (1 + the
 * count of larger logits), top_vals float32 [rows, k], top_ids int64 [rows, k] (k <= n). A row holding a NaN is
 * reported in bad (1) and left for the caller's reference, as is one holding +inf. */
void llmctl_sampled_logprobs(const float *x, int64_t xs, int rows, int n, const int64_t *chosen, int k,
                             float *lse, int64_t *rank, float *top_vals, int64_t *top_ids, int8_t *bad,
                             int num_threads) {
    const int threads = (int64_t)rows * n >= ROWWISE_PARALLEL_MIN_ELEMS ? num_threads : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        const float *row = x + r * xs;
        float m;
        bad[r] = (int8_t)row_max_nonfinite(row, n, &m);
        if (bad[r]) continue;
        const float c = row[chosen[r]];
        float sum = 0.0f;
        int64_t above = 0;
        if (m > -INFINITY) {  /* every logit -inf: the normaliser is -inf and no logit is larger (as torch) */
#pragma omp simd reduction(+ : sum, above)
            for (int j = 0; j < n; j++) {
                sum += softmax_exp(row[j] - m);
                above += row[j] > c;
            }
        }
        lse[r] = m > -INFINITY ? m + logf(sum) : -INFINITY;
        rank[r] = above + 1;
        float *tv = top_vals + (int64_t)r * k;
        int64_t *ti = top_ids + (int64_t)r * k;
        if (k <= 0) continue;
        int filled = 0;
        for (int j = 0; j < n; j++) {
            if (filled < k)
                topk_insert(tv, ti, filled++, row[j], j);
            else if (row[j] > tv[k - 1])
                topk_insert(tv, ti, k - 1, row[j], j);
        }
    }
}
