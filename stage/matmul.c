/* stage/matmul.c — interim: f32 weights straight to sgemm, others converted tile by tile. */
#include "stage/matmul.h"

#include <cblas.h>
#include <stdlib.h>

void stage_matmul_w(const float *x, int m, const stage_weight *w, float *y)
{
    if (m <= 0 || w->rows <= 0) return;
    const int n = w->rows, k = w->cols;
    if (w->dtype == STAGE_F32) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, k, w->data, k, 0.0f,
                    y, n);
        return;
    }
    enum { TILE = 64 };
    static _Thread_local float *buf; /* [TILE][k], grown once */
    static _Thread_local size_t cap;
    if (cap < (size_t)TILE * k) {
        free(buf);
        cap = (size_t)TILE * k;
        buf = malloc(cap * sizeof *buf);
    }
    size_t es = stage_dtype_size(w->dtype);
    for (int r0 = 0; r0 < n; r0 += TILE) {
        int nr = n - r0 < TILE ? n - r0 : TILE;
        stage_dtype_to_f32(w->dtype, (const char *)w->data + (size_t)r0 * k * es, buf, (size_t)nr * k);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, nr, k, 1.0f, x, k, buf, k, 0.0f,
                    y + r0, n);
    }
}
