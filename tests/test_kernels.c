/* tests/test_kernels.c — stage/matmul.h: stage_matmul_w and stage_attend* against independent
 * double-precision references, for every ISA variant this CPU can run.
 *
 *   1. every variant x dtype (f32, bf16, f16) x m = 1..40, 63..65, 70 (across both thresholds) on shapes with
 *      odd k and n not a multiple of the row block, both paths: max |y - ref| / max |ref| <= 1e-5,
 *      the reference being computed in double on the same bf16/f16-rounded weights; each SIMD
 *      variant against the plain C one;
 *   2. determinism: thread counts 1, 2, 3 give bit-identical results (both paths, the large one
 *      on both engines); a row of a
 *      small-path call with m = 8 is bit-identical to that row computed alone; so is every row
 *      of the bf16 many-row kernels (m = 2 .. 33, exact), and their FAST mode gives the AVX-512
 *      BF16 variant's bits;
 *   3. attention (one head and GQA groups) against a double reference; a GQA head is
 *      bit-identical to the same head alone;
 *   4. the thread pool: 2000 jobs back to back and jobs after the workers went to sleep give
 *      the single-thread bits;
 *   5. edge cases and errors: m = 0, k = 0, bad thread counts, unsupported variants; Q8_0
 *      quantization, and FAST mode's vectorised x quantizer against the scalar rule (exact ties);
 *   6. the large path on oneDNN vs on OpenBLAS vs the reference, primitives cached; bf16
 *      weights on oneDNN's bf16 matmul, exact and fast modes (make test runs this program again
 *      with ONEDNN_MAX_CPU_ISA=SSE41 and =AVX512_CORE: the capped kernels, no bf16 ones).
 * MODPIPE_TEST_VERBOSE=1 prints the measured errors.
 */
#include "stage/convert.h"
#include "stage/matmul.h"
#include "stage/onednn.h"

#include <CUnit/Basic.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/testutil.h"

#include "stage/matmul_isa.h"
#include "tests/kernels_fixture.h"

/* ---- 1. accuracy ----------------------------------------------------------------------------- */

/* One shape, every variant and dtype, the given m values, paths AUTO and the forced other one.
 * Records the worst error per (variant, dtype) in worst[][]. */
static void check_shape(int n, int k, const int *ms, int n_ms, double worst[STAGE_N_ISAS][N_DT])
{
    int mmax = 0;
    for (int t = 0; t < n_ms; t++)
        if (ms[t] > mmax) mmax = ms[t];
    float *x = malloc((size_t)mmax * k * sizeof *x);
    float *src = malloc((size_t)n * k * sizeof *src);
    float *wr = malloc((size_t)n * k * sizeof *wr);
    double *ref = malloc((size_t)mmax * n * sizeof *ref);
    float *y = malloc((size_t)mmax * n * sizeof *y);
    float *yc = malloc((size_t)mmax * n * sizeof *yc);
    fill(x, (size_t)mmax * k);
    fill(src, (size_t)n * k);
    for (int d = 0; d < N_DT; d++) {
        stage_weight w;
        make_weight(DTYPES[d], n, k, src, &w, wr);
        ref_matmul(x, mmax, k, wr, n, ref);
        for (int t = 0; t < n_ms; t++) {
            const int m = ms[t];
            CU_ASSERT_EQUAL_FATAL(stage_matmul_force_isa(STAGE_ISA_C), 0);
            stage_matmul_force_path(STAGE_PATH_AUTO);
            stage_matmul_w(x, m, &w, yc);
            for (int isa = 0; isa < STAGE_N_ISAS; isa++) {
                if (!stage_isa_supported((stage_isa)isa)) continue;
                CU_ASSERT_EQUAL_FATAL(stage_matmul_force_isa((stage_isa)isa), 0);
                for (int p = 0; p < 2; p++) {
                    stage_path path =
                        p == 0 ? STAGE_PATH_AUTO
                               : (m <= stage_matmul_m_small(DTYPES[d]) ? STAGE_PATH_LARGE
                                                                       : STAGE_PATH_SMALL);
                    stage_matmul_force_path(path);
                    for (size_t i = 0; i < (size_t)m * n; i++) y[i] = NAN;
                    stage_matmul_w(x, m, &w, y);
                    double e = rel_err_d(y, ref, (size_t)m * n);
                    double ec = rel_err_f(y, yc, (size_t)m * n);
                    if (e > worst[isa][d]) worst[isa][d] = e;
                    if (e > TOL || ec > 2 * TOL)
                        fprintf(stderr,
                                "\n  %s %s n=%d k=%d m=%d path=%d: rel err %.3g (vs C %.3g)\n",
                                stage_isa_name((stage_isa)isa), dt_name(DTYPES[d]), n, k, m,
                                (int)path, e, ec);
                    CU_ASSERT(e <= TOL);
                    CU_ASSERT(ec <= 2 * TOL);
                }
            }
        }
        free_weight(&w);
    }
    stage_matmul_force_path(STAGE_PATH_AUTO);
    stage_matmul_force_isa(stage_isa_best());
    free(x);
    free(src);
    free(wr);
    free(ref);
    free(y);
    free(yc);
}

static void print_worst(const char *what, double worst[STAGE_N_ISAS][N_DT])
{
    if (!verbose()) return;
    for (int isa = 0; isa < STAGE_N_ISAS; isa++) {
        if (!stage_isa_supported((stage_isa)isa)) continue;
        fprintf(stderr, "\n  %s %-10s f32 %.3g  bf16 %.3g  f16 %.3g  q8_0 %.3g", what,
                stage_isa_name((stage_isa)isa), worst[isa][0], worst[isa][1], worst[isa][2],
                worst[isa][3]);
    }
}

/* m = 1..40 and around 64 (the thresholds of f32 and of bf16/f16) on small odd shapes, 1 and 2
 * threads */
static void test_matmul_m_sweep(void)
{
    int ms[44];
    for (int i = 0; i < 40; i++) ms[i] = i + 1;
    ms[40] = 63, ms[41] = 64, ms[42] = 65, ms[43] = 70;
    double worst[STAGE_N_ISAS][N_DT] = {{0}};
    for (int th = 1; th <= 2; th++) {
        threads(th);
        check_shape(37, 67, ms, 44, worst); /* k: 4 x 16 + 3; n: 9 row blocks + 1 */
        check_shape(6, 33, ms, 44, worst);  /* k just past one bf16 pair chunk */
        check_shape(5, 5, ms, 44, worst);   /* k < every vector width */
    }
    stage_threads_free();
    print_worst("m sweep", worst);
}

/* Larger shapes: many tiles, k blocked in the large path, long dot products. */
static void test_matmul_large_shapes(void)
{
    double worst[STAGE_N_ISAS][N_DT] = {{0}};
    threads(2);
    const int ms1[] = {1, 4, 16, 17, 24};
    check_shape(531, 300, ms1, 5, worst); /* 3 tiles; k not a multiple of 16 */
    const int ms2[] = {1, 3, 17};
    check_shape(13, STAGE_TILE_K * 2 + 37, ms2, 3, worst); /* k in 3 converted blocks */
    const int ms3[] = {2, 20};
    check_shape(64, 4096, ms3, 2, worst); /* decode-sized dot products */
    /* Q8_0's AVX-512 kernel reads scales 16 blocks at a time: 3 groups and a short block */
    const int ms4[] = {1, 2, 3, 4, 5, 9};
    check_shape(9, 32 * 16 * 3 + 5, ms4, 6, worst);
    stage_threads_free();
    print_worst("large", worst);
}

/* ---- 2. determinism -------------------------------------------------------------------------- */

static void test_matmul_threads_bitwise(void)
{
    const int n = 1000, k = 301; /* 4 large-path tiles, many small-path tasks */
    const int ms[] = {1, 5, 16, 33, 70};
    float *x = malloc((size_t)70 * k * sizeof *x);
    float *src = malloc((size_t)n * k * sizeof *src);
    float *wr = malloc((size_t)n * k * sizeof *wr);
    float *y[3];
    for (int t = 0; t < 3; t++) y[t] = malloc((size_t)70 * n * sizeof(float));
    fill(x, (size_t)70 * k);
    fill(src, (size_t)n * k);
    for (int d = 0; d < N_DT; d++) {
        stage_weight w;
        make_weight(DTYPES[d], n, k, src, &w, wr);
        for (int isa = 0; isa < STAGE_N_ISAS; isa++) {
            if (!stage_isa_supported((stage_isa)isa)) continue;
            stage_matmul_force_isa((stage_isa)isa);
            for (int mi = 0; mi < 5 * 2; mi++) {
                const int m = ms[mi % 5], eng = mi / 5; /* large path on OpenBLAS, oneDNN */
                stage_matmul_force_engine(eng ? STAGE_ENGINE_ONEDNN : STAGE_ENGINE_BLAS);
                for (int th = 1; th <= 3; th++) {
                    threads(th);
                    memset(y[th - 1], 0xff, (size_t)m * n * sizeof(float));
                    stage_matmul_w(x, m, &w, y[th - 1]);
                }
                int same = !memcmp(y[0], y[1], (size_t)m * n * sizeof(float)) &&
                           !memcmp(y[0], y[2], (size_t)m * n * sizeof(float));
                if (!same)
                    fprintf(stderr, "\n  %s %s m=%d %s: results differ between 1, 2, 3 threads\n",
                            stage_isa_name((stage_isa)isa), dt_name(DTYPES[d]), m,
                            eng ? "onednn" : "openblas");
                CU_ASSERT(same);
            }
            stage_matmul_force_engine(STAGE_ENGINE_AUTO);
        }
        free_weight(&w);
    }
    stage_threads_free();
    stage_matmul_force_isa(stage_isa_best());
    free(x);
    free(src);
    free(wr);
    for (int t = 0; t < 3; t++) free(y[t]);
}

/* The large path's two tile engines: oneDNN (the default where it has a kernel: every x86-64
 * CPU, whatever ONEDNN_MAX_CPU_ISA caps it to) and OpenBLAS, each within TOL of the double
 * reference and of each other, for f32 and for converted bf16/f16 tiles (row tiles with a
 * tail, k in several converted blocks); a second call reuses the cached primitives. */
static void test_matmul_onednn(void)
{
    char eng[96];
    stage_matmul_large_engine(100, 300, eng, sizeof eng);
    if (verbose()) fprintf(stderr, "\n  large-path engine by default (m=100, k=300): %s\n", eng);
    stage_matmul_force_engine(STAGE_ENGINE_ONEDNN);
#if defined(__x86_64__)
    /* oneDNN has non-reference f32 kernels on every x86-64 CPU (SSE4.1 and up) */
    CU_ASSERT(!strncmp(stage_matmul_large_engine(100, 300, eng, sizeof eng), "onednn:", 7));
#endif
    stage_matmul_force_engine(STAGE_ENGINE_BLAS);
    CU_ASSERT_STRING_EQUAL(stage_matmul_large_engine(100, 300, eng, sizeof eng), "openblas");
    stage_matmul_force_engine(STAGE_ENGINE_AUTO);
    threads(2);
    const int shapes[][2] = {{531, 300}, {300, STAGE_TILE_K * 2 + 37}, {256, 64}};
    const int ms[] = {33, 65, 100};
    double worst = 0.0, worst_x = 0.0;
    for (int si = 0; si < 3; si++) {
        const int n = shapes[si][0], k = shapes[si][1], mmax = 100;
        float *x = malloc((size_t)mmax * k * sizeof *x);
        float *src = malloc((size_t)n * k * sizeof *src);
        float *wr = malloc((size_t)n * k * sizeof *wr);
        float *yd = malloc((size_t)mmax * n * sizeof *yd), *yb = malloc((size_t)mmax * n * 4);
        double *ref = malloc((size_t)mmax * n * sizeof *ref);
        fill(x, (size_t)mmax * k);
        fill(src, (size_t)n * k);
        for (int d = 0; d < N_DT; d++) {
            stage_weight w;
            make_weight(DTYPES[d], n, k, src, &w, wr);
            for (int mi = 0; mi < 3; mi++) {
                const int m = ms[mi];
                ref_matmul(x, m, k, wr, n, ref);
                stage_matmul_force_path(STAGE_PATH_LARGE);
                stage_matmul_force_engine(STAGE_ENGINE_BLAS);
                stage_matmul_w(x, m, &w, yb);
                stage_matmul_force_engine(STAGE_ENGINE_ONEDNN);
                memset(yd, 0xff, (size_t)m * n * sizeof *yd);
                stage_matmul_w(x, m, &w, yd);
                const int cached = stage_dnnl_cached();
                stage_matmul_w(x, m, &w, yd); /* the same shapes: no new primitive */
                CU_ASSERT_EQUAL(stage_dnnl_cached(), cached);
                double ed = rel_err_d(yd, ref, (size_t)m * n);
                double eb = rel_err_d(yb, ref, (size_t)m * n);
                double ex = rel_err_f(yd, yb, (size_t)m * n);
                if (ed > worst) worst = ed;
                if (ex > worst_x) worst_x = ex;
                if (!(ed <= TOL && eb <= TOL && ex <= 2 * TOL))
                    fprintf(stderr, "\n  %s n=%d k=%d m=%d: onednn %.3g openblas %.3g apart %.3g\n",
                            dt_name(DTYPES[d]), n, k, m, ed, eb, ex);
                CU_ASSERT(ed <= TOL);
                CU_ASSERT(eb <= TOL);
                CU_ASSERT(ex <= 2 * TOL);
            }
            free_weight(&w);
        }
        free(x);
        free(src);
        free(wr);
        free(yd);
        free(yb);
        free(ref);
    }
    stage_matmul_force_path(STAGE_PATH_AUTO);
    stage_matmul_force_engine(STAGE_ENGINE_AUTO);
    CU_ASSERT(stage_dnnl_cached() > 0);
    CU_ASSERT(stage_dnnl_cached() <= STAGE_DNNL_CACHE);
    stage_threads_free();
    CU_ASSERT_EQUAL(stage_dnnl_cached(), 0);
    if (verbose())
        fprintf(stderr, "  onednn: worst rel err %.3g vs reference, %.3g vs openblas\n", worst,
                worst_x);
}

/* bf16 weights on oneDNN's bf16 matmul (stage_dnnl_bf16: its AVX512-BF16 kernels) in both
 * modes (stage_matmul_set_mode): exact (x split in bf16 hi + lo) within TOL of the double
 * reference on the same rounded weights; fast (x rounded to bf16 once) within FAST_TOL and
 * really rounded (its error above exact's); each bit-identical at 1, 2 and 3 threads. Row
 * tiles with a tail, k not a multiple of 32 or 16, k longer than a converted block, and
 * stories260K's FFN shapes. Where oneDNN has no bf16 kernel (make test's run with
 * ONEDNN_MAX_CPU_ISA=AVX512_CORE, an AVX2 CPU) the exact f32 conversion runs in both modes:
 * fast then gives exact's bits. */
#define FAST_TOL 4e-3 /* x's 8 mantissa bits: 2^-9 relative per element; measured <= 1.7e-3 */
static void test_matmul_bf16_onednn(void)
{
    const int native = stage_dnnl_bf16();
    if (verbose()) fprintf(stderr, "\n  oneDNN bf16 kernels: %s", native ? "yes" : "no");
    if (native) { /* the brgemm kernel, not a reference or gemm one */
        stage_dnnl_shape s = {
            .m = 200, .n = 256, .k = 300, .ldx = 300, .ldw = 300, .ldy = 256, .bf16 = 1};
        const char *impl = stage_dnnl_impl(&s);
        CU_ASSERT(impl && strstr(impl, "brg:avx512_core_bf16"));
        if (verbose()) fprintf(stderr, " (%s)", impl ? impl : "none");
    }
    const int shapes[][2] = {{531, 300}, {300, STAGE_TILE_K + 37}, {256, 64}, {172, 64}, {64, 172}};
    const int ms[] = {256, 100, 65}; /* 256 first: the others' rows are compared with its rows */
    double worst[2] = {0, 0};
    for (int si = 0; si < 5; si++) {
        const int n = shapes[si][0], k = shapes[si][1], mmax = 256;
        float *x = malloc((size_t)mmax * k * sizeof *x);
        float *src = malloc((size_t)n * k * sizeof *src);
        float *wr = malloc((size_t)n * k * sizeof *wr);
        float *y[2][3];
        for (int a = 0; a < 6; a++) y[a / 3][a % 3] = malloc((size_t)mmax * n * sizeof(float));
        float *full[2] = {malloc((size_t)mmax * n * 4), malloc((size_t)mmax * n * 4)};
        double *ref = malloc((size_t)mmax * n * sizeof *ref);
        fill(x, (size_t)mmax * k);
        fill(src, (size_t)n * k);
        stage_weight w;
        make_weight(STAGE_BF16, n, k, src, &w, wr);
        ref_matmul(x, mmax, k, wr, n, ref);
        for (int mi = 0; mi < 3; mi++) {
            const int m = ms[mi];
            const size_t cnt = (size_t)m * n;
            for (int fast = 0; fast < 2; fast++) {
                stage_matmul_set_mode(fast ? STAGE_MATMUL_FAST : STAGE_MATMUL_EXACT);
                for (int th = 1; th <= 3; th++) {
                    threads(th);
                    memset(y[fast][th - 1], 0xff, cnt * sizeof(float));
                    stage_matmul_w(x, m, &w, y[fast][th - 1]);
                }
                CU_ASSERT(!memcmp(y[fast][0], y[fast][1], cnt * sizeof(float)));
                CU_ASSERT(!memcmp(y[fast][0], y[fast][2], cnt * sizeof(float)));
                /* oneDNN promises no order independent of m; its bf16 brgemm computes a row
                 * alone (measured on these shapes and 5632 x 2048; the f32 conversion path's
                 * gemm kernels do not): checked so a change shows */
                if (mi == 0) memcpy(full[fast], y[fast][0], cnt * sizeof(float));
                if (native) CU_ASSERT(!memcmp(full[fast], y[fast][0], cnt * sizeof(float)));
            }
            const double e = rel_err_d(y[0][0], ref, cnt), ef = rel_err_d(y[1][0], ref, cnt);
            if (e > worst[0]) worst[0] = e;
            if (ef > worst[1]) worst[1] = ef;
            if (!(e <= TOL && ef <= FAST_TOL))
                fprintf(stderr, "\n  bf16 n=%d k=%d m=%d: exact %.3g fast %.3g\n", n, k, m, e, ef);
            CU_ASSERT(e <= TOL);
            CU_ASSERT(ef <= FAST_TOL);
            if (native) {
                CU_ASSERT(ef > 10 * e); /* fast mode rounds x */
            } else {
                CU_ASSERT(!memcmp(y[0][0], y[1][0], cnt * sizeof(float)));
            }
        }
        stage_matmul_set_mode(STAGE_MATMUL_EXACT);
        free_weight(&w);
        free(x);
        free(src);
        free(wr);
        free(ref);
        free(full[0]);
        free(full[1]);
        for (int a = 0; a < 6; a++) free(y[a / 3][a % 3]);
    }
    stage_threads_free();
    if (verbose())
        fprintf(stderr, "\n  bf16 worst rel err: exact %.3g fast %.3g\n", worst[0], worst[1]);
}

/* A row's result on the small path does not depend on the other rows in the call (m = 8 and
 * m at the dtype's threshold), nor on the weight rows around it. */
static void test_matmul_row_independent(void)
{
    const int n = 45, k = 131, M = STAGE_M_SMALL_16BIT;
    float *x = malloc((size_t)M * k * sizeof *x);
    float *src = malloc((size_t)n * k * sizeof *src);
    float *wr = malloc((size_t)n * k * sizeof *wr);
    float *ym = malloc((size_t)M * n * sizeof *ym);
    float *y1 = malloc((size_t)n * sizeof *y1);
    float *y3 = malloc((size_t)3 * n * sizeof *y3);
    fill(x, (size_t)M * k);
    fill(src, (size_t)n * k);
    threads(2);
    for (int d = 0; d < N_DT; d++) {
        stage_weight w;
        make_weight(DTYPES[d], n, k, src, &w, wr);
        /* the first 7 rows of w as a weight of their own */
        stage_weight w7 = w;
        w7.rows = 7;
        const int mlist[2] = {8, stage_matmul_m_small(DTYPES[d])};
        for (int isa = 0; isa < STAGE_N_ISAS; isa++) {
            if (!stage_isa_supported((stage_isa)isa)) continue;
            stage_matmul_force_isa((stage_isa)isa);
            for (int mi = 0; mi < 2; mi++) {
                const int m = mlist[mi];
                stage_matmul_w(x, m, &w, ym);
                int same = 1;
                for (int i = 0; i < m; i++) {
                    stage_matmul_w(x + (size_t)i * k, 1, &w, y1);
                    same &= !memcmp(y1, ym + (size_t)i * n, (size_t)n * sizeof(float));
                }
                stage_matmul_w(x + (size_t)5 * k, 3, &w, y3); /* rows 5..7 as a 3-row call */
                same &= !memcmp(y3, ym + (size_t)5 * n, (size_t)3 * n * sizeof(float));
                stage_matmul_w(x, 1, &w7, y1);
                same &= !memcmp(y1, ym, 7 * sizeof(float));
                if (!same)
                    fprintf(stderr,
                            "\n  %s %s m=%d: a row's result depends on the rows around it\n",
                            stage_isa_name((stage_isa)isa), dt_name(DTYPES[d]), m);
                CU_ASSERT(same);
            }
        }
        free_weight(&w);
    }
    stage_threads_free();
    stage_matmul_force_isa(stage_isa_best());
    free(x);
    free(src);
    free(wr);
    free(ym);
    free(y1);
    free(y3);
}

/* A bf16 case for the small-path kernel tests: x [M][k], a bf16 weight [n][k], the double
 * reference on its rounded values [M][n], and output buffers ym, yb [M][n], y1 [n]. */
typedef struct {
    int n, k, M;
    float *x, *src, *wr, *ym, *yb, *y1;
    double *ref;
    stage_weight w;
} bf16_case;

static void bf16_case_make(bf16_case *c, int n, int k, int M)
{
    c->n = n, c->k = k, c->M = M;
    c->x = malloc((size_t)M * k * sizeof *c->x);
    c->src = malloc((size_t)n * k * sizeof *c->src);
    c->wr = malloc((size_t)n * k * sizeof *c->wr);
    c->ref = malloc((size_t)M * n * sizeof *c->ref);
    c->ym = malloc((size_t)M * n * sizeof *c->ym);
    c->yb = malloc((size_t)M * n * sizeof *c->yb);
    c->y1 = malloc((size_t)n * sizeof *c->y1);
    fill(c->x, (size_t)M * k);
    fill(c->src, (size_t)n * k);
    make_weight(STAGE_BF16, n, k, c->src, &c->w, c->wr);
    ref_matmul(c->x, M, k, c->wr, n, c->ref);
}

static void bf16_case_free(bf16_case *c)
{
    free_weight(&c->w);
    free(c->x);
    free(c->src);
    free(c->wr);
    free(c->ref);
    free(c->ym);
    free(c->yb);
    free(c->y1);
}

/* 1 when each of the m rows in c->ym is bit-identical to that x row's product alone */
static int bf16_rows_alone(bf16_case *c, int m)
{
    int same = 1;
    for (int i = 0; i < m; i++) {
        stage_matmul_w(c->x + (size_t)i * c->k, 1, &c->w, c->y1);
        same &= !memcmp(c->y1, c->ym + (size_t)i * c->n, (size_t)c->n * sizeof(float));
    }
    return same;
}

/* The AVX-512 BF16 small-path kernel (k-blocked, x split once per call) in both modes, forced
 * on the small path at m = 1 .. 33 (past its 32-row x block) and k across its 1024-column
 * blocks with a short tail: within TOL (exact) and FAST_TOL (fast) of the double reference,
 * every row bit-identical to the same row alone (m = 1), at 1 and 2 threads. Skipped where
 * the CPU has no AVX-512 BF16 (the variant cannot be forced there). */
static void test_matmul_bf16_rows_blocked(void)
{
    if (!stage_isa_supported(STAGE_ISA_AVX512BF16)) return;
    const int ms[] = {1, 2, 4, 8, 16, 32, 33};
    bf16_case c;
    bf16_case_make(&c, 23, 2 * 1024 + 37, 33);
    CU_ASSERT_EQUAL_FATAL(stage_matmul_force_isa(STAGE_ISA_AVX512BF16), 0);
    stage_matmul_force_path(STAGE_PATH_SMALL);
    double worst[2] = {0, 0};
    for (int th = 1; th <= 2; th++) {
        threads(th);
        for (int fast = 0; fast < 2; fast++) {
            stage_matmul_set_mode(fast ? STAGE_MATMUL_FAST : STAGE_MATMUL_EXACT);
            for (size_t mi = 0; mi < sizeof ms / sizeof ms[0]; mi++) {
                const int m = ms[mi];
                stage_matmul_w(c.x, m, &c.w, c.ym);
                const double e = rel_err_d(c.ym, c.ref, (size_t)m * c.n);
                if (e > worst[fast]) worst[fast] = e;
                CU_ASSERT(e <= (fast ? FAST_TOL : TOL));
                const int same = bf16_rows_alone(&c, m);
                if (!same)
                    fprintf(stderr, "\n  avx512bf16 %s m=%d threads=%d: rows depend on the call\n",
                            fast ? "fast" : "exact", m, th);
                CU_ASSERT(same);
            }
        }
    }
    /* fast rounds x: visibly less exact than the hi + lo split, still within its bound */
    CU_ASSERT(worst[1] > 10 * worst[0]);
    if (verbose())
        fprintf(stderr, "\n  avx512bf16 blocked rows: exact %.3g fast %.3g", worst[0], worst[1]);
    stage_matmul_set_mode(STAGE_MATMUL_EXACT);
    stage_matmul_force_path(STAGE_PATH_AUTO);
    stage_matmul_force_isa(stage_isa_best());
    stage_threads_free();
    bf16_case_free(&c);
}

/* bf16 rows in the default variant, forced on the small path, m = 1 .. 33 (one and more
 * passes, every remainder), k with a short tail, n with a remainder row block: EXACT (m >= 2:
 * x deinterleaved once per call, 4 x 4 blocks, next block prefetched) gives every row
 * bit-identical to the same row alone; FAST on a CPU with AVX-512 BF16 (x rounded to bf16,
 * vdpbf16ps, m = 1 too) gives the AVX-512 BF16 variant's FAST bits, within FAST_TOL, and every
 * row bit-identical to the same row alone as well. */
static void test_matmul_bf16_many_rows(void)
{
    const int ms[] = {1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 32, 33};
    bf16_case c;
    bf16_case_make(&c, 4 * 9 + 2, 2 * 1024 + 37, 33);
    const size_t out = (size_t)c.n * sizeof(float);
    const stage_isa best = stage_isa_best();
    const int bf = stage_isa_supported(STAGE_ISA_AVX512BF16) && best == STAGE_ISA_AVX512;
    stage_matmul_force_path(STAGE_PATH_SMALL);
    for (int th = 1; th <= 2; th++) {
        threads(th);
        for (size_t mi = 0; mi < sizeof ms / sizeof ms[0]; mi++) {
            const int m = ms[mi];
            stage_matmul_force_isa(best);
            stage_matmul_set_mode(STAGE_MATMUL_EXACT);
            stage_matmul_w(c.x, m, &c.w, c.ym);
            CU_ASSERT(rel_err_d(c.ym, c.ref, (size_t)m * c.n) <= TOL);
            const int same = bf16_rows_alone(&c, m);
            if (!same)
                fprintf(stderr, "\n  %s bf16 exact m=%d threads=%d: rows depend on the call\n",
                        stage_isa_name(best), m, th);
            CU_ASSERT(same);
            if (!bf) continue;
            stage_matmul_set_mode(STAGE_MATMUL_FAST);
            stage_matmul_w(c.x, m, &c.w, c.ym);
            const double e = rel_err_d(c.ym, c.ref, (size_t)m * c.n);
            CU_ASSERT(e <= FAST_TOL);
            CU_ASSERT(e > 10 * TOL); /* x really rounded */
            CU_ASSERT(bf16_rows_alone(&c, m));
            CU_ASSERT_EQUAL_FATAL(stage_matmul_force_isa(STAGE_ISA_AVX512BF16), 0);
            stage_matmul_w(c.x, m, &c.w, c.yb);
            CU_ASSERT(!memcmp(c.ym, c.yb, (size_t)m * out));
        }
    }
    stage_matmul_set_mode(STAGE_MATMUL_EXACT);
    stage_matmul_force_path(STAGE_PATH_AUTO);
    stage_matmul_force_isa(best);
    stage_threads_free();
    bf16_case_free(&c);
}

/* Q8_0 in FAST mode (x quantized per 32-block to int8, llama.cpp's rule, then an int8 dot on
 * AVX-512 VNNI): against the double reference on the quantized x and dequantized weights
 * (what it computes: only f32 rounding, TOL) and on the f32 x (the quantization's cost,
 * Q8_FAST_TOL); bit-identical at 1 and 2 threads and for a row alone. Where the CPU has no
 * VNNI the mode leaves Q8_0 exact: results equal the exact mode's bits. */
#define Q8_FAST_TOL 2e-2 /* x's int8: 2^-8 of a block's max per element; measured in -v output */
static void test_matmul_q8_fast(void)
{
    static const int shapes[][2] = {{37, 67}, {9, 32 * 16 * 3 + 5}, {64, 4096}, {5, 5}, {12, 128}};
    const int ms[] = {1, 2, 3, 4, 5, 9};
    double worst[2] = {0};
    for (int sh = 0; sh < 5; sh++) {
        const int n = shapes[sh][0], k = shapes[sh][1], M = 9;
        float *x = malloc((size_t)M * k * sizeof *x), *xq = malloc((size_t)M * k * sizeof *xq);
        float *src = malloc((size_t)n * k * sizeof *src), *wr = malloc((size_t)n * k * sizeof *wr);
        double *ref = malloc((size_t)M * n * sizeof *ref),
               *refq = malloc((size_t)M * n * sizeof *refq);
        float *y = malloc((size_t)M * n * sizeof *y), *y2 = malloc((size_t)M * n * sizeof *y2);
        float *y1 = malloc((size_t)n * sizeof *y1);
        fill(x, (size_t)M * k);
        fill(src, (size_t)n * k);
        stage_weight w;
        make_weight(STAGE_Q8_0, n, k, src, &w, wr);
        /* x as FAST mode sees it: stage_q8_quantize_row's numbers, dequantized */
        int8_t *q = malloc((size_t)k);
        uint16_t *d = malloc((size_t)stage_q8_blocks(k) * sizeof *d);
        for (int i = 0; i < M; i++) {
            const float *xi = x + (size_t)i * k;
            for (int b = 0; b * 32 < k; b++) {
                const int c0 = b * 32, cn = k - c0 < 32 ? k - c0 : 32;
                float amax = 0.0f;
                for (int c = 0; c < cn; c++) amax = fmaxf(amax, fabsf(xi[c0 + c]));
                const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
                for (int c = 0; c < cn; c++)
                    xq[(size_t)i * k + c0 + c] = roundf(xi[c0 + c] * id) * dd;
            }
        }
        free(q);
        free(d);
        ref_matmul(x, M, k, wr, n, ref);
        ref_matmul(xq, M, k, wr, n, refq);
        for (int isa = STAGE_ISA_AVX512; isa < STAGE_N_ISAS; isa++) {
            if (!stage_isa_supported((stage_isa)isa)) continue;
            stage_matmul_force_isa((stage_isa)isa);
            for (int mi = 0; mi < 6; mi++) {
                const int m = ms[mi];
                threads(1);
                stage_matmul_set_mode(STAGE_MATMUL_FAST);
                stage_matmul_w(x, m, &w, y);
                threads(2);
                stage_matmul_w(x, m, &w, y2);
                CU_ASSERT(!memcmp(y, y2, (size_t)m * n * sizeof *y));
                for (int i = 0; i < m; i++) {
                    stage_matmul_w(x + (size_t)i * k, 1, &w, y1);
                    CU_ASSERT(!memcmp(y1, y + (size_t)i * n, (size_t)n * sizeof *y1));
                }
                stage_matmul_set_mode(STAGE_MATMUL_EXACT);
                if (stage_q8_fast_available()) {
                    const double eq = rel_err_d(y, refq, (size_t)m * n);
                    const double e = rel_err_d(y, ref, (size_t)m * n);
                    if (eq > worst[0]) worst[0] = eq;
                    if (e > worst[1]) worst[1] = e;
                    CU_ASSERT(eq <= TOL);
                    CU_ASSERT(e <= Q8_FAST_TOL);
                    CU_ASSERT(e > eq); /* really quantized */
                } else {
                    stage_matmul_w(x, m, &w, y2);
                    CU_ASSERT(!memcmp(y, y2, (size_t)m * n * sizeof *y));
                }
            }
        }
        free_weight(&w);
        free(x), free(xq), free(src), free(wr), free(ref), free(refq), free(y), free(y2), free(y1);
    }
    stage_threads_free();
    stage_matmul_force_isa(stage_isa_best());
    if (verbose())
        fprintf(stderr, "\n  q8_0 fast: vs quantized-x ref %.3g, vs f32-x ref %.3g\n", worst[0],
                worst[1]);
}

/* The pool across its states: jobs back to back (workers spinning), after a pause (workers
 * asleep on the condition variable), and after re-initialising with another count. */
static void test_pool_sleep_wake(void)
{
    const int n = 300, k = 70, m = 3;
    float *x = malloc((size_t)m * k * sizeof *x);
    float *src = malloc((size_t)n * k * sizeof *src);
    float *wr = malloc((size_t)n * k * sizeof *wr);
    float *want = malloc((size_t)m * n * sizeof *want);
    float *y = malloc((size_t)m * n * sizeof *y);
    fill(x, (size_t)m * k);
    fill(src, (size_t)n * k);
    stage_weight w;
    make_weight(STAGE_BF16, n, k, src, &w, wr);
    stage_matmul_w(x, m, &w, want); /* no pool: the caller alone */
    int same = 1;
    for (int th = 2; th <= 3; th++) {
        threads(th);
        for (int r = 0; r < 2000; r++) {
            stage_matmul_w(x, m, &w, y);
            same &= !memcmp(y, want, (size_t)m * n * sizeof(float));
        }
        for (int r = 0; r < 5; r++) {
            usleep(2000); /* > the 50 us spin: the workers go to sleep */
            memset(y, 0, (size_t)m * n * sizeof(float));
            stage_matmul_w(x, m, &w, y);
            same &= !memcmp(y, want, (size_t)m * n * sizeof(float));
        }
    }
    CU_ASSERT(same);
    stage_threads_free();
    free_weight(&w);
    free(x);
    free(src);
    free(wr);
    free(want);
    free(y);
}

/* ---- 3. attention ---------------------------------------------------------------------------- */

/* probs [n_q][n_ctx], out [n_q][hd] in double */
static void ref_attend(const float *q, int n_q, const float *k, const float *v, size_t stride,
                       int n_ctx, int hd, float scale, double *probs, double *out)
{
    for (int h = 0; h < n_q; h++) {
        double *p = probs + (size_t)h * n_ctx, mx = -INFINITY, sum = 0.0;
        for (int t = 0; t < n_ctx; t++) {
            double s = 0.0;
            for (int i = 0; i < hd; i++)
                s += (double)q[(size_t)h * hd + i] * k[(size_t)t * stride + i];
            p[t] = s * scale;
            if (p[t] > mx) mx = p[t];
        }
        for (int t = 0; t < n_ctx; t++) {
            p[t] = exp(p[t] - mx);
            sum += p[t];
        }
        for (int t = 0; t < n_ctx; t++) p[t] /= sum;
        for (int i = 0; i < hd; i++) {
            double o = 0.0;
            for (int t = 0; t < n_ctx; t++) o += p[t] * v[(size_t)t * stride + i];
            out[(size_t)h * hd + i] = o;
        }
    }
}

static void test_attend(void)
{
    const int hds[] = {64, 100, 7, 128};
    const int ctxs[] = {1, 5, 300};
    const int nqs[] = {1, 4, 10};
    double worst[STAGE_N_ISAS] = {0};
    for (int hi = 0; hi < 4; hi++)
        for (int ci = 0; ci < 3; ci++)
            for (int qi = 0; qi < 3; qi++) {
                const int hd = hds[hi], n_ctx = ctxs[ci], n_q = nqs[qi];
                const size_t stride = (size_t)3 * hd + 5; /* one head of a wider KV row */
                float *q = malloc((size_t)n_q * hd * sizeof *q);
                float *kk = malloc((size_t)n_ctx * stride * sizeof *kk);
                float *vv = malloc((size_t)n_ctx * stride * sizeof *vv);
                float *probs = malloc((size_t)n_q * n_ctx * sizeof *probs);
                float *out = malloc((size_t)n_q * hd * sizeof *out);
                float *p1 = malloc((size_t)n_ctx * sizeof *p1);
                float *o1 = malloc((size_t)hd * sizeof *o1);
                double *rp = malloc((size_t)n_q * n_ctx * sizeof *rp);
                double *ro = malloc((size_t)n_q * hd * sizeof *ro);
                fill(q, (size_t)n_q * hd);
                for (size_t i = 0; i < (size_t)n_q * hd; i++) q[i] *= 3.0f; /* peaky softmax */
                fill(kk, (size_t)n_ctx * stride);
                fill(vv, (size_t)n_ctx * stride);
                const float scale = 1.0f / sqrtf((float)hd);
                const float *kh = kk + hd, *vh = vv + hd; /* head 1 of the row */
                ref_attend(q, n_q, kh, vh, stride, n_ctx, hd, scale, rp, ro);
                for (int isa = 0; isa < STAGE_N_ISAS; isa++) {
                    if (!stage_isa_supported((stage_isa)isa)) continue;
                    stage_matmul_force_isa((stage_isa)isa);
                    stage_attend_gqa(q, n_q, kh, vh, stride, n_ctx, hd, scale, probs, out);
                    double e = rel_err_d(out, ro, (size_t)n_q * hd);
                    double ep = rel_err_d(probs, rp, (size_t)n_q * n_ctx);
                    if (e > worst[isa]) worst[isa] = e;
                    if (ep > worst[isa]) worst[isa] = ep;
                    if (e > TOL || ep > TOL)
                        fprintf(stderr,
                                "\n  attend %s hd=%d n_ctx=%d n_q=%d: out %.3g probs %.3g\n",
                                stage_isa_name((stage_isa)isa), hd, n_ctx, n_q, e, ep);
                    CU_ASSERT(e <= TOL);
                    CU_ASSERT(ep <= TOL);
                    int same = 1;
                    for (int h = 0; h < n_q; h++) {
                        stage_attend(q + (size_t)h * hd, kh, vh, stride, n_ctx, hd, scale, p1, o1);
                        same &= !memcmp(o1, out + (size_t)h * hd, (size_t)hd * sizeof(float));
                        same &=
                            !memcmp(p1, probs + (size_t)h * n_ctx, (size_t)n_ctx * sizeof(float));
                    }
                    if (!same)
                        fprintf(stderr,
                                "\n  attend %s hd=%d n_ctx=%d n_q=%d: GQA head != head alone\n",
                                stage_isa_name((stage_isa)isa), hd, n_ctx, n_q);
                    CU_ASSERT(same);
                }
                free(q);
                free(kk);
                free(vv);
                free(probs);
                free(out);
                free(p1);
                free(o1);
                free(rp);
                free(ro);
            }
    stage_matmul_force_isa(stage_isa_best());
    if (verbose())
        for (int isa = 0; isa < STAGE_N_ISAS; isa++)
            if (stage_isa_supported((stage_isa)isa))
                fprintf(stderr, "\n  attend %-10s worst rel err %.3g",
                        stage_isa_name((stage_isa)isa), worst[isa]);
}

/* Many attention jobs at once on the pool (stage_attend_batch: prefill's rows x KV heads, causal
 * contexts of different lengths over a paged cache) give, job by job, the bits of the
 * row-at-a-time stage_attend_paged, at 1, 2 and 3 threads, and grow their scratch when a longer
 * context comes. */
static void test_attend_batch(void)
{
    const int hd = 100, n_q = 2, nkv = 3, rows = 37, page = 16, base = 40;
    const int n_pages = (base + rows + page - 1) / page;
    const size_t kvd = (size_t)nkv * hd, ps = (size_t)page * kvd;
    float *kk = malloc((size_t)n_pages * ps * sizeof *kk);
    float *vv = malloc((size_t)n_pages * ps * sizeof *vv);
    float *q = malloc((size_t)rows * nkv * n_q * hd * sizeof *q);
    float *want = malloc((size_t)rows * nkv * n_q * hd * sizeof *want);
    float *got = malloc((size_t)rows * nkv * n_q * hd * sizeof *got);
    float *probs = malloc((size_t)n_q * (base + rows) * sizeof *probs);
    stage_attend_job *jobs = malloc((size_t)rows * nkv * sizeof *jobs);
    int32_t pages[8];
    for (int i = 0; i < n_pages; i++) pages[i] = n_pages - 1 - i; /* out of order in the pool */
    fill(kk, (size_t)n_pages * ps);
    fill(vv, (size_t)n_pages * ps);
    fill(q, (size_t)rows * nkv * n_q * hd);
    const float scale = 1.0f / sqrtf((float)hd);
    for (int isa = 0; isa < STAGE_N_ISAS; isa++) {
        if (!stage_isa_supported((stage_isa)isa)) continue;
        stage_matmul_force_isa((stage_isa)isa);
        int nj = 0;
        for (int r = 0; r < rows; r++) /* row r at position base + r: entries 3..base + r */
            for (int kh = 0; kh < nkv; kh++, nj++) {
                const size_t o = ((size_t)r * nkv + kh) * n_q * hd;
                jobs[nj] = (stage_attend_job){.q = q + o,
                                              .kv = {.k = kk + (size_t)kh * hd,
                                                     .v = vv + (size_t)kh * hd,
                                                     .pages = pages,
                                                     .page = page,
                                                     .t0 = 3,
                                                     .page_stride = ps,
                                                     .stride = kvd},
                                              .n_ctx = base + r + 1 - 3,
                                              .out = got + o};
                stage_attend_paged(q + o, n_q, &jobs[nj].kv, jobs[nj].n_ctx, hd, scale, probs,
                                   want + o);
            }
        for (int th = 1; th <= 3; th++) {
            threads(th);
            for (int half = 0; half < 2; half++) { /* short contexts first, then all: growth */
                memset(got, 0xff, (size_t)rows * nkv * n_q * hd * sizeof *got);
                const int n = half ? nj : nj / 4;
                stage_attend_batch(jobs, n, n_q, hd, scale, probs);
                int same = !memcmp(got, want, (size_t)n * n_q * hd * sizeof *got);
                if (!same)
                    fprintf(stderr, "\n  attend_batch %s threads=%d jobs=%d: != row at a time\n",
                            stage_isa_name((stage_isa)isa), th, n);
                CU_ASSERT(same);
            }
        }
    }
    stage_threads_free();
    stage_matmul_force_isa(stage_isa_best());
    free(kk);
    free(vv);
    free(q);
    free(want);
    free(got);
    free(probs);
    free(jobs);
}

/* ---- 4. edges and errors --------------------------------------------------------------------- */

/* Q8_0 quantization, llama.cpp's numbers: d = max|x| / 127 (f16), q = round(x / d) half away
 * from zero; a short last block; an all-zero block (d = 0); a non-finite value refused. */
static void test_q8_quantize(void)
{
    float x[40], back[40];
    for (int i = 0; i < 32; i++) x[i] = (float)(i - 16) * 0.25f; /* max |x| = 4 at i = 0 */
    x[5] = 127.5f * (4.0f / 127.0f) / 2.0f;                      /* 63.75 steps: rounds to 64 */
    for (int i = 32; i < 40; i++) x[i] = 0.0f;
    int8_t q[40];
    uint16_t d[2];
    CU_ASSERT_EQUAL_FATAL(stage_q8_quantize_row(x, 40, q, d), 0);
    CU_ASSERT_EQUAL(d[0], stage_f32_to_f16(4.0f / 127.0f));
    CU_ASSERT_EQUAL(d[1], 0);
    CU_ASSERT_EQUAL(q[0], -127);
    CU_ASSERT_EQUAL(q[16], 0);
    CU_ASSERT_EQUAL(q[5], 64);
    CU_ASSERT_EQUAL(q[24], (int8_t)lroundf(2.0f * 127.0f / 4.0f)); /* 63.5 -> 64 */
    for (int i = 32; i < 40; i++) CU_ASSERT_EQUAL(q[i], 0);
    stage_q8_dequant(q, d, 0, 40, back);
    for (int i = 0; i < 40; i++) {
        CU_ASSERT_EQUAL(back[i], (float)q[i] * stage_f16_to_f32(d[i / 32]));
        /* the error of a value: half a step, plus the scale's f16 rounding */
        CU_ASSERT(fabsf(back[i] - x[i]) <= 0.5f * 4.0f / 127.0f * 1.002f + 4.0f / 1024.0f);
    }
    stage_q8_dequant(q, d, 32, 8, back); /* from a block start */
    for (int i = 0; i < 8; i++) CU_ASSERT_EQUAL(back[i], 0.0f);
    x[33] = NAN;
    CU_ASSERT_EQUAL(stage_q8_quantize_row(x, 40, q, d), -1);
    x[33] = INFINITY;
    CU_ASSERT_EQUAL(stage_q8_quantize_row(x, 40, q, d), -1);
}

/* FAST mode's x quantizer (stage/matmul_isa.h layout) against llama.cpp's rule done in scalar
 * code: q = roundf(x / d) (ties away from zero: blocks whose scale is 1 hold exact ties),
 * stored + 128, 128 past k; the scales in the kernel's lane layout. */
static void test_q8_quant_x(void)
{
    if (!stage_q8_fast_available()) return;
    static const int ks[] = {5, 32, 67, 130};
    for (size_t t = 0; t < sizeof ks / sizeof ks[0]; t++) {
        const int k = ks[t], kq = mm_q8x_kq(k), m = 2;
        float *x = malloc((size_t)m * k * sizeof *x);
        uint8_t *xq = malloc((size_t)m * mm_q8x_row_bytes(k));
        fill(x, (size_t)m * k);
        for (int c = 0; c < k && c < 32; c++) /* row 0, block 0: d = 1, x = +-(j + 0.5) */
            x[c] = c == 0 ? 127.0f : (c % 2 ? -1.0f : 1.0f) * ((float)(c * 4 % 126) + 0.5f);
        stage_mm_q8_quant_x(x, m, k, xq);
        for (int i = 0; i < m; i++) {
            const uint8_t *q = xq + (size_t)i * mm_q8x_row_bytes(k);
            const float *sx = (const float *)(q + kq);
            for (int b = 0; b < kq / 32; b++) {
                float amax = 0.0f;
                for (int c = b * 32; c < k && c < b * 32 + 32; c++)
                    amax = fmaxf(amax, fabsf(x[(size_t)i * k + c]));
                const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
                for (int l = 0; l < 8; l++) CU_ASSERT_EQUAL(sx[b / 2 * 16 + b % 2 * 8 + l], d);
                for (int c = b * 32; c < b * 32 + 32; c++) {
                    float v = c < k ? roundf(x[(size_t)i * k + c] * id) : 0.0f;
                    v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
                    CU_ASSERT_EQUAL((int)q[c] - 128, (int)v);
                }
            }
        }
        free(x);
        free(xq);
    }
}

static void test_edges(void)
{
    char err[ERRLEN];
    CU_ASSERT_NOT_EQUAL(stage_threads_init(0, err, sizeof err), 0);
    ASSERT_HAS(err, "threads");
    CU_ASSERT_NOT_EQUAL(stage_threads_init(5000, err, sizeof err), 0);
    CU_ASSERT_EQUAL(stage_threads_n(), 1);
    stage_threads_free();
    stage_threads_free(); /* twice: no-op */
    CU_ASSERT_EQUAL(stage_matmul_force_isa((stage_isa)99), -1);
    CU_ASSERT_STRING_EQUAL(stage_isa_name(STAGE_ISA_C), "c");
    CU_ASSERT_STRING_EQUAL(stage_isa_name(STAGE_ISA_AVX512BF16), "avx512bf16");
    CU_ASSERT(stage_isa_supported(stage_isa_best()));
    CU_ASSERT_EQUAL(stage_matmul_isa(), stage_isa_best());

    /* m = 0 writes nothing; k = 0 gives zeros */
    float x[4] = {1, 2, 3, 4}, y[6] = {7, 7, 7, 7, 7, 7};
    const float wd[6] = {1, 2, 3, 4, 5, 6};
    stage_weight w = {.dtype = STAGE_F32, .rows = 3, .cols = 2, .data = wd};
    stage_matmul_w(x, 0, &w, y);
    for (int i = 0; i < 6; i++) CU_ASSERT_EQUAL(y[i], 7.0f);
    stage_weight w0 = {.dtype = STAGE_BF16, .rows = 3, .cols = 0, .data = wd};
    stage_matmul_w(x, 2, &w0, y);
    for (int i = 0; i < 6; i++) CU_ASSERT_EQUAL(y[i], 0.0f);
    /* a hand value: x [2][2] = {1,2},{3,4}; W rows {1,2},{3,4},{5,6} */
    for (int isa = 0; isa < STAGE_N_ISAS; isa++) {
        if (stage_matmul_force_isa((stage_isa)isa) != 0) continue;
        for (int p = STAGE_PATH_SMALL; p <= STAGE_PATH_LARGE; p++) {
            stage_matmul_force_path((stage_path)p);
            stage_matmul_w(x, 2, &w, y);
            const float want[6] = {5, 11, 17, 11, 25, 39};
            CU_ASSERT(!memcmp(y, want, sizeof want));
        }
    }
    stage_matmul_force_path(STAGE_PATH_AUTO);
    stage_matmul_force_isa(stage_isa_best());
}

/* ---- the suite ------------------------------------------------------------------------------- */

typedef struct {
    const char *name;
    CU_TestFunc fn;
} test_def;
#define T_(f)                                                                                      \
    {                                                                                              \
#f, f                                                                                      \
    }

int main(void)
{
    static const test_def tests[] = {
        T_(test_edges),
        T_(test_q8_quantize),
        T_(test_q8_quant_x),
        T_(test_matmul_m_sweep),
        T_(test_matmul_large_shapes),
        T_(test_matmul_threads_bitwise),
        T_(test_matmul_onednn),
        T_(test_matmul_bf16_onednn),
        T_(test_matmul_row_independent),
        T_(test_matmul_bf16_rows_blocked),
        T_(test_matmul_bf16_many_rows),
        T_(test_matmul_q8_fast),
        T_(test_pool_sleep_wake),
        T_(test_attend),
        T_(test_attend_batch),
    };
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("kernels", NULL, NULL);
    if (!s) return 1;
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++)
        if (!CU_add_test(s, tests[i].name, tests[i].fn)) return 1;
    if (verbose()) { fprintf(stderr, "best variant: %s\n", stage_isa_name(stage_isa_best())); }
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    stage_threads_free();
    return fails ? 1 : 0;
}
