/* stage/dtype.h — the one dtype table of modpipe: weights (safetensors), the wire, KV.
 *
 * Every place that names, sizes, parses or converts a tensor element type goes through this
 * table; the numeric values are the wire's (proto/modpipe.proto WireDtype), so a
 * stage_dtype can be put in a packet header as it is.
 *
 * Conversions: f32 -> bf16 / f16 round to nearest even, NaN stays NaN, overflow gives inf,
 * f16 subnormals both ways (stage/convert.h has the scalar forms). The array forms read and
 * write raw little-endian bytes at any alignment. Pure functions, no allocation.
 */
#ifndef STAGE_DTYPE_H
#define STAGE_DTYPE_H

#include <stddef.h>
#include <stdint.h>

/* STAGE_Q8_0 is a weight format only (docs/SPEC.md §9): blocks of STAGE_Q8_BLOCK consecutive
 * values of a row as int8 q with one f16 scale d per block, value = q * d (llama.cpp's Q8_0
 * numbers; the layout is modpipe's: the int8 matrix and the scale matrix apart, see
 * stage_weight). It is not an element dtype: never on the wire or in the KV cache, and the
 * element functions below (size, names, parse, conversions) do not know it. */
typedef enum { STAGE_F32 = 0, STAGE_BF16 = 1, STAGE_F16 = 2, STAGE_Q8_0 = 3 } stage_dtype;
#define STAGE_N_DTYPES 3  /* element dtypes: weights, wire, KV */
#define STAGE_N_WDTYPES 4 /* weight dtypes: the element ones and STAGE_Q8_0 */
#define STAGE_Q8_BLOCK 32

size_t stage_dtype_size(stage_dtype d);         /* 4, 2, 2; 0 for a value outside the table */
const char *stage_dtype_name(stage_dtype d);    /* "f32", "bf16", "f16" */
const char *stage_dtype_st_name(stage_dtype d); /* safetensors header names "F32", "BF16", "F16" */
/* Accepts either spelling, any case ("bf16", "BF16"). 0 ok, -1 unknown. */
int stage_dtype_parse(const char *s, stage_dtype *out);
int stage_dtype_valid(int d); /* d is a member of the table */

/* n elements of dtype d at src (raw bytes) -> f32 dst, and back. */
void stage_dtype_to_f32(stage_dtype d, const void *src, float *dst, size_t n);
void stage_dtype_from_f32(stage_dtype d, const float *src, void *dst, size_t n);

/* A weight matrix as it lies in memory (usually inside a safetensors mmap), in its
 * checkpoint dtype: element (r, c) is at data + (r * cols + c) * size. HF nn.Linear
 * weights are [out][in], so y = x W^T has n = rows, k = cols. 1-D tensors: rows = 1.
 * data is aligned to the element size (the loader copies a misaligned tensor). */
typedef struct {
    stage_dtype dtype; /* any weight dtype, STAGE_Q8_0 included */
    int rows, cols;
    const void *data;      /* [rows][cols] elements; Q8_0: int8 q [rows][cols] */
    const uint16_t *scale; /* Q8_0 only: f16 d [rows][stage_q8_blocks(cols)], else NULL; a
                            * row's last block holds cols % 32 values when that is not 0 */
} stage_weight;

static inline int stage_q8_blocks(int cols) { return (cols + STAGE_Q8_BLOCK - 1) / STAGE_Q8_BLOCK; }
/* Bytes of a rows x cols matrix held in weight dtype d (Q8_0: cols int8 + 2 per block a row). */
static inline size_t stage_matrix_bytes(stage_dtype d, size_t rows, size_t cols)
{
    if (d == STAGE_Q8_0) return rows * (cols + 2 * (size_t)stage_q8_blocks((int)cols));
    return rows * cols * stage_dtype_size(d);
}
static inline size_t stage_weight_bytes(const stage_weight *w)
{
    return stage_matrix_bytes(w->dtype, (size_t)w->rows, (size_t)w->cols);
}
/* Row r of w as f32 into dst [cols] (embedding lookups, small router vectors). */
void stage_weight_row_f32(const stage_weight *w, int r, float *dst);

/* Weight dtypes by name: the element names and "q8_0" (any case). 0 ok, -1 unknown. */
int stage_wdtype_parse(const char *s, stage_dtype *out);
const char *stage_wdtype_name(stage_dtype d); /* "f32", "bf16", "f16", "q8_0" */

/* One row of n values to Q8_0 (llama.cpp's quantize_row_q8_0_ref numbers): per block of 32
 * (the last one may be shorter) d = max|x| / 127, q = round(x / d) (half away from zero),
 * d stored as f16; an all-zero block has d = 0, q = 0. q [n], d [stage_q8_blocks(n)].
 * 0, or -1 when a value is not finite (nothing sensible to store). */
int stage_q8_quantize_row(const float *x, int n, int8_t *q, uint16_t *d);
/* Values c0 .. c0+n-1 of a Q8_0 row (q, d: the row's) as f32: q * d, exact in f32. c0 is a
 * multiple of 32. */
void stage_q8_dequant(const int8_t *q, const uint16_t *d, int c0, int n, float *dst);

#endif
