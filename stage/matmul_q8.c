/* stage/matmul_q8.c — Q8_0 weights (stage/dtype.h) in the kernels of stage/matmul_isa.h: the
 * small path's row kernels (plain C, AVX2+FMA+F16C and AVX-512) and the large path's tile
 * dequantization.
 *
 * Small path: y = x · W^T with each weight dequantized on the fly (w = q * d, exact in f32:
 * 8 x 11 significant bits), activations kept in f32 (not quantized as llama.cpp does: the only
 * error is the weights' own). Reduction order of one output: L lane sums acc[l] += w[c] * x[c]
 * (lane l = c % L, fused multiply-adds in column order), then a fixed tree over the lanes:
 * L = 8, ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)), in the C and AVX2 variants (bit-identical to
 * each other); L = 16 and _mm512_reduce_add_ps's tree in the AVX-512 one. It depends on cols
 * alone, not on m, the thread or the rows around (stage/matmul.h: reduction order). The SIMD
 * kernels dequantize each weight vector once for every x row of their block (AVX2: 2 x rows,
 * AVX-512: 4), so batched decode pays the int8 -> f32 conversion once per weight, not per row.
 *
 * Why an AVX-512 kernel: the AVX2 one spends four vector instructions (widen, convert, scale,
 * FMA) on 8 weights for each x row pair; 16 weights an instruction and 4 x rows a block
 * measured 2x its rate at 4 and 16 x rows (docs/BENCH.md), level with it at one row.
 *
 * Large path: tiles dequantized to f32 and multiplied by the f32 tile engine, as the 16-bit
 * dtypes are.
 */
#include "stage/matmul.h"
#include "stage/matmul_isa.h"

#include <math.h>
#include <string.h>

#include "stage/convert.h"

#define QB STAGE_Q8_BLOCK

static float lanes_sum(const float a[8])
{
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

void stage_mm_q8_rows_c(const float *x, int m, const stage_weight *w, int r0, int r1, float *y,
                        const uint16_t *xs)
{
    (void)xs;
    const int n = w->rows, k = w->cols, nb = stage_q8_blocks(k);
    for (int j = r0; j < r1; j++) {
        const int8_t *q = (const int8_t *)w->data + (size_t)j * k;
        const uint16_t *d = w->scale + (size_t)j * nb;
        for (int i = 0; i < m; i++) {
            const float *xi = x + (size_t)i * k;
            float acc[8] = {0};
            for (int c = 0; c < k; c++)
                acc[c & 7] = fmaf((float)q[c] * stage_f16_to_f32(d[c / QB]), xi[c], acc[c & 7]);
            y[(size_t)i * n + j] = lanes_sum(acc);
        }
    }
}

void stage_mm_q8_tile(const stage_weight *w, int r0, int rn, int c0, int kc, float *buf)
{
    const int k = w->cols, nb = stage_q8_blocks(k);
    for (int r = 0; r < rn; r++)
        stage_q8_dequant((const int8_t *)w->data + (size_t)(r0 + r) * k,
                         w->scale + (size_t)(r0 + r) * nb, c0, kc, buf + (size_t)r * kc);
}

#if defined(__x86_64__)
#include <immintrin.h>

#define T256 __attribute__((target("avx2,fma,f16c")))
#define INL inline __attribute__((always_inline))

/* 8 int8 at q as f32, and 8 f32 at x; n < 8 valid ones are copied out (zeros after them) so no
 * load passes the end of a row. */
static T256 INL __m256 ldq(const int8_t *q, int n)
{
    int8_t tmp[8];
    if (n < 8) {
        memset(tmp, 0, sizeof tmp);
        memcpy(tmp, q, (size_t)n);
        q = tmp;
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}
static T256 INL __m256 ldx(const float *x, int n)
{
    float tmp[8];
    if (n < 8) {
        memset(tmp, 0, sizeof tmp);
        memcpy(tmp, x, (size_t)n * sizeof *x);
        x = tmp;
    }
    return _mm256_loadu_ps(x);
}

static T256 INL float hsum(__m256 a)
{
    float t[8];
    _mm256_storeu_ps(t, a);
    return lanes_sum(t);
}

/* 8 weights of a row as f32: q * d */
static T256 INL __m256 dq8(const int8_t *q, int n, __m256 d) { return _mm256_mul_ps(ldq(q, n), d); }

/* y[i*ldy + r] = x_i · w_r for r < R weight rows (q rows at q + r*k, scales at d + r*nb) and
 * i < MB x rows (at x + i*k); columns in groups of 8, a short group zero padded. */
static T256 INL void blkq8(const float *x, const int8_t *q, const uint16_t *d, int k, int nb, int R,
                           int MB, float *y, int ldy)
{
    __m256 acc[4][2];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 2
        for (int i = 0; i < MB; i++) acc[r][i] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256 dv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) dv[r] = _mm256_set1_ps(_cvtsh_ss(d[(size_t)r * nb + b]));
        const int c1 = (b + 1) * QB < k ? (b + 1) * QB : k;
        if (c1 - b * QB == QB) {
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {
                const int c = b * QB + v * 8;
                __m256 xv[2];
#pragma GCC unroll 2
                for (int i = 0; i < MB; i++) xv[i] = _mm256_loadu_ps(x + (size_t)i * k + c);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const __m256 wv = dq8(q + (size_t)r * k + c, 8, dv[r]);
#pragma GCC unroll 2
                    for (int i = 0; i < MB; i++) acc[r][i] = _mm256_fmadd_ps(wv, xv[i], acc[r][i]);
                }
            }
        } else { /* the row's short last block */
            for (int c = b * QB; c < c1; c += 8) {
                const int cn = c1 - c < 8 ? c1 - c : 8;
                __m256 xv[2];
#pragma GCC unroll 2
                for (int i = 0; i < MB; i++) xv[i] = ldx(x + (size_t)i * k + c, cn);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const __m256 wv = dq8(q + (size_t)r * k + c, cn, dv[r]);
#pragma GCC unroll 2
                    for (int i = 0; i < MB; i++) acc[r][i] = _mm256_fmadd_ps(wv, xv[i], acc[r][i]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 2
        for (int i = 0; i < MB; i++) y[(size_t)i * ldy + r] = hsum(acc[r][i]);
}

/* Groups of 4 weight rows (then single rows), each against pairs of x rows (then a single one)
 * while the group's rows stay in L1. */
T256 void stage_mm_q8_rows_avx2(const float *x, int m, const stage_weight *w, int r0, int r1,
                                float *y, const uint16_t *xs)
{
    (void)xs;
    const int n = w->rows, k = w->cols, nb = stage_q8_blocks(k);
    const int8_t *q = w->data;
    int j = r0;
    for (; j + 4 <= r1; j += 4) {
        const int8_t *qj = q + (size_t)j * k;
        const uint16_t *dj = w->scale + (size_t)j * nb;
        int i = 0;
        for (; i + 2 <= m; i += 2)
            blkq8(x + (size_t)i * k, qj, dj, k, nb, 4, 2, y + (size_t)i * n + j, n);
        if (i < m) blkq8(x + (size_t)i * k, qj, dj, k, nb, 4, 1, y + (size_t)i * n + j, n);
    }
    for (; j < r1; j++) {
        const int8_t *qj = q + (size_t)j * k;
        const uint16_t *dj = w->scale + (size_t)j * nb;
        int i = 0;
        for (; i + 2 <= m; i += 2)
            blkq8(x + (size_t)i * k, qj, dj, k, nb, 1, 2, y + (size_t)i * n + j, n);
        if (i < m) blkq8(x + (size_t)i * k, qj, dj, k, nb, 1, 1, y + (size_t)i * n + j, n);
    }
}

/* ---- AVX-512 (F/BW/VL) ----------------------------------------------------------------------- */

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))

/* y[i*ldy + r] = x_i · w_r for r < R weight rows (q rows at q + r*k, scales at d + r*nb) and
 * i < MB x rows (at x + i*k). Columns in vectors of 16 in order, the last one masked; each
 * weight vector is dequantized once (q * d) and multiplied into all MB x rows. */
static T512 INL void blkq8_512(const float *x, const int8_t *q, const uint16_t *d, int k, int nb,
                               int R, int MB, float *y, int ldy)
{
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) acc[r][i] = _mm512_setzero_ps();
    const int nfull = k / QB; /* blocks of 32 columns */
    for (int b0 = 0; b0 < nb; b0 += 16) {
        /* the scales of blocks b0 .. b0+15 of each row as f32, read back one block at a time
         * (broadcast from memory: no shuffle per block) */
        float ds[4][16];
        const int bn = nb - b0 < 16 ? nb - b0 : 16;
        const __mmask16 bm = (__mmask16)((1u << bn) - 1u);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            _mm512_storeu_ps(
                ds[r], _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(bm, d + (size_t)r * nb + b0)));
        const int bf = nfull - b0 < bn ? (nfull - b0 > 0 ? nfull - b0 : 0) : bn;
        for (int bb = 0; bb < bf; bb++) {
            const int c0 = (b0 + bb) * QB;
#pragma GCC unroll 2
            for (int v = 0; v < 2; v++) {
                const int c = c0 + v * 16;
                __m512 wv[4];
#pragma GCC unroll 4
                for (int r = 0; r < R; r++)
                    wv[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                              (const __m128i *)(q + (size_t)r * k + c)))),
                                          _mm512_set1_ps(ds[r][bb]));
#pragma GCC unroll 4
                for (int i = 0; i < MB; i++) {
                    const __m512 xv = _mm512_loadu_ps(x + (size_t)i * k + c);
#pragma GCC unroll 4
                    for (int r = 0; r < R; r++) acc[r][i] = _mm512_fmadd_ps(wv[r], xv, acc[r][i]);
                }
            }
        }
        if (bf < bn) { /* the row's short last block: vectors of 16, the last one masked */
            const int bb = bf;
            for (int c = (b0 + bb) * QB; c < k; c += 16) {
                const int cn = k - c < 16 ? k - c : 16;
                const __mmask16 cm = (__mmask16)((1u << cn) - 1u);
                __m512 wv[4];
#pragma GCC unroll 4
                for (int r = 0; r < R; r++)
                    wv[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                              _mm_maskz_loadu_epi8(cm, q + (size_t)r * k + c))),
                                          _mm512_set1_ps(ds[r][bb]));
#pragma GCC unroll 4
                for (int i = 0; i < MB; i++) {
                    const __m512 xv = _mm512_maskz_loadu_ps(cm, x + (size_t)i * k + c);
#pragma GCC unroll 4
                    for (int r = 0; r < R; r++) acc[r][i] = _mm512_fmadd_ps(wv[r], xv, acc[r][i]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) y[(size_t)i * ldy + r] = _mm512_reduce_add_ps(acc[r][i]);
}

/* Groups of 4 weight rows (then single rows), each against blocks of 4 x rows (then the 1-3
 * left) while the group's rows stay in L1. */
T512 void stage_mm_q8_rows_avx512(const float *x, int m, const stage_weight *w, int r0, int r1,
                                  float *y, const uint16_t *xs)
{
    (void)xs;
    const int n = w->rows, k = w->cols, nb = stage_q8_blocks(k);
    const int8_t *q = w->data;
    int j = r0;
#define Q8B(RR, MM) blkq8_512(x + (size_t)i * k, qj, dj, k, nb, RR, MM, y + (size_t)i * n + j, n)
#define Q8ROWS(RR)                                                                                 \
    do {                                                                                           \
        const int8_t *qj = q + (size_t)j * k;                                                      \
        const uint16_t *dj = w->scale + (size_t)j * nb;                                            \
        int i = 0;                                                                                 \
        for (; i + 4 <= m; i += 4) Q8B(RR, 4);                                                     \
        switch (m - i) {                                                                           \
        case 3: Q8B(RR, 3); break;                                                                 \
        case 2: Q8B(RR, 2); break;                                                                 \
        case 1: Q8B(RR, 1); break;                                                                 \
        default: break;                                                                            \
        }                                                                                          \
    } while (0)
    for (; j + 4 <= r1; j += 4) Q8ROWS(4);
    for (; j < r1; j++) Q8ROWS(1);
#undef Q8ROWS
#undef Q8B
}
#endif

/* ---- FAST mode: int8 activations, AVX-512 VNNI ----------------------------------------------- */
#if defined(__x86_64__)
#define TVN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))

int stage_mm_q8_fast_supported(void)
{
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
}

void stage_mm_q8_quant_x(const float *x, int m, int k, void *xq)
{
    const int kq = mm_q8x_kq(k), nbq = kq / QB;
    for (int i = 0; i < m; i++) {
        int8_t *q = (int8_t *)xq + (size_t)i * mm_q8x_row_bytes(k);
        float *dx = (float *)(q + kq);
        const float *xi = x + (size_t)i * k;
        for (int b = 0; b < nbq; b++) {
            const int c0 = b * QB, cn = k - c0 < QB ? (k - c0 > 0 ? k - c0 : 0) : QB;
            float amax = 0.0f;
            for (int c = 0; c < cn; c++) amax = fmaxf(amax, fabsf(xi[c0 + c]));
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            for (int c = 0; c < QB; c++) {
                const float v = c < cn ? roundf(xi[c0 + c] * id) : 0.0f;
                q[c0 + c] = (int8_t)(v > 127.0f ? 127 : v < -127.0f ? -127 : v);
            }
            dx[b] = d;
        }
    }
}

/* R weight rows x MB x rows, 64 columns (two blocks) a step: vpdpbusd of |w| (unsigned) and x
 * with w's sign (x is within +-127, so negating it cannot overflow), 16 int32 lanes of which
 * 0-7 are block 2p and 8-15 block 2p + 1; each lane's sum to f32, times dw * dx of its block,
 * added into an f32 accumulator; then _mm512_reduce_add_ps. */
static TVN INL void blkq8_vnni(const int8_t *xq, const float *dx, size_t xstride, const int8_t *q,
                               const uint16_t *d, int k, int nb, int R, int MB, float *y, int ldy)
{
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) acc[r][i] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    const __m512i lo8 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int b0 = 0; b0 < nb; b0 += 16) {
        const int bn = nb - b0 < 16 ? nb - b0 : 16;
        const __mmask16 bm = (__mmask16)((1u << bn) - 1u);
        __m512 ds[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            ds[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(bm, d + (size_t)r * nb + b0));
        for (int p = 0; p < bn; p += 2) {
            const int c = (b0 + p) * QB;
            const __mmask64 cm =
                k - c >= 64 ? ~(__mmask64)0 : (__mmask64)((1ull << (k - c)) - 1ull);
            const __m512i idx = _mm512_add_epi32(lo8, _mm512_set1_epi32(p));
            __m512i wa[4];
            __mmask64 wn[4];
            __m512 sw[4];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m512i wv = _mm512_maskz_loadu_epi8(cm, q + (size_t)r * k + c);
                wa[r] = _mm512_abs_epi8(wv);
                wn[r] = _mm512_movepi8_mask(wv);
                sw[r] = _mm512_permutexvar_ps(idx, ds[r]);
            }
#pragma GCC unroll 4
            for (int i = 0; i < MB; i++) {
                const __m512i xv = _mm512_loadu_si512(xq + (size_t)i * xstride + c);
                const __m512 sx = _mm512_permutexvar_ps(
                    lo8,
                    _mm512_castps256_ps512(_mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64(
                        (const __m128i *)(dx + (size_t)i * (xstride / 4) + b0 + p))))));
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const __m512i xs = _mm512_mask_sub_epi8(xv, wn[r], zero, xv);
                    const __m512i s = _mm512_dpbusd_epi32(zero, wa[r], xs);
                    acc[r][i] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sw[r], sx), acc[r][i]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) y[(size_t)i * ldy + r] = _mm512_reduce_add_ps(acc[r][i]);
}

TVN void stage_mm_q8_rows_vnni(const float *x, int m, const stage_weight *w, int r0, int r1,
                               float *y, const uint16_t *xs)
{
    (void)x;
    const int n = w->rows, k = w->cols, nb = stage_q8_blocks(k);
    const size_t rb = mm_q8x_row_bytes(k);
    const int8_t *xq = (const int8_t *)xs;
    const float *dx = (const float *)(xq + mm_q8x_kq(k)); /* row i's at + i * rb / 4 floats */
    const int8_t *q = w->data;
#define QV(RR, MM)                                                                                 \
    blkq8_vnni(xq + (size_t)i * rb, dx + (size_t)i * (rb / 4), rb, q + (size_t)j * k,              \
               w->scale + (size_t)j * nb, k, nb, RR, MM, y + (size_t)i * n + j, n)
#define QVROWS(RR)                                                                                 \
    do {                                                                                           \
        int i = 0;                                                                                 \
        for (; i + 4 <= m; i += 4) QV(RR, 4);                                                      \
        switch (m - i) {                                                                           \
        case 3: QV(RR, 3); break;                                                                  \
        case 2: QV(RR, 2); break;                                                                  \
        case 1: QV(RR, 1); break;                                                                  \
        default: break;                                                                            \
        }                                                                                          \
    } while (0)
    int j = r0;
    /* One x row: one weight row at a time, so the rows stream from memory in order, one
     * sequential read (4 rows side by side, 2 KiB each at hidden 2048, are 4 short streams:
     * measured 1.4x slower at m = 1, docs/BENCH.md). Several x rows: 4 weight rows a block, each
     * weight vector used for every x row. The order of one output is the same either way. */
    if (m > 1)
        for (; j + 4 <= r1; j += 4) QVROWS(4);
    for (; j < r1; j++) QVROWS(1);
#undef QVROWS
#undef QV
}
#else
int stage_mm_q8_fast_supported(void) { return 0; }
void stage_mm_q8_quant_x(const float *x, int m, int k, void *xq)
{
    (void)x, (void)m, (void)k, (void)xq;
}
#endif
