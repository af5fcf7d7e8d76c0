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

typedef enum { STAGE_F32 = 0, STAGE_BF16 = 1, STAGE_F16 = 2 } stage_dtype;
#define STAGE_N_DTYPES 3

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
    stage_dtype dtype;
    int rows, cols;
    const void *data;
} stage_weight;

static inline size_t stage_weight_bytes(const stage_weight *w)
{
    return (size_t)w->rows * (size_t)w->cols * stage_dtype_size(w->dtype);
}
/* Row r of w as f32 into dst [cols] (embedding lookups, small router vectors). */
void stage_weight_row_f32(const stage_weight *w, int r, float *dst);

#endif
