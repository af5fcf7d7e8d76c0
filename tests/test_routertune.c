/* tests/test_routertune.c — `modpipe router-tune` under mpirun.
 *
 *   - data parallel: -np 1, 2, 3 give the same routers within 1e-5 (both granularities), and
 *     training moved them (not a vacuous comparison);
 *   - the output directory: config.json marks the routed layers mindskip, the index maps the
 *     original tensors to the ORIGINAL file by a relative path, routers.safetensors holds only
 *     the routers, and `modpipe eval` loads it and reports per-layer participation;
 *   - --resume continues from the routers (0 steps: identical routers), refusal without it;
 *   - bad input: data missing, shorter than one batch, --layers out of range, --batch < ranks;
 *   - SIGINT writes the routers and exits with status 130.
 * Needs: MODPIPE (the binary, default build/modpipe), mpirun, tests/fixtures/dense.
 */
#include <CUnit/Basic.h>
#include <cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "stage/config.h"
#include "stage/safetensors.h"
#include "tests/testutil.h"

static const char *BIN, *FIX;
static char TMP[256];
#define MPIRUN                                                                                     \
    "mpirun --allow-run-as-root --oversubscribe --mca btl self,tcp --mca btl_tcp_if_include lo"
#define TRAIN_ARGS "--layers 2-4 --seq-len 16 --batch 6 --steps 8 --lr 0.05 --eval-every 4 --quiet"

static char OUT[1 << 16];

static int run(int secs, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int run(int secs, const char *fmt, ...)
{
    char cmd[8192], full[8400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    snprintf(full, sizeof full, "timeout -s KILL %d sh -c '%s' 2>&1", secs, cmd);
    FILE *p = popen(full, "r");
    if (!p) return -1;
    size_t n = fread(OUT, 1, sizeof OUT - 1, p);
    OUT[n] = 0;
    int st = pclose(p);
    int rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (getenv("MODPIPE_TEST_VERBOSE")) fprintf(stderr, "\n$ %s\n[rc %d]\n%s", cmd, rc, OUT);
    return rc;
}

#define ASSERT_OUT_HAS(needle)                                                                     \
    do {                                                                                           \
        int has_ = strstr(OUT, (needle)) != NULL;                                                  \
        if (!has_) fprintf(stderr, "\n  output lacks \"%s\":\n%s\n", (needle), OUT);               \
        CU_ASSERT(has_);                                                                           \
    } while (0)

/* documents of token ids with some structure (a repeated motif per document) */
static void write_data(const char *path, int docs, uint32_t seed)
{
    FILE *f = fopen(path, "w");
    for (int d = 0; d < docs && f; d++) {
        seed = seed * 1664525u + 1013904223u;
        int len = 20 + (int)(seed >> 24) % 30, motif = 3 + (int)(seed >> 16) % 90;
        for (int t = 0; t < len; t++) {
            seed = seed * 1664525u + 1013904223u;
            int id = (t % 4 == 0) ? motif : 3 + (int)((seed >> 8) % 94u);
            fprintf(f, "%d%s", id, t + 1 < len ? "," : "\n");
        }
    }
    if (f) fclose(f);
}

/* routers of layers 2-4 of an output dir: w [3][64], b [3] */
static int read_routers(const char *dir, float *w, float *b)
{
    st_model *m = NULL;
    char err[512];
    if (st_open(dir, &m, err, sizeof err)) {
        fprintf(stderr, "\n  %s\n", err);
        return -1;
    }
    int rc = 0;
    for (int i = 0; i < 3 && !rc; i++) {
        char name[128];
        int64_t s2[2] = {1, 64}, s1[1] = {1};
        snprintf(name, sizeof name, "model.layers.%d.router.weight", 2 + i);
        const float *p = st_get_f32(m, name, 2, s2, err, sizeof err);
        snprintf(name, sizeof name, "model.layers.%d.router.bias", 2 + i);
        const float *q = st_get_f32(m, name, 1, s1, err, sizeof err);
        if (!p || !q) {
            fprintf(stderr, "\n  %s\n", err);
            rc = -1;
            break;
        }
        memcpy(w + i * 64, p, 64 * sizeof *w);
        b[i] = q[0];
    }
    st_close(m);
    return rc;
}

static void k_agree(const char *gran)
{
    float w1[192], b1[3], wk[192], bk[3];
    for (int k = 1; k <= 3; k++) {
        int rc =
            run(120,
                MPIRUN " -np %d %s router-tune --model %s/dense --data-ids %s/train.txt "
                       "--eval-data-ids %s/eval.txt --out %s/%s-np%d --granularity %s " TRAIN_ARGS,
                k, BIN, FIX, TMP, TMP, TMP, gran, k, gran);
        CU_ASSERT_EQUAL_FATAL(rc, 0);
        char dir[512];
        snprintf(dir, sizeof dir, "%s/%s-np%d", TMP, gran, k);
        CU_ASSERT_FATAL(read_routers(dir, k == 1 ? w1 : wk, k == 1 ? b1 : bk) == 0);
        if (k == 1) {
            /* training moved the routers away from the init (b = 0.5, |w| ~ 0.01) */
            double moved = 0;
            for (int i = 0; i < 3; i++) moved += fabs(b1[i] - 0.5);
            CU_ASSERT(moved > 0.05);
            continue;
        }
        double md = 0;
        for (int i = 0; i < 192; i++) md = fmax(md, fabs(w1[i] - wk[i]));
        for (int i = 0; i < 3; i++) md = fmax(md, fabs(b1[i] - bk[i]));
        if (getenv("MODPIPE_TEST_VERBOSE"))
            fprintf(stderr, "\n  %s np %d: max diff %.3g\n", gran, k, md);
        CU_ASSERT(md <= 1e-5);
    }
}

static void test_np_agree_sequence(void) { k_agree("sequence"); }
static void test_np_agree_token(void) { k_agree("token"); }

static void test_output_dir(void)
{
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/sequence-np1", TMP);
    stage_config cfg;
    char err[512];
    CU_ASSERT_FATAL(stage_config_load(dir, &cfg, err, sizeof err) == 0);
    for (int l = 0; l < cfg.n_layers; l++)
        CU_ASSERT_EQUAL(cfg.layer_kind[l],
                        l >= 2 && l <= 4 ? STAGE_KIND_MINDSKIP : STAGE_KIND_DENSE);
    CU_ASSERT_EQUAL(cfg.ms_granularity, STAGE_GRAN_SEQUENCE);
    stage_config_free(&cfg);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    struct stat sb;
    CU_ASSERT(stat(path, &sb) != 0); /* nothing copied */
    snprintf(path, sizeof path, "%s/routers.safetensors", dir);
    CU_ASSERT(stat(path, &sb) == 0 && sb.st_size < 4096);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    FILE *f = fopen(path, "r");
    CU_ASSERT_FATAL(f != NULL);
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    cJSON *root = cJSON_Parse(buf);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(wm, "model.embed_tokens.weight");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(wm, "model.layers.3.router.weight");
    CU_ASSERT_FATAL(cJSON_IsString(e) && cJSON_IsString(r));
    CU_ASSERT(!strncmp(e->valuestring, "../", 3));
    CU_ASSERT(strstr(e->valuestring, "dense/model.safetensors") != NULL);
    CU_ASSERT_STRING_EQUAL(r->valuestring, "routers.safetensors");
    cJSON_Delete(root);
    /* the engine serves it: eval with per-layer participation */
    CU_ASSERT_EQUAL(run(60,
                        "%s router-tune --model %s/dense --data-ids %s/eval.txt --seq-len 16 "
                        "--dump-sequences %s/eval-seqs.txt",
                        BIN, FIX, TMP, TMP),
                    0);
    CU_ASSERT_EQUAL(run(60,
                        MPIRUN " -np 2 %s eval --model %s --tokens-file %s/eval-seqs.txt "
                               "--stats %s/stats.json --quiet",
                        BIN, dir, TMP, TMP),
                    0);
    ASSERT_OUT_HAS("mean NLL");
}

static void test_resume(void)
{
    float w0[192], b0[3], w1[192], b1[3];
    char src[512];
    snprintf(src, sizeof src, "%s/sequence-np1", TMP);
    CU_ASSERT_FATAL(read_routers(src, w0, b0) == 0);
    CU_ASSERT_NOT_EQUAL(run(60,
                            "%s router-tune --model %s --data-ids %s/train.txt --out %s/x "
                            "--layers 3",
                            BIN, src, TMP, TMP),
                        0);
    ASSERT_OUT_HAS("layer 3 already has a router");
    ASSERT_OUT_HAS("--resume");
    CU_ASSERT_NOT_EQUAL(run(60,
                            "%s router-tune --model %s --data-ids %s/train.txt --out %s/x "
                            "--layers 1-3 --resume",
                            BIN, src, TMP, TMP),
                        0);
    ASSERT_OUT_HAS("no router on layer 1");
    /* 0 steps: the routers come back unchanged; the new index still reaches the base weights */
    CU_ASSERT_EQUAL(run(60,
                        "%s router-tune --model %s --data-ids %s/train.txt --out %s/resumed "
                        "--layers 2-4 --seq-len 16 --batch 6 --steps 0 --resume --quiet",
                        BIN, src, TMP, TMP),
                    0);
    char dir[512];
    snprintf(dir, sizeof dir, "%s/resumed", TMP);
    CU_ASSERT_FATAL(read_routers(dir, w1, b1) == 0);
    CU_ASSERT(!memcmp(w0, w1, sizeof w0) && !memcmp(b0, b1, sizeof b0));
    /* and more steps continue from them */
    CU_ASSERT_EQUAL(run(60,
                        "%s router-tune --model %s --data-ids %s/train.txt --out %s/resumed2 "
                        "--layers 2-4 --seq-len 16 --batch 6 --steps 2 --resume --quiet",
                        BIN, src, TMP, TMP),
                    0);
    snprintf(dir, sizeof dir, "%s/resumed2", TMP);
    CU_ASSERT_FATAL(read_routers(dir, w1, b1) == 0);
    double md = 0;
    for (int i = 0; i < 3; i++) md = fmax(md, fabs(b1[i] - b0[i]));
    CU_ASSERT(md > 0 && md < 0.5); /* two steps of lr 0.01 from the resumed values */
}

static void test_bad_input(void)
{
    CU_ASSERT_EQUAL(run(60, "%s router-tune --model %s/dense --data-ids %s/nope.txt --out %s/x",
                        BIN, FIX, TMP, TMP),
                    1);
    ASSERT_OUT_HAS("cannot open");
    ASSERT_OUT_HAS("nope.txt");
    CU_ASSERT_EQUAL(run(60,
                        "%s router-tune --model %s/dense --data-ids %s/eval.txt --out %s/x "
                        "--seq-len 64 --batch 64",
                        BIN, FIX, TMP, TMP),
                    1);
    ASSERT_OUT_HAS("fewer than one batch");
    CU_ASSERT_EQUAL(run(60,
                        "%s router-tune --model %s/dense --data-ids %s/train.txt --out %s/x "
                        "--layers 3-6",
                        BIN, FIX, TMP, TMP),
                    1);
    ASSERT_OUT_HAS("layer 6 is out of range");
    CU_ASSERT_EQUAL(run(60,
                        MPIRUN " -np 3 %s router-tune --model %s/dense --data-ids %s/train.txt "
                               "--out %s/x --batch 2",
                        BIN, FIX, TMP, TMP),
                    1);
    ASSERT_OUT_HAS("smaller than the 3 ranks");
    CU_ASSERT_EQUAL(run(60,
                        "%s router-tune --model %s/dense --data-ids %s/train.txt --out %s/x "
                        "--target-skip 1.5",
                        BIN, FIX, TMP, TMP),
                    1);
    ASSERT_OUT_HAS("--target-skip");
    CU_ASSERT_EQUAL(run(60, "%s router-tune --model %s/dense --out %s/x", BIN, FIX, TMP), 1);
    ASSERT_OUT_HAS("--data");
    CU_ASSERT_EQUAL(run(60, "%s router-tune --help", BIN), 0);
    ASSERT_OUT_HAS("--target-skip");
    ASSERT_OUT_HAS("--resume");
}

/* --data text: documents split at blank lines, each tokenized as `modpipe tokenize` does
 * (BOS first), concatenated and cut into sequences; the tail is dropped. */
static void test_text_data(void)
{
    char path[512];
    snprintf(path, sizeof path, "%s/docs.txt", TMP);
    FILE *f = fopen(path, "w");
    CU_ASSERT_FATAL(f != NULL);
    fprintf(f, "Once upon a time, there was a cat.\nIt was happy.\n\n  \nThe dog ran home.\n");
    fclose(f);
    char want[4096] = "";
    CU_ASSERT_EQUAL_FATAL(run(30,
                              "%s tokenize --model %s/stories260K --text \"$(printf \"Once upon a "
                              "time, there was a cat.\\nIt was happy.\")\"",
                              BIN, FIX),
                          0);
    strcat(want, OUT);
    CU_ASSERT_EQUAL_FATAL(
        run(30, "%s tokenize --model %s/stories260K --text \"The dog ran home.\"", BIN, FIX), 0);
    strcat(want, OUT);
    int ids[512], n = 0;
    for (char *t = strtok(want, " \n"); t && n < 512; t = strtok(NULL, " \n")) ids[n++] = atoi(t);
    CU_ASSERT_FATAL(n > 16 && ids[0] == 1);
    CU_ASSERT_EQUAL_FATAL(run(30,
                              "%s router-tune --model %s/stories260K --data %s --seq-len 8 "
                              "--dump-sequences %s/docs.ids 2>/dev/null && cat %s/docs.ids",
                              BIN, FIX, path, TMP, TMP),
                          0);
    int got[512], m = 0;
    for (char *t = strtok(OUT, ",\n"); t && m < 512; t = strtok(NULL, ",\n")) got[m++] = atoi(t);
    CU_ASSERT_EQUAL(m, n / 8 * 8);
    for (int i = 0; i < m && i < n; i++) CU_ASSERT_EQUAL(got[i], ids[i]);
}

static void test_sigint(void)
{
    int rc = run(120,
                 "%s router-tune --model %s/dense --data-ids %s/train.txt --out %s/int "
                 "--layers 2-4 --seq-len 16 --batch 6 --steps 100000000 --log-every 1 "
                 "> %s/int.log 2>&1 & p=$!; "
                 "i=0; while ! grep -q \"step 3/\" %s/int.log && [ $i -lt 600 ]; do sleep 0.1; "
                 "i=$((i+1)); done; "
                 "kill -INT $p; wait $p; echo rc=$?; cat %s/int.log",
                 BIN, FIX, TMP, TMP, TMP, TMP, TMP);
    CU_ASSERT_EQUAL(rc, 0);
    ASSERT_OUT_HAS("rc=130");
    ASSERT_OUT_HAS("interrupted after");
    char dir[512];
    float w[192], b[3];
    snprintf(dir, sizeof dir, "%s/int", TMP);
    CU_ASSERT(read_routers(dir, w, b) == 0);
}

int main(void)
{
    BIN = getenv("MODPIPE") ? getenv("MODPIPE") : "build/modpipe";
    FIX = getenv("MODPIPE_FIXTURES") ? getenv("MODPIPE_FIXTURES") : "tests/fixtures";
    snprintf(TMP, sizeof TMP, "/tmp/modpipe-rt-XXXXXX");
    if (!mkdtemp(TMP)) {
        perror("mkdtemp");
        return 1;
    }
    if (tu_mpi_env("test_routertune", BIN)) return 1;
    char path[512];
    snprintf(path, sizeof path, "%s/train.txt", TMP);
    write_data(path, 40, 7u);
    snprintf(path, sizeof path, "%s/eval.txt", TMP);
    write_data(path, 8, 99u);

    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("router-tune", NULL, NULL);
    CU_add_test(s, "np 1/2/3 agree (sequence)", test_np_agree_sequence);
    CU_add_test(s, "np 1/2/3 agree (token)", test_np_agree_token);
    CU_add_test(s, "output directory loads in the engine", test_output_dir);
    CU_add_test(s, "resume / refuse existing routers", test_resume);
    CU_add_test(s, "bad input", test_bad_input);
    CU_add_test(s, "text data through the tokenizer", test_text_data);
    CU_add_test(s, "SIGINT writes the routers", test_sigint);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    run(30, "rm -rf %s", TMP);
    return fails != 0;
}
