/* The bf16 GEMM on prepacked 16-column panels (AVX512-BF16 dot products, AMX tiles, or AVX2 + FMA by conversion
 * to float32), with the fused SiLU-and-mul epilogue of the gate/up projection.
 *
 * Part of kernels.c's single translation unit (included from there, after common.h): not compiled alone. */

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
    if (m <= 0) return 0; /* a step that samples no row (only non-final prefill chunks): the AMX path crashed on it */
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
#elif HAVE_AVX2_FMA
/* ---- the same GEMM with AVX2 + FMA (no bf16 dot products) ----------------------------------------------------
 *
 * Why: without AVX512-BF16, oneDNN has no bf16 kernel for these CPUs and torch's bf16 linear ran far slower than
 * float32 (docs/performance.md, the AVX2 host). The packed panels need no other layout: a 256-bit load holds 8
 * columns' k pairs, and a shift (even k) or a mask (odd k) turns each pair half into float32. x is converted to
 * float32 once per call (zero padded to whole pairs), so each k costs one broadcast per row and one FMA per
 * 8 columns. Each output element is one FMA chain over k in order, from its own row only: batch-invariant, like
 * the paths above (its sums differ from theirs in rounding, not in invariance). */
#define GEMM2_ROWS 4 /* rows per register tile: 8 accumulators, 4 weight vectors, one broadcast */

/* Sums of ROWS rows of xf (float32, row stride xfs, k2 pairs) by one panel -> out[r * os + c], c < 16. */
static inline __attribute__((always_inline)) void gemm2_panel(int ROWS, const float *xf, int64_t xfs, int k2,
                                                              const bf16_t *w, float *out, int os) {
    __m256 acc[GEMM2_ROWS][2];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256i odd = _mm256_set1_epi32((int32_t)0xffff0000u);
    for (int j = 0; j < k2; j++) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + (size_t)j * 32));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + (size_t)j * 32 + 16));
        const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
        const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            const __m256 a = _mm256_broadcast_ss(xf + r * xfs + 2 * j);
            acc[r][0] = _mm256_fmadd_ps(a, e0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, e1, acc[r][1]);
        }
        const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(w0, odd));
        const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(w1, odd));
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            const __m256 a = _mm256_broadcast_ss(xf + r * xfs + 2 * j + 1);
            acc[r][0] = _mm256_fmadd_ps(a, o0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, o1, acc[r][1]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++) {
        _mm256_storeu_ps(out + r * os, acc[r][0]);
        _mm256_storeu_ps(out + r * os + 8, acc[r][1]);
    }
}

static void gemm2_panel_any(int rows, const float *xf, int64_t xfs, int k2, const bf16_t *w, float *out, int os) {
    switch (rows) {
    case 1: gemm2_panel(1, xf, xfs, k2, w, out, os); break;
    case 2: gemm2_panel(2, xf, xfs, k2, w, out, os); break;
    case 3: gemm2_panel(3, xf, xfs, k2, w, out, os); break;
    default: gemm2_panel(4, xf, xfs, k2, w, out, os); break;
    }
}

/* Bias, bf16 rounding and (silu) SiLU-and-mul of a gate/up panel pair, for one row of a tile's float32 sums
 * (npan panels of 16 columns at s), rounded where store_cols16 / store_silu16 round. */
static inline void gemm2_epilogue(const float *s, int npan, int silu, const bf16_t *bias, bf16_t *y, int last_cols) {
    if (silu) {
        for (int q = 0; q < npan / 2; q++)
            for (int h = 0; h < 16; h += 8) {
                __m256 gate = _mm256_loadu_ps(s + 32 * q + h), up = _mm256_loadu_ps(s + 32 * q + 16 + h);
                if (bias != NULL) {
                    gate = _mm256_add_ps(gate, from_bf16_8(_mm_loadu_si128((const __m128i *)(bias + 32 * q + h))));
                    up = _mm256_add_ps(up, from_bf16_8(_mm_loadu_si128((const __m128i *)(bias + 32 * q + 16 + h))));
                }
                const __m256 g = from_bf16_8(to_bf16_8(gate)), u = from_bf16_8(to_bf16_8(up));
                const __m256 sg = from_bf16_8(to_bf16_8(silu8(g)));
                _mm_storeu_si128((__m128i *)(y + 16 * q + h), to_bf16_8(_mm256_mul_ps(sg, u)));
            }
        return;
    }
    for (int p = 0; p < npan; p++) {
        const int cols = p == npan - 1 ? last_cols : 16;
        for (int h = 0; h < cols; h += 8) {
            __m256 v = _mm256_loadu_ps(s + 16 * p + h);
            if (cols - h >= 8) {
                if (bias != NULL) v = _mm256_add_ps(v, from_bf16_8(_mm_loadu_si128((const __m128i *)(bias + 16 * p + h))));
                _mm_storeu_si128((__m128i *)(y + 16 * p + h), to_bf16_8(v));
                continue;
            }
            bf16_t tmp[8];
            _mm_storeu_si128((__m128i *)tmp, to_bf16_8(v)); /* no bias here: added per column below */
            for (int c = 0; c < cols - h; c++)
                y[16 * p + h + c] = bias == NULL ? tmp[c]
                                                 : f32_to_bf16(s[16 * p + h + c] + bf16_to_f32(bias[16 * p + h + c]));
        }
    }
}

/* silu: the panels alternate gate and up (n a multiple of 32) and y gets silu(gate) * up, [m, n / 2]. Returns -2
 * when the float32 copy of x cannot be allocated. */
static int gemm_driver(const bf16_t *x, int64_t xs, int m, int k, const bf16_t *packed, int n, const bf16_t *bias,
                       bf16_t *y, int64_t ys, int num_threads, int silu) {
    if (m <= 0) return 0;
    const int k2 = (k + 1) / 2, kp = 2 * k2, panels = (n + 15) / 16;
    const int groups = (panels + GEMM_PANELS - 1) / GEMM_PANELS;
    const size_t panel_stride = (size_t)k2 * 32;
    float *xf = (float *)malloc((size_t)m * kp * sizeof(float));
    if (xf == NULL) return -2;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int i = 0; i < m; i++) {
            const bf16_t *src = x + (int64_t)i * xs;
            float *dst = xf + (size_t)i * kp;
            int j = 0;
            for (; j + 8 <= k; j += 8)
                _mm256_storeu_ps(dst + j, from_bf16_8(_mm_loadu_si128((const __m128i *)(src + j))));
            for (; j < k; j++) dst[j] = bf16_to_f32(src[j]);
            if (kp > k) dst[k] = 0.0f; /* the zero partner of an odd k's last weight */
        }
#pragma omp for schedule(static)
        for (int g = 0; g < groups; g++) {
            float sums[GEMM2_ROWS][16 * GEMM_PANELS];
            const int p0 = g * GEMM_PANELS;
            const int npan = panels - p0 < GEMM_PANELS ? panels - p0 : GEMM_PANELS;
            const int tail = n - 16 * (p0 + npan - 1);
            const int last_cols = tail > 16 ? 16 : tail;
            const bf16_t *w = packed + (size_t)p0 * panel_stride;
            const bf16_t *b = bias == NULL ? NULL : bias + 16 * p0;
            for (int r = 0; r < m; r += GEMM2_ROWS) {
                const int rows = m - r < GEMM2_ROWS ? m - r : GEMM2_ROWS;
                for (int p = 0; p < npan; p++)
                    gemm2_panel_any(rows, xf + (size_t)r * kp, kp, k2, w + p * panel_stride, &sums[0][16 * p],
                                    16 * GEMM_PANELS);
                for (int i = 0; i < rows; i++)
                    gemm2_epilogue(sums[i], npan, silu, b, y + (r + i) * ys + (silu ? 8 : 16) * p0, last_cols);
            }
        }
    }
    free(xf);
    return 0;
}

int llmctl_gemm_bf16(const bf16_t *x, int64_t xs, int m, int k, const bf16_t *packed, int n, const bf16_t *bias,
                     bf16_t *y, int64_t ys, int num_threads) {
    return gemm_driver(x, xs, m, k, packed, n, bias, y, ys, num_threads, 0);
}

int llmctl_gemm_bf16_silu(const bf16_t *x, int64_t xs, int m, int k, const bf16_t *packed, int n,
                          const bf16_t *bias, bf16_t *y, int64_t ys, int num_threads) {
    if (n % 32 != 0) return -1;
    return gemm_driver(x, xs, m, k, packed, n, bias, y, ys, num_threads, 1);
}

int llmctl_has_gemm_bf16(void) { return 1; }
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
