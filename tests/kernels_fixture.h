/* tests/kernels_fixture.h — what the matmul tests share: seeded data, weights of every dtype
 * built from f32 values (with the values they really hold, for references), a double
 * reference product, error measures, the pool's thread count. Test programs only. */
#ifndef TESTS_KERNELS_FIXTURE_H
#define TESTS_KERNELS_FIXTURE_H

#include <CUnit/Basic.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stage/convert.h"
#include "stage/matmul.h"

#define ERRLEN 256
#define TOL 1e-5

static inline int verbose(void) { return getenv("MODPIPE_TEST_VERBOSE") != NULL; }

/* xorshift: the same data on every run */
static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static inline float frand(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((double)(g_rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static inline void fill(float *a, size_t n)
{
    for (size_t i = 0; i < n; i++) a[i] = frand();
}

/* A weight of dtype dt from f32 values: raw data (caller frees w->data) and the f32 values it
 * really holds (wr, rounded) for the reference. */
static inline void make_weight(stage_dtype dt, int rows, int cols, const float *src,
                               stage_weight *w, float *wr)
{
    size_t n = (size_t)rows * cols;
    w->dtype = dt;
    w->rows = rows;
    w->cols = cols;
    w->scale = NULL;
    if (dt == STAGE_F32) {
        float *d = malloc(n * sizeof *d);
        memcpy(d, src, n * sizeof *d);
        memcpy(wr, src, n * sizeof *d);
        w->data = d;
        return;
    }
    if (dt == STAGE_Q8_0) { /* int8 [rows][cols], f16 scales [rows][blocks]; wr: q * d */
        const int nb = stage_q8_blocks(cols);
        int8_t *q = malloc(n ? n : 1);
        uint16_t *sc = malloc((size_t)rows * nb * sizeof *sc + 2);
        for (int r = 0; r < rows; r++) {
            CU_ASSERT_EQUAL(stage_q8_quantize_row(src + (size_t)r * cols, cols,
                                                  q + (size_t)r * cols, sc + (size_t)r * nb),
                            0);
            stage_q8_dequant(q + (size_t)r * cols, sc + (size_t)r * nb, 0, cols,
                             wr + (size_t)r * cols);
        }
        w->data = q;
        w->scale = sc;
        return;
    }
    uint16_t *d = malloc(n * sizeof *d);
    for (size_t i = 0; i < n; i++) {
        d[i] = dt == STAGE_BF16 ? stage_f32_to_bf16(src[i]) : stage_f32_to_f16(src[i]);
        wr[i] = dt == STAGE_BF16 ? stage_bf16_to_f32(d[i]) : stage_f16_to_f32(d[i]);
    }
    w->data = d;
}

/* ref [m][n] = x [m][k] · wr^T in double */
static inline void ref_matmul(const float *x, int m, int k, const float *wr, int n, double *ref)
{
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0.0;
            for (int c = 0; c < k; c++) s += (double)x[(size_t)i * k + c] * wr[(size_t)j * k + c];
            ref[(size_t)i * n + j] = s;
        }
}

/* max |y - ref| / max |ref| over the first count values */
static inline double rel_err_d(const float *y, const double *ref, size_t count)
{
    double e = 0.0, mx = 0.0;
    for (size_t i = 0; i < count; i++) {
        double d = fabs((double)y[i] - ref[i]);
        if (d > e || d != d) e = d != d ? INFINITY : d;
        if (fabs(ref[i]) > mx) mx = fabs(ref[i]);
    }
    return mx > 0 ? e / mx : e;
}

static inline double rel_err_f(const float *a, const float *b, size_t count)
{
    double e = 0.0, mx = 0.0;
    for (size_t i = 0; i < count; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > e || d != d) e = d != d ? INFINITY : d;
        if (fabs((double)b[i]) > mx) mx = fabs((double)b[i]);
    }
    return mx > 0 ? e / mx : e;
}

static inline void free_weight(stage_weight *w)
{
    free((void *)w->data);
    free((void *)w->scale);
}

/* every weight dtype: the element ones and Q8_0 (its reference: the dequantized values) */
static const stage_dtype DTYPES[] = {STAGE_F32, STAGE_BF16, STAGE_F16, STAGE_Q8_0};
#define N_DT 4
static inline const char *dt_name(stage_dtype d) { return stage_wdtype_name(d); }

static inline void threads(int n)
{
    char err[ERRLEN];
    int rc = stage_threads_init(n, err, sizeof err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(stage_threads_n(), n);
}

#endif
