/* The batch-invariant float32 GEMM on prepacked panels (AVX-512, or AVX2 + FMA).
 *
 * Part of kernels.c's single translation unit (included from there, after common.h): not compiled alone. */

/* ---- float32 GEMM ---------------------------------------------------------------------------------------------
 *
 * Why our own: float32 batch invariance (a row's bits never depend on the rest of the batch) is a promise on every
 * host, and no library GEMM makes it. MKL's packed GEMM kept it on Sapphire Rapids but not on AMD EPYC, where MKL
 * picks other kernels; oneDNN changes kernels with the row count. Here an output element is summed by one thread
 * over k in order, one fused multiply-add per k from zero, whatever tile (1-4 rows, 1-4 panels) or thread computes
 * it, and the bias is added once after the sum, so the same row gives the same bits at every batch size.
 *
 * Packed layout: 16-column panels, panel p holds w[16p + c][j] at (p * K + j) * 16 + c, zero padded past N, so one
 * 64-byte load feeds 16 columns. On AVX-512 a 16-column vector is one register; on AVX2 + FMA it is two. */
#define GEMM_F32_PANELS 4
/* AVX-512 tiles are up to 4 rows x 4 panels (16 accumulators of 32 registers). AVX2 has 16 registers and a
 * 16-column vector takes two, so a 3- or 4-row tile over 4 panels spills its accumulators on every k: there, 3 or
 * more rows take one panel at a time, up to 6 rows (12 accumulators, 2 weight vectors, 1 broadcast), once a first
 * tile of 1-2 rows over the group's 4 panels has brought the weights in from memory (4 streams in flight, what a
 * weight read from memory once per step needs). The tile never changes a sum's order, only which sums share the
 * loop, so every row keeps its bits at every batch size. */
#if defined(__AVX512F__)
#define GEMM_F32_ROWS 4
#else
#define GEMM_F32_ROWS 6
#endif

void llmctl_pack_f32_panels(const float *w, int64_t w_row_stride, int n, int k, float *out) {
    const int panels = (n + 15) / 16;
    memset(out, 0, (size_t)panels * k * 16 * sizeof(float));
#pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++)
        for (int c = 0; c < 16 && 16 * p + c < n; c++) {
            const float *row = w + (int64_t)(16 * p + c) * w_row_stride;
            float *dst = out + (size_t)p * k * 16 + c;
            for (int j = 0; j < k; j++) dst[(size_t)j * 16] = row[j];
        }
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#if !defined(__AVX512F__)
#include <immintrin.h>
#endif
int llmctl_has_gemm_f32(void) { return 1; }

#if defined(__AVX512F__)
typedef __m512 f32x16;
static inline f32x16 f32x16_zero(void) { return _mm512_setzero_ps(); }
static inline f32x16 f32x16_load(const float *p) { return _mm512_loadu_ps(p); }
static inline f32x16 f32x16_set1(float x) { return _mm512_set1_ps(x); }
static inline f32x16 f32x16_fma(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline f32x16 f32x16_add(f32x16 a, f32x16 b) { return _mm512_add_ps(a, b); }
static inline void f32x16_store(float *p, f32x16 v) { _mm512_storeu_ps(p, v); }
#else
typedef struct { __m256 lo, hi; } f32x16;
static inline f32x16 f32x16_zero(void) { return (f32x16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline f32x16 f32x16_load(const float *p) { return (f32x16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline f32x16 f32x16_set1(float x) { return (f32x16){_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
static inline f32x16 f32x16_fma(f32x16 a, f32x16 b, f32x16 c) {
    return (f32x16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline f32x16 f32x16_add(f32x16 a, f32x16 b) {
    return (f32x16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
static inline void f32x16_store(float *p, f32x16 v) { _mm256_storeu_ps(p, v.lo), _mm256_storeu_ps(p + 8, v.hi); }
#endif

/* Stores 16 (or the last panel's `cols`) sums of one row, plus the bias. */
static inline __attribute__((always_inline)) void store_f32_cols(f32x16 v, const float *bias, int cols, float *y) {
    float tmp[16];
    if (cols == 16) {
        if (bias != NULL) v = f32x16_add(v, f32x16_load(bias));
        f32x16_store(y, v);
        return;
    }
    if (bias != NULL) {
        memset(tmp, 0, sizeof(tmp));
        memcpy(tmp, bias, (size_t)cols * sizeof(float));
        v = f32x16_add(v, f32x16_load(tmp));
    }
    f32x16_store(tmp, v);
    memcpy(y, tmp, (size_t)cols * sizeof(float));
}

static inline __attribute__((always_inline)) void gemm_f32_tile(int ROWS, int NPAN, const float *x, int64_t xs,
                                                                int k, const float *w, size_t panel_stride,
                                                                const float *bias, float *y, int64_t ys,
                                                                int last_cols) {
    f32x16 acc[GEMM_F32_ROWS][GEMM_F32_PANELS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 8
        for (int p = 0; p < NPAN; p++) acc[r][p] = f32x16_zero();
    for (int j = 0; j < k; j++) {
        f32x16 b[GEMM_F32_PANELS];
#pragma GCC unroll 8
        for (int p = 0; p < NPAN; p++) b[p] = f32x16_load(w + p * panel_stride + (size_t)j * 16);
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; r++) {
            const f32x16 a = f32x16_set1(x[r * xs + j]);
#pragma GCC unroll 8
            for (int p = 0; p < NPAN; p++) acc[r][p] = f32x16_fma(a, b[p], acc[r][p]);
        }
    }
#pragma GCC unroll 8
    for (int p = 0; p < NPAN; p++)
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; r++)
            store_f32_cols(acc[r][p], bias == NULL ? NULL : bias + 16 * p, p == NPAN - 1 ? last_cols : 16,
                           y + r * ys + 16 * p);
}

#define GEMM_F32_TILE(R_, P_)                                                                      \
    if (rows == (R_) && npan == (P_)) {                                                            \
        gemm_f32_tile(R_, P_, x, xs, k, w, panel_stride, bias, y, ys, last_cols);                  \
        return;                                                                                    \
    }
#define GEMM_F32_TILE_ROWS(R_) GEMM_F32_TILE(R_, 1) GEMM_F32_TILE(R_, 2) GEMM_F32_TILE(R_, 3) GEMM_F32_TILE(R_, 4)

static void gemm_f32_tile_any(int rows, int npan, const float *x, int64_t xs, int k, const float *w,
                              size_t panel_stride, const float *bias, float *y, int64_t ys, int last_cols) {
    GEMM_F32_TILE_ROWS(1) GEMM_F32_TILE_ROWS(2)
#if defined(__AVX512F__)
    GEMM_F32_TILE_ROWS(3) GEMM_F32_TILE_ROWS(4)
#else
    GEMM_F32_TILE(3, 1) GEMM_F32_TILE(4, 1) GEMM_F32_TILE(5, 1) GEMM_F32_TILE(6, 1)
#endif
}

/* One group's rows [0, m): AVX-512 walks them in 4-row tiles over all the group's panels; AVX2 starts with a
 * 1-2 row tile over all panels, then tiles of up to 6 rows over one panel at a time (a last 1-2 rows again over
 * all panels). */
static inline void gemm_f32_group(int m, int npan, const float *x, int64_t xs, int k, const float *w,
                                  size_t panel_stride, const float *b, float *y, int64_t ys, int last_cols) {
#if defined(__AVX512F__)
    for (int r = 0; r < m; r += GEMM_F32_ROWS) {
        const int rows = m - r < GEMM_F32_ROWS ? m - r : GEMM_F32_ROWS;
        gemm_f32_tile_any(rows, npan, x + r * xs, xs, k, w, panel_stride, b, y + r * ys, ys, last_cols);
    }
#else
    /* The first two rows stream the group's panels in from memory (4 streams in flight); the rest re-read them
     * from cache in tiles of up to 6 rows, one panel at a time. */
    const int head = m < 2 ? m : 2;
    gemm_f32_tile_any(head, npan, x, xs, k, w, panel_stride, b, y, ys, last_cols);
    for (int r = head; r < m;) {
        const int rows = m - r < GEMM_F32_ROWS ? m - r : GEMM_F32_ROWS;
        if (rows <= 2) {
            gemm_f32_tile_any(rows, npan, x + r * xs, xs, k, w, panel_stride, b, y + r * ys, ys, last_cols);
        } else {
            for (int p = 0; p < npan; p++)
                gemm_f32_tile_any(rows, 1, x + r * xs, xs, k, w + p * panel_stride, panel_stride,
                                  b == NULL ? NULL : b + 16 * p, y + r * ys + 16 * p, ys,
                                  p == npan - 1 ? last_cols : 16);
        }
        r += rows;
    }
#endif
}

/* x: [m, k] float32, unit stride along k, row stride xs; y: [m, n], row stride ys; bias: n floats or NULL. The
 * threads split the columns (groups of 4 panels), each walking all rows of its groups (gemm_f32_group). */
int llmctl_gemm_f32(const float *x, int64_t xs, int m, int k, const float *packed, int n, const float *bias,
                    float *y, int64_t ys, int num_threads) {
    const int panels = (n + 15) / 16;
    const int groups = (panels + GEMM_F32_PANELS - 1) / GEMM_F32_PANELS;
    const size_t panel_stride = (size_t)k * 16;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int g = 0; g < groups; g++) {
        const int p0 = g * GEMM_F32_PANELS;
        const int npan = panels - p0 < GEMM_F32_PANELS ? panels - p0 : GEMM_F32_PANELS;
        const int tail = n - 16 * (p0 + npan - 1);
        const int last_cols = tail > 16 ? 16 : tail;
        const float *w = packed + (size_t)p0 * panel_stride;
        const float *b = bias == NULL ? NULL : bias + 16 * p0;
        gemm_f32_group(m, npan, x, xs, k, w, panel_stride, b, y + 16 * p0, ys, last_cols);
    }
    return 0;
}
#else
int llmctl_has_gemm_f32(void) { return 0; }

int llmctl_gemm_f32(const float *x, int64_t xs, int m, int k, const float *packed, int n, const float *bias,
                    float *y, int64_t ys, int num_threads) {
    (void)x, (void)xs, (void)m, (void)k, (void)packed, (void)n, (void)bias, (void)y, (void)ys, (void)num_threads;
    return -1;
}
#endif
