/* tests/loader_util.h — what the loader tests share (tests/test_loader.c: config.json and
 * safetensors reading; tests/test_st_write.c: the writers and patching): reading and writing
 * raw files, hand conversions, and the writer round-trip helpers (a fixed tensor list,
 * values, readback and file-layout checks). Static inline: each test takes what it uses.
 */
#ifndef TESTS_LOADER_UTIL_H
#define TESTS_LOADER_UTIL_H

#include "stage/config.h"
#include "stage/convert.h"
#include "stage/safetensors.h"

#include <CUnit/Basic.h>
#include <cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/testutil.h"

/* ---- helpers --------------------------------------------------------------------------------- */

/* MODPIPE_TEST_VERBOSE=1 prints every expected error message. */
static inline void show(const char *msg)
{
    if (getenv("MODPIPE_TEST_VERBOSE")) fprintf(stderr, "\n    | %s", msg);
}

static inline const char *fixtures(void)
{
    const char *e = getenv("MODPIPE_FIXTURES");
    return e && *e ? e : "tests/fixtures";
}

static inline void fx_path(char *buf, size_t len, const char *a, const char *b)
{
    if (b)
        snprintf(buf, len, "%s/%s/%s", fixtures(), a, b);
    else
        snprintf(buf, len, "%s/%s", fixtures(), a);
}

static inline unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    rewind(f);
    unsigned char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (b) {
        b[n] = 0;
        *len = (size_t)n;
    }
    return b;
}

static inline void spit(const char *dir, const char *name, const void *p, size_t n)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    CU_ASSERT_FATAL(f != NULL);
    if (n) CU_ASSERT(fwrite(p, 1, n, f) == n);
    fclose(f);
}

static inline void rm_file(const char *dir, const char *name)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    unlink(path);
}

static inline char *make_tmpdir(void) { return make_tmpdir_tagged("loader"); }

/* Independent read of a tensor's raw bytes: parse the header with cJSON here and fread. */
static inline unsigned char *raw_tensor(const char *file, const char *name, char *dtype,
                                        size_t *nbytes)
{
    size_t len;
    unsigned char *b = slurp(file, &len);
    if (!b || len < 8) {
        free(b);
        return NULL;
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | b[i];
    cJSON *h = cJSON_ParseWithLength((const char *)b + 8, (size_t)n);
    cJSON *e = cJSON_GetObjectItemCaseSensitive(h, name);
    unsigned char *out = NULL;
    if (e) {
        cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
        size_t beg = (size_t)cJSON_GetArrayItem(off, 0)->valuedouble;
        size_t end = (size_t)cJSON_GetArrayItem(off, 1)->valuedouble;
        strcpy(dtype, cJSON_GetObjectItemCaseSensitive(e, "dtype")->valuestring);
        *nbytes = end - beg;
        out = malloc(end - beg + 1);
        memcpy(out, b + 8 + n + beg, end - beg);
    }
    cJSON_Delete(h);
    free(b);
    return out;
}

/* Hand decoders (not stage/convert.c). */
static inline float hand_bf16(const unsigned char *p)
{
    uint32_t u = ((uint32_t)p[1] << 24) | ((uint32_t)p[0] << 16);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float hand_f16(const unsigned char *p)
{
    unsigned h = (unsigned)p[0] | ((unsigned)p[1] << 8);
    int s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 0)
        v = ldexp(m, -24);
    else if (e == 31)
        v = m ? NAN : INFINITY;
    else
        v = ldexp(m + 1024, e - 25);
    return (float)(s ? -v : v);
}

static inline float hand_f32(const unsigned char *p)
{
    uint32_t u =
        (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- safetensors: writer round trip ---------------------------------------------------------- */

typedef struct {
    const char *name;
    stage_dtype dt;
    int ndim;
    int64_t shape[3];
} wspec;

static const wspec wspecs[] = {
    {"a.f32", STAGE_F32, 2, {3, 5, 0}},
    {"b.bf16", STAGE_BF16, 1, {7, 0, 0}},
    {"c.f16", STAGE_F16, 3, {2, 3, 4}},
    {"d.f16_odd", STAGE_F16, 1, {3, 0, 0}}, /* 6 bytes: the next F32 lands unaligned */
    {"e.f32_after_odd", STAGE_F32, 2, {4, 4, 0}},
    {"f.scalar", STAGE_F32, 0, {0, 0, 0}},
    {"g.bf16", STAGE_BF16, 2, {16, 8, 0}},
};
#define N_WSPEC ((int)(sizeof wspecs / sizeof wspecs[0]))

static inline size_t wnumel(const wspec *w)
{
    size_t n = 1;
    for (int i = 0; i < w->ndim; i++) n *= (size_t)w->shape[i];
    return n;
}

/* Deterministic values incl. signs, tiny and large magnitudes, -0 and a rounding tie. */
static inline void wvalues(int which, float *v, size_t n)
{
    uint32_t s = 0x9e3779b9u * (uint32_t)(which + 1);
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        float x = ((float)(s >> 8) / 16777216.0f - 0.5f) * 4.0f;
        if (i % 5 == 1) x *= 1e-6f;
        if (i % 7 == 3) x *= 3000.0f;
        v[i] = x;
    }
    if (n > 2) {
        v[0] = -0.0f;
        v[1] = 1.00390625f; /* 1 + 2^-8: a bf16 tie, rounds to even (1.0) */
    }
}

static inline st_writer *build_writer(void)
{
    st_writer *w = st_writer_new();
    CU_ASSERT_PTR_NOT_NULL_FATAL(w);
    for (int k = 0; k < N_WSPEC; k++) {
        size_t n = wnumel(&wspecs[k]);
        float *v = malloc(n * sizeof *v);
        wvalues(k, v, n);
        CU_ASSERT_EQUAL(
            st_writer_add(w, wspecs[k].name, wspecs[k].dt, wspecs[k].ndim, wspecs[k].shape, v), 0);
        free(v);
    }
    return w;
}

static inline void check_readback(const char *dir)
{
    st_model *m = NULL;
    char err[512] = "";
    int rc = st_open(dir, &m, err, sizeof err);
    if (rc) fprintf(stderr, "\n  %s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    for (int k = 0; k < N_WSPEC; k++) {
        size_t n = wnumel(&wspecs[k]);
        float *v = malloc(n * sizeof *v);
        wvalues(k, v, n);
        const float *p =
            st_get_f32(m, wspecs[k].name, wspecs[k].ndim, wspecs[k].shape, err, sizeof err);
        if (!p) fprintf(stderr, "\n  %s\n", err);
        CU_ASSERT_PTR_NOT_NULL_FATAL(p);
        st_tensor t;
        CU_ASSERT_EQUAL(st_find(m, wspecs[k].name, &t, err, sizeof err), 1);
        CU_ASSERT_EQUAL(t.dtype, wspecs[k].dt);
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) {
            float want = v[i];
            if (wspecs[k].dt == STAGE_BF16) want = stage_bf16_to_f32(stage_f32_to_bf16(v[i]));
            if (wspecs[k].dt == STAGE_F16) want = stage_f16_to_f32(stage_f32_to_f16(v[i]));
            if (memcmp(&want, &p[i], 4) != 0) bad++;
        }
        CU_ASSERT_EQUAL(bad, 0);
        if (wspecs[k].dt == STAGE_BF16) CU_ASSERT_EQUAL(p[1], 1.0f);
        if (wspecs[k].dt == STAGE_F32 && n > 2) CU_ASSERT(signbit(p[0]) && p[0] == 0.0f);
        free(v);
    }
    st_close(m);
}

/* The file's data region starts 8-aligned and tensors are packed without gaps. */
static inline void check_file_layout(const char *dir, const char *name, size_t *n_tensors)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    size_t len;
    unsigned char *b = slurp(path, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | b[i];
    CU_ASSERT_EQUAL((8 + n) % 8, 0);
    cJSON *h = cJSON_ParseWithLength((const char *)b + 8, (size_t)n);
    CU_ASSERT_PTR_NOT_NULL_FATAL(h);
    size_t total = 0, cnt = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, h)
    {
        if (strcmp(it->string, "__metadata__") == 0) continue;
        const cJSON *off = cJSON_GetObjectItemCaseSensitive(it, "data_offsets");
        CU_ASSERT_EQUAL((size_t)cJSON_GetArrayItem(off, 0)->valuedouble, total);
        total = (size_t)cJSON_GetArrayItem(off, 1)->valuedouble;
        cnt++;
    }
    CU_ASSERT_EQUAL(8 + n + total, len);
    *n_tensors = cnt;
    cJSON_Delete(h);
    free(b);
}

#endif
