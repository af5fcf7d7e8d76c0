/* tests/testutil.h — helpers shared by the CUnit test programs (header-only: each test is
 * its own binary). */
#ifndef TESTS_TESTUTIL_H
#define TESTS_TESTUTIL_H

#include <CUnit/Basic.h>
#include <CUnit/CUnit.h>
#include <cJSON.h>
#include <dirent.h>
#include <sys/stat.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/wait.h>

#include "stage/config.h"
#include "stage/npy.h"
#include "stage/stage.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A fresh /tmp/modpipe-TAG-XXXXXX directory (malloc'd path), or NULL. */
/* Environment of a test that runs the built binary under mpirun (as root, one BLAS thread),
 * and a check that the binary exists. 0, or -1 with a line on stderr naming prog. */
static inline int tu_mpi_env(const char *prog, const char *bin)
{
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    setenv("OPENBLAS_NUM_THREADS", "1", 0);
    struct stat sb;
    if (stat(bin, &sb)) {
        fprintf(stderr, "%s: %s not built\n", prog, bin);
        return -1;
    }
    return 0;
}

static inline char *make_tmpdir_tagged(const char *tag)
{
    char *t = malloc(64);
    if (!t) return NULL;
    snprintf(t, 64, "/tmp/modpipe-%s-XXXXXX", tag);
    if (!mkdtemp(t)) {
        free(t);
        return NULL;
    }
    return t;
}

/* Remove a temp dir of plain files and free its path (NULL-safe). */
static inline void rm_tmpdir(char *dir)
{
    if (!dir) return;
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        char path[1024];
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
        closedir(d);
    }
    rmdir(dir);
    free(dir);
}

/* A model directory with every layer, the embedding and the head on one stage. 0, or -1
 * with a line on stderr naming what failed (nothing to free then). */
typedef struct {
    stage_config cfg;
    stage_model *m;
} tu_model;

static inline int tu_model_open(const char *dir, tu_model *f)
{
    char err[512];
    memset(f, 0, sizeof *f);
    if (stage_config_load(dir, &f->cfg, err, sizeof err)) {
        fprintf(stderr, "\n  %s: %s\n", dir, err);
        return -1;
    }
    stage_range r = {0, f->cfg.n_layers - 1, 1, 1};
    if (stage_model_load(dir, &f->cfg, r, &f->m, err, sizeof err)) {
        fprintf(stderr, "\n  %s: %s\n", dir, err);
        stage_config_free(&f->cfg);
        return -1;
    }
    return 0;
}

static inline void tu_model_close(tu_model *f)
{
    stage_model_free(f->m);
    stage_config_free(&f->cfg);
}

/* mpirun as the tests run it: root allowed, more ranks than cores, TCP on loopback only. */
#define TU_MPIRUN                                                                                  \
    "mpirun --allow-run-as-root --oversubscribe --mca btl self,tcp --mca btl_tcp_if_include lo"

/* 1 when files a and b both open and hold the same bytes. */
static inline int tu_files_identical(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int same = fa && fb;
    while (same) {
        int ca = fgetc(fa), cb = fgetc(fb);
        if (ca != cb) same = 0;
        if (ca == EOF || cb == EOF) break;
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return same;
}

/* Assert that an error message contains `needle`, printing both when it does not. */
#define ASSERT_HAS(msg, needle)                                                                    \
    do {                                                                                           \
        int has_ = strstr((msg), (needle)) != NULL;                                                \
        if (!has_) fprintf(stderr, "\n  message \"%s\" lacks \"%s\"\n", (msg), (needle));          \
        CU_ASSERT(has_);                                                                           \
    } while (0)

/* Runs the registered tests verbosely, frees the registry; the exit status (CU_basic_run_tests
 * returns success even when assertions failed: the failure count decides). */
static inline int tu_cunit_run(void)
{
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    return fails != 0;
}

/* needle in hay; when not, both on stderr (for CU_ASSERT(tu_contains(...))). */
static inline int tu_contains(const char *hay, const char *needle)
{
    int ok = strstr(hay, needle) != NULL;
    if (!ok) fprintf(stderr, "\n  expected '%s'\n  in '%s'\n", needle, hay);
    return ok;
}

/* Run a shell command under `timeout -s KILL secs` with stdout+stderr into out [cap];
 * returns its exit code (128 + signal when killed). MODPIPE_TEST_VERBOSE echoes it. */
static inline int tu_run(char *out, size_t cap, int secs, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static inline int tu_run(char *out, size_t cap, int secs, const char *fmt, ...)
{
    char cmd[8192], full[8400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    snprintf(full, sizeof full, "timeout -s KILL %d sh -c '%s' 2>&1", secs, cmd);
    FILE *p = popen(full, "r");
    if (!p) return -1;
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = 0;
    int st = pclose(p);
    int rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (getenv("MODPIPE_TEST_VERBOSE")) fprintf(stderr, "\n$ %s\n[rc %d]\n%s", cmd, rc, out);
    return rc;
}

/* max |a-b| / max |b| over two .npy float32 files (NaN where both are NaN is equal); +inf
 * when unreadable, the shapes do not fit or only one is NaN somewhere. first_step 0: the whole
 * files, of one shape. first_step 1: two --dump-logits files [seqs][steps][vocab] whose step
 * counts may differ, compared on step 0 only (the prompts' logits, before a sampled token
 * feeds back). */
static inline double tu_npy_rel_err_at(const char *a, const char *b, int first_step)
{
    float *x = NULL, *y = NULL;
    int na = 0, nb = 0;
    int64_t sa[8], sb[8];
    char err[256];
    double rel = INFINITY;
    if (!npy_read_f32(a, &x, &na, sa, err, sizeof err) &&
        !npy_read_f32(b, &y, &nb, sb, err, sizeof err) &&
        (first_step ? na == 3 && nb == 3 && sa[0] == sb[0] && sa[2] == sb[2]
                    : na == nb && !memcmp(sa, sb, (size_t)na * sizeof *sa))) {
        size_t n = 1;
        for (int i = 0; i < na; i++) n *= (size_t)sa[i];
        /* rows x cols, row r of x at r * xs (of y at r * ys) */
        size_t rows = first_step ? (size_t)sa[0] : 1, cols = first_step ? (size_t)sa[2] : n;
        size_t xs = first_step ? (size_t)(sa[1] * sa[2]) : 0;
        size_t ys = first_step ? (size_t)(sb[1] * sb[2]) : 0;
        double md = 0, mb = 0;
        for (size_t r = 0; r < rows; r++)
            for (size_t c = 0; c < cols; c++) {
                float p = x[r * xs + c], q = y[r * ys + c];
                if (isnan(p) || isnan(q)) {
                    if (isnan(p) != isnan(q)) md = INFINITY;
                    continue;
                }
                double d = fabs((double)p - q);
                if (d > md) md = d;
                if (fabs(q) > mb) mb = fabs(q);
            }
        rel = mb > 0 ? md / mb : md;
    }
    free(x);
    free(y);
    return rel;
}

static inline double tu_npy_rel_err(const char *a, const char *b)
{
    return tu_npy_rel_err_at(a, b, 0);
}

/* 1 when every line of the text file at `path` occurs somewhere in `out`, 0 otherwise (or
 * when the file cannot be read). */
static inline int tu_lines_in(const char *out, const char *path)
{
    char want[4096];
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(want, 1, sizeof want - 1, f);
    fclose(f);
    want[n] = 0;
    char *save = NULL;
    for (char *line = strtok_r(want, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
        if (!strstr(out, line)) return 0;
    return 1;
}

/* A JSON file (up to 1 MiB) parsed, or NULL; cJSON_Delete it. */
static inline cJSON *tu_read_json(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    static char buf[1 << 20];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    return cJSON_Parse(buf);
}

/* Number o[k], NaN when absent or not a number. */
static inline double tu_jnum(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

#endif
