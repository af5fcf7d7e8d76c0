/* tests/test_matmul_n.c — stage_matmul_w_n (stage/matmul.h): several weights on one x give
 * bit for bit what one stage_matmul_w call each gives, for every weight dtype, both matmul
 * modes, 1 and 2 threads, m on the small path and past it (n calls then), and weights that
 * cannot share a call (another dtype: n calls).
 */
#include "tests/kernels_fixture.h"

static void check_n(stage_dtype dt, stage_dtype dt2, int m, int nthreads)
{
    enum { K = 300, N0 = 96, N1 = 37, N2 = 130 };
    const int rows[3] = {N0, N1, N2}, cols[3] = {K, K, K};
    const stage_dtype dts[3] = {dt, dt, dt2};
    stage_weight w[3];
    float *src[3], *wr[3], *y[3], *ref[3];
    float *x = malloc((size_t)m * K * sizeof *x);
    fill(x, (size_t)m * K);
    for (int i = 0; i < 3; i++) {
        src[i] = malloc((size_t)rows[i] * cols[i] * sizeof(float));
        wr[i] = malloc((size_t)rows[i] * cols[i] * sizeof(float));
        y[i] = malloc((size_t)m * rows[i] * sizeof(float));
        ref[i] = malloc((size_t)m * rows[i] * sizeof(float));
        fill(src[i], (size_t)rows[i] * cols[i]);
        make_weight(dts[i], rows[i], cols[i], src[i], &w[i], wr[i]);
    }
    threads(nthreads);
    for (int mode = 0; mode < 2; mode++) {
        stage_matmul_set_mode(mode ? STAGE_MATMUL_FAST : STAGE_MATMUL_EXACT);
        const stage_weight *wp[3] = {&w[0], &w[1], &w[2]};
        for (int i = 0; i < 3; i++) stage_matmul_w(x, m, wp[i], ref[i]);
        for (int i = 0; i < 3; i++) memset(y[i], 0xff, (size_t)m * rows[i] * sizeof(float));
        stage_matmul_w_n(x, m, 3, wp, y);
        int same = 1;
        for (int i = 0; i < 3; i++)
            same &= memcmp(y[i], ref[i], (size_t)m * rows[i] * sizeof(float)) == 0;
        if (!same)
            fprintf(stderr, "\n  %s + %s, m %d, %d threads, %s: differs", dt_name(dt), dt_name(dt2),
                    m, nthreads, mode ? "fast" : "exact");
        CU_ASSERT(same);
        /* two weights of one kind: the shared call itself */
        for (int i = 0; i < 2; i++) memset(y[i], 0xff, (size_t)m * rows[i] * sizeof(float));
        stage_matmul_w_n(x, m, 2, wp, y);
        CU_ASSERT(memcmp(y[0], ref[0], (size_t)m * N0 * sizeof(float)) == 0);
        CU_ASSERT(memcmp(y[1], ref[1], (size_t)m * N1 * sizeof(float)) == 0);
    }
    stage_matmul_set_mode(STAGE_MATMUL_EXACT);
    for (int i = 0; i < 3; i++) {
        free_weight(&w[i]);
        free(src[i]), free(wr[i]), free(y[i]), free(ref[i]);
    }
    free(x);
}

static void test_matmul_n_same_bits(void)
{
    static const int ms[] = {1, 2, 5, 16, 33, 80};
    for (int d = 0; d < N_DT; d++)
        for (size_t t = 0; t < sizeof ms / sizeof ms[0]; t++)
            for (int nt = 1; nt <= 2; nt++) {
                check_n(DTYPES[d], DTYPES[d], ms[t], nt);              /* all three share a call */
                check_n(DTYPES[d], DTYPES[(d + 1) % N_DT], ms[t], nt); /* other dtype */
            }
    threads(1);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("matmul_n", NULL, NULL);
    if (!s || !CU_add_test(s, "stage_matmul_w_n == one stage_matmul_w per weight",
                           test_matmul_n_same_bits))
        return 1;
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    const unsigned failed = CU_get_number_of_failures();
    CU_cleanup_registry();
    stage_threads_free();
    return failed ? 1 : 0;
}
