/* tests/test_st_write.c — the safetensors writers (stage/safetensors_write.c): the in-memory
 * writer's round trip through the reader, the streaming writer (the same bytes as the
 * in-memory one for any chunking, shards and index; its errors leave no partial model) and
 * patching a tensor in place. Helpers shared with tests/test_loader.c: tests/loader_util.h.
 */
#include "tests/loader_util.h"

static void test_writer_roundtrip(void)
{
    char err[512] = "";
    size_t cnt;

    /* single file */
    char *d1 = make_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(d1);
    st_writer *w = build_writer();
    CU_ASSERT_EQUAL_FATAL(st_writer_save(w, d1, 1, err, sizeof err), 0);
    check_file_layout(d1, "model.safetensors", &cnt);
    CU_ASSERT_EQUAL(cnt, N_WSPEC);
    check_readback(d1);

    /* 3 shards + index */
    char *d3 = make_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(d3);
    int rc = st_writer_save(w, d3, 3, err, sizeof err);
    if (rc) fprintf(stderr, "\n  %s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    size_t sum = 0;
    const char *shards[3] = {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                             "model-00003-of-00003.safetensors"};
    for (int s = 0; s < 3; s++) {
        check_file_layout(d3, shards[s], &cnt);
        CU_ASSERT(cnt >= 1);
        sum += cnt;
    }
    CU_ASSERT_EQUAL(sum, N_WSPEC);
    check_readback(d3);

    /* the index: total_size and a weight_map in insertion order with non-decreasing shards */
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", d3);
    size_t len;
    char *text = (char *)slurp(path, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(text);
    cJSON *root = cJSON_Parse(text);
    cJSON *ts = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "metadata"),
                                                 "total_size");
    size_t total = 0;
    for (int k = 0; k < N_WSPEC; k++) total += wnumel(&wspecs[k]) * stage_dtype_size(wspecs[k].dt);
    CU_ASSERT(cJSON_IsNumber(ts) && (size_t)ts->valuedouble == total);
    cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    CU_ASSERT_EQUAL(cJSON_GetArraySize(wm), N_WSPEC);
    int k = 0;
    const char *prev = "";
    const cJSON *it;
    cJSON_ArrayForEach(it, wm)
    {
        CU_ASSERT_STRING_EQUAL(it->string, wspecs[k].name);
        CU_ASSERT(strcmp(prev, it->valuestring) <= 0);
        prev = it->valuestring;
        k++;
    }
    cJSON_Delete(root);
    free(text);

    /* shards into a dir holding model.safetensors: refused (it would shadow them) */
    CU_ASSERT_NOT_EQUAL(st_writer_save(w, d1, 2, err, sizeof err), 0);
    ASSERT_HAS(err, "model.safetensors");
    st_writer_free(w);
    rm_tmpdir(d1);
    rm_tmpdir(d3);

    /* balance by bytes: 6 equal tensors in 3 shards -> 2 each; more shards than tensors ->
     * one per tensor */
    char *d = make_tmpdir();
    w = st_writer_new();
    float v[16] = {0};
    const int64_t s16[1] = {16};
    char nm[32];
    for (int i = 0; i < 6; i++) {
        snprintf(nm, sizeof nm, "t%d", i);
        CU_ASSERT_EQUAL(st_writer_add(w, nm, STAGE_F32, 1, s16, v), 0);
    }
    CU_ASSERT_EQUAL_FATAL(st_writer_save(w, d, 3, err, sizeof err), 0);
    for (int s = 0; s < 3; s++) {
        check_file_layout(d, shards[s], &cnt);
        CU_ASSERT_EQUAL(cnt, 2);
    }
    rm_tmpdir(d);
    d = make_tmpdir();
    CU_ASSERT_EQUAL_FATAL(st_writer_save(w, d, 9, err, sizeof err), 0);
    check_file_layout(d, "model-00006-of-00006.safetensors", &cnt);
    CU_ASSERT_EQUAL(cnt, 1);
    rm_tmpdir(d);

    /* bad adds, duplicate names */
    CU_ASSERT_NOT_EQUAL(st_writer_add(w, "__metadata__", STAGE_F32, 1, s16, v), 0);
    const int64_t neg[1] = {-1};
    CU_ASSERT_NOT_EQUAL(st_writer_add(w, "neg", STAGE_F32, 1, neg, v), 0);
    CU_ASSERT_NOT_EQUAL(st_writer_add(w, "nodata", STAGE_F32, 1, s16, NULL), 0);
    CU_ASSERT_EQUAL(st_writer_add(w, "t3", STAGE_F32, 1, s16, v), 0);
    d = make_tmpdir();
    CU_ASSERT_NOT_EQUAL(st_writer_save(w, d, 1, err, sizeof err), 0);
    ASSERT_HAS(err, "t3");
    rm_tmpdir(d);
    st_writer_free(w);
    st_writer_free(NULL);
}

/* ---- streaming writer ------------------------------------------------------------------------ */

/* Every file in a (the same names, the same bytes) is in b and vice versa. */
static int dirs_identical(const char *a, const char *b)
{
    int same = 1, n_a = 0, n_b = 0;
    const char *dirs[2] = {a, b};
    for (int side = 0; side < 2; side++) {
        DIR *d = opendir(dirs[side]);
        if (!d) return 0;
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            if (side == 1) {
                n_b++;
                continue;
            }
            n_a++;
            char pa[1024], pb[1024];
            snprintf(pa, sizeof pa, "%s/%s", a, e->d_name);
            snprintf(pb, sizeof pb, "%s/%s", b, e->d_name);
            size_t la = 0, lb = 0;
            unsigned char *ba = slurp(pa, &la), *bb = slurp(pb, &lb);
            if (!ba || !bb || la != lb || memcmp(ba, bb, la)) {
                fprintf(stderr, "\n  %s and %s differ\n", pa, pb);
                same = 0;
            }
            free(ba);
            free(bb);
        }
        closedir(d);
    }
    return same && n_a == n_b && n_a > 0;
}

static int n_files(const char *dir)
{
    int n = 0;
    DIR *d = opendir(dir);
    if (!d) return -1;
    struct dirent *e;
    while ((e = readdir(d))) n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

static st_stream *declare_wspecs(void)
{
    st_stream *s = st_stream_new();
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    for (int k = 0; k < N_WSPEC; k++)
        CU_ASSERT_EQUAL(
            st_stream_declare(s, wspecs[k].name, wspecs[k].dt, wspecs[k].ndim, wspecs[k].shape), 0);
    return s;
}

/* All wspecs values concatenated as f32: [sum of numel]. */
static float *all_values(size_t *n)
{
    size_t tot = 0;
    for (int k = 0; k < N_WSPEC; k++) tot += wnumel(&wspecs[k]);
    float *v = malloc(tot * sizeof *v);
    size_t o = 0;
    for (int k = 0; k < N_WSPEC; k++) {
        wvalues(k, v + o, wnumel(&wspecs[k]));
        o += wnumel(&wspecs[k]);
    }
    *n = tot;
    return v;
}

/* Stream the wspecs tensors as f32 in chunks of `chunk` values (spanning tensors). */
static int stream_f32(const char *dir, int shards, size_t chunk, char *err, size_t errlen)
{
    st_stream *s = declare_wspecs();
    size_t n;
    float *v = all_values(&n);
    int rc = st_stream_begin(s, dir, shards, err, errlen);
    for (size_t o = 0; !rc && o < n; o += chunk)
        rc = st_stream_write_f32(s, v + o, n - o < chunk ? n - o : chunk, err, errlen);
    if (!rc) rc = st_stream_finish(s, err, errlen);
    st_stream_free(s);
    free(v);
    return rc;
}

/* The same model as raw bytes (taken from the in-memory writer's files), `chunk` bytes a call. */
static int stream_bytes(const char *src, const char *dir, size_t chunk, char *err, size_t errlen)
{
    st_model *m = NULL;
    if (st_open(src, &m, err, errlen)) return -1;
    st_stream *s = declare_wspecs();
    int rc = st_stream_begin(s, dir, 1, err, errlen);
    for (int k = 0; !rc && k < N_WSPEC; k++) {
        st_tensor t;
        CU_ASSERT_EQUAL(st_find(m, wspecs[k].name, &t, err, errlen), 1);
        const uint8_t *p = t.data;
        for (size_t o = 0; !rc && o < t.nbytes; o += chunk)
            rc =
                st_stream_write(s, p + o, t.nbytes - o < chunk ? t.nbytes - o : chunk, err, errlen);
    }
    if (!rc) rc = st_stream_finish(s, err, errlen);
    st_stream_free(s);
    st_close(m);
    return rc;
}

static void test_stream_identical(void)
{
    char err[512] = "";
    for (int shards = 1; shards <= 4; shards += 2) {
        char *ref = make_tmpdir(), *a = make_tmpdir(), *b = make_tmpdir();
        CU_ASSERT_PTR_NOT_NULL_FATAL(ref && a && b);
        st_writer *w = build_writer();
        CU_ASSERT_EQUAL_FATAL(st_writer_save(w, ref, shards, err, sizeof err), 0);
        st_writer_free(w);
        /* 7 values a call: chunks cross tensor (and dtype, and shard) boundaries */
        int rc = stream_f32(a, shards, 7, err, sizeof err);
        if (rc) fprintf(stderr, "\n  %s\n", err);
        CU_ASSERT_EQUAL(rc, 0);
        CU_ASSERT(dirs_identical(ref, a));
        /* one big call */
        rm_tmpdir(a);
        a = make_tmpdir();
        CU_ASSERT_EQUAL(stream_f32(a, shards, 1u << 20, err, sizeof err), 0);
        CU_ASSERT(dirs_identical(ref, a));
        CU_ASSERT_EQUAL(n_files(a), shards == 1 ? 1 : shards + 1); /* shards + index */
        check_readback(a);
        if (shards == 1) { /* raw bytes, 5 at a time */
            CU_ASSERT_EQUAL(stream_bytes(ref, b, 5, err, sizeof err), 0);
            CU_ASSERT(dirs_identical(ref, b));
        }
        rm_tmpdir(ref);
        rm_tmpdir(a);
        rm_tmpdir(b);
    }

    /* the index names every tensor's shard; sizes and totals as declared */
    char *d = make_tmpdir();
    st_stream *s = declare_wspecs();
    size_t n;
    float *v = all_values(&n);
    uint64_t want_total = 0;
    for (int k = 0; k < N_WSPEC; k++)
        want_total += wnumel(&wspecs[k]) * stage_dtype_size(wspecs[k].dt);
    CU_ASSERT_EQUAL(st_stream_total_bytes(s), want_total);
    CU_ASSERT_EQUAL_FATAL(st_stream_begin(s, d, 3, err, sizeof err), 0);
    CU_ASSERT_EQUAL(st_stream_written_bytes(s), 0);
    CU_ASSERT_EQUAL(st_stream_write_f32(s, v, n, err, sizeof err), 0);
    CU_ASSERT_EQUAL(st_stream_written_bytes(s), want_total);
    CU_ASSERT_EQUAL(st_stream_finish(s, err, sizeof err), 0);
    st_stream_free(s);
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", d);
    size_t len = 0;
    unsigned char *txt = slurp(path, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(txt);
    cJSON *j = cJSON_ParseWithLength((const char *)txt, len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(j);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(j, "weight_map");
    CU_ASSERT_EQUAL(cJSON_GetArraySize(wm), N_WSPEC);
    CU_ASSERT_DOUBLE_EQUAL(cJSON_GetObjectItemCaseSensitive(
                               cJSON_GetObjectItemCaseSensitive(j, "metadata"), "total_size")
                               ->valuedouble,
                           (double)want_total, 0);
    size_t in_files = 0;
    for (int f = 1; f <= 3; f++) {
        char name[64];
        snprintf(name, sizeof name, "model-%05d-of-00003.safetensors", f);
        size_t cnt;
        check_file_layout(d, name, &cnt);
        in_files += cnt;
        int mapped = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, wm) mapped += strcmp(it->valuestring, name) == 0;
        CU_ASSERT_EQUAL(mapped, (int)cnt);
    }
    CU_ASSERT_EQUAL(in_files, N_WSPEC);
    cJSON_Delete(j);
    free(txt);
    free(v);
    rm_tmpdir(d);
}

static void test_stream_errors(void)
{
    char err[512] = "";
    int64_t s4[1] = {4}, s0[1] = {0}, neg[1] = {-1};
    float v[8] = {1, 2, 3, 4, 5, 6, 7, 8};

    /* declaring: bad arguments; after begin nothing more can be declared */
    st_stream *s = st_stream_new();
    CU_ASSERT_NOT_EQUAL(st_stream_declare(s, "__metadata__", STAGE_F32, 1, s4), 0);
    CU_ASSERT_NOT_EQUAL(st_stream_declare(s, "neg", STAGE_F32, 1, neg), 0);
    CU_ASSERT_NOT_EQUAL(st_stream_declare(s, "dt", (stage_dtype)7, 1, s4), 0);
    CU_ASSERT_NOT_EQUAL(st_stream_declare(s, "nd", STAGE_F32, ST_MAX_DIMS + 1, s4), 0);
    CU_ASSERT_EQUAL(st_stream_declare(s, "a", STAGE_F32, 1, s4), 0);
    CU_ASSERT_EQUAL(st_stream_declare(s, "empty", STAGE_BF16, 1, s0), 0);
    CU_ASSERT_EQUAL(st_stream_declare(s, "b", STAGE_BF16, 1, s4), 0);
    CU_ASSERT_NOT_EQUAL(st_stream_write(s, v, 4, err, sizeof err), 0); /* not begun */
    char *d = make_tmpdir();
    CU_ASSERT_EQUAL_FATAL(st_stream_begin(s, d, 1, err, sizeof err), 0);
    CU_ASSERT_NOT_EQUAL(st_stream_declare(s, "late", STAGE_F32, 1, s4), 0);
    CU_ASSERT_NOT_EQUAL(st_stream_begin(s, d, 1, err, sizeof err), 0);
    /* finishing early: an error naming the tensor, and the file is gone */
    CU_ASSERT_EQUAL(st_stream_write_f32(s, v, 6, err, sizeof err), 0); /* a + half of b */
    CU_ASSERT_EQUAL(n_files(d), 1);
    CU_ASSERT_NOT_EQUAL(st_stream_finish(s, err, sizeof err), 0);
    ASSERT_HAS(err, "tensor b incomplete: 20 of 24 bytes");
    CU_ASSERT_EQUAL(n_files(d), 0);
    CU_ASSERT_NOT_EQUAL(st_stream_write_f32(s, v, 1, err, sizeof err), 0); /* failed: dead */
    st_stream_free(s);

    /* too many bytes */
    s = st_stream_new();
    CU_ASSERT_EQUAL(st_stream_declare(s, "a", STAGE_F32, 1, s4), 0);
    CU_ASSERT_EQUAL_FATAL(st_stream_begin(s, d, 1, err, sizeof err), 0);
    CU_ASSERT_NOT_EQUAL(st_stream_write_f32(s, v, 5, err, sizeof err), 0);
    ASSERT_HAS(err, "4 bytes more than the declared tensors hold");
    CU_ASSERT_EQUAL(n_files(d), 0);
    st_stream_free(s);

    /* an unfinished stream leaves nothing behind when freed */
    s = st_stream_new();
    CU_ASSERT_EQUAL(st_stream_declare(s, "a", STAGE_F32, 1, s4), 0);
    CU_ASSERT_EQUAL(st_stream_declare(s, "b", STAGE_F32, 1, s4), 0);
    CU_ASSERT_EQUAL_FATAL(st_stream_begin(s, d, 2, err, sizeof err), 0);
    CU_ASSERT_EQUAL(st_stream_write_f32(s, v, 6, err, sizeof err), 0);
    CU_ASSERT_EQUAL(n_files(d), 2);
    st_stream_free(s);
    CU_ASSERT_EQUAL(n_files(d), 0);
    st_stream_free(NULL);

    /* a directory that does not exist: fails at begin, before any data */
    s = st_stream_new();
    CU_ASSERT_EQUAL(st_stream_declare(s, "a", STAGE_F32, 1, s4), 0);
    char missing[1100];
    snprintf(missing, sizeof missing, "%s/no/such/dir", d);
    CU_ASSERT_NOT_EQUAL(st_stream_begin(s, missing, 1, err, sizeof err), 0);
    ASSERT_HAS(err, "model.safetensors: cannot create: No such file or directory");
    CU_ASSERT_NOT_EQUAL(st_stream_write_f32(s, v, 4, err, sizeof err), 0);
    st_stream_free(s);

    /* a full disk (the second shard is /dev/full): write failed, every file removed */
    char shard2[1100];
    snprintf(shard2, sizeof shard2, "%s/model-00002-of-00002.safetensors", d);
    CU_ASSERT_EQUAL_FATAL(symlink("/dev/full", shard2), 0);
    s = st_stream_new();
    int64_t big[1] = {1 << 20}; /* 4 MiB: more than any stdio buffer */
    CU_ASSERT_EQUAL(st_stream_declare(s, "a", STAGE_F32, 1, s4), 0);
    CU_ASSERT_EQUAL(st_stream_declare(s, "b", STAGE_F32, 1, big), 0);
    CU_ASSERT_EQUAL_FATAL(st_stream_begin(s, d, 2, err, sizeof err), 0);
    float *z = calloc((size_t)big[0], sizeof *z);
    int rc = st_stream_write_f32(s, v, 4, err, sizeof err);
    if (!rc) rc = st_stream_write_f32(s, z, (size_t)big[0], err, sizeof err);
    if (!rc) rc = st_stream_finish(s, err, sizeof err);
    CU_ASSERT_NOT_EQUAL(rc, 0);
    ASSERT_HAS(err, "model-00002-of-00002.safetensors: write failed: No space left on device");
    CU_ASSERT_EQUAL(n_files(d), 0); /* shard 1 and the link are gone, no index */
    st_stream_free(s);
    free(z);

    /* st_writer reports the same errors */
    st_writer *w = st_writer_new();
    CU_ASSERT_EQUAL(st_writer_add(w, "a", STAGE_F32, 1, s4, v), 0);
    CU_ASSERT_NOT_EQUAL(st_writer_save(w, missing, 1, err, sizeof err), 0);
    ASSERT_HAS(err, "cannot create");
    st_writer_free(w);
    rm_tmpdir(d);
}

static void test_patch(void)
{
    char err[512] = "";
    char *d = make_tmpdir();
    st_writer *w = build_writer();
    CU_ASSERT_EQUAL_FATAL(st_writer_save(w, d, 2, err, sizeof err), 0);
    st_writer_free(w);
    float nb[7] = {1.5f, -2.0f, 3.25f, 0.0f, 1.00390625f, -7.0f, 100.0f}; /* b.bf16 [7] */
    float ng[16 * 8];                                                     /* g.bf16 [16, 8] */
    for (int i = 0; i < 128; i++) ng[i] = (float)i - 64.0f;
    float ne = 42.0f; /* f.scalar (f32) */
    CU_ASSERT_EQUAL(st_patch_f32(d, "b.bf16", nb, 7, err, sizeof err), 1);
    CU_ASSERT_EQUAL(st_patch_f32(d, "g.bf16", ng, 128, err, sizeof err), 1);
    CU_ASSERT_EQUAL(st_patch_f32(d, "f.scalar", &ne, 1, err, sizeof err), 1);
    CU_ASSERT_EQUAL(st_patch_f32(d, "no.such", &ne, 1, err, sizeof err), 0);
    CU_ASSERT_EQUAL(st_patch_f32(d, "b.bf16", nb, 6, err, sizeof err), -1);
    ASSERT_HAS(err, "tensor b.bf16 holds 7 values, 6 given");
    st_model *m = NULL;
    CU_ASSERT_EQUAL_FATAL(st_open(d, &m, err, sizeof err), 0);
    const float *p = st_get_f32(m, "b.bf16", 1, (int64_t[]){7}, err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    for (int i = 0; i < 7; i++) /* bf16 of each; the tie 1 + 2^-8 rounds to 1 */
        CU_ASSERT_EQUAL(p[i], i == 4 ? 1.0f : nb[i]);
    p = st_get_f32(m, "g.bf16", 2, (int64_t[]){16, 8}, err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    int bad = 0;
    for (int i = 0; i < 128; i++) bad += p[i] != ng[i];
    CU_ASSERT_EQUAL(bad, 0);
    p = st_get_f32(m, "f.scalar", 0, NULL, err, sizeof err);
    CU_ASSERT(p && p[0] == 42.0f);
    /* a neighbour is untouched */
    size_t n = wnumel(&wspecs[3]);
    float *want = malloc(n * sizeof *want);
    wvalues(3, want, n);
    p = st_get_f32(m, "d.f16_odd", 1, wspecs[3].shape, err, sizeof err);
    CU_ASSERT(p && p[2] == stage_f16_to_f32(stage_f32_to_f16(want[2])));
    free(want);
    st_close(m);
    rm_tmpdir(d);
}

/* ---- main ------------------------------------------------------------------------------------ */

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    CU_pSuite ss = CU_add_suite("safetensors writing", NULL, NULL);
    if (!ss) {
        CU_cleanup_registry();
        return 2;
    }
    CU_add_test(ss, "writer round trip", test_writer_roundtrip);
    CU_add_test(ss, "streaming writer = in-memory writer (chunks, shards, index)",
                test_stream_identical);
    CU_add_test(ss, "streaming writer errors (early finish, overflow, no dir, full disk)",
                test_stream_errors);
    CU_add_test(ss, "patch a tensor in place", test_patch);
    return tu_cunit_run();
}
