/* stage/matmul_x86.c — the x86-64 SIMD variants of stage/matmul_isa.h: AVX2+FMA+F16C,
 * AVX-512 (F/BW/VL) and AVX-512 BF16. Each function carries its own target attribute, so this
 * file builds with the project's baseline flags and the dispatcher (matmul.c) only calls a
 * variant after __builtin_cpu_supports said the CPU has it.
 *
 * Block kernels: R weight rows (4, or 1 for the remainder) x MB rows of x (1..4) held in
 * registers. Every accumulator runs over k in chunks of one vector (16 or 8 floats; 32 bf16
 * pairs for vdpbf16ps), in order, the last chunk masked, then one fixed horizontal sum; R and
 * MB only choose how many accumulators run side by side, so an output's rounding never
 * depends on the block it fell in (stage/matmul.h: reduction order).
 */
#include "stage/matmul.h"
#include "stage/matmul_isa.h"

#if defined(__x86_64__)

#include <immintrin.h>
#include <string.h>

#define INL inline __attribute__((always_inline))
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define TBF __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))
#define T256 __attribute__((target("avx2,fma,f16c")))

/* ---- AVX-512 --------------------------------------------------------------------------------- */

/* 16 elements of dtype dt at p (element pointer) as f32; msk selects the valid ones of a
 * tail (full: all 16). */
static T512 INL __m512 ld512(const void *p, stage_dtype dt, int full, __mmask16 msk)
{
    if (dt == STAGE_F32) return full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(msk, p);
    __m256i h = full ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(msk, p);
    if (dt == STAGE_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

static INL const char *elem(const void *base, size_t i, stage_dtype dt)
{
    return (const char *)base + i * (dt == STAGE_F32 ? 4 : 2);
}

/* y[i*ldy + r] = x_i · w_r for r < R, i < MB; x rows at x + i*k, weight rows at w + r*k. */
static T512 INL void blk512(const float *x, const void *w, int k, int R, int MB, stage_dtype dt,
                            float *y, int ldy)
{
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) acc[r][i] = _mm512_setzero_ps();
    int c = 0;
    for (; c + 16 <= k; c += 16) {
        __m512 wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) wv[r] = ld512(elem(w, (size_t)r * k + c, dt), dt, 1, 0);
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) {
            __m512 xv = _mm512_loadu_ps(x + (size_t)i * k + c);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][i] = _mm512_fmadd_ps(wv[r], xv, acc[r][i]);
        }
    }
    if (c < k) {
        __mmask16 msk = (__mmask16)((1u << (k - c)) - 1u);
        __m512 wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) wv[r] = ld512(elem(w, (size_t)r * k + c, dt), dt, 0, msk);
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(msk, x + (size_t)i * k + c);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][i] = _mm512_fmadd_ps(wv[r], xv, acc[r][i]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) y[(size_t)i * ldy + r] = _mm512_reduce_add_ps(acc[r][i]);
}

/* bf16 rows by shift and mask, no widening shuffle: a 64-byte load holds 32 weights, element
 * 2l in the low half of 32-bit lane l and 2l + 1 in the high half, so w << 16 is the even
 * elements as f32 and w & 0xffff0000 the odd ones. x is deinterleaved to match: DX 0, two
 * permutes per 32 columns of x (shared by the R weight rows); DX 1, x already deinterleaved
 * by dx512 (rows ld apart), two loads: the same vectors (the last chunk's x is zero past k
 * either way), so the two give the same bits. Order of one output: lane l accumulates columns
 * 32c + 2l then 32c + 2l + 1 for chunks c in order (the last chunk masked), then
 * _mm512_reduce_add_ps. R up to 8 (rows r < 4 at w, the others at w2; outputs likewise at y
 * and y2), MB up to 4 (R * MB <= 16). pf, npf: rows of the next weight block to prefetch, one
 * cache line of each per chunk, so that block streams in from memory while this one runs from
 * the L1 (the passes of several x-row blocks over one weight block would otherwise leave the
 * memory idle in all but the first). */
static T512 INL void blk512_bf16(const float *x, int ld, int DX, const uint16_t *w,
                                 const uint16_t *w2, int k, int R, int MB, const uint16_t *pf,
                                 int npf, float *y, float *y2, int ldy)
{
    __m512 acc[8][4];
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) acc[r][i] = _mm512_setzero_ps();
    int c = 0;
    for (; c < k; c += 32) {
        const int full = c + 32 <= k;
        const __mmask32 mw = full ? ~(__mmask32)0 : (__mmask32)((1ull << (k - c)) - 1ull);
        const __mmask16 ma =
            full ? (__mmask16)0xffff : (__mmask16)(k - c >= 16 ? 0xffffu : (1u << (k - c)) - 1u);
        const __mmask16 mb =
            full ? (__mmask16)0xffff : (__mmask16)(k - c > 16 ? (1u << (k - c - 16)) - 1u : 0u);
        for (int p = 0; p < npf; p++)
            _mm_prefetch((const char *)(pf + (size_t)p * k + c), _MM_HINT_T0);
        __m512 we[8], wo[8];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const uint16_t *p = (r < 4 ? w + (size_t)r * k : w2 + (size_t)(r - 4) * k) + c;
            const __m512i v = full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(mw, p);
            we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            wo[r] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
        }
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) {
            __m512 xe, xo;
            if (DX) {
                xe = _mm512_loadu_ps(x + (size_t)i * ld + c);
                xo = _mm512_loadu_ps(x + (size_t)i * ld + c + 16);
            } else {
                const float *xi = x + (size_t)i * ld + c;
                const __m512 a = full ? _mm512_loadu_ps(xi) : _mm512_maskz_loadu_ps(ma, xi);
                const __m512 b =
                    full ? _mm512_loadu_ps(xi + 16) : _mm512_maskz_loadu_ps(mb, xi + 16);
                xe = _mm512_permutex2var_ps(a, ie, b);
                xo = _mm512_permutex2var_ps(a, io, b);
            }
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                acc[r][i] = _mm512_fmadd_ps(we[r], xe, acc[r][i]);
                acc[r][i] = _mm512_fmadd_ps(wo[r], xo, acc[r][i]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++)
            (r < 4 ? y : y2 - 4)[(size_t)i * ldy + r] = _mm512_reduce_add_ps(acc[r][i]);
}

/* bf16 rows: blocks of 8 weight rows for one x row, 4 x 4 for more. */
static T512 void rows512_bf16(const float *x, int m, const stage_weight *w, int r0, int r1,
                              float *y, const uint16_t *xs)
{
    (void)xs;
    const int n = w->rows, k = w->cols;
    const uint16_t *wd = w->data;
#define BB(RR, MM)                                                                                 \
    blk512_bf16(x + (size_t)i * k, k, 0, wd + (size_t)j * k, NULL, k, RR, MM, NULL, 0,             \
                y + (size_t)i * n + j, NULL, n)
    int j = r0;
    if (m == 1) {
        for (; j + 8 <= r1; j += 8)
            blk512_bf16(x, k, 0, wd + (size_t)j * k, wd + (size_t)(j + 4) * k, k, 8, 1, NULL, 0,
                        y + j, y + j + 4, n);
    }
    for (; j + 4 <= r1; j += 4) {
        int i = 0;
        for (; i + 4 <= m; i += 4) BB(4, 4);
        switch (m - i) {
        case 3: BB(4, 3); break;
        case 2: BB(4, 2); break;
        case 1: BB(4, 1); break;
        default: break;
        }
    }
    for (; j < r1; j++) {
        int i = 0;
        for (; i + 4 <= m; i += 4) BB(1, 4);
        switch (m - i) {
        case 3: BB(1, 3); break;
        case 2: BB(1, 2); break;
        case 1: BB(1, 1); break;
        default: break;
        }
    }
#undef BB
}

#define ROWS_BODY(BLK, ...)                                                                        \
    do {                                                                                           \
        const int n = w->rows, k = w->cols;                                                        \
        int j = r0;                                                                                \
        for (; j + 4 <= r1; j += 4) {                                                              \
            const void *wj = elem(w->data, (size_t)j * k, DT);                                     \
            int i = 0;                                                                             \
            for (; i + 4 <= m; i += 4) BLK(__VA_ARGS__, 4, 4);                                     \
            switch (m - i) {                                                                       \
            case 3: BLK(__VA_ARGS__, 4, 3); break;                                                 \
            case 2: BLK(__VA_ARGS__, 4, 2); break;                                                 \
            case 1: BLK(__VA_ARGS__, 4, 1); break;                                                 \
            default: break;                                                                        \
            }                                                                                      \
        }                                                                                          \
        for (; j < r1; j++) {                                                                      \
            const void *wj = elem(w->data, (size_t)j * k, DT);                                     \
            int i = 0;                                                                             \
            for (; i + 4 <= m; i += 4) BLK(__VA_ARGS__, 1, 4);                                     \
            switch (m - i) {                                                                       \
            case 3: BLK(__VA_ARGS__, 1, 3); break;                                                 \
            case 2: BLK(__VA_ARGS__, 1, 2); break;                                                 \
            case 1: BLK(__VA_ARGS__, 1, 1); break;                                                 \
            default: break;                                                                        \
            }                                                                                      \
        }                                                                                          \
    } while (0)

#define B512(dummy, RR, MM) blk512(x + (size_t)i * k, wj, k, RR, MM, DT, y + (size_t)i * n + j, n)

#define DEF_ROWS512(NAME, DTV)                                                                     \
    static T512 void NAME(const float *x, int m, const stage_weight *w, int r0, int r1, float *y,  \
                          const uint16_t *xs)                                                      \
    {                                                                                              \
        (void)xs;                                                                                  \
        const stage_dtype DT = DTV;                                                                \
        ROWS_BODY(B512, 0);                                                                        \
    }
DEF_ROWS512(rows512_f32, STAGE_F32)
DEF_ROWS512(rows512_f16, STAGE_F16)

/* x rows deinterleaved for rows512_bf16_dx (matmul_isa.h: mm_dx layout): per 32-column chunk
 * c, xd[c .. c + 16) = x[c + 2l] and xd[c + 16 .. c + 32) = x[c + 2l + 1], l < 16, zero past
 * k: the vectors blk512_bf16 builds with two permutes per chunk and x row, built once per call
 * instead of once per block of 8 weight rows. */
static T512 void dx512(const float *x, int m, int k, float *xd)
{
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const int ld = mm_dx_stride(k);
    for (int i = 0; i < m; i++) {
        const float *xi = x + (size_t)i * k;
        float *o = xd + (size_t)i * ld;
        for (int c = 0; c < k; c += 32) {
            const int left = k - c;
            const __mmask16 ma = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
            const __mmask16 mb = left >= 32  ? (__mmask16)0xffff
                                 : left > 16 ? (__mmask16)((1u << (left - 16)) - 1u)
                                             : (__mmask16)0;
            const __m512 a = _mm512_maskz_loadu_ps(ma, xi + c);
            const __m512 b = _mm512_maskz_loadu_ps(mb, xi + c + 16);
            _mm512_storeu_ps(o + c, _mm512_permutex2var_ps(a, ie, b));
            _mm512_storeu_ps(o + c + 16, _mm512_permutex2var_ps(a, io, b));
        }
    }
}

/* bf16 rows for m >= 2 with x deinterleaved by dx512 (passed as x): blocks of 4 weight rows,
 * each passed over by all m rows of x in blocks of 4 (ceil(m / 4) passes from the L1), pass p
 * prefetching its share of the next block's 4 rows. */
static T512 void rows512_bf16_dx(const float *xd, int m, const stage_weight *w, int r0, int r1,
                                 float *y, const uint16_t *xs)
{
    (void)xs;
    const int n = w->rows, k = w->cols, ld = mm_dx_stride(k);
    const uint16_t *wd = w->data;
    const int passes = (m + 3) / 4;
    int j = r0;
    for (; j + 4 <= r1; j += 4) {
        const int next = j + 4 + 4 <= r1; /* a whole next block to prefetch */
        for (int i = 0, p = 0; i < m; i += 4, p++) {
            const int mb = m - i < 4 ? m - i : 4;
            const int f0 = p * 4 / passes, f1 = (p + 1) * 4 / passes;
            const int npf = next && f0 < 4 ? (f1 < 4 ? f1 : 4) - f0 : 0;
            const uint16_t *pf = npf ? wd + (size_t)(j + 4 + f0) * k : NULL;
            const float *xi = xd + (size_t)i * ld;
            float *yi = y + (size_t)i * n + j;
            switch (mb) {
            case 4:
                blk512_bf16(xi, ld, 1, wd + (size_t)j * k, NULL, k, 4, 4, pf, npf, yi, NULL, n);
                break;
            case 3:
                blk512_bf16(xi, ld, 1, wd + (size_t)j * k, NULL, k, 4, 3, pf, npf, yi, NULL, n);
                break;
            case 2:
                blk512_bf16(xi, ld, 1, wd + (size_t)j * k, NULL, k, 4, 2, pf, npf, yi, NULL, n);
                break;
            default:
                blk512_bf16(xi, ld, 1, wd + (size_t)j * k, NULL, k, 4, 1, pf, npf, yi, NULL, n);
                break;
            }
        }
    }
    for (; j < r1; j++)
        for (int i = 0; i < m; i += 4) {
            const int mb = m - i < 4 ? m - i : 4;
            const float *xi = xd + (size_t)i * ld;
            float *yi = y + (size_t)i * n + j;
            switch (mb) {
            case 4:
                blk512_bf16(xi, ld, 1, wd + (size_t)j * k, NULL, k, 1, 4, NULL, 0, yi, NULL, n);
                break;
            case 3:
                blk512_bf16(xi, ld, 1, wd + (size_t)j * k, NULL, k, 1, 3, NULL, 0, yi, NULL, n);
                break;
            case 2:
                blk512_bf16(xi, ld, 1, wd + (size_t)j * k, NULL, k, 1, 2, NULL, 0, yi, NULL, n);
                break;
            default:
                blk512_bf16(xi, ld, 1, wd + (size_t)j * k, NULL, k, 1, 1, NULL, 0, yi, NULL, n);
                break;
            }
        }
}

/* ---- AVX-512 BF16: x split into bf16 (hi + lo, or hi only in FAST mode), weights as they are - ---- */

/* The split x (matmul_isa.h layout [m][2][mm_split_half]) with vcvtneps2bf16: round to nearest even,
 * denormal inputs and results flushed to zero (|x| < 2^-126: nothing a logit can see). EXACT:
 * lo = bf16(x - hi) (x - hi is exact in f32, so x = hi + lo to ~16 mantissa bits); FAST
 * (stage_matmul_set_mode): hi only, lo is not written and not read. */
static TBF void splitbf(const float *x, int m, int k, uint16_t *xs)
{
    const int kp = mm_split_kp(k), hf = mm_split_half(k);
    const int lo = stage_matmul_get_mode() != STAGE_MATMUL_FAST;
    for (int i = 0; i < m; i++) {
        const float *xi = x + (size_t)i * k;
        uint16_t *h = xs + (size_t)i * 2 * hf, *l = h + hf;
        for (int c = 0; c < kp; c += 16) {
            const __mmask16 mk =
                k - c >= 16 ? (__mmask16)0xffff : (__mmask16)(k > c ? (1u << (k - c)) - 1 : 0);
            const __m512 v = _mm512_maskz_loadu_ps(mk, xi + c); /* zero past k */
            const __m256i hv = (__m256i)_mm512_cvtneps_pbh(v);
            _mm256_storeu_si256((__m256i *)(h + c), hv);
            if (!lo) continue;
            const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hv), 16));
            _mm256_storeu_si256((__m256i *)(l + c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf)));
        }
    }
}

/* R weight rows (w, row stride k) x MB rows of split x (xs, row stride 2 hf, lo part at + hf),
 * columns [c0, c1) of a k-block. Order of one output: lane l accumulates, for 32-column chunks
 * c in order, vdpbf16ps with the hi part into one accumulator and (PARTS 2) with the lo part
 * into a second one, the last chunk's weights masked (x is zero there); after the last k-block,
 * _mm512_reduce_add_ps(lo + hi) (PARTS 1: of hi). Two accumulators, not one: the two products
 * of a chunk would otherwise wait on each other (vdpbf16ps latency). Between k-blocks the
 * accumulators wait in st ([R][lds] pairs of vectors), so splitting k into blocks does not
 * change the order. R * MB * PARTS <= 16. */
/* one 32-column chunk of blkbf (FULL 0: the masked last one) */
#define BF_CHUNK(FULL)                                                                             \
    do {                                                                                           \
        const __mmask32 mw = FULL ? ~(__mmask32)0 : (__mmask32)((1ull << (k - c)) - 1ull);         \
        for (int p = 0; p < npf; p++)                                                              \
            _mm_prefetch((const char *)(pf + (size_t)p * k + c), _MM_HINT_T1);                     \
        __m512i wv[8];                                                                             \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                        \
        {                                                                                          \
            const uint16_t *p = w + (size_t)r * k + c;                                             \
            wv[r] = FULL ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(mw, p);                \
        }                                                                                          \
        _Pragma("GCC unroll 4") for (int i = 0; i < MB; i++)                                       \
        {                                                                                          \
            const uint16_t *xi = xs + (size_t)i * 2 * hf + c;                                      \
            const __m512bh xh = (__m512bh)_mm512_loadu_si512(xi);                                  \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) ah[r][i] =                         \
                _mm512_dpbf16_ps(ah[r][i], xh, (__m512bh)wv[r]);                                   \
            if (PARTS == 2) {                                                                      \
                const __m512bh xl = (__m512bh)_mm512_loadu_si512(xi + hf);                         \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) al[r][i] =                     \
                    _mm512_dpbf16_ps(al[r][i], xl, (__m512bh)wv[r]);                               \
            }                                                                                      \
        }                                                                                          \
    } while (0)

static TBF INL void blkbf(const uint16_t *xs, int hf, const uint16_t *w, int k, int c0, int c1,
                          int R, int MB, int PARTS, __m512 *st, int lds, int first, int last,
                          const uint16_t *pf, int npf, float *y, int ldy)
{
    __m512 ah[8][4], al[8][4];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) {
            ah[r][i] = first ? _mm512_setzero_ps() : st[2 * ((size_t)r * lds + i)];
            if (PARTS == 2)
                al[r][i] = first ? _mm512_setzero_ps() : st[2 * ((size_t)r * lds + i) + 1];
        }
    const int cf = c1 - c0 >= 32 ? c0 + ((c1 - c0) & ~31) : c0; /* full chunks end */
    for (int c = c0; c < cf; c += 32) BF_CHUNK(1);
    if (cf < c1) {
        const int c = cf;
        BF_CHUNK(0);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int i = 0; i < MB; i++) {
            if (last) {
                const __m512 t = PARTS == 2 ? _mm512_add_ps(al[r][i], ah[r][i]) : ah[r][i];
                y[(size_t)i * ldy + r] = _mm512_reduce_add_ps(t);
            } else {
                st[2 * ((size_t)r * lds + i)] = ah[r][i];
                if (PARTS == 2) st[2 * ((size_t)r * lds + i) + 1] = al[r][i];
            }
        }
}

/* Blocking of the bf16 rows: BF_JB weight rows x BF_MB rows of x at a time, k in BF_KC-column
 * blocks. Within a block every x row passes over the same BF_JB x BF_KC weights (in registers
 * 4 weight rows x 4 x rows, 4 x 2 with two parts, 8 x 1 when there is one x row), so each
 * weight row is read from memory once per BF_MB rows of x and the block's x
 * (BF_MB x BF_KC x 2 bf16) stays in L1. */
#define BF_JB 8
#define BF_MB 32
#define BF_KC 1024

/* blkbf calls rowsbf_p makes for one block of jb weight rows x mb rows of x (its loops below) */
static inline int bf_calls(int mb, int jb, int MBB)
{
    int q = 0, j = 0;
    if (mb == 1) q += jb / 8, j = jb / 8 * 8;
    const int g4 = (jb - j) / 4;
    q += g4 * (mb / MBB + mb % MBB) + (jb - j - 4 * g4) * (mb / 2 + mb % 2);
    return q;
}

static TBF INL void rowsbf_p(const int m, const stage_weight *w, int r0, int r1, float *y,
                             const uint16_t *xs, int PARTS)
{
    const int n = w->rows, k = w->cols, hf = mm_split_half(k);
    const int MBB = PARTS == 2 ? 2 : 4; /* x rows per register block */
    const uint16_t *wd = w->data;
    __m512 st[2 * BF_JB * BF_MB]; /* [BF_JB][BF_MB][2] accumulators between k-blocks */
#define CB(RR, MM)                                                                                 \
    blkbf(xs + (size_t)(i0 + i) * 2 * hf, hf, wd + (size_t)(j0 + j) * k, k, c0, c1, RR, MM, PARTS, \
          st + 2 * ((size_t)j * BF_MB + i), BF_MB, first, last, pf, npf,                           \
          y + (size_t)(i0 + i) * n + j0 + j, n)
    for (int i0 = 0; i0 < m; i0 += BF_MB) {
        const int mb = m - i0 < BF_MB ? m - i0 : BF_MB;
        for (int j0 = r0; j0 < r1; j0 += BF_JB) {
            const int jb = r1 - j0 < BF_JB ? r1 - j0 : BF_JB;
            for (int c0 = 0; c0 < k; c0 += BF_KC) {
                const int c1 = c0 + BF_KC < k ? c0 + BF_KC : k;
                const int first = c0 == 0, last = c1 == k;
                /* CB calls of this block: q of nq, call q prefetching its share of the next
                 * block's BF_JB rows at these columns (see blk512_bf16) */
                const int nq = bf_calls(mb, jb, MBB);
                const int next = j0 + BF_JB + BF_JB <= r1;
                int q = 0;
                const uint16_t *pf = NULL;
                int npf = 0;
#define PF_NEXT()                                                                                  \
    do {                                                                                           \
        const int f0 = q * BF_JB / nq, f1 = (q + 1) * BF_JB / nq;                                  \
        npf = next ? f1 - f0 : 0;                                                                  \
        pf = npf ? wd + (size_t)(j0 + BF_JB + f0) * k : NULL;                                      \
        q++;                                                                                       \
    } while (0)
                int j = 0;
                if (mb == 1)
                    for (const int i = 0; j + 8 <= jb; j += 8) {
                        PF_NEXT();
                        CB(8, 1);
                    }
                for (; j + 4 <= jb; j += 4) {
                    int i = 0;
                    if (MBB == 4)
                        for (; i + 4 <= mb; i += 4) {
                            PF_NEXT();
                            CB(4, 4);
                        }
                    else
                        for (; i + 2 <= mb; i += 2) {
                            PF_NEXT();
                            CB(4, 2);
                        }
                    for (; i < mb; i++) {
                        PF_NEXT();
                        CB(4, 1);
                    }
                }
                for (; j < jb; j++) {
                    int i = 0;
                    for (; i + 2 <= mb; i += 2) {
                        PF_NEXT();
                        CB(1, 2);
                    }
                    for (; i < mb; i++) {
                        PF_NEXT();
                        CB(1, 1);
                    }
                }
            }
        }
    }
#undef PF_NEXT
#undef CB
}
#undef BF_CHUNK

static TBF void rowsbf_bf16(const float *x, int m, const stage_weight *w, int r0, int r1, float *y,
                            const uint16_t *xs)
{
    (void)x;
    if (stage_matmul_get_mode() == STAGE_MATMUL_FAST)
        rowsbf_p(m, w, r0, r1, y, xs, 1);
    else
        rowsbf_p(m, w, r0, r1, y, xs, 2);
}

/* ---- conversions (large path tiles) ---------------------------------------------------------- */

static T512 void cvt512_bf16(const void *src, float *dst, size_t n)
{
    const uint16_t *s = src;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, ld512(s + i, STAGE_BF16, 1, 0));
    if (i < n) {
        __mmask16 msk = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(dst + i, msk, ld512(s + i, STAGE_BF16, 0, msk));
    }
}

static T512 void cvt512_f16(const void *src, float *dst, size_t n)
{
    const uint16_t *s = src;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, ld512(s + i, STAGE_F16, 1, 0));
    if (i < n) {
        __mmask16 msk = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(dst + i, msk, ld512(s + i, STAGE_F16, 0, msk));
    }
}

static void cvt_f32(const void *src, float *dst, size_t n) { memcpy(dst, src, n * sizeof(float)); }

/* ---- attention ------------------------------------------------------------------------------- */

#define AH 8 /* query heads scored side by side */

static T512 void attend512(const float *q, int n_q, const stage_kv_view *kv, int n_ctx, int hd,
                           float scale, float *probs, float *out)
{
    const int full = hd / 16;
    const __mmask16 tm = (__mmask16)((1u << (hd % 16)) - 1u);
    for (int h0 = 0; h0 < n_q; h0 += AH) {
        const int nh = n_q - h0 < AH ? n_q - h0 : AH;
        mm_kv_it ik;
        mm_kv_it_init(&ik, kv->k, kv);
        for (int t = 0; t < n_ctx; t++) {
            const float *kt = mm_kv_it_next(&ik);
            __m512 acc[AH];
            for (int h = 0; h < nh; h++) acc[h] = _mm512_setzero_ps();
            for (int c = 0; c < full; c++) {
                __m512 kv = _mm512_loadu_ps(kt + c * 16);
                for (int h = 0; h < nh; h++)
                    acc[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (size_t)(h0 + h) * hd + c * 16),
                                             kv, acc[h]);
            }
            if (tm) {
                __m512 kv = _mm512_maskz_loadu_ps(tm, kt + full * 16);
                for (int h = 0; h < nh; h++)
                    acc[h] = _mm512_fmadd_ps(
                        _mm512_maskz_loadu_ps(tm, q + (size_t)(h0 + h) * hd + full * 16), kv,
                        acc[h]);
            }
            for (int h = 0; h < nh; h++)
                probs[(size_t)(h0 + h) * n_ctx + t] = _mm512_reduce_add_ps(acc[h]) * scale;
        }
    }
    stage_mm_softmax_rows(probs, n_q, n_ctx);
    memset(out, 0, (size_t)n_q * hd * sizeof(float));
    mm_kv_it iv;
    mm_kv_it_init(&iv, kv->v, kv);
    for (int t = 0; t < n_ctx; t++) {
        const float *vt = mm_kv_it_next(&iv);
        for (int h = 0; h < n_q; h++) {
            const __m512 p = _mm512_set1_ps(probs[(size_t)h * n_ctx + t]);
            float *o = out + (size_t)h * hd;
            for (int c = 0; c < full; c++)
                _mm512_storeu_ps(o + c * 16, _mm512_fmadd_ps(p, _mm512_loadu_ps(vt + c * 16),
                                                             _mm512_loadu_ps(o + c * 16)));
            if (tm)
                _mm512_mask_storeu_ps(o + full * 16, tm,
                                      _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(tm, vt + full * 16),
                                                      _mm512_maskz_loadu_ps(tm, o + full * 16)));
        }
    }
}

/* ---- AVX2 + FMA + F16C ----------------------------------------------------------------------- */

/* 8 elements of dtype dt at p as f32; n < 8 valid ones (a tail) are copied out first so no
 * load passes the end of the row. */
static T256 INL __m256 ld256(const void *p, stage_dtype dt, int n)
{
    uint32_t tmp[8];
    if (n < 8) {
        memset(tmp, 0, sizeof tmp);
        memcpy(tmp, p, (size_t)n * (dt == STAGE_F32 ? 4 : 2));
        p = tmp;
    }
    if (dt == STAGE_F32) return _mm256_loadu_ps(p);
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (dt == STAGE_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

static T256 INL float hsum256(__m256 a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* As blk512 with 8-lane chunks; MB <= 2 (16 ymm registers). */
static T256 INL void blk256(const float *x, const void *w, int k, int R, int MB, stage_dtype dt,
                            float *y, int ldy)
{
    __m256 acc[4][2];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 2
        for (int i = 0; i < MB; i++) acc[r][i] = _mm256_setzero_ps();
    int c = 0;
    for (; c + 8 <= k; c += 8) {
        __m256 wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) wv[r] = ld256(elem(w, (size_t)r * k + c, dt), dt, 8);
#pragma GCC unroll 2
        for (int i = 0; i < MB; i++) {
            __m256 xv = _mm256_loadu_ps(x + (size_t)i * k + c);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][i] = _mm256_fmadd_ps(wv[r], xv, acc[r][i]);
        }
    }
    if (c < k) {
        __m256 wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) wv[r] = ld256(elem(w, (size_t)r * k + c, dt), dt, k - c);
#pragma GCC unroll 2
        for (int i = 0; i < MB; i++) {
            __m256 xv = ld256(x + (size_t)i * k + c, STAGE_F32, k - c);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][i] = _mm256_fmadd_ps(wv[r], xv, acc[r][i]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 2
        for (int i = 0; i < MB; i++) y[(size_t)i * ldy + r] = hsum256(acc[r][i]);
}

/* ROWS_BODY with x-row blocks of 2 (MB 3 and 4 fall back to 2 + 1 / 2 + 2). */
#define B256(dummy, RR, MM)                                                                        \
    do {                                                                                           \
        if ((MM) >= 2) {                                                                           \
            blk256(x + (size_t)i * k, wj, k, RR, 2, DT, y + (size_t)i * n + j, n);                 \
            if ((MM) == 4)                                                                         \
                blk256(x + (size_t)(i + 2) * k, wj, k, RR, 2, DT, y + (size_t)(i + 2) * n + j, n); \
            else if ((MM) == 3)                                                                    \
                blk256(x + (size_t)(i + 2) * k, wj, k, RR, 1, DT, y + (size_t)(i + 2) * n + j, n); \
        } else {                                                                                   \
            blk256(x + (size_t)i * k, wj, k, RR, 1, DT, y + (size_t)i * n + j, n);                 \
        }                                                                                          \
    } while (0)

#define DEF_ROWS256(NAME, DTV)                                                                     \
    static T256 void NAME(const float *x, int m, const stage_weight *w, int r0, int r1, float *y,  \
                          const uint16_t *xs)                                                      \
    {                                                                                              \
        (void)xs;                                                                                  \
        const stage_dtype DT = DTV;                                                                \
        ROWS_BODY(B256, 0);                                                                        \
    }
DEF_ROWS256(rows256_f32, STAGE_F32)
DEF_ROWS256(rows256_bf16, STAGE_BF16)
DEF_ROWS256(rows256_f16, STAGE_F16)

static T256 void cvt256_bf16(const void *src, float *dst, size_t n)
{
    const uint16_t *s = src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, ld256(s + i, STAGE_BF16, 8));
    for (; i < n; i++) {
        uint32_t u = (uint32_t)s[i] << 16;
        memcpy(dst + i, &u, 4);
    }
}

static T256 void cvt256_f16(const void *src, float *dst, size_t n)
{
    const uint16_t *s = src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, ld256(s + i, STAGE_F16, 8));
    if (i < n) {
        float tmp[8];
        _mm256_storeu_ps(tmp, ld256(s + i, STAGE_F16, (int)(n - i)));
        memcpy(dst + i, tmp, (n - i) * sizeof(float));
    }
}

static T256 void attend256(const float *q, int n_q, const stage_kv_view *kv, int n_ctx, int hd,
                           float scale, float *probs, float *out)
{
    const int full = hd / 8, tail = hd % 8;
    for (int h0 = 0; h0 < n_q; h0 += AH) {
        const int nh = n_q - h0 < AH ? n_q - h0 : AH;
        mm_kv_it ik;
        mm_kv_it_init(&ik, kv->k, kv);
        for (int t = 0; t < n_ctx; t++) {
            const float *kt = mm_kv_it_next(&ik);
            __m256 acc[AH];
            for (int h = 0; h < nh; h++) acc[h] = _mm256_setzero_ps();
            for (int c = 0; c < full; c++) {
                __m256 kv = _mm256_loadu_ps(kt + c * 8);
                for (int h = 0; h < nh; h++)
                    acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)(h0 + h) * hd + c * 8), kv,
                                             acc[h]);
            }
            if (tail) {
                __m256 kv = ld256(kt + full * 8, STAGE_F32, tail);
                for (int h = 0; h < nh; h++)
                    acc[h] = _mm256_fmadd_ps(
                        ld256(q + (size_t)(h0 + h) * hd + full * 8, STAGE_F32, tail), kv, acc[h]);
            }
            for (int h = 0; h < nh; h++)
                probs[(size_t)(h0 + h) * n_ctx + t] = hsum256(acc[h]) * scale;
        }
    }
    stage_mm_softmax_rows(probs, n_q, n_ctx);
    memset(out, 0, (size_t)n_q * hd * sizeof(float));
    mm_kv_it iv;
    mm_kv_it_init(&iv, kv->v, kv);
    for (int t = 0; t < n_ctx; t++) {
        const float *vt = mm_kv_it_next(&iv);
        for (int h = 0; h < n_q; h++) {
            const float p = probs[(size_t)h * n_ctx + t];
            const __m256 pv = _mm256_set1_ps(p);
            float *o = out + (size_t)h * hd;
            for (int c = 0; c < full; c++)
                _mm256_storeu_ps(o + c * 8, _mm256_fmadd_ps(pv, _mm256_loadu_ps(vt + c * 8),
                                                            _mm256_loadu_ps(o + c * 8)));
            for (int i = full * 8; i < hd; i++) o[i] = __builtin_fmaf(p, vt[i], o[i]);
        }
    }
}

/* ---- tables ---------------------------------------------------------------------------------- */

const mm_ops stage_mm_ops_avx2 = {
    .rows = {[STAGE_F32] = rows256_f32,
             [STAGE_BF16] = rows256_bf16,
             [STAGE_F16] = rows256_f16,
             [STAGE_Q8_0] = stage_mm_q8_rows_avx2},
    .cvt = {[STAGE_F32] = cvt_f32, [STAGE_BF16] = cvt256_bf16, [STAGE_F16] = cvt256_f16},
    .split = NULL,
    .rows_nosplit_bf16 = NULL,
    .attend = attend256,
};

const mm_ops stage_mm_ops_avx512 = {
    .rows = {[STAGE_F32] = rows512_f32,
             [STAGE_BF16] = rows512_bf16,
             [STAGE_F16] = rows512_f16,
             [STAGE_Q8_0] = stage_mm_q8_rows_avx512},
    .cvt = {[STAGE_F32] = cvt_f32, [STAGE_BF16] = cvt512_bf16, [STAGE_F16] = cvt512_f16},
    .split = NULL,
    .rows_nosplit_bf16 = NULL,
    .dx = dx512,
    .rows_bf16_dx = rows512_bf16_dx,
    .attend = attend512,
};

const mm_ops stage_mm_ops_avx512bf16 = {
    .rows = {[STAGE_F32] = rows512_f32,
             [STAGE_BF16] = rowsbf_bf16,
             [STAGE_F16] = rows512_f16,
             [STAGE_Q8_0] = stage_mm_q8_rows_avx512},
    .cvt = {[STAGE_F32] = cvt_f32, [STAGE_BF16] = cvt512_bf16, [STAGE_F16] = cvt512_f16},
    .split = splitbf,
    .rows_nosplit_bf16 = rows512_bf16,
    .attend = attend512,
};

#endif /* __x86_64__ */
