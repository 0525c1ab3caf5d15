/* Quantized linear layers for the CPU plugin (built like kernels.c: host compiler, -march=native, ctypes).
 *
 * - int8 W8A8: activations quantized per row (symmetric, amax / 127, round half to even: torch.round's rule) and
 *   multiplied with int8 weights packed once into 16-column panels of k quads, the layout of AVX512-VNNI's
 *   vpdpbusd (u8 x s8 -> s32). The activations are offset by +128 to be unsigned; each column's weight sum times
 *   128 is subtracted afterwards, so the int32 sums are exact and the result equals core's reference bit for bit
 *   (same float ops in the same order: (float)acc * x_scale * w_scale + bias).
 * - int4 / int8 weight-only: the weights stream as stored (core's int4 layout: element 2j in the low nibble of
 *   byte j; int8 as is) with float32 group scales and mins; each group's dot product with the activations is
 *   accumulated in float32 and scaled once per group, so a decode step reads a third of bf16's bytes. AVX2 builds
 *   (no AVX-512) repack them into 16-column panels instead (llmctl_gemm_wq_panels, below).
 *
 * All entry points take float32 activations [M, K] and write float32 [M, N]; the Python side converts.
 * Columns are split between OpenMP threads and each output element is summed by one thread over its own row,
 * so a row's result does not depend on the batch. Scalar fallbacks keep every entry point correct on any host.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QK_AVX512 1
#endif
#if defined(QK_AVX512) && defined(__AVX512VNNI__)
#define QK_VNNI 1
#endif
/* AVX2 + FMA, which every AVX-512 host has too: the weight-only GEMMs run on 16-column panels (below), bf16 in and
 * out and called through the kernels library, so a decode step with them can be recorded and replayed; without
 * VNNI, W8A8 sums u8 x s8 pairs with vpmaddubsw. AVX-512 hosts once streamed core's layout with a float32 result
 * and a torch conversion after it, which kept every GGUF model's decode steps out of the replay there. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QK_AVX2 1
#endif
#if defined(QK_VNNI) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#include <sys/syscall.h>
#include <unistd.h>
#define QK_AMX 1
#endif

int llmctl_quant_has_vnni(void) {
#ifdef QK_VNNI
    return 1;
#else
    return 0;
#endif
}

int llmctl_quant_has_avx2(void) {
#ifdef QK_AVX2
    return 1;
#else
    return 0;
#endif
}

int llmctl_quant_has_avx512(void) {
#ifdef QK_AVX512
    return 1;
#else
    return 0;
#endif
}

/* ---- AMX (Sapphire Rapids and later) ------------------------------------------------------------------------ */

static int amx_on = 0;

/* Linux hands the 8 KB of tile state only to a process that asks (once; then every thread may use it). Returns
 * whether the AMX path of the W8A8 GEMM is on after the call. */
int llmctl_quant_use_amx(int on) {
#ifdef QK_AMX
    static int permitted = -1;
    if (permitted < 0) permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    amx_on = on && permitted;
#else
    (void)on;
    amx_on = 0;
#endif
    return amx_on;
}

/* ---- int8 W8A8 ---------------------------------------------------------------------------------------------- */

/* w: int8 [n, k] row-major. panels: int8 [ceil(n/16)][kq = ceil(k/4)][16][4], zero padded; colsum: int32 [16 *
 * ceil(n/16)] (sum over k of each column, for the +128 offset of the activations). */
void llmctl_pack_int8_panels(const int8_t *w, int64_t n, int64_t k, int8_t *panels, int32_t *colsum) {
    int64_t np = (n + 15) / 16, kq = (k + 3) / 4;
    memset(panels, 0, (size_t)(np * kq * 64));
    memset(colsum, 0, (size_t)(np * 16) * sizeof(int32_t));
    for (int64_t col = 0; col < n; col++) {
        int64_t p = col / 16, c = col % 16;
        int32_t s = 0;
        for (int64_t kk = 0; kk < k; kk++) {
            int8_t v = w[col * k + kk];
            panels[((p * kq + kk / 4) * 16 + c) * 4 + kk % 4] = v;
            s += v;
        }
        colsum[col] = s;
    }
}

/* One row's dynamic quantization: xq (uint8, value + 128) [kq * 4] zero padded (+128 = 128 there, compensated:
 * padded weights are 0), returns the scale. */
static float quantize_row_u8(const float *x, int64_t k, int64_t kq, uint8_t *xq) {
    float amax = 0.0f;
    int64_t i0 = 0;
#ifdef QK_AVX512
    /* the same IEEE division and round-half-to-even as the scalar loop, 16 lanes at a time: identical bytes */
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 mk = k - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - i)) - 1);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, x + i)));
    }
    amax = _mm512_reduce_max_ps(vmax);
    const float vscale_f = amax > 0.0f ? amax / 127.0f : 1.0f;
    const __m512 vscale = _mm512_set1_ps(vscale_f), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (; i0 + 16 <= k; i0 += 16) {
        __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i0), vscale),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
        __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128));
        _mm_storeu_si128((__m128i *)(xq + i0), _mm512_cvtepi32_epi8(v));
    }
#else
    for (int64_t i = 0; i < k; i++) {
        float a = fabsf(x[i]);
        if (a > amax) amax = a;
    }
#endif
    float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    for (int64_t i = i0; i < k; i++) {
        float q = nearbyintf(x[i] / scale);  /* default rounding mode: half to even, as torch.round */
        if (q > 127.0f) q = 127.0f;
        if (q < -127.0f) q = -127.0f;
        xq[i] = (uint8_t)((int)q + 128);
    }
    for (int64_t i = k; i < kq * 4; i++) xq[i] = 128;
    return scale;
}

/* The epilogue of 1..4 rows x 16 columns of exact int32 sums: the reference's float ops in its order. */
static void w8a8_epilogue(const int32_t (*acc)[16], int rows, int64_t r0, int64_t p, const int32_t *colsum,
                          const float *xs, const float *ws, const float *bias, int64_t n, float *y) {
    for (int rr = 0; rr < rows; rr++) {
        float *yr = y + (r0 + rr) * n;
        for (int c = 0; c < 16; c++) {
            int64_t col = p * 16 + c;
            if (col >= n) break;
            int32_t exact = acc[rr][c] - 128 * colsum[col];
            float v = (float)exact * xs[r0 + rr] * ws[col];
            yr[col] = bias ? v + bias[col] : v;
        }
    }
}

#ifdef QK_AMX
/* Rows in blocks of 16 (the A tile), four panels at a time (four C tiles), k in 64-byte steps: a panel's 16
 * consecutive k quads are exactly an AMX B tile (16 rows of 16 columns x 4 bytes), so the VNNI panels feed the
 * tiles as they are. The k quads past the last whole tile are added with VNNI to the stored sums. The sums are
 * exact integers either way, so the result equals the VNNI path's and the reference's bit for bit. */
#define AMX_MIN_ROWS 16
#define AMX_PANELS 4

struct quant_amx_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static void w8a8_amx(const uint8_t *xq, int64_t m, int64_t kq, const int8_t *panels, const int32_t *colsum,
                     const float *xs, const float *ws, const float *bias, int64_t n, float *y) {
    const int64_t np = (n + 15) / 16, mb = (m + 15) / 16, pg = (np + AMX_PANELS - 1) / AMX_PANELS;
    const int64_t kt = kq / 16 * 16, stride = kq * 4;
    #pragma omp parallel
    {
        struct quant_amx_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int t = 0; t < 8; t++) {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        _tile_loadconfig(&cfg);
        int32_t acc[AMX_PANELS][16][16];
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < mb * pg; task++) {
            const int64_t b = task / pg, p0 = (task % pg) * AMX_PANELS;
            const int np_here = (int)(np - p0 < AMX_PANELS ? np - p0 : AMX_PANELS);
            const uint8_t *xa = xq + b * 16 * stride;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t q = 0; q < kt; q += 16) {
                _tile_loadd(4, xa + q * 4, stride);
                const int8_t *wb = panels + p0 * kq * 64 + q * 64;
                _tile_loadd(5, wb, 64);
                _tile_dpbusd(0, 4, 5);
                if (np_here > 1) {
                    _tile_loadd(6, wb + kq * 64, 64);
                    _tile_dpbusd(1, 4, 6);
                }
                if (np_here > 2) {
                    _tile_loadd(7, wb + 2 * kq * 64, 64);
                    _tile_dpbusd(2, 4, 7);
                }
                if (np_here > 3) {
                    _tile_loadd(5, wb + 3 * kq * 64, 64);
                    _tile_dpbusd(3, 4, 5);
                }
            }
            _tile_stored(0, acc[0], 64);
            if (np_here > 1) _tile_stored(1, acc[1], 64);
            if (np_here > 2) _tile_stored(2, acc[2], 64);
            if (np_here > 3) _tile_stored(3, acc[3], 64);
            const int rows = (int)(m - b * 16 < 16 ? m - b * 16 : 16);
            for (int j = 0; j < np_here; j++) {
                const int8_t *wp = panels + (p0 + j) * kq * 64;
                for (int r = 0; r < rows; r++) {
                    if (kt < kq) {
                        __m512i a = _mm512_loadu_si512((const void *)acc[j][r]);
                        const uint8_t *xr = xa + r * stride;
                        for (int64_t q = kt; q < kq; q++)
                            a = _mm512_dpbusd_epi32(a, _mm512_set1_epi32(*(const int32_t *)(xr + q * 4)),
                                                    _mm512_loadu_si512((const void *)(wp + q * 64)));
                        _mm512_storeu_si512((void *)acc[j][r], a);
                    }
                }
                for (int r = 0; r < rows; r += 4)
                    w8a8_epilogue((const int32_t (*)[16])acc[j][r], rows - r < 4 ? rows - r : 4, b * 16 + r, p0 + j,
                                  colsum, xs, ws, bias, n, y);
            }
        }
        _tile_release();
    }
}
#endif

/* y[m, n] = (sum_k xq * w) * xs[m] * ws[n] + bias[n]. ws, bias: float32 [n] (bias may be NULL). */
int llmctl_gemm_w8a8(const float *x, int64_t m, int64_t k, const int8_t *panels, const int32_t *colsum,
                     const float *ws, const float *bias, int64_t n, float *y) {
    int64_t np = (n + 15) / 16, kq = (k + 3) / 4;
    int64_t mq = (m + 15) / 16 * 16; /* the AMX path reads whole 16-row A tiles: the rows past m are zeros */
    uint8_t *xq = (uint8_t *)aligned_alloc(64, (size_t)(((mq * kq * 4) + 63) / 64 * 64));
    float *xs = (float *)malloc((size_t)m * sizeof(float));
    if (!xq || !xs) { free(xq); free(xs); return -1; }
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < m; r++) xs[r] = quantize_row_u8(x + r * k, k, kq, xq + r * kq * 4);
#ifdef QK_AMX
    if (amx_on && m >= AMX_MIN_ROWS && kq >= 16) {
        memset(xq + m * kq * 4, 0, (size_t)((mq - m) * kq * 4));
        w8a8_amx(xq, m, kq, panels, colsum, xs, ws, bias, n, y);
        free(xq);
        free(xs);
        return 0;
    }
#endif
    #pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < np; p++) {
        const int8_t *wp = panels + p * kq * 64;
        int32_t acc[4][16];
        for (int64_t r0 = 0; r0 < m; r0 += 4) {
            int rows = (int)(m - r0 < 4 ? m - r0 : 4);
#ifdef QK_VNNI
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            const uint8_t *x0 = xq + r0 * kq * 4;
            for (int64_t q = 0; q < kq; q++) {
                __m512i b = _mm512_loadu_si512((const void *)(wp + q * 64));
                a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(*(const int32_t *)(x0 + q * 4)), b);
                if (rows > 1) a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(*(const int32_t *)(x0 + kq * 4 + q * 4)), b);
                if (rows > 2) a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32(*(const int32_t *)(x0 + 2 * kq * 4 + q * 4)), b);
                if (rows > 3) a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32(*(const int32_t *)(x0 + 3 * kq * 4 + q * 4)), b);
            }
            _mm512_storeu_si512((void *)acc[0], a0);
            _mm512_storeu_si512((void *)acc[1], a1);
            _mm512_storeu_si512((void *)acc[2], a2);
            _mm512_storeu_si512((void *)acc[3], a3);
#elif defined(QK_AVX2)
            /* Without VNNI: vpmaddubsw multiplies u8 x s8 and adds pairs into int16, which the +128 offset would
             * overflow (255 * 127 * 2). So the signed activations (xq - 128, in [-127, 127]) carry the weights'
             * signs and the weights' magnitudes (|w| <= 128, unsigned) the other operand: |w| * (+-x) pairs stay
             * within 2 * 128 * 127 < 32767, exact. The offset's 128 * colsum is added back for the shared epilogue. */
            __m256i a[4][2];
            for (int rr = 0; rr < 4; rr++) a[rr][0] = a[rr][1] = _mm256_setzero_si256();
            const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
            const uint8_t *x0 = xq + r0 * kq * 4;
            for (int64_t q = 0; q < kq; q++) {
                const __m256i b0 = _mm256_loadu_si256((const __m256i *)(wp + q * 64));
                const __m256i b1 = _mm256_loadu_si256((const __m256i *)(wp + q * 64 + 32));
                const __m256i u0 = _mm256_abs_epi8(b0), u1 = _mm256_abs_epi8(b1);
                for (int rr = 0; rr < rows; rr++) {
                    const __m256i xs = _mm256_xor_si256(
                        _mm256_set1_epi32(*(const int32_t *)(x0 + rr * kq * 4 + q * 4)), flip);
                    a[rr][0] = _mm256_add_epi32(a[rr][0],
                                                _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(xs, b0)), ones));
                    a[rr][1] = _mm256_add_epi32(a[rr][1],
                                                _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(xs, b1)), ones));
                }
            }
            const __m256i c0 = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(colsum + p * 16)), 7);
            const __m256i c1 = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(colsum + p * 16 + 8)), 7);
            for (int rr = 0; rr < rows; rr++) {
                _mm256_storeu_si256((__m256i *)acc[rr], _mm256_add_epi32(a[rr][0], c0));
                _mm256_storeu_si256((__m256i *)(acc[rr] + 8), _mm256_add_epi32(a[rr][1], c1));
            }
#else
            for (int rr = 0; rr < rows; rr++) {
                const uint8_t *xr = xq + (r0 + rr) * kq * 4;
                for (int c = 0; c < 16; c++) {
                    int32_t s = 0;
                    for (int64_t q = 0; q < kq; q++)
                        for (int j = 0; j < 4; j++) s += (int32_t)xr[q * 4 + j] * (int32_t)wp[(q * 16 + c) * 4 + j];
                    acc[rr][c] = s;
                }
            }
#endif
            w8a8_epilogue((const int32_t (*)[16])acc, rows, r0, p, colsum, xs, ws, bias, n, y);
        }
    }
    free(xq);
    free(xs);
    return 0;
}

/* ---- weight-only int4 / int8 with group scales and mins --------------------------------------------------------- */

/* x f32 [m, k] -> xd f32 [m, k]: within each 32-chunk the even elements, then the odd ones (the order in which a
 * 16-byte nibble chunk unpacks: low nibbles are the even elements). */
static void deinterleave32(const float *x, int64_t m, int64_t k, float *xd) {
    for (int64_t r = 0; r < m; r++)
        for (int64_t c = 0; c < k; c += 32)
            for (int j = 0; j < 16; j++) {
                xd[r * k + c + j] = x[r * k + c + 2 * j];
                xd[r * k + c + 16 + j] = x[r * k + c + 2 * j + 1];
            }
}

/* y[m, n] = sum_g scales[n, g] * (x_g . q_g) + mins[n, g] * sum(x_g) + bias[n]. bits 4: qw uint8 [n, k / 2];
 * bits 8: int8 [n, k]. group % 32 == 0 and k % group == 0; mins may be NULL (int8 only). */
int llmctl_gemm_wq(const float *x, int64_t m, int64_t k, const void *qw, int bits, const float *scales,
                   const float *mins, int64_t group, const float *bias, int64_t n, float *y) {
    /* groups of 32 (or a multiple), and for int8 also of 16 (Q6_K): a 32-wide chunk then holds two groups */
    if ((group % 32 && !(bits == 8 && group == 16)) || k % group || (bits != 4 && bits != 8)) return -2;
    int64_t ng = k / group;
    float *xd = (float *)aligned_alloc(64, (size_t)((m * k * 4 + 63) / 64 * 64));
    float *xsum = (float *)malloc((size_t)(m * ng) * sizeof(float));
    if (!xd || !xsum) { free(xd); free(xsum); return -1; }
    if (bits == 4) deinterleave32(x, m, k, xd); else memcpy(xd, x, (size_t)(m * k) * sizeof(float));
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < ng; g++) {
            float s = 0.0f;
            for (int64_t i = 0; i < group; i++) s += x[r * k + g * group + i];
            xsum[r * ng + g] = s;
        }
    #pragma omp parallel for schedule(static)
    for (int64_t col = 0; col < n; col++) {
        const float *sc = scales + col * ng;
        const float *mn = mins ? mins + col * ng : NULL;
        for (int64_t r0 = 0; r0 < m; r0 += 4) {
            int rows = (int)(m - r0 < 4 ? m - r0 : 4);
            float out[4] = {0, 0, 0, 0};
#ifdef QK_AVX512
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            if (group == 16) { /* int8 only: each 32-wide chunk is two groups, each scaled on its own */
                for (int64_t c = 0; c < k; c += 32) {
                    const int8_t *src = (const int8_t *)qw + col * k + c;
                    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)src)));
                    const __m512 w1 = _mm512_cvtepi32_ps(
                        _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + 16))));
                    const __m512 s0 = _mm512_set1_ps(sc[c / 16]), s1 = _mm512_set1_ps(sc[c / 16 + 1]);
                    for (int rr = 0; rr < rows; rr++) {
                        const float *xr = xd + (r0 + rr) * k + c;
                        acc[rr] = _mm512_fmadd_ps(_mm512_mul_ps(w0, _mm512_loadu_ps(xr)), s0, acc[rr]);
                        acc[rr] = _mm512_fmadd_ps(_mm512_mul_ps(w1, _mm512_loadu_ps(xr + 16)), s1, acc[rr]);
                    }
                }
            }
            for (int64_t g = 0; g < ng && group != 16; g++) {
                __m512 part[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
                    __m512 w0, w1;
                    if (bits == 4) {
                        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)qw + col * (k / 2) + c / 2)));
                        w0 = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
                        w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
                    } else {
                        const int8_t *src = (const int8_t *)qw + col * k + c;
                        w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)src)));
                        w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + 16))));
                    }
                    for (int rr = 0; rr < rows; rr++) {
                        const float *xr = xd + (r0 + rr) * k + c;
                        part[rr] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), part[rr]);
                        part[rr] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), part[rr]);
                    }
                }
                __m512 s = _mm512_set1_ps(sc[g]);
                for (int rr = 0; rr < rows; rr++) acc[rr] = _mm512_fmadd_ps(part[rr], s, acc[rr]);
            }
            for (int rr = 0; rr < rows; rr++) out[rr] = _mm512_reduce_add_ps(acc[rr]);
#else
            for (int rr = 0; rr < rows; rr++) {
                const float *xr = x + (r0 + rr) * k;
                float total = 0.0f;
                for (int64_t g = 0; g < ng; g++) {
                    float part = 0.0f;
                    for (int64_t i = g * group; i < (g + 1) * group; i++) {
                        float q;
                        if (bits == 4) {
                            uint8_t byte = ((const uint8_t *)qw)[col * (k / 2) + i / 2];
                            q = (float)((i & 1) ? (byte >> 4) : (byte & 15));
                        } else {
                            q = (float)((const int8_t *)qw)[col * k + i];
                        }
                        part += q * xr[i];
                    }
                    total += part * sc[g];
                }
                out[rr] = total;
            }
#endif
            for (int rr = 0; rr < rows; rr++) {
                float v = out[rr];
                if (mn)
                    for (int64_t g = 0; g < ng; g++) v += mn[g] * xsum[(r0 + rr) * ng + g];
                if (bias) v += bias[col];
                y[(r0 + rr) * n + col] = v;
            }
        }
    }
    free(xd);
    free(xsum);
    return 0;
}

/* ---- weight-only int4 / int8 on 16-column panels (AVX2 + FMA builds) ------------------------------------------- */

/* Why panels: without AVX-512 a column-at-a-time dot product spends more on horizontal sums and on converting each
 * weight per 4-row block than on the FMAs. Here 16 columns' weights at one k sit in 16 consecutive bytes (int4: byte c
 * of k pair t holds column c's elements 2t (low nibble) and 2t+1 (high), exactly core's byte t of that row), so two
 * widening loads and a few conversions give the integer weights of 16 columns as float vectors, which every row of
 * the block broadcasts its x[k] against.
 *
 * Why per-group sums: a group's scale and min are common to its weights, so the kernel sums q * x over the group on
 * the stored integers and applies them once per group, y = sum_g (s_g * sum_k q x + m_g * sum_k x): one FMA per
 * weight instead of a dequantizing FMA and a product. Up to 4 rows convert in registers; more rows convert the panel
 * once into a buffer and run 6-row tiles over it. Both paths perform the same float operations in the same order for
 * each output element (part = fma(q, x, part) from 0 with k ascending inside a group; acc = fma(part, s_g, acc), then
 * acc = fma(m_g, xsum_g, acc), groups ascending; xsum_g summed per row in index order), so a row's result does not
 * depend on the batch it is in.
 *
 * qp: bits 4: uint8 [np][k / 2][16]; bits 8: int8 [np][k][16]. sp, mp: float32 [np][ng][16] (mins 0 where the
 * format has none). Columns past n are zero. */
void llmctl_pack_wq_panels(const void *qw, int bits, int64_t n, int64_t k, const float *scales, const float *mins,
                           int64_t group, void *qp, float *sp, float *mp) {
    const int64_t np = (n + 15) / 16, ng = k / group, kb = bits == 4 ? k / 2 : k;
    memset(qp, 0, (size_t)(np * kb * 16));
    memset(sp, 0, (size_t)(np * ng * 16) * sizeof(float));
    memset(mp, 0, (size_t)(np * ng * 16) * sizeof(float));
    for (int64_t col = 0; col < n; col++) {
        const int64_t p = col / 16, c = col % 16;
        const uint8_t *src = (const uint8_t *)qw + col * kb;
        uint8_t *dst = (uint8_t *)qp + p * kb * 16 + c;
        for (int64_t t = 0; t < kb; t++) dst[t * 16] = src[t];
        for (int64_t g = 0; g < ng; g++) {
            sp[(p * ng + g) * 16 + c] = scales[col * ng + g];
            if (mins) mp[(p * ng + g) * 16 + c] = mins[col * ng + g];
        }
    }
}

#ifdef QK_AVX2
/* Columns 0-7 and 8-15 of one k's int8 weights as floats (two widening loads, no shuffle of a loaded vector). */
static inline __attribute__((always_inline)) void cvt8_k(const int8_t *b16, __m256 *w) {
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b16)));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b16 + 8))));
}

/* One k pair of int4 weights: w[0..1] the even k's columns 0-7 / 8-15 (low nibbles), w[2..3] the odd k's. */
static inline __attribute__((always_inline)) void cvt4_pair(const uint8_t *b16, __m256 *w) {
    const __m256i low4 = _mm256_set1_epi32(15);
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b16));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b16 + 8)));
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low4));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low4));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
}

/* part[r][h] += w[h] * x[r][kk] for the tile's R rows (R a compile-time constant after inlining). */
#define PANEL_FMA(R, xk, w0, w1)                                                                                   \
    for (int r = 0; r < (R); r++) {                                                                                \
        const __m256 xb = _mm256_broadcast_ss((xk) + r * k);                                                       \
        part[r][0] = _mm256_fmadd_ps((w0), xb, part[r][0]);                                                        \
        part[r][1] = _mm256_fmadd_ps((w1), xb, part[r][1]);                                                        \
    }

/* acc = fma(part, s_g, acc); acc = fma(m_g, xsum_g, acc) for the tile's rows: the end of group g. */
#define GROUP_END(R, acc, g)                                                                                       \
    do {                                                                                                           \
        const __m256 s0 = _mm256_loadu_ps(spp + (g) * 16), s1 = _mm256_loadu_ps(spp + (g) * 16 + 8);               \
        const __m256 m0 = _mm256_loadu_ps(mpp + (g) * 16), m1 = _mm256_loadu_ps(mpp + (g) * 16 + 8);               \
        for (int r = 0; r < (R); r++) {                                                                            \
            const __m256 xs = _mm256_broadcast_ss(xsum + (r0 + r) * ng + (g));                                    \
            acc[r][0] = _mm256_fmadd_ps(m0, xs, _mm256_fmadd_ps(part[r][0], s0, acc[r][0]));                      \
            acc[r][1] = _mm256_fmadd_ps(m1, xs, _mm256_fmadd_ps(part[r][1], s1, acc[r][1]));                      \
        }                                                                                                          \
    } while (0)

static inline __attribute__((always_inline)) void panel_store(int R, __m256 (*acc)[2], int64_t r0, int64_t p,
                                                              const float *bias, int64_t n, float *y) {
    float out[16];
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(out, acc[r][0]);
        _mm256_storeu_ps(out + 8, acc[r][1]);
        float *yr = y + (r0 + r) * n;
        for (int c = 0; c < 16 && p * 16 + c < n; c++) yr[p * 16 + c] = bias ? out[c] + bias[p * 16 + c] : out[c];
    }
}

/* R <= 4 rows, weights converted in registers. */
static inline __attribute__((always_inline)) void panel_direct(const int R, const float *x, int64_t k,
                                                               const void *qpp, int bits, const float *spp,
                                                               const float *mpp, const float *xsum, int64_t group,
                                                               int64_t r0, int64_t p, const float *bias, int64_t n,
                                                               float *y) {
    const int64_t ng = k / group;
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float *xr = x + r0 * k;
    for (int64_t g = 0; g < ng; g++) {
        __m256 part[4][2];
        for (int r = 0; r < 4; r++) part[r][0] = part[r][1] = _mm256_setzero_ps();
        if (bits == 4) {
            for (int64_t kk = g * group; kk < (g + 1) * group; kk += 2) {
                __m256 w[4];
                cvt4_pair((const uint8_t *)qpp + kk / 2 * 16, w);
                PANEL_FMA(R, xr + kk, w[0], w[1]);
                PANEL_FMA(R, xr + kk + 1, w[2], w[3]);
            }
        } else {
            for (int64_t kk = g * group; kk < (g + 1) * group; kk++) {
                __m256 w[2];
                cvt8_k((const int8_t *)qpp + kk * 16, w);
                PANEL_FMA(R, xr + kk, w[0], w[1]);
            }
        }
        GROUP_END(R, acc, g);
    }
    panel_store(R, acc, r0, p, bias, n, y);
}

/* R <= 6 rows over a panel already converted into buf [k][16] (the integer weights as floats); the running sums
 * live in memory (touched once per group) so the 6 x 2 group sums, a weight pair and x fit the 16 registers. */
static inline __attribute__((always_inline)) void panel_buffered(const int R, const float *x, int64_t k,
                                                                 const float *buf, const float *spp,
                                                                 const float *mpp, const float *xsum, int64_t group,
                                                                 int64_t r0, int64_t p, const float *bias, int64_t n,
                                                                 float *y) {
    const int64_t ng = k / group;
    __m256 acc[6][2];
    for (int r = 0; r < 6; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float *xr = x + r0 * k;
    for (int64_t g = 0; g < ng; g++) {
        __m256 part[6][2];
        for (int r = 0; r < 6; r++) part[r][0] = part[r][1] = _mm256_setzero_ps();
        for (int64_t kk = g * group; kk < (g + 1) * group; kk++) {
            const __m256 w0 = _mm256_load_ps(buf + kk * 16), w1 = _mm256_load_ps(buf + kk * 16 + 8);
            PANEL_FMA(R, xr + kk, w0, w1);
        }
        GROUP_END(R, acc, g);
    }
    panel_store(R, acc, r0, p, bias, n, y);
}
#undef PANEL_FMA
#undef GROUP_END

#ifdef QK_AVX512
/* panel_direct on AVX-512: a panel's 16 columns in one vector, so one conversion and one FMA per weight and row
 * where the 8-lane version takes two. Every lane does what its 8-lane counterpart does, in the same order (the
 * same group sums, scales and mins), so the results are the same bits, half the instructions: a one-stream decode
 * step of a GGUF model is mostly this loop. */
static inline __attribute__((always_inline)) void panel_direct16(const int R, const float *x, int64_t k,
                                                                 const void *qpp, int bits, const float *spp,
                                                                 const float *mpp, const float *xsum, int64_t group,
                                                                 int64_t r0, int64_t p, const float *bias, int64_t n,
                                                                 float *y) {
    const int64_t ng = k / group;
    const __m512i low4 = _mm512_set1_epi32(15);
    __m512 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    const float *xr = x + r0 * k;
    for (int64_t g = 0; g < ng; g++) {
        __m512 part[4];
        for (int r = 0; r < 4; r++) part[r] = _mm512_setzero_ps();
        if (bits == 4) {
            for (int64_t kk = g * group; kk < (g + 1) * group; kk += 2) { /* byte c: column c, k even low, odd high */
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)qpp + kk / 2 * 16)));
                const __m512 we = _mm512_cvtepi32_ps(_mm512_and_si512(b, low4));
                const __m512 wo = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
                for (int r = 0; r < R; r++) part[r] = _mm512_fmadd_ps(we, _mm512_set1_ps(xr[r * k + kk]), part[r]);
                for (int r = 0; r < R; r++) part[r] = _mm512_fmadd_ps(wo, _mm512_set1_ps(xr[r * k + kk + 1]), part[r]);
            }
        } else {
            for (int64_t kk = g * group; kk < (g + 1) * group; kk++) {
                const __m512 w = _mm512_cvtepi32_ps(
                    _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)qpp + kk * 16))));
                for (int r = 0; r < R; r++) part[r] = _mm512_fmadd_ps(w, _mm512_set1_ps(xr[r * k + kk]), part[r]);
            }
        }
        const __m512 sg = _mm512_loadu_ps(spp + g * 16), mg = _mm512_loadu_ps(mpp + g * 16);
        for (int r = 0; r < R; r++) {
            const __m512 xs = _mm512_set1_ps(xsum[(r0 + r) * ng + g]);
            acc[r] = _mm512_fmadd_ps(mg, xs, _mm512_fmadd_ps(part[r], sg, acc[r]));
        }
    }
    const int64_t cols = n - p * 16 < 16 ? n - p * 16 : 16;
    const __mmask16 keep = (__mmask16)((1u << cols) - 1);
    for (int r = 0; r < R; r++) {
        __m512 out = acc[r];
        if (bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(keep, bias + p * 16));
        _mm512_mask_storeu_ps(y + (r0 + r) * n + p * 16, keep, out);
    }
}
#define PANEL_DIRECT panel_direct16
#else
#define PANEL_DIRECT panel_direct
#endif
#endif

/* y[m, n] = x @ dequant(panels).T + bias, as llmctl_gemm_wq. group even (int4) and k % group == 0. Returns -3 where
 * this build has no panel path (the caller keeps core's layout and llmctl_gemm_wq there). */
int llmctl_gemm_wq_panels(const float *x, int64_t m, int64_t k, const void *qp, int bits, const float *sp,
                          const float *mp, int64_t group, const float *bias, int64_t n, float *y) {
#ifndef QK_AVX2
    (void)x; (void)m; (void)k; (void)qp; (void)bits; (void)sp; (void)mp; (void)group; (void)bias; (void)n; (void)y;
    return -3;
#else
    if ((bits != 4 && bits != 8) || group <= 0 || k % group || (bits == 4 && group % 2)) return -2;
    const int64_t np = (n + 15) / 16, ng = k / group, kb = bits == 4 ? k / 2 : k;
    const int buffered = m > 4;
    /* each row's group sums of x, for the mins: in index order, once per call */
    float *xsum = (float *)malloc((size_t)(m * ng) * sizeof(float));
    if (!xsum) return -1;
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < ng; g++) {
            float s = 0.0f;
            for (int64_t i = g * group; i < (g + 1) * group; i++) s += x[r * k + i];
            xsum[r * ng + g] = s;
        }
    int failed = 0;
    #pragma omp parallel
    {
        float *buf = buffered ? (float *)aligned_alloc(64, (size_t)(k * 16) * sizeof(float)) : NULL;
        if (buffered && !buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < np; p++) {
            const void *qpp = (const uint8_t *)qp + p * kb * 16;
            const float *spp = sp + p * ng * 16, *mpp = mp + p * ng * 16;
            if (!buffered) {
                switch (m) {
                    case 1: PANEL_DIRECT(1, x, k, qpp, bits, spp, mpp, xsum, group, 0, p, bias, n, y); break;
                    case 2: PANEL_DIRECT(2, x, k, qpp, bits, spp, mpp, xsum, group, 0, p, bias, n, y); break;
                    case 3: PANEL_DIRECT(3, x, k, qpp, bits, spp, mpp, xsum, group, 0, p, bias, n, y); break;
                    default: PANEL_DIRECT(4, x, k, qpp, bits, spp, mpp, xsum, group, 0, p, bias, n, y); break;
                }
                continue;
            }
            if (!buf) continue;
            if (bits == 4) {
                for (int64_t kk = 0; kk < k; kk += 2) {
                    __m256 w[4];
                    cvt4_pair((const uint8_t *)qpp + kk / 2 * 16, w);
                    _mm256_store_ps(buf + kk * 16, w[0]);
                    _mm256_store_ps(buf + kk * 16 + 8, w[1]);
                    _mm256_store_ps(buf + kk * 16 + 16, w[2]);
                    _mm256_store_ps(buf + kk * 16 + 24, w[3]);
                }
            } else {
                for (int64_t kk = 0; kk < k; kk++) {
                    __m256 w[2];
                    cvt8_k((const int8_t *)qpp + kk * 16, w);
                    _mm256_store_ps(buf + kk * 16, w[0]);
                    _mm256_store_ps(buf + kk * 16 + 8, w[1]);
                }
            }
            int64_t r0 = 0;
            for (; r0 + 6 <= m; r0 += 6) panel_buffered(6, x, k, buf, spp, mpp, xsum, group, r0, p, bias, n, y);
            switch (m - r0) {
                case 1: panel_buffered(1, x, k, buf, spp, mpp, xsum, group, r0, p, bias, n, y); break;
                case 2: panel_buffered(2, x, k, buf, spp, mpp, xsum, group, r0, p, bias, n, y); break;
                case 3: panel_buffered(3, x, k, buf, spp, mpp, xsum, group, r0, p, bias, n, y); break;
                case 4: panel_buffered(4, x, k, buf, spp, mpp, xsum, group, r0, p, bias, n, y); break;
                case 5: panel_buffered(5, x, k, buf, spp, mpp, xsum, group, r0, p, bias, n, y); break;
                default: break;
            }
        }
        free(buf);
    }
    free(xsum);
    return failed ? -1 : 0;
#endif
}

typedef int (*wq_gemm_fn)(const float *, int64_t, int64_t, const void *, int, const float *, const float *, int64_t,
                          const float *, int64_t, float *);

/* bf16 rows in, bf16 result out (raw bits) around a float32 weight-only GEMM: the rows are widened to float32
 * (exact), the float32 kernel runs, and its result (bias added) is rounded to bf16 to nearest even, as torch's
 * conversions around the float32 call would do: the same bits, without the two torch ops, so that a bf16 decode
 * step with these layers stays recordable (llmctl_cpu.graph). */
static int wq_bf16_around(wq_gemm_fn fn, const uint16_t *x, int64_t m, int64_t k, const void *qp, int bits,
                          const float *sp, const float *mp, int64_t group, const float *bias, int64_t n, uint16_t *y) {
    float *xf = (float *)malloc((size_t)(m * k + m * n) * sizeof(float));
    if (!xf) return -1;
    float *yf = xf + m * k;
    for (int64_t i = 0; i < m * k; i++) {
        const uint32_t u = (uint32_t)x[i] << 16;
        memcpy(xf + i, &u, 4);
    }
    const int rc = fn(xf, m, k, qp, bits, sp, mp, group, bias, n, yf);
    if (rc == 0)
        for (int64_t i = 0; i < m * n; i++) {
            uint32_t u;
            memcpy(&u, yf + i, 4);
            y[i] = isnan(yf[i]) ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    free(xf);
    return rc;
}

/* As llmctl_gemm_wq_panels for bf16 activations and a bf16 result (raw bits): see wq_bf16_around. */
int llmctl_gemm_wq_panels_bf16(const uint16_t *x, int64_t m, int64_t k, const void *qp, int bits, const float *sp,
                               const float *mp, int64_t group, const float *bias, int64_t n, uint16_t *y) {
    return wq_bf16_around(llmctl_gemm_wq_panels, x, m, k, qp, bits, sp, mp, group, bias, n, y);
}

/* ---- weight-only int4 / int8 groups x int8 activations in blocks of 32 (GGUF files, AVX2 builds) -------------- *
 *
 * What llama.cpp does for its Q4_0/Q4_1/Q8_0 x Q8_0/Q8_1 dot products: each activation row is quantized once per
 * call to int8 in blocks of 32 (d_b = amax_b / 127, q = x / d_b rounded half to even, clamped to +-127), and each
 * block's dot product with the stored integer weights is an exact int32 sum (vpmaddubsw + vpmaddwd), converted to
 * float once per block: about a quarter of the instructions of the float panels above, which widen every weight to
 * float and spend one FMA per weight and row. The result is not the weight-only reference's: the activations carry
 * int8 rounding (a relative error of about 1/254 of each block's largest element per element), as they do in
 * llama.cpp on the same file; so this path is chosen per layer at load (GGUF layers, llmctl_cpu.quant), never by the
 * row count.
 *
 * Per output element the float operations are, groups g ascending and each group's blocks b ascending:
 *   part = fma((float)isum_b, d_b, part) from 0;  acc = fma(part, s_g, acc);  acc = fma(m_g, xs_g, acc)
 * with xs_g = sum over the group's blocks of d_b * (float)sum(q_b) (in block order, once per row): the mins meet the
 * quantized activations' sums, as in llama.cpp's Q4_1 x Q8_1, so a weight's error terms cancel as in w . x_q. The
 * same operations for every row count and tile: a row's result does not depend on the batch it is in.
 *
 * Layout (llmctl_pack_wq_act8), per 16-column panel p and k quad t (4 consecutive k):
 *   bits 4: 32 bytes: byte 4c + j (c < 8, j < 4) holds column c's element 4t + j in its low nibble and column
 *           c + 8's in its high nibble: uint8 [np][k / 4][32] (the bytes of core's layout, rearranged);
 *   bits 8: 64 bytes: byte 4c + j (c < 16): column c's element 4t + j: int8 [np][k / 4][64].
 * sp, mp: float32 [np][ng][16] as the float panels'. k % 32 == 0 and group % 32 == 0. */
void llmctl_pack_wq_act8(const void *qw, int bits, int64_t n, int64_t k, const float *scales, const float *mins,
                         int64_t group, void *qp, float *sp, float *mp) {
    const int64_t np = (n + 15) / 16, ng = k / group, kq = k / 4, qb = bits == 4 ? 32 : 64;
    memset(qp, 0, (size_t)(np * kq * qb));
    memset(sp, 0, (size_t)(np * ng * 16) * sizeof(float));
    memset(mp, 0, (size_t)(np * ng * 16) * sizeof(float));
    for (int64_t col = 0; col < n; col++) {
        const int64_t p = col / 16, c = col % 16;
        uint8_t *dst = (uint8_t *)qp + p * kq * qb;
        for (int64_t kk = 0; kk < k; kk++) {
            const int64_t t = kk / 4, j = kk % 4;
            if (bits == 4) {
                const uint8_t byte = ((const uint8_t *)qw)[col * (k / 2) + kk / 2];
                const uint8_t q = (kk & 1) ? (byte >> 4) : (byte & 15);
                dst[t * 32 + (c % 8) * 4 + j] |= (uint8_t)(c < 8 ? q : q << 4);
            } else {
                dst[t * 64 + c * 4 + j] = ((const uint8_t *)qw)[col * k + kk];
            }
        }
        for (int64_t g = 0; g < ng; g++) {
            sp[(p * ng + g) * 16 + c] = scales[col * ng + g];
            if (mins) mp[(p * ng + g) * 16 + c] = mins[col * ng + g];
        }
    }
}

/* One row's int8 blocks of 32: xq [k], xd [k / 32] (d_b; 1 for an all-zero block), xs [k / 32] (d_b * sum q_b).
 * The vector and scalar loops perform the same IEEE operations (a division, round half to even, a clamp), so they
 * give the same bytes. */
static void quantize_row_q8_32(const float *x, int64_t k, int8_t *xq, float *xd, float *xs) {
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + b * 32;
        int8_t *qb = xq + b * 32;
        float amax = 0.0f;
#ifdef QK_AVX2
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xb + 8 * i);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        amax = _mm_cvtss_f32(m4);
        const float d = amax > 0.0f ? amax / 127.0f : 1.0f;
        const __m256 dv = _mm256_set1_ps(d), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
        __m256i q[4];
        for (int i = 0; i < 4; i++) {
            __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        }
        const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        const int32_t isum = _mm_cvtsi128_si32(s4);
        /* packs interleave the 128-bit lanes: the permute puts the 32 bytes back in index order */
        const __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)qb, _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
        for (int i = 0; i < 32; i++) {
            const float a = fabsf(xb[i]);
            if (a > amax) amax = a;
        }
        const float d = amax > 0.0f ? amax / 127.0f : 1.0f;
        int32_t isum = 0;
        for (int i = 0; i < 32; i++) {
            float q = nearbyintf(xb[i] / d);  /* default rounding mode: half to even */
            if (q > 127.0f) q = 127.0f;
            if (q < -127.0f) q = -127.0f;
            qb[i] = (int8_t)q;
            isum += (int32_t)q;
        }
#endif
        xd[b] = d;
        xs[b] = d * (float)isum;
    }
}

int llmctl_quant_row_q8_32(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd, float *xs) {
    if (k % 32) return -2;
    for (int64_t r = 0; r < m; r++) quantize_row_q8_32(x + r * k, k, xq + r * k, xd + r * (k / 32), xs + r * (k / 32));
    return 0;
}

#ifdef QK_AVX2
/* Eight group scales (or mins) from float32 panels, or from fp16 ones (F16C; exact: chosen only where every value
 * converts back unchanged). */
static inline __attribute__((always_inline)) __m256 load8_scales(const void *base, int64_t i, int half) {
#ifdef __F16C__
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)));
#else
    (void)half;
#endif
    return _mm256_loadu_ps((const float *)base + i);
}

/* R <= 4 rows x one 16-column panel. bits 4: u4 weights x s8 activations with vpmaddubsw, whose int16 pair sums
 * (<= 2 * 15 * 127) are added over a block's eight quads (<= 30480, no overflow) before vpmaddwd widens them; bits
 * 8: s8 x s8 by the sign trick (|w| as the unsigned operand, x carrying w's sign: pairs <= 2 * 128 * 127), widened
 * every quad. */
static inline __attribute__((always_inline)) void act8_tile(const int R, const int bits, const int8_t *xq,
                                                            const float *xd, const float *xg, int64_t k,
                                                            const uint8_t *qpp, const void *spp, const void *mpp,
                                                            const int half, int64_t group, int64_t r0, int64_t p,
                                                            const float *bias, int64_t n, float *y) {
    const int64_t ng = k / group, nb = k / 32, bpg = group / 32;
    const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(15);
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const int8_t *x0 = xq + r0 * k;
    for (int64_t g = 0; g < ng; g++) {
        __m256 part[4][2];
        for (int r = 0; r < 4; r++) part[r][0] = part[r][1] = _mm256_setzero_ps();
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
            __m256i is[4][2];
            for (int r = 0; r < 4; r++) is[r][0] = is[r][1] = _mm256_setzero_si256();
            if (bits == 4) {
                for (int64_t t = b * 8; t < b * 8 + 8; t++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(qpp + t * 32));
                    const __m256i wl = _mm256_and_si256(v, low4);
                    const __m256i wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    for (int r = 0; r < R; r++) {
                        const __m256i xb = _mm256_set1_epi32(*(const int32_t *)(x0 + r * k + t * 4));
                        is[r][0] = _mm256_add_epi16(is[r][0], _mm256_maddubs_epi16(wl, xb));
                        is[r][1] = _mm256_add_epi16(is[r][1], _mm256_maddubs_epi16(wh, xb));
                    }
                }
                for (int r = 0; r < R; r++) {
                    is[r][0] = _mm256_madd_epi16(is[r][0], ones);
                    is[r][1] = _mm256_madd_epi16(is[r][1], ones);
                }
            } else {
                for (int64_t t = b * 8; t < b * 8 + 8; t++) {
                    const __m256i w0 = _mm256_loadu_si256((const __m256i *)(qpp + t * 64));
                    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(qpp + t * 64 + 32));
                    const __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
                    for (int r = 0; r < R; r++) {
                        const __m256i xb = _mm256_set1_epi32(*(const int32_t *)(x0 + r * k + t * 4));
                        is[r][0] = _mm256_add_epi32(is[r][0],
                                                    _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(xb, w0)), ones));
                        is[r][1] = _mm256_add_epi32(is[r][1],
                                                    _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(xb, w1)), ones));
                    }
                }
            }
            for (int r = 0; r < R; r++) {
                const __m256 d = _mm256_broadcast_ss(xd + (r0 + r) * nb + b);
                part[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[r][0]), d, part[r][0]);
                part[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[r][1]), d, part[r][1]);
            }
        }
        const __m256 s0 = load8_scales(spp, g * 16, half), s1 = load8_scales(spp, g * 16 + 8, half);
        for (int r = 0; r < R; r++) {
            acc[r][0] = _mm256_fmadd_ps(part[r][0], s0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(part[r][1], s1, acc[r][1]);
        }
        if (mpp != NULL) {
            const __m256 m0 = load8_scales(mpp, g * 16, half), m1 = load8_scales(mpp, g * 16 + 8, half);
            for (int r = 0; r < R; r++) {
                const __m256 xs = _mm256_broadcast_ss(xg + (r0 + r) * ng + g);
                acc[r][0] = _mm256_fmadd_ps(m0, xs, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(m1, xs, acc[r][1]);
            }
        }
    }
    panel_store(R, acc, r0, p, bias, n, y);
}
#endif

#define ACT8_HALF_SCALES 256

/* Whether llmctl_gemm_wq_act8 takes fp16 scales (ACT8_HALF_SCALES). */
int llmctl_quant_has_f16c(void) {
#if defined(QK_AVX2) && defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}

/* y[m, n] = sum_g s_g * (sum_b d_b * (q_x,b . q_w,b)) + m_g * xs_g + bias (above), on llmctl_pack_wq_act8's panels.
 * bits may carry ACT8_HALF_SCALES: sp and mp then hold fp16 values ([np][ng][16] uint16), a sixth less traffic for
 * Q4_0/Q4_1 (whose scales are fp16 in the file) in a GEMM that reads more bytes than it computes at one row. mp
 * NULL: no mins (Q8_0), nothing read for them. Returns -3 where this build has no AVX2 path (the caller then never
 * packs for it), -2 for shapes or flags it does not run. */

int llmctl_gemm_wq_act8(const float *x, int64_t m, int64_t k, const void *qp, int bits, const float *sp,
                        const float *mp, int64_t group, const float *bias, int64_t n, float *y) {
#ifndef QK_AVX2
    (void)x; (void)m; (void)k; (void)qp; (void)bits; (void)sp; (void)mp; (void)group; (void)bias; (void)n; (void)y;
    return -3;
#else
    const int half = (bits & ACT8_HALF_SCALES) != 0;
    bits &= ~ACT8_HALF_SCALES;
    if ((bits != 4 && bits != 8) || group <= 0 || group % 32 || k % group) return -2;
#ifndef __F16C__
    if (half) return -2;
#endif
    const int64_t np = (n + 15) / 16, ng = k / group, nb = k / 32, bpg = group / 32, kb = bits == 4 ? k * 8 : k * 16;
    const int64_t sb = half ? 2 : 4; /* bytes per scale */
    int8_t *xq = (int8_t *)malloc((size_t)(m * k) + (size_t)(m * (2 * nb + ng)) * sizeof(float));
    if (!xq) return -1;
    float *xd = (float *)(xq + m * k), *xs = xd + m * nb, *xg = xs + m * nb;
    #pragma omp parallel for schedule(static) if (m >= 16)
    for (int64_t r = 0; r < m; r++) {
        quantize_row_q8_32(x + r * k, k, xq + r * k, xd + r * nb, xs + r * nb);
        for (int64_t g = 0; g < ng; g++) {
            float s = 0.0f;
            for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) s += xs[r * nb + b];
            xg[r * ng + g] = s;
        }
    }
    #pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < np; p++) {
        const uint8_t *qpp = (const uint8_t *)qp + p * kb;
        const void *spp = (const char *)sp + p * ng * 16 * sb;
        const void *mpp = mp == NULL ? NULL : (const char *)mp + p * ng * 16 * sb;
        int64_t r0 = 0;
        for (; r0 + 4 <= m; r0 += 4) {
            if (bits == 4) act8_tile(4, 4, xq, xd, xg, k, qpp, spp, mpp, half, group, r0, p, bias, n, y);
            else act8_tile(4, 8, xq, xd, xg, k, qpp, spp, mpp, half, group, r0, p, bias, n, y);
        }
        switch ((m - r0) * 16 + bits) {
            case 1 * 16 + 4: act8_tile(1, 4, xq, xd, xg, k, qpp, spp, mpp, half, group, r0, p, bias, n, y); break;
            case 2 * 16 + 4: act8_tile(2, 4, xq, xd, xg, k, qpp, spp, mpp, half, group, r0, p, bias, n, y); break;
            case 3 * 16 + 4: act8_tile(3, 4, xq, xd, xg, k, qpp, spp, mpp, half, group, r0, p, bias, n, y); break;
            case 1 * 16 + 8: act8_tile(1, 8, xq, xd, xg, k, qpp, spp, mpp, half, group, r0, p, bias, n, y); break;
            case 2 * 16 + 8: act8_tile(2, 8, xq, xd, xg, k, qpp, spp, mpp, half, group, r0, p, bias, n, y); break;
            case 3 * 16 + 8: act8_tile(3, 8, xq, xd, xg, k, qpp, spp, mpp, half, group, r0, p, bias, n, y); break;
            default: break;
        }
    }
    free(xq);
    return 0;
#endif
}

/* As llmctl_gemm_wq_act8 for bf16 activations and a bf16 result (raw bits): see wq_bf16_around. */
int llmctl_gemm_wq_act8_bf16(const uint16_t *x, int64_t m, int64_t k, const void *qp, int bits, const float *sp,
                             const float *mp, int64_t group, const float *bias, int64_t n, uint16_t *y) {
    return wq_bf16_around(llmctl_gemm_wq_act8, x, m, k, qp, bits, sp, mp, group, bias, n, y);
}
