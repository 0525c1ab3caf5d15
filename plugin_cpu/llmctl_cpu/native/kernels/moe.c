/* The experts of a sparse mixture-of-experts layer (fused_moe), float32 or bf16, on prepacked panels.
 *
 * Part of kernels.c's single translation unit (included from there, after gemm_f32.c, whose f32x16 vector type it
 * shares): not compiled alone.
 *
 * Why one call: the torch reference visits each expert with a dozen torch ops (a mask, a gather, two GEMMs, the
 * activation, a weighted index_add), so a decode step of a small MoE spends most of its time dispatching. Here the
 * routing is sorted once (a counting sort of the top-k ids, stable in token order), each expert's gate/up and
 * down projections run as GEMMs over its own rows only, and the weighted outputs are summed per token.
 *
 * Results follow the reference's arithmetic: sums in float32 with one rounding per GEMM output, then (bf16) the
 * same roundings torch makes between its ops: gate and up, silu(gate), silu * up, the down projection, its product
 * with the routing weight, and each addition into the token's output, in ascending expert order. Every output
 * element is computed by one thread in a fixed order, so a token's result does not depend on the batch.
 *
 * Packed layout (per expert, one after the other): 16-column panels with k contiguous, panel p holding w[16p + c][j]
 * at (p * K + j) * 16 + c, zero padded past N (the float32 GEMM's layout, in the weights' own dtype). The gate/up
 * weight's rows are interleaved by 16 (16 gate rows, the 16 up rows of the same columns, ...), so panels 2q and
 * 2q + 1 are the gate and up halves of the same 16 intermediate columns and one tile ends in silu(gate) * up. */

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
int llmctl_has_fused_moe(void) { return 1; }

/* A tile is up to MOE_ROWS rows by 2 panels (a gate/up pair): 8 accumulators on AVX-512; on AVX2, where a 16-column
 * vector is two registers of 16, 3 rows keep the 12 accumulators, 4 weight halves and the broadcast in registers. */
#if defined(__AVX512F__)
#define MOE_ROWS 4
#else
#define MOE_ROWS 3
#endif
#define MOE_PANELS 2
#define MOE_SUM_COLS 256
#define MOE_MAX_TOPK 64

static inline __attribute__((always_inline)) f32x16 moe_load_panel(const void *w, size_t offset, int wbf16) {
    if (!wbf16) return f32x16_load((const float *)w + offset);
    const bf16_t *p = (const bf16_t *)w + offset;
#if defined(__AVX512F__)
    return from_bf16_16(_mm256_loadu_si256((const __m256i *)p));
#else
    const __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
    const __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 8))), 16);
    return (f32x16){_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi)};
#endif
}

/* res[r][16p + c] = sum_j a[r][j] * w_panel_p[j][c], one FMA per j from zero (the float32 GEMM's order). */
static inline __attribute__((always_inline)) void moe_tile(int ROWS, int NPAN, int wbf16, const float *const *a,
                                                           int k, const void *w, size_t panel_stride,
                                                           float res[MOE_ROWS][MOE_PANELS * 16]) {
    f32x16 acc[MOE_ROWS][MOE_PANELS];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 2
        for (int p = 0; p < NPAN; p++) acc[r][p] = f32x16_zero();
    for (int j = 0; j < k; j++) {
        f32x16 b[MOE_PANELS];
#pragma GCC unroll 2
        for (int p = 0; p < NPAN; p++) b[p] = moe_load_panel(w, p * panel_stride + (size_t)j * 16, wbf16);
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            const f32x16 x = f32x16_set1(a[r][j]);
#pragma GCC unroll 2
            for (int p = 0; p < NPAN; p++) acc[r][p] = f32x16_fma(x, b[p], acc[r][p]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 2
        for (int p = 0; p < NPAN; p++) f32x16_store(res[r] + 16 * p, acc[r][p]);
}

#define MOE_TILE(R_, P_, B_)                                                                      \
    if (rows == (R_) && npan == (P_) && wbf16 == (B_)) {                                         \
        moe_tile(R_, P_, B_, a, k, w, panel_stride, res);                                        \
        return;                                                                                  \
    }
#define MOE_TILE_ROWS(R_) MOE_TILE(R_, 1, 0) MOE_TILE(R_, 2, 0) MOE_TILE(R_, 1, 1) MOE_TILE(R_, 2, 1)

static void moe_tile_any(int rows, int npan, int wbf16, const float *const *a, int k, const void *w,
                         size_t panel_stride, float res[MOE_ROWS][MOE_PANELS * 16]) {
    MOE_TILE_ROWS(1) MOE_TILE_ROWS(2) MOE_TILE_ROWS(3)
#if MOE_ROWS > 3
    MOE_TILE_ROWS(4)
#endif
}

static inline float moe_round(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

static inline float moe_silu(float v) { return v / (1.0f + expf(-v)); }

/* x: [T, H] (dtype), row stride xs; ids: int64 [T, topk]; weights: float32 [T, topk] (the routing weights as the
 * reference multiplies them); w13: the packed [E, 2I, H] (I a multiple of 16), w2: the packed [E, H, I], both in
 * the dtype; out: [T, H], row stride os. Returns 0, 1 + the index of the first id outside [0, E) (nothing
 * written), or -2 when scratch memory could not be had. */
int llmctl_fused_moe(int dtype, const void *x, int64_t xs, int T, int H, int I, int E, int topk, const void *w13,
                     const void *w2, const int64_t *ids, const float *weights, void *out, int64_t os,
                     int num_threads) {
    const int N = T * topk, bf16 = dtype == DT_BF16;
    for (int n = 0; n < N; n++)
        if (ids[n] < 0 || ids[n] >= E) return 1 + n;
    if (N == 0) return 0;
    const size_t esize = bf16 ? sizeof(bf16_t) : sizeof(float);
    const int p13 = 2 * I / 16, p2 = (H + 15) / 16; /* panels per expert */
    const size_t stride13 = (size_t)H * 16, stride2 = (size_t)I * 16, expert13 = p13 * stride13,
                 expert2 = p2 * stride2;
    /* Scratch: each expert's first sorted row, the active experts, fill counters, the sorted (token, slot) pairs and
     * their inverse; the intermediate rows and the weighted down rows (both in sorted order), x in float32 (bf16). */
    int *ints = (int *)malloc(sizeof(int) * (size_t)(3 * E + 1 + 2 * N));
    float *inter = (float *)malloc(sizeof(float) * ((size_t)N * I + (size_t)N * H + (bf16 ? (size_t)T * H : 0)));
    if (ints == NULL || inter == NULL) {
        free(ints), free(inter);
        return -2;
    }
    int *start = ints, *active = ints + E + 1, *next = active + E, *order = next + E, *pos = order + N;
    float *down = inter + (size_t)N * I, *xf = down + (size_t)N * H;
    memset(start, 0, sizeof(int) * (size_t)(E + 1));
    for (int n = 0; n < N; n++) start[ids[n] + 1]++;
    int nact = 0;
    for (int e = 0; e < E; e++) {
        if (start[e + 1] > 0) active[nact++] = e;
        start[e + 1] += start[e];
    }
    memcpy(next, start, sizeof(int) * (size_t)E);
    for (int n = 0; n < N; n++) { /* stable: an expert's rows stay in token order */
        const int slot = next[ids[n]]++;
        order[slot] = n;
        pos[n] = slot;
    }
    const int pairs = I / 16, groups2 = (p2 + MOE_PANELS - 1) / MOE_PANELS;
#pragma omp parallel num_threads(num_threads)
    {
        const float *a[MOE_ROWS];
        float res[MOE_ROWS][MOE_PANELS * 16];
        if (bf16) {
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) load_f32(x, (int64_t)t * xs, DT_BF16, xf + (size_t)t * H, H);
        }
        /* gate/up: one item per (active expert, 16 intermediate columns); silu(gate) * up into inter */
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < nact * pairs; item++) {
            const int e = active[item / pairs], q = item % pairs;
            const void *w = (const char *)w13 + (expert13 * e + 2 * q * stride13) * esize;
            for (int s = start[e]; s < start[e + 1]; s += MOE_ROWS) {
                const int rows = start[e + 1] - s < MOE_ROWS ? start[e + 1] - s : MOE_ROWS;
                for (int r = 0; r < rows; r++) {
                    const int t = order[s + r] / topk;
                    a[r] = bf16 ? xf + (size_t)t * H : (const float *)x + (int64_t)t * xs;
                }
                moe_tile_any(rows, 2, bf16, a, H, w, stride13, res);
                for (int r = 0; r < rows; r++) {
                    float *dst = inter + (size_t)(s + r) * I + 16 * q;
                    for (int c = 0; c < 16; c++) {
                        const float g = moe_round(res[r][c], bf16), u = moe_round(res[r][16 + c], bf16);
                        dst[c] = moe_round(moe_round(moe_silu(g), bf16) * u, bf16);
                    }
                }
            }
        }
        /* down: one item per (active expert, 32 hidden columns); times the routing weight into down */
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < nact * groups2; item++) {
            const int e = active[item / groups2], g = item % groups2;
            const int p0 = g * MOE_PANELS, npan = p2 - p0 < MOE_PANELS ? p2 - p0 : MOE_PANELS;
            const int cols = H - 16 * p0 < 16 * npan ? H - 16 * p0 : 16 * npan;
            const void *w = (const char *)w2 + (expert2 * e + p0 * stride2) * esize;
            for (int s = start[e]; s < start[e + 1]; s += MOE_ROWS) {
                const int rows = start[e + 1] - s < MOE_ROWS ? start[e + 1] - s : MOE_ROWS;
                for (int r = 0; r < rows; r++) a[r] = inter + (size_t)(s + r) * I;
                moe_tile_any(rows, npan, bf16, a, I, w, stride2, res);
                for (int r = 0; r < rows; r++) {
                    const float rw = weights[order[s + r]];
                    float *dst = down + (size_t)(s + r) * H + 16 * p0;
                    for (int c = 0; c < cols; c++) dst[c] = moe_round(moe_round(res[r][c], bf16) * rw, bf16);
                }
            }
        }
        /* per token: its experts' rows added in ascending expert order (the reference's), rounding each sum */
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            int slots[MOE_MAX_TOPK];
            const int k = topk < MOE_MAX_TOPK ? topk : MOE_MAX_TOPK; /* the Python side refuses more */
            for (int j = 0; j < k; j++) {
                int i = j;
                while (i > 0 && ids[(int64_t)t * topk + slots[i - 1]] > ids[(int64_t)t * topk + j]) {
                    slots[i] = slots[i - 1];
                    i--;
                }
                slots[i] = j;
            }
            float acc[MOE_SUM_COLS];
            for (int c0 = 0; c0 < H; c0 += MOE_SUM_COLS) {
                const int cn = H - c0 < MOE_SUM_COLS ? H - c0 : MOE_SUM_COLS;
                for (int c = 0; c < cn; c++) acc[c] = 0.0f;
                for (int j = 0; j < k; j++) {
                    const float *src = down + (size_t)pos[(int64_t)t * topk + slots[j]] * H + c0;
                    for (int c = 0; c < cn; c++) acc[c] = moe_round(acc[c] + src[c], bf16);
                }
                store_f32(out, (int64_t)t * os + c0, dtype, acc, cn);
            }
        }
    }
    free(ints);
    free(inter);
    return 0;
}
#else
int llmctl_has_fused_moe(void) { return 0; }

int llmctl_fused_moe(int dtype, const void *x, int64_t xs, int T, int H, int I, int E, int topk, const void *w13,
                     const void *w2, const int64_t *ids, const float *weights, void *out, int64_t os,
                     int num_threads) {
    (void)dtype, (void)x, (void)xs, (void)T, (void)H, (void)I, (void)E, (void)topk, (void)w13, (void)w2, (void)ids;
    (void)weights, (void)out, (void)os, (void)num_threads;
    return -1;
}
#endif
