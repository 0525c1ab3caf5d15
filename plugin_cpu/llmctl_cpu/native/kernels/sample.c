/* Random sampling from a softmax: each row's token drawn by inverse CDF from softmax(x / temperature).
 *
 * Part of kernels.c's single translation unit (included from there, after common.h): not compiled alone.
 *
 * The reference (llmctl.ops.reference.sample_softmax) divides by the temperature, takes the softmax (its max,
 * exponentials and normalisation), a running sum and a search: six passes over rows x vocabulary in torch, with
 * a tensor written by most. Here three reads per row and nothing written: the max; the sum of exponentials; then
 * the exponentials again, summed in blocks of 64 until the block that crosses u times the total, which is scanned
 * one by one. The weights are the reference's up to float rounding, so a draw can differ from it only where u
 * times the total falls within that rounding of a token's boundary. */

#define SAMPLE_BLOCK 64

void llmctl_sample_softmax(const float *x, int64_t xs, int rows, int n, const float *temps, const float *u,
                           int64_t *out, int8_t *bad, int num_threads) {
    const int threads = (int64_t)rows * n >= ROWWISE_PARALLEL_MIN_ELEMS ? num_threads : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        const float *row = x + r * xs;
        const float inv = 1.0f / temps[r];
        float m;
        const int nonfinite = row_max_nonfinite(row, n, &m);
        bad[r] = (int8_t)(nonfinite || m == -INFINITY || !(inv > 0.0f) || inv == INFINITY);
        if (bad[r]) continue;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int j = 0; j < n; j++) total += softmax_exp((row[j] - m) * inv);
        const float target = u[r] * total;
        float run = 0.0f;
        int64_t pick = -1;
        int j0 = 0;
        for (; j0 < n; j0 += SAMPLE_BLOCK) {
            const int j1 = j0 + SAMPLE_BLOCK < n ? j0 + SAMPLE_BLOCK : n;
            float block = 0.0f;
#pragma omp simd reduction(+ : block)
            for (int j = j0; j < j1; j++) block += softmax_exp((row[j] - m) * inv);
            if (run + block > target) break;
            run += block;
        }
        for (int j = j0; j < n; j++) {  /* from the crossing block on: a block sum can round past the target */
            const float w = row[j] == -INFINITY ? 0.0f : softmax_exp((row[j] - m) * inv);
            run += w;
            if (run > target && w > 0.0f) {
                pick = j;
                break;
            }
        }
        if (pick < 0)  /* u * total rounded to the end: the last token with weight, as the reference does */
            for (int j = n - 1; j >= 0; j--)
                if (row[j] > -INFINITY) {
                    pick = j;
                    break;
                }
        out[r] = pick;
    }
}
