/* stage/matmul_q8.c — Q8_0 weights (stage/dtype.h) in the kernels of stage/matmul_isa.h: the
 * small path's row kernels (plain C, AVX2+FMA+F16C and AVX-512) and the large path's tile
 * dequantization.
 *
 * Small path: y = x · W^T with the weights dequantized on the fly, activations kept in f32
 * (not quantized as llama.cpp does: the only error is the weights' own). Reduction order of
 * one output, C and AVX2 variants (bit-identical to each other): L = 8 lane sums
 * acc[l] += (q[c] * d) * x[c] (lane l = c % 8, w = q * d exact in f32: 8 x 11 significant
 * bits; fused multiply-adds in column order), then ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)).
 * AVX-512: 16 lanes; per 32-column block b, t[l] = q[c] * x[c] + q[c + 16] * x[c + 16]
 * (c = 32b + l; a product, then an FMA), then acc[l] += t[l] * d_b (an FMA): the scale once per
 * block, not per weight; then _mm512_reduce_add_ps's tree. Either depends on cols alone, not
 * on m, the thread or the rows around (stage/matmul.h: reduction order). The SIMD kernels
 * convert each weight vector once for every x row of their block (AVX2: 2 x rows, AVX-512: 4),
 * so batched decode pays the int8 -> f32 conversion once per weight, not per row.
 *
 * Why an AVX-512 kernel: the AVX2 one spends four vector instructions (widen, convert, scale,
 * FMA) on 8 weights for each x row pair; 16 weights an instruction and 4 x rows a block
 * measured 2x its rate at 4 and 16 x rows (docs/BENCH.md). Why the block-scale order there:
 * at one x row the kernel is bound by its floating-point operations before the memory is
 * (convert, scale, FMA per 16 weights); scaling per block drops one of them, which together
 * with one weight row at a time measured 1.38x the one-sequence decode rate; the cost is one
 * FMA more per block and x row when several x rows share a weight vector (~13% of the kernel's
 * rate at 4-16 rows, docs/BENCH.md).
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

/* How far ahead of its loads a kernel asks for its int8 weights (software prefetch, to the
 * L1). Why: the rows stream in order, yet the hardware prefetcher alone leaves the loads
 * waiting on memory. 4 KiB ahead, 6 alternating rounds of one-sequence steady decode (hidden
 * 2048): --matmul fast median 26.8 -> 30.1 tok/s, exact 21.7 -> 23.1 (1 KiB and 8 KiB: no gain
 * in a first round); docs/BENCH.md. Results are unchanged; a prefetch past the end of the
 * matrix is harmless (it never faults). */
#define Q8_PF_BYTES 4096

/* y[i*ldy + r] = x_i · w_r for r < R weight rows (q rows at q + r*k, scales at d + r*nb) and
 * i < MB x rows (at x + i*k). Per block of 32 columns (two vectors of 16, the row's short last
 * block masked): t = q[0..16) * x + q[16..32) * x (lane-wise, the int8 weights converted to f32
 * once for all MB x rows), then acc += t * d: the block scale is applied once per 32 weights,
 * not per weight (one floating-point operation less per 16 weights, which is what bounds this
 * kernel at one x row), and acc's dependency chain is one FMA per block. */
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
            const int c = (b0 + bb) * QB;
            __m512 w0[4], w1[4];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                if (!(bb & 1))
                    _mm_prefetch((const char *)(q + (size_t)r * k + c + Q8_PF_BYTES), _MM_HINT_T0);
                w0[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                    _mm_loadu_si128((const __m128i *)(q + (size_t)r * k + c))));
                w1[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                    _mm_loadu_si128((const __m128i *)(q + (size_t)r * k + c + 16))));
            }
#pragma GCC unroll 4
            for (int i = 0; i < MB; i++) {
                const __m512 x0 = _mm512_loadu_ps(x + (size_t)i * k + c);
                const __m512 x1 = _mm512_loadu_ps(x + (size_t)i * k + c + 16);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const __m512 t = _mm512_fmadd_ps(w1[r], x1, _mm512_mul_ps(w0[r], x0));
                    acc[r][i] = _mm512_fmadd_ps(t, _mm512_set1_ps(ds[r][bb]), acc[r][i]);
                }
            }
        }
        if (bf < bn) { /* the row's short last block: vectors of 16, the last one masked */
            const int bb = bf, cb = (b0 + bb) * QB;
            __m512 t[4][4];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
#pragma GCC unroll 4
                for (int i = 0; i < MB; i++) t[r][i] = _mm512_setzero_ps();
            for (int c = cb; c < k; c += 16) {
                const int cn = k - c < 16 ? k - c : 16;
                const __mmask16 cm = (__mmask16)((1u << cn) - 1u);
                __m512 wv[4];
#pragma GCC unroll 4
                for (int r = 0; r < R; r++)
                    wv[r] = _mm512_cvtepi32_ps(
                        _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(cm, q + (size_t)r * k + c)));
#pragma GCC unroll 4
                for (int i = 0; i < MB; i++) {
                    const __m512 xv = _mm512_maskz_loadu_ps(cm, x + (size_t)i * k + c);
#pragma GCC unroll 4
                    for (int r = 0; r < R; r++) t[r][i] = _mm512_fmadd_ps(wv[r], xv, t[r][i]);
                }
            }
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
#pragma GCC unroll 4
                for (int i = 0; i < MB; i++)
                    acc[r][i] = _mm512_fmadd_ps(t[r][i], _mm512_set1_ps(ds[r][bb]), acc[r][i]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) y[(size_t)i * ldy + r] = _mm512_reduce_add_ps(acc[r][i]);
}

/* Groups of 4 weight rows (then single rows; one x row: single rows only), each against blocks
 * of 4 x rows (then the 1-3 left) while the group's rows stay in L1. */
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
    /* One x row: one weight row at a time, so the rows stream from memory in order, one
     * sequential read (as the FAST kernel below; with this kernel's block-scale order measured
     * 1.25x the 4-rows-a-block loop at one sequence, docs/BENCH.md). Several x rows: 4 weight
     * rows a block, each weight vector converted once for every x row. Same order either way. */
    if (m > 1)
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

/* llama.cpp's rule per 32-value block, d = max|x| / 127, q = roundf(x / d) (ties away from
 * zero: trunc(v + copysign(0.49999997, v)), exact for |v| <= 127), stored biased as q + 128
 * (the unsigned operand of vpdpbusd); a block's 32 values in two vectors, its maximum by one
 * reduction. */
TVN void stage_mm_q8_quant_x(const float *x, int m, int k, void *xq)
{
    const int kq = mm_q8x_kq(k);
    const __m512 half = _mm512_set1_ps(0.49999997f), lim = _mm512_set1_ps(127.0f),
                 nlim = _mm512_set1_ps(-127.0f);
    const __m512i sgn = _mm512_set1_epi32((int)0x80000000u);
    for (int i = 0; i < m; i++) {
        uint8_t *q = (uint8_t *)xq + (size_t)i * mm_q8x_row_bytes(k);
        float *sx = (float *)(q + kq); /* [kq / 64][16] */
        const float *xi = x + (size_t)i * k;
        for (int c0 = 0; c0 < kq; c0 += 64) {
            float d2[2]; /* the pair's two block scales */
            for (int h = 0; h < 2; h++) {
                const int c = c0 + 32 * h;
                const int l0 = k - c, l1 = k - c - 16;
                const __mmask16 m0 = l0 >= 16 ? 0xffff : l0 > 0 ? (__mmask16)((1u << l0) - 1u) : 0;
                const __mmask16 m1 = l1 >= 16 ? 0xffff : l1 > 0 ? (__mmask16)((1u << l1) - 1u) : 0;
                const __m512 a = _mm512_maskz_loadu_ps(m0, xi + c);
                const __m512 b = _mm512_maskz_loadu_ps(m1, xi + c + 16);
                const float amax =
                    _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
                const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
                const __m512 vid = _mm512_set1_ps(id);
                __m512i qi[2];
                const __m512 v[2] = {_mm512_mul_ps(a, vid), _mm512_mul_ps(b, vid)};
                for (int u = 0; u < 2; u++) {
                    const __m512 hs = _mm512_castsi512_ps(
                        _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(v[u]), sgn),
                                        _mm512_castps_si512(half)));
                    __m512 r = _mm512_roundscale_ps(_mm512_add_ps(v[u], hs),
                                                    _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                    r = _mm512_min_ps(_mm512_max_ps(r, nlim), lim);
                    qi[u] = _mm512_xor_si512(_mm512_cvttps_epi32(r), _mm512_set1_epi32(128));
                }
                _mm_storeu_si128((__m128i *)(q + c), _mm512_cvtepi32_epi8(qi[0]));
                _mm_storeu_si128((__m128i *)(q + c + 16), _mm512_cvtepi32_epi8(qi[1]));
                d2[h] = d;
            }
            _mm512_storeu_ps(
                sx + (size_t)(c0 / 64) * 16,
                _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(d2[0]), _mm512_set1_ps(d2[1])));
        }
    }
}

/* R weight rows x MB x rows, 64 columns (two blocks) a step: vpdpbusd of x + 128 (unsigned)
 * and w, started from -128 * sum(w) (vpdpbusd of 128s and w, once per weight vector), so each
 * int32 lane holds exactly sum(x * w) of 4 columns: lanes 0-7 of block 2p, 8-15 of block
 * 2p + 1; each lane's sum to f32, times dw * dx of its block, added into an f32 accumulator;
 * then _mm512_reduce_add_ps. */
static TVN INL void blkq8_vnni(const uint8_t *xq, const float *sx, size_t xstride, const int8_t *q,
                               const uint16_t *d, int k, int nb, int R, int MB, float *y, int ldy)
{
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) acc[r][i] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512(), b128 = _mm512_set1_epi8((char)0x80);
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
            __m512i wv[4], nc[4];
            __m512 sw[4];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                wv[r] = _mm512_maskz_loadu_epi8(cm, q + (size_t)r * k + c);
                _mm_prefetch((const char *)(q + (size_t)r * k + c + Q8_PF_BYTES), _MM_HINT_T0);
                nc[r] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, b128, wv[r]));
                sw[r] = _mm512_permutexvar_ps(idx, ds[r]);
            }
#pragma GCC unroll 4
            for (int i = 0; i < MB; i++) {
                const __m512i xv = _mm512_loadu_si512(xq + (size_t)i * xstride + c);
                const __m512 sxv = _mm512_loadu_ps(sx + (size_t)i * (xstride / 4) + (size_t)c / 4);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const __m512i s = _mm512_dpbusd_epi32(nc[r], xv, wv[r]);
                    acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sw[r], sxv),
                                                acc[r][i]);
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
    const uint8_t *xq = (const uint8_t *)xs;
    const float *sx = (const float *)(xq + mm_q8x_kq(k)); /* row i's at + i * rb / 4 floats */
    const int8_t *q = w->data;
#define QV(RR, MM)                                                                                 \
    blkq8_vnni(xq + (size_t)i * rb, sx + (size_t)i * (rb / 4), rb, q + (size_t)j * k,              \
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
