/* tests/test_base.c — base/: token-id lists, whole files, the clock, the back-off (CUnit). */
#include <CUnit/Basic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/backoff.h"
#include "base/clock.h"
#include "base/err.h"
#include "base/file.h"
#include "base/ids.h"
#include "tests/testutil.h"

static void test_ids(void)
{
    base_ids ids = {0};
    char err[256];
    CU_ASSERT_EQUAL(base_ids_parse(" 1,2\t3\r\n 40 ", 100, &ids, "w", err, sizeof err), 0);
    CU_ASSERT_EQUAL(ids.n, 4);
    CU_ASSERT(ids.n == 4 && ids.v[0] == 1 && ids.v[2] == 3 && ids.v[3] == 40);
    CU_ASSERT_EQUAL(base_ids_parse("5 6", 100, &ids, "w", err, sizeof err), 0); /* appends */
    CU_ASSERT_EQUAL(ids.n, 6);
    CU_ASSERT_EQUAL(base_ids_parse("", 100, &ids, "w", err, sizeof err), 0);
    CU_ASSERT_EQUAL(ids.n, 6);
    CU_ASSERT_NOT_EQUAL(base_ids_parse("7 8x 9", 100, &ids, "f:3", err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(err, "f:3: id 2: '8x' is not a token id (>= 0)");
    CU_ASSERT_EQUAL(ids.n, 6); /* unchanged on error */
    CU_ASSERT_NOT_EQUAL(base_ids_parse("1 -4", 100, &ids, "w", err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(err, "w: id 2: '-4' is not a token id (>= 0)");
    CU_ASSERT_NOT_EQUAL(base_ids_parse("100", 100, &ids, "w", err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(err, "w: id 1: token id 100 out of range [0, 100)");
    CU_ASSERT_NOT_EQUAL(
        base_ids_parse("99999999999999999999", 1L << 40, &ids, "w", err, sizeof err), 0);
    base_ids_free(&ids);
    CU_ASSERT_PTR_NULL(ids.v);
    CU_ASSERT_EQUAL(ids.n, 0);
}

static void test_file(void)
{
    char path[] = "/tmp/modpipe-base-XXXXXX";
    int fd = mkstemp(path);
    CU_ASSERT_FATAL(fd >= 0);
    /* larger than the first read of a stream, with a NUL inside */
    size_t n = 200000;
    char *data = malloc(n);
    for (size_t i = 0; i < n; i++) data[i] = (char)(i * 7);
    CU_ASSERT_EQUAL(write(fd, data, n), (ssize_t)n);
    close(fd);
    char err[256];
    size_t len = 0;
    char *b = base_read_file(path, 0, &len, err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    CU_ASSERT_EQUAL(len, n);
    CU_ASSERT(memcmp(b, data, n) == 0 && b[n] == 0);
    free(b);
    CU_ASSERT_PTR_NULL(base_read_file(path, 1000, &len, err, sizeof err));
    ASSERT_HAS(err, ": larger than 1000 bytes");
    /* a pipe: read to EOF */
    char cmd[600];
    snprintf(cmd, sizeof cmd, "cat %s", path);
    FILE *p = popen(cmd, "r");
    char dev[64];
    snprintf(dev, sizeof dev, "/dev/fd/%d", fileno(p));
    b = base_read_file(dev, 0, &len, err, sizeof err);
    pclose(p);
    CU_ASSERT(b && len == n && memcmp(b, data, n) == 0);
    free(b);
    unlink(path);
    free(data);
    CU_ASSERT_PTR_NULL(base_read_file("/nonexistent/x", 0, &len, err, sizeof err));
    CU_ASSERT_STRING_EQUAL(err, "/nonexistent/x: No such file or directory");
    CU_ASSERT_PTR_NULL(base_read_file("/tmp", 0, &len, err, sizeof err));
    CU_ASSERT_STRING_EQUAL(err, "/tmp: a directory");
    base_set_err(NULL, 0, "%s", "no buffer: nothing happens");
}

static void test_clock_backoff(void)
{
    double t0 = base_now_s();
    base_backoff b;
    base_backoff_init(&b, BASE_BACKOFF_FIXED, 3, 2000000); /* 3 free calls, then 2 ms naps */
    for (int i = 0; i < 3; i++) base_backoff_wait(&b);
    double t1 = base_now_s();
    CU_ASSERT(t1 - t0 < 0.0015);
    base_backoff_wait(&b);
    base_backoff_wait(&b);
    double t2 = base_now_s();
    CU_ASSERT(t2 - t1 >= 0.004);
    base_backoff_init(&b, BASE_BACKOFF_DOUBLE, 0, 1000);
    for (int i = 0; i < 12; i++) base_backoff_wait(&b);
    CU_ASSERT(b.cur_ns >= 1000000 && b.cur_ns < 2100000); /* doubled up to about 1 ms */
    base_backoff_init(&b, BASE_BACKOFF_IDLE, 0, 20000);
    CU_ASSERT(b.t0 > 0);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    CU_pSuite s = CU_add_suite("base", NULL, NULL);
    if (!s || !CU_add_test(s, "token-id lists", test_ids) ||
        !CU_add_test(s, "whole files: regular, pipe, limits, errors", test_file) ||
        !CU_add_test(s, "clock and back-off", test_clock_backoff)) {
        CU_cleanup_registry();
        return 2;
    }
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
