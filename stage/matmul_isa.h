/* stage/matmul_isa.h — internal to stage/matmul*.c: one table of kernels per ISA variant.
 *
 * rows[dtype](x, m, w, r0, r1, y, xs): y[i][j] for i < m, r0 <= j < r1 (y row stride w->rows),
 * x [m][w->cols]. Each y[i][j] is computed from x row i and weight row j alone, in an order
 * fixed by the variant and w->cols (stage/matmul.h: reduction order). xs is the split x of
 * the variant's split() (NULL for variants without one).
 * split(x, m, k, xs): xs [m][2][mm_split_half(k)] bf16, hi part then lo part, each zero
 * padded to kp = k rounded up to 32: x ~= hi + lo with ~16 mantissa bits. The half is kp + 32,
 * not kp: with power-of-two k the rows (and the hi and lo parts) would sit at multiples of
 * 4 KiB, all in one L1 set, and the kernels that read 4-8 of them at once would evict each
 * other. NULL: this variant does not need it.
 * dx / rows_bf16_dx: below.
 * cvt[dtype](src, dst, n): n elements to f32, exact (the large path's tile conversion).
 * attend: stage_attend_gqa for this variant.
 */
#ifndef STAGE_MATMUL_ISA_H
#define STAGE_MATMUL_ISA_H

#include <stddef.h>
#include <stdint.h>

#include "stage/dtype.h"

typedef struct stage_kv_view stage_kv_view; /* stage/matmul.h */

typedef void (*mm_rows_fn)(const float *x, int m, const stage_weight *w, int r0, int r1, float *y,
                           const uint16_t *xs);
typedef void (*mm_cvt_fn)(const void *src, float *dst, size_t n);
typedef void (*mm_attend_fn)(const float *q, int n_q, const stage_kv_view *kv, int n_ctx, int hd,
                             float scale, float *probs, float *out);

typedef struct {
    mm_rows_fn rows[STAGE_N_WDTYPES]; /* [STAGE_Q8_0]: stage/matmul_q8.c */
    mm_cvt_fn cvt[STAGE_N_DTYPES];
    void (*split)(const float *x, int m, int k, uint16_t *xs);
    /* rows to use for bf16 when split's scratch is unavailable (NULL: rows[] never needs xs) */
    mm_rows_fn rows_nosplit_bf16;
    /* bf16 rows for m >= 2 (NULL: rows[] serves every m): dx(x, m, k, xd) writes x as the
     * kernel reads it (layout below), rows_bf16_dx takes that as its x; the same results as
     * rows[STAGE_BF16], bit for bit, and faster for many rows. */
    void (*dx)(const float *x, int m, int k, float *xd);
    mm_rows_fn rows_bf16_dx;
    mm_attend_fn attend;
} mm_ops;

static inline int mm_split_kp(int k) { return (k + 31) & ~31; }
static inline int mm_split_half(int k) { return mm_split_kp(k) + 32; }
/* dx's layout: xd [m][mm_dx_stride(k)] f32, per 32-column chunk the 16 even columns then the
 * 16 odd ones, zero past k. The stride is kp + 16, not kp, for the reason above (rows 4 KiB
 * apart would share L1 sets). */
static inline int mm_dx_stride(int k) { return mm_split_kp(k) + 16; }

/* Walks the entries of a stage_kv_view in order: kv_it_next returns entry t0, t0 + 1, ...
 * of the K (or V) side; the page id is read only when an entry starts a page. */
typedef struct {
    const float *base, *p;
    const int32_t *pg;
    int left, page;
    size_t ps, st;
} mm_kv_it;

static inline void mm_kv_it_init(mm_kv_it *it, const float *base, const stage_kv_view *kv)
{
    const int off = kv->t0 % kv->page;
    it->base = base;
    it->pg = kv->pages + kv->t0 / kv->page;
    it->page = kv->page;
    it->left = kv->page - off;
    it->ps = kv->page_stride;
    it->st = kv->stride;
    it->p = base + (size_t)it->pg[0] * it->ps + (size_t)off * it->st;
}

static inline const float *mm_kv_it_next(mm_kv_it *it)
{
    if (it->left == 0) {
        it->pg++;
        it->p = it->base + (size_t)it->pg[0] * it->ps;
        it->left = it->page;
    }
    it->left--;
    const float *r = it->p;
    it->p += it->st;
    return r;
}

extern const mm_ops stage_mm_ops_c;
#if defined(__x86_64__)
extern const mm_ops stage_mm_ops_avx2;
extern const mm_ops stage_mm_ops_avx512;
extern const mm_ops stage_mm_ops_avx512bf16;
#endif

/* Q8_0 (matmul_q8.c): row kernels, and a tile [rn][kc] of rows r0.., columns c0.. (a multiple
 * of 32) dequantized to f32 into buf. */
void stage_mm_q8_rows_c(const float *x, int m, const stage_weight *w, int r0, int r1, float *y,
                        const uint16_t *xs);
void stage_mm_q8_tile(const stage_weight *w, int r0, int rn, int c0, int kc, float *buf);
#if defined(__x86_64__)
void stage_mm_q8_rows_avx2(const float *x, int m, const stage_weight *w, int r0, int r1, float *y,
                           const uint16_t *xs);
void stage_mm_q8_rows_avx512(const float *x, int m, const stage_weight *w, int r0, int r1, float *y,
                             const uint16_t *xs);
#endif

/* Q8_0 FAST mode (stage_matmul_set_mode): x quantized per 32-column block to int8 with an f32
 * scale (llama.cpp's q8_0 rule: d = max|x| / 127, q = round(x / d)), dotted with the weights'
 * int8 by AVX-512 VNNI. quant_x writes m rows of mm_q8x_row_bytes(k) each: uint8 q + 128
 * [kq] (128 past k), then f32 d per lane of the kernel's 64-column steps, [kq / 64][16]: lanes
 * 0-7 the d of block 2p, 8-15 of block 2p + 1 (one load a step, no shuffle). rows_vnni takes
 * that as xs. Both layouts live in one scratch (xs_reserve: the larger of the two). */
static inline int mm_q8x_kq(int k) { return (k + 63) & ~63; }
static inline size_t mm_q8x_row_bytes(int k) { return (size_t)mm_q8x_kq(k) * 2; }
int stage_mm_q8_fast_supported(void);
void stage_mm_q8_quant_x(const float *x, int m, int k, void *xq);
#if defined(__x86_64__)
void stage_mm_q8_rows_vnni(const float *x, int m, const stage_weight *w, int r0, int r1, float *y,
                           const uint16_t *xs);
#endif

/* Plain C pieces shared by every variant (matmul.c). */
void stage_mm_softmax_rows(float *probs, int n_q, int n_ctx);

#endif
