/* stage/dtype.c — the dtype table. See dtype.h. */
#include "stage/dtype.h"

#include <math.h>
#include <string.h>
#include <strings.h>

#include "stage/convert.h"

/* Tensors in safetensors files and on the wire are little-endian; the conversions copy
 * host words as they are. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "modpipe assumes a little-endian host");

static const struct {
    const char *name, *st_name;
    size_t size;
} TABLE[STAGE_N_DTYPES] = {
    [STAGE_F32] = {"f32", "F32", 4},
    [STAGE_BF16] = {"bf16", "BF16", 2},
    [STAGE_F16] = {"f16", "F16", 2},
};

int stage_dtype_valid(int d) { return d >= 0 && d < STAGE_N_DTYPES; }
size_t stage_dtype_size(stage_dtype d) { return stage_dtype_valid((int)d) ? TABLE[d].size : 0; }
const char *stage_dtype_name(stage_dtype d)
{
    return stage_dtype_valid((int)d) ? TABLE[d].name : "?";
}
const char *stage_dtype_st_name(stage_dtype d)
{
    return stage_dtype_valid((int)d) ? TABLE[d].st_name : "?";
}

int stage_dtype_parse(const char *s, stage_dtype *out)
{
    for (int d = 0; s && d < STAGE_N_DTYPES; d++)
        if (!strcasecmp(s, TABLE[d].name)) {
            *out = (stage_dtype)d;
            return 0;
        }
    return -1;
}

void stage_dtype_to_f32(stage_dtype d, const void *src, float *dst, size_t n)
{
    const unsigned char *p = src;
    if (d == STAGE_F32) {
        memcpy(dst, src, n * 4);
        return;
    }
    if (((uintptr_t)p & 1u) == 0) {
        if (d == STAGE_F16)
            stage_f16_to_f32_n((const uint16_t *)src, dst, n);
        else
            stage_bf16_to_f32_n((const uint16_t *)src, dst, n);
        return;
    }
    for (size_t i = 0; i < n; i++) { /* odd address: read each half through memcpy */
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        dst[i] = d == STAGE_F16 ? stage_f16_to_f32(h) : stage_bf16_to_f32(h);
    }
}

void stage_dtype_from_f32(stage_dtype d, const float *src, void *dst, size_t n)
{
    unsigned char *p = dst;
    if (d == STAGE_F32) {
        memcpy(dst, src, n * 4);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        uint16_t h = d == STAGE_F16 ? stage_f32_to_f16(src[i]) : stage_f32_to_bf16(src[i]);
        memcpy(p + 2 * i, &h, 2);
    }
}

int stage_wdtype_parse(const char *s, stage_dtype *out)
{
    if (s && !strcasecmp(s, "q8_0")) {
        *out = STAGE_Q8_0;
        return 0;
    }
    return stage_dtype_parse(s, out);
}

const char *stage_wdtype_name(stage_dtype d)
{
    return d == STAGE_Q8_0 ? "q8_0" : stage_dtype_name(d);
}

int stage_q8_quantize_row(const float *x, int n, int8_t *q, uint16_t *d)
{
    for (int b = 0; b * STAGE_Q8_BLOCK < n; b++) {
        const int c0 = b * STAGE_Q8_BLOCK;
        const int nb = n - c0 < STAGE_Q8_BLOCK ? n - c0 : STAGE_Q8_BLOCK;
        float amax = 0.0f;
        for (int c = 0; c < nb; c++) {
            if (!isfinite(x[c0 + c])) return -1;
            float a = fabsf(x[c0 + c]);
            if (a > amax) amax = a;
        }
        const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
        for (int c = 0; c < nb; c++) {
            float v = roundf(x[c0 + c] * id);
            q[c0 + c] = (int8_t)(v > 127.0f ? 127 : v < -127.0f ? -127 : v);
        }
        d[b] = stage_f32_to_f16(dd);
    }
    return 0;
}

void stage_q8_dequant(const int8_t *q, const uint16_t *d, int c0, int n, float *dst)
{
    for (int c = 0; c < n; c += STAGE_Q8_BLOCK) {
        const float dd = stage_f16_to_f32(d[(c0 + c) / STAGE_Q8_BLOCK]);
        const int nb = n - c < STAGE_Q8_BLOCK ? n - c : STAGE_Q8_BLOCK;
        for (int i = 0; i < nb; i++) dst[c + i] = (float)q[c0 + c + i] * dd;
    }
}

void stage_weight_row_f32(const stage_weight *w, int r, float *dst)
{
    if (w->dtype == STAGE_Q8_0) {
        stage_q8_dequant((const int8_t *)w->data + (size_t)r * w->cols,
                         w->scale + (size_t)r * stage_q8_blocks(w->cols), 0, w->cols, dst);
        return;
    }
    size_t es = stage_dtype_size(w->dtype);
    stage_dtype_to_f32(w->dtype, (const unsigned char *)w->data + (size_t)r * w->cols * es, dst,
                       (size_t)w->cols);
}
