/* stage/matmul_q8.c — Q8_0 weights (stage/dtype.h) in the kernels of stage/matmul_isa.h: the
 * small path's row kernels (plain C and AVX2+FMA+F16C; AVX-512 CPUs run the AVX2 one) and the
 * large path's tile dequantization.
 *
 * Small path: y = x · W^T with each weight dequantized on the fly (w = q * d, exact in f32:
 * 8 x 11 significant bits), activations kept in f32 (not quantized as llama.cpp does: the only
 * error is the weights' own). Reduction order of one output, the same in both variants: eight
 * lane sums acc[l] += w[c] * x[c] (lane l = c % 8, fused multiply-adds in column order), then
 * ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)). It depends on cols alone, not on m, the thread or the
 * rows around (stage/matmul.h: reduction order). The AVX2 kernel dequantizes each group of 8
 * weights once for up to 2 x rows (batched decode).
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
#endif
