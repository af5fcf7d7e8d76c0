/* tests/test_pipeline.c — multi-rank tests: the built modpipe under mpirun.
 *
 * Exactness (docs/SPEC.md §4): every fixture model, -np 1 against the known answers (1e-4) and
 * -np 2/3/4 bit-identical to -np 1 at the same micro-batching; byte counters against the
 * fixture route files; bad input and a dead rank end the job with a clear message.
 * Needs: MODPIPE (path of the binary, default build/modpipe), mpirun, tests/fixtures.
 */
#include <CUnit/Basic.h>
#include <stdarg.h>
#include <cJSON.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "engine/partition.h"
#include "stage/config.h"
#include "stage/npy.h"
#include "stage/safetensors.h"
#include "stage/stage.h"
#include "testutil.h"

static const char *BIN, *FIX;
static char TMP[256];
static const char *PROMPTS =
    "--prompt-ids 3,14,15,92,65,35 --prompt-ids 89,79 --prompt-ids 32,38,46,26";
#define MPIRUN TU_MPIRUN

/* ---- helpers --------------------------------------------------------------------------------- */

static char OUT[1 << 16];

/* Run a shell command (stdout+stderr into OUT), killed after `secs`. Returns the exit code. */
#define run(secs, ...) tu_run(OUT, sizeof OUT, (secs), __VA_ARGS__)

#define files_identical tu_files_identical

#define npy_rel_err tu_npy_rel_err
#define read_json tu_read_json
#define jnum tu_jnum

static const cJSON *find_link(const cJSON *stats, const char *name)
{
    const cJSON *l;
    cJSON_ArrayForEach(l, cJSON_GetObjectItemCaseSensitive(stats, "links"))
    {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(l, "link");
        if (cJSON_IsString(n) && !strcmp(n->valuestring, name)) return l;
    }
    return NULL;
}

/* The generated lines of OUT must equal the fixture's M.generate.txt. */
static int tokens_match(const char *model)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s.generate.txt", FIX, model);
    return tu_lines_in(OUT, path);
}

/* ---- exactness ------------------------------------------------------------------------------- */

static const char *GEN_MODELS[] = {
    "dense",           "mod",      "mod_all",        "mod_predictor", "mode_staged",
    "mode_integrated", "mindskip", "mindskip_token", "mixed"};
static const char *EVAL_MODELS[] = {"dense", "mod", "mod_topk", "mixed"};

static void check_generate(const char *model, const char *extra, const char *tag)
{
    char one[512], many[512], want[512];
    snprintf(one, sizeof one, "%s/%s-%s-np1.npy", TMP, model, tag);
    snprintf(want, sizeof want, "%s/%s.generate.npy", FIX, model);
    int rc =
        run(120, "%s -np 1 %s generate --model %s/%s %s --max-new 5 --quiet %s --dump-logits %s",
            MPIRUN, BIN, FIX, model, PROMPTS, extra, one);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT(tokens_match(model));
    double rel = npy_rel_err(one, want);
    CU_ASSERT(rel <= 1e-4);
    if (!(rel <= 1e-4)) fprintf(stderr, "\n%s: rel err %g vs known answer\n", model, rel);
    for (int np = 2; np <= 4; np++) {
        snprintf(many, sizeof many, "%s/%s-%s-np%d.npy", TMP, model, tag, np);
        rc = run(120,
                 "%s -np %d %s generate --model %s/%s %s --max-new 5 --quiet %s --dump-logits %s",
                 MPIRUN, np, BIN, FIX, model, PROMPTS, extra, many);
        CU_ASSERT_EQUAL(rc, 0);
        CU_ASSERT(tokens_match(model));
        int same = files_identical(one, many);
        CU_ASSERT(same);
        if (!same)
            fprintf(stderr, "\n%s -np %d (%s): logits differ from -np 1\n", model, np, extra);
    }
}

static void test_generate_exact_default(void)
{
    for (size_t i = 0; i < sizeof GEN_MODELS / sizeof *GEN_MODELS; i++)
        check_generate(GEN_MODELS[i], "", "default");
}

/* Several sequences in one micro-batch and prompts cut into chunks. */
static void test_generate_exact_microbatch(void)
{
    for (size_t i = 0; i < sizeof GEN_MODELS / sizeof *GEN_MODELS; i++)
        check_generate(GEN_MODELS[i], "--micro-batch 3 --groups 1", "mb3");
}

/* eval of the fixture tokens of model m at -np np (extra options), logits into out */
static int run_eval(const char *m, int np, const char *extra, const char *out)
{
    return run(120,
               "%s -np %d %s eval --model %s/%s --tokens-file %s/eval_tokens.txt --micro-batch 8 "
               "--quiet %s --dump-logits %s",
               MPIRUN, np, BIN, FIX, m, FIX, extra, out);
}

static void test_eval_exact(void)
{
    for (size_t i = 0; i < sizeof EVAL_MODELS / sizeof *EVAL_MODELS; i++) {
        const char *m = EVAL_MODELS[i];
        char one[512], many[512], want[512];
        snprintf(one, sizeof one, "%s/%s-eval-np1.npy", TMP, m);
        snprintf(want, sizeof want, "%s/%s.eval.npy", FIX, m);
        CU_ASSERT_EQUAL_FATAL(run_eval(m, 1, "", one), 0);
        CU_ASSERT(strstr(OUT, "perplexity") != NULL);
        CU_ASSERT(npy_rel_err(one, want) <= 1e-4);
        for (int np = 2; np <= 4; np++) {
            snprintf(many, sizeof many, "%s/%s-eval-np%d.npy", TMP, m, np);
            CU_ASSERT_EQUAL(run_eval(m, np, "", many), 0);
            CU_ASSERT(files_identical(one, many));
        }
    }
}

/* --weights-dtype q8_0 (docs/SPEC.md §9): np 2 and 3 give the bits of np 1 (generate and
 * eval), the fixtures' tokens where no routing decision flips (dense, mode_integrated), the
 * stats name the dtype; a TP stage refuses it, as an unknown dtype is refused. */
static void test_q8_0_ranks(void)
{
    static const char *models[] = {"dense", "mode_integrated", "mixed"};
    for (size_t i = 0; i < sizeof models / sizeof *models; i++) {
        const char *m = models[i];
        char one[512], many[512], stats[512];
        snprintf(one, sizeof one, "%s/%s-q8-np1.npy", TMP, m);
        snprintf(stats, sizeof stats, "%s/%s-q8.json", TMP, m);
        CU_ASSERT_EQUAL_FATAL(run(120,
                                  "%s -np 1 %s generate --model %s/%s %s --max-new 5 --quiet "
                                  "--weights-dtype q8_0 --stats %s --dump-logits %s",
                                  MPIRUN, BIN, FIX, m, PROMPTS, stats, one),
                              0);
        if (strcmp(m, "mixed")) CU_ASSERT(tokens_match(m));
        cJSON *st = read_json(stats);
        CU_ASSERT_PTR_NOT_NULL_FATAL(st);
        const cJSON *wd = cJSON_GetObjectItemCaseSensitive(st, "weights_dtype");
        CU_ASSERT(cJSON_IsString(wd) && !strcmp(wd->valuestring, "q8_0"));
        cJSON_Delete(st);
        for (int np = 2; np <= 3; np++) {
            snprintf(many, sizeof many, "%s/%s-q8-np%d.npy", TMP, m, np);
            CU_ASSERT_EQUAL(run(120,
                                "%s -np %d %s generate --model %s/%s %s --max-new 5 --quiet "
                                "--weights-dtype q8_0 --dump-logits %s",
                                MPIRUN, np, BIN, FIX, m, PROMPTS, many),
                            0);
            int same = files_identical(one, many);
            CU_ASSERT(same);
            if (!same) fprintf(stderr, "\n%s q8_0 -np %d: logits differ from -np 1\n", m, np);
        }
    }
    char one[512], many[512];
    snprintf(one, sizeof one, "%s/mixed-q8-eval-np1.npy", TMP);
    snprintf(many, sizeof many, "%s/mixed-q8-eval-np3.npy", TMP);
    CU_ASSERT_EQUAL(run_eval("mixed", 1, "--weights-dtype q8_0", one), 0);
    CU_ASSERT_EQUAL(run_eval("mixed", 3, "--weights-dtype q8_0", many), 0);
    CU_ASSERT(files_identical(one, many));
    CU_ASSERT_NOT_EQUAL(
        run(60, "%s generate --model %s/dense --prompt-ids 1 --weights-dtype q4", BIN, FIX), 0);
    CU_ASSERT(strstr(OUT, "--weights-dtype: expected f32, bf16, f16 or q8_0, got 'q4'") != NULL);
    CU_ASSERT_NOT_EQUAL(run(120,
                            "%s -np 2 %s generate --model %s/dense --prompt-ids 1 --tp 2 --quiet "
                            "--weights-dtype q8_0",
                            MPIRUN, BIN, FIX),
                        0);
    CU_ASSERT(strstr(OUT, "q8_0 weights: not with tensor-parallel stages") != NULL);
}

/* The first `from` in the file at path replaced by `to`; 0, or -1 when absent or unwritable. */
static int replace_in_file(const char *path, const char *from, const char *to)
{
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    static char buf[1 << 16], out[(1 << 16) + 512];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *at = strstr(buf, from);
    if (!at || n + strlen(to) >= sizeof out) return -1;
    snprintf(out, sizeof out, "%.*s%s%s", (int)(at - buf), buf, to, at + strlen(from));
    f = fopen(path, "wb");
    if (!f) return -1;
    int rc = fputs(out, f) < 0 ? -1 : 0;
    return fclose(f) || rc ? -1 : 0;
}

/* partition's weight bytes for 3 stages = the loader's, stage by stage */
static void plan_bytes_match(const char *dir)
{
    char err[512];
    stage_config cfg;
    CU_ASSERT_FATAL(stage_config_load(dir, &cfg, err, sizeof err) == 0);
    engine_mem_opts mo = {STAGE_F32, 0, 1, 16, 4, STAGE_F32};
    CU_ASSERT_FATAL(engine_weight_dtype(dir, &mo.weight_dtype, err, sizeof err) == 0);
    CU_ASSERT_FATAL(engine_keep_dtype(dir, &mo.keep_dtype, err, sizeof err) == 0);
    engine_plan p;
    CU_ASSERT_FATAL(engine_partition_auto_mem(&cfg, 3, &mo, &p, err, sizeof err) == 0);
    for (int t = 0; t < 3; t++) {
        stage_range r = {p.st[t].first, p.st[t].last, t == 0, t == 2};
        stage_model *sm = NULL;
        CU_ASSERT_FATAL(stage_model_load(dir, &cfg, r, &sm, err, sizeof err) == 0);
        CU_ASSERT_EQUAL(p.st[t].weight_bytes, stage_model_weight_bytes(sm));
        stage_model_free(sm);
    }
    engine_plan_free(&p);
    stage_config_free(&cfg);
}

/* modpipe quantize --skip: the projections named stay as stored (the source's bytes), the
 * config's ignore list names them, the directory gives the same bits at np 1 and 3 and with
 * --weights-dtype q8_0 (a kept projection is not quantized at load either), other bits than
 * the fully quantized one; partition counts the kept ones' real bytes; a config.json that
 * disagrees with the file is refused; bad --skip and --dtype values. */
static void test_quantize_skip(void)
{
    char q8[512], a[512], b[512], c[512], d[512], full[512], err[512];
    snprintf(q8, sizeof q8, "%s/mixed-q8skip", TMP);
    snprintf(full, sizeof full, "%s/mixed-q8full", TMP);
    snprintf(a, sizeof a, "%s/mixed-q8skip-np1.npy", TMP);
    snprintf(b, sizeof b, "%s/mixed-q8skip-np3.npy", TMP);
    snprintf(c, sizeof c, "%s/mixed-q8skip-w.npy", TMP);
    snprintf(d, sizeof d, "%s/mixed-q8full.npy", TMP);
    CU_ASSERT_EQUAL_FATAL(run(120,
                              "%s quantize --model %s/mixed --out %s --dtype q8_0 --skip "
                              "lm_head,model.layers.0.mlp.down_proj.weight --skip "
                              "model.layers.1.self_attn.q_proj",
                              BIN, FIX, q8),
                          0);
    CU_ASSERT_EQUAL_FATAL(run(120, "%s quantize --model %s/mixed --out %s", BIN, FIX, full), 0);
    static const char *const kept[] = {"lm_head.weight", "model.layers.0.mlp.down_proj.weight",
                                       "model.layers.1.self_attn.q_proj.weight"};
    st_model *src = NULL, *m = NULL;
    char fx[512];
    snprintf(fx, sizeof fx, "%s/mixed", FIX);
    CU_ASSERT_FATAL(st_open(fx, &src, err, sizeof err) == 0);
    CU_ASSERT_FATAL(st_open(q8, &m, err, sizeof err) == 0);
    for (int i = 0; i < 3; i++) {
        st_tensor ts, tq, tsc;
        char sn[256];
        snprintf(sn, sizeof sn, "%s_scale", kept[i]);
        CU_ASSERT_FATAL(st_find(src, kept[i], &ts, err, sizeof err) == 1);
        CU_ASSERT_FATAL(st_find(m, kept[i], &tq, err, sizeof err) == 1);
        CU_ASSERT_EQUAL(tq.dtype, ts.dtype);
        CU_ASSERT_EQUAL(tq.nbytes, ts.nbytes);
        CU_ASSERT(tq.nbytes == ts.nbytes && !memcmp(tq.data, ts.data, ts.nbytes));
        CU_ASSERT_EQUAL(st_find(m, sn, &tsc, err, sizeof err), 0);
    }
    st_tensor t;
    CU_ASSERT(st_find(m, "model.layers.1.self_attn.k_proj.weight", &t, err, sizeof err) == 1 &&
              t.dtype == STAGE_Q8_0);
    st_close(m);
    st_close(src);
    stage_config cfg;
    CU_ASSERT_FATAL(stage_config_load(q8, &cfg, err, sizeof err) == 0);
    CU_ASSERT(cfg.q8_0);
    for (int i = 0; i < 3; i++) CU_ASSERT_EQUAL(stage_q8_kept(&cfg, kept[i]), 1);
    CU_ASSERT_EQUAL(stage_q8_kept(&cfg, "model.layers.1.self_attn.k_proj.weight"), 0);
    stage_config_free(&cfg);

    for (int v = 0; v < 3; v++)
        CU_ASSERT_EQUAL(run(120,
                            "%s -np %d %s generate --model %s %s --max-new 5 --quiet %s "
                            "--dump-logits %s",
                            MPIRUN, v == 1 ? 3 : 1, BIN, q8, PROMPTS,
                            v == 2 ? "--weights-dtype q8_0" : "",
                            v == 0   ? a
                            : v == 1 ? b
                                     : c),
                        0);
    CU_ASSERT_EQUAL(run(120, "%s generate --model %s %s --max-new 5 --quiet --dump-logits %s", BIN,
                        full, PROMPTS, d),
                    0);
    CU_ASSERT(files_identical(a, b));
    CU_ASSERT(files_identical(a, c));
    CU_ASSERT(!files_identical(a, d));
    plan_bytes_match(q8);

    /* config.json and the file must agree */
    char cj[600];
    snprintf(cj, sizeof cj, "%s/config.json", q8);
    CU_ASSERT_FATAL(replace_in_file(cj, "\"lm_head\", ", "") == 0);
    CU_ASSERT_EQUAL(run(30, "%s generate --model %s --prompt-ids 1 --quiet", BIN, q8), 1);
    CU_ASSERT(strstr(OUT, "tensor lm_head.weight is bf16, but config.json's quantization_config "
                          "quantizes it (not in ignore)") != NULL);
    snprintf(cj, sizeof cj, "%s/config.json", full);
    CU_ASSERT_FATAL(replace_in_file(cj, "\"ignore\":\t[",
                                    "\"ignore\": [\"model.layers.0.self_attn.q_proj\", ") == 0);
    CU_ASSERT_EQUAL(run(30, "%s generate --model %s --prompt-ids 1 --quiet", BIN, full), 1);
    CU_ASSERT(strstr(OUT,
                     "tensor model.layers.0.self_attn.q_proj.weight is q8_0, but config.json's "
                     "quantization_config keeps it as stored (ignore)") != NULL);
    CU_ASSERT_NOT_EQUAL(
        run(60, "%s quantize --model %s/mixed --out %s/q8bad --skip nosuch", BIN, FIX, TMP), 0);
    CU_ASSERT(strstr(OUT, "--skip nosuch: no tensor nosuch.weight in the model") != NULL);
    CU_ASSERT_NOT_EQUAL(run(60,
                            "%s quantize --model %s/mixed --out %s/q8bad --skip "
                            "model.layers.1.router",
                            BIN, FIX, TMP),
                        0);
    CU_ASSERT(strstr(OUT, "is not a projection this command quantizes") != NULL);
    CU_ASSERT_NOT_EQUAL(
        run(60, "%s quantize --model %s/mixed --out %s/q8bad --dtype q4_0", BIN, FIX, TMP), 0);
    CU_ASSERT(strstr(OUT, "--dtype: expected q8_0, got 'q4_0'") != NULL);
}

/* modpipe quantize (docs/SPEC.md §9): the directory it writes computes the bits of
 * --weights-dtype q8_0 on the original at np 1 and 3, with its weights in place inside the
 * mapping (q and scales: the file's bytes, no copy) and its bytes as partition counts them;
 * the refusals: another --weights-dtype, quantizing twice, an --out holding a model. */
static void test_quantize_command(void)
{
    char q8[512], a[512], b[512], c[512], err[512];
    snprintf(q8, sizeof q8, "%s/mixed-q8dir", TMP);
    snprintf(a, sizeof a, "%s/mixed-q8load.npy", TMP);
    snprintf(b, sizeof b, "%s/mixed-q8dir-np1.npy", TMP);
    snprintf(c, sizeof c, "%s/mixed-q8dir-np3.npy", TMP);
    CU_ASSERT_EQUAL_FATAL(run(120, "%s quantize --model %s/mixed --out %s", BIN, FIX, q8), 0);
    CU_ASSERT(strstr(OUT, "to q8_0") != NULL);
    CU_ASSERT_EQUAL(run(120,
                        "%s -np 1 %s generate --model %s/mixed %s --max-new 5 --quiet "
                        "--weights-dtype q8_0 --dump-logits %s",
                        MPIRUN, BIN, FIX, PROMPTS, a),
                    0);
    for (int np = 1; np <= 3; np += 2)
        CU_ASSERT_EQUAL(run(120,
                            "%s -np %d %s generate --model %s %s --max-new 5 --quiet "
                            "--dump-logits %s",
                            MPIRUN, np, BIN, q8, PROMPTS, np == 1 ? b : c),
                        0);
    CU_ASSERT(files_identical(a, b));
    CU_ASSERT(files_identical(a, c));

    /* in place: the weight handed out is the file's I8 tensor and its F16 scale tensor */
    st_model *m = NULL;
    CU_ASSERT_FATAL(st_open(q8, &m, err, sizeof err) == 0);
    const char *nm = "model.layers.0.self_attn.q_proj.weight";
    st_tensor tq, ts;
    CU_ASSERT_FATAL(st_find(m, nm, &tq, err, sizeof err) == 1);
    CU_ASSERT_FATAL(
        st_find(m, "model.layers.0.self_attn.q_proj.weight_scale", &ts, err, sizeof err) == 1);
    CU_ASSERT_EQUAL(tq.dtype, STAGE_Q8_0);
    CU_ASSERT_EQUAL(ts.dtype, STAGE_F16);
    stage_weight w;
    CU_ASSERT_FATAL(st_get_weight(m, nm, tq.shape[0], tq.shape[1], -1, &w, err, sizeof err) == 0);
    CU_ASSERT(w.data == tq.data);
    CU_ASSERT((const void *)w.scale == ts.data);
    CU_ASSERT_NOT_EQUAL(st_get_weight(m, "model.layers.1.self_attn.k_proj.weight", 32, 64,
                                      STAGE_BF16, &w, err, sizeof err),
                        0);
    CU_ASSERT(strstr(err, "is stored as q8_0: --weights-dtype bf16") != NULL);
    st_close(m);

    /* partition's bytes = the loader's, 3 stages */
    stage_config cfg;
    CU_ASSERT_FATAL(stage_config_load(q8, &cfg, err, sizeof err) == 0);
    CU_ASSERT(cfg.q8_0);
    stage_config_free(&cfg);
    stage_dtype wd, kd;
    CU_ASSERT_FATAL(engine_weight_dtype(q8, &wd, err, sizeof err) == 0);
    CU_ASSERT_FATAL(engine_keep_dtype(q8, &kd, err, sizeof err) == 0);
    CU_ASSERT_EQUAL(wd, STAGE_Q8_0);
    CU_ASSERT_EQUAL(kd, STAGE_BF16);
    plan_bytes_match(q8);

    CU_ASSERT_NOT_EQUAL(
        run(60, "%s generate --model %s --prompt-ids 1 --quiet --weights-dtype bf16", BIN, q8), 0);
    CU_ASSERT(strstr(OUT, "is stored as q8_0: --weights-dtype bf16 would need a dequantized") !=
              NULL);
    CU_ASSERT_NOT_EQUAL(run(60, "%s quantize --model %s --out %s/q8q8", BIN, q8, TMP), 0);
    CU_ASSERT(strstr(OUT, "already quantized") != NULL);
    CU_ASSERT_NOT_EQUAL(run(60, "%s quantize --model %s/dense --out %s", BIN, FIX, q8), 0);
    CU_ASSERT(strstr(OUT, "holds a model.safetensors already") != NULL);
    CU_ASSERT_NOT_EQUAL(run(60, "%s quantize --model %s/dense", BIN, FIX), 0);
    CU_ASSERT(strstr(OUT, "--model DIR and --out DIR are required") != NULL);
}

/* ---- byte accounting ------------------------------------------------------------------------- */

/* The fixture route files give the rows docs/SPEC.md §4 sends on each link for stages 0-1,2-3,4-5. */
static void check_routes(const char *model)
{
    char stats[512], path[512];
    snprintf(stats, sizeof stats, "%s/%s-routes.json", TMP, model);
    CU_ASSERT_EQUAL_FATAL(run(120,
                              "%s -np 3 %s generate --model %s/%s %s --max-new 5 --quiet "
                              "--stages 0-1,2-3,4-5 --stats %s",
                              MPIRUN, BIN, FIX, model, PROMPTS, stats),
                          0);
    snprintf(path, sizeof path, "%s/%s.routes-3stages.json", FIX, model);
    cJSON *want = read_json(path), *got = read_json(stats);
    CU_ASSERT_PTR_NOT_NULL_FATAL(want);
    CU_ASSERT_PTR_NOT_NULL_FATAL(got);
    const cJSON *wl;
    double rows = 0;
    cJSON_ArrayForEach(wl, cJSON_GetObjectItemCaseSensitive(want, "links"))
    {
        const cJSON *gl = find_link(got, wl->string);
        CU_ASSERT_PTR_NOT_NULL(gl);
        if (!gl) continue;
        CU_ASSERT_EQUAL(jnum(gl, "rows"), wl->valuedouble);
        CU_ASSERT_EQUAL(jnum(gl, "payload_bytes"), wl->valuedouble * 64 * 4);
        rows += wl->valuedouble;
    }
    /* no row link beyond the listed ones (the tokens link 2->0 is separate) */
    const cJSON *gl;
    double got_rows = 0;
    cJSON_ArrayForEach(gl, cJSON_GetObjectItemCaseSensitive(got, "links"))
    {
        const cJSON *k = cJSON_GetObjectItemCaseSensitive(gl, "kind");
        if (strcmp(k->valuestring, "tokens")) got_rows += jnum(gl, "rows");
        CU_ASSERT(jnum(gl, "header_bytes") > 0);
    }
    CU_ASSERT_EQUAL(got_rows, rows);
    const cJSON *tot = cJSON_GetObjectItemCaseSensitive(got, "total");
    CU_ASSERT_EQUAL(jnum(tot, "payload_bytes"), jnum(want, "payload_bytes"));
    CU_ASSERT_EQUAL(jnum(tot, "dense_bytes"), jnum(want, "dense_bytes"));
    CU_ASSERT_EQUAL(jnum(tot, "wire_bytes"), jnum(tot, "header_bytes") +
                                                 jnum(tot, "payload_bytes") +
                                                 jnum(tot, "token_bytes"));
    /* one chain packet per link per micro-batch (+ END), even when empty */
    const cJSON *c01 = find_link(got, "0->1");
    CU_ASSERT_EQUAL(jnum(c01, "packets"), jnum(got, "micro_batches") + 1);
    cJSON_Delete(want);
    cJSON_Delete(got);
}

static void test_routes_mod_all(void) { check_routes("mod_all"); }
static void test_routes_mixed(void) { check_routes("mixed"); }

/* bf16 halves every payload byte; dense transport sends everything and changes no bit. */
static void test_wire_dtype_and_dense_transport(void)
{
    char stats[512], a[512], b[512];
    snprintf(stats, sizeof stats, "%s/bf16.json", TMP);
    snprintf(a, sizeof a, "%s/bf16.npy", TMP);
    CU_ASSERT_EQUAL_FATAL(run(120,
                              "%s -np 3 %s generate --model %s/mod_all %s --max-new 5 --quiet "
                              "--wire-dtype bf16 --stats %s --dump-logits %s",
                              MPIRUN, BIN, FIX, PROMPTS, stats, a),
                          0);
    cJSON *s = read_json(stats);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    const cJSON *l;
    cJSON_ArrayForEach(l, cJSON_GetObjectItemCaseSensitive(s, "links"))
    {
        if (!strcmp(cJSON_GetObjectItemCaseSensitive(l, "kind")->valuestring, "tokens")) continue;
        CU_ASSERT_EQUAL(jnum(l, "payload_bytes"), jnum(l, "rows") * 64 * 2);
        if (!strcmp(cJSON_GetObjectItemCaseSensitive(l, "kind")->valuestring, "chain"))
            CU_ASSERT_EQUAL(jnum(l, "dense_bytes"), jnum(l, "dense_rows") * 64 * 2);
    }
    cJSON_Delete(s);
    char want[512];
    snprintf(want, sizeof want, "%s/mod_all.generate.npy", FIX);
    CU_ASSERT(npy_rel_err(a, want) < 5e-2); /* lossy, but close */

    snprintf(stats, sizeof stats, "%s/dense-tr.json", TMP);
    snprintf(a, sizeof a, "%s/sparse-tr.npy", TMP);
    snprintf(b, sizeof b, "%s/dense-tr.npy", TMP);
    CU_ASSERT_EQUAL(run(120,
                        "%s -np 4 %s generate --model %s/mod_all %s --max-new 5 --quiet "
                        "--dump-logits %s",
                        MPIRUN, BIN, FIX, PROMPTS, a),
                    0);
    CU_ASSERT_EQUAL(run(120,
                        "%s -np 4 %s generate --model %s/mod_all %s --max-new 5 --quiet "
                        "--transport dense --stats %s --dump-logits %s",
                        MPIRUN, BIN, FIX, PROMPTS, stats, b),
                    0);
    CU_ASSERT(files_identical(a, b));
    s = read_json(stats);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    const cJSON *tot = cJSON_GetObjectItemCaseSensitive(s, "total");
    CU_ASSERT_EQUAL(jnum(tot, "payload_bytes"), jnum(tot, "dense_bytes"));
    cJSON_Delete(s);
}

/* topk is non-causal: every boundary carries every row, and the stages report busy/wait. */
static void test_topk_dense_links_and_stage_times(void)
{
    char stats[512];
    snprintf(stats, sizeof stats, "%s/topk.json", TMP);
    CU_ASSERT_EQUAL_FATAL(
        run(120,
            "%s -np 3 %s eval --model %s/mod_topk --tokens-file %s/eval_tokens.txt "
            "--quiet --stats %s",
            MPIRUN, BIN, FIX, FIX, stats),
        0);
    cJSON *s = read_json(stats);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    const cJSON *tot = cJSON_GetObjectItemCaseSensitive(s, "total");
    CU_ASSERT_EQUAL(jnum(tot, "payload_bytes"), jnum(tot, "dense_bytes"));
    CU_ASSERT_EQUAL(jnum(find_link(s, "0->1"), "rows"), 16);
    CU_ASSERT_EQUAL(jnum(find_link(s, "1->2"), "rows"), 16);
    const cJSON *st;
    int n = 0;
    cJSON_ArrayForEach(st, cJSON_GetObjectItemCaseSensitive(s, "stages"))
    {
        CU_ASSERT(jnum(st, "busy_s") > 0);
        CU_ASSERT(jnum(st, "wait_s") >= 0);
        n++;
    }
    CU_ASSERT_EQUAL(n, 3);
    const cJSON *ly;
    cJSON_ArrayForEach(ly, cJSON_GetObjectItemCaseSensitive(s, "layers"))
    {
        if (strcmp(cJSON_GetObjectItemCaseSensitive(ly, "type")->valuestring, "mod")) continue;
        CU_ASSERT_DOUBLE_EQUAL(jnum(ly, "participation"), 0.25,
                               1e-12); /* k = floor(0.25 * 8) of 8 */
    }
    cJSON_Delete(s);
}

/* ---- configs and the partitioner ------------------------------------------------------------- */

static void test_yaml_config_and_override(void)
{
    char cfg[512];
    snprintf(cfg, sizeof cfg, "%s/run.yaml", TMP);
    FILE *f = fopen(cfg, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fprintf(f,
            "model: %s/mod_all\nstages: [\"0-1\", \"2-3\", \"4-5\"]\nmax-new: 2\nquiet: true\n"
            "prompt-ids:\n  - \"3,14,15,92,65,35\"\n  - \"89,79\"\n  - \"32,38,46,26\"\n",
            FIX);
    fclose(f);
    CU_ASSERT_EQUAL(run(120, "%s -np 3 %s generate --config %s", MPIRUN, BIN, cfg), 0);
    CU_ASSERT(strstr(OUT, "generated 70,66\n") != NULL);
    CU_ASSERT_EQUAL(run(120, "%s -np 3 %s generate --config %s --max-new 5", MPIRUN, BIN, cfg), 0);
    CU_ASSERT(tokens_match("mod_all"));
    /* 3 ranges but 2 ranks */
    CU_ASSERT_NOT_EQUAL(run(60, "%s -np 2 %s generate --config %s", MPIRUN, BIN, cfg), 0);
    CU_ASSERT(strstr(OUT, "3 ranges") || strstr(OUT, "ranks"));
    /* malformed YAML: file:line:col */
    f = fopen(cfg, "w");
    fprintf(f, "model: x\nstages: [0-1, 2-3\nmax-new: 2\n");
    fclose(f);
    CU_ASSERT_NOT_EQUAL(run(60, "%s -np 2 %s generate --config %s", MPIRUN, BIN, cfg), 0);
    char where[600];
    snprintf(where, sizeof where, "%s:", cfg);
    CU_ASSERT(strstr(OUT, where) != NULL);
    /* unknown key, with its position */
    f = fopen(cfg, "w");
    fprintf(f, "model: x\nmicro_batch: 4\n");
    fclose(f);
    CU_ASSERT_NOT_EQUAL(run(60, "%s -np 1 %s generate --config %s", MPIRUN, BIN, cfg), 0);
    snprintf(where, sizeof where, "%s:2:", cfg);
    CU_ASSERT(strstr(OUT, where) != NULL && strstr(OUT, "micro_batch") != NULL);
}

static void test_partition_command(void)
{
    CU_ASSERT_EQUAL(run(30, "%s partition --model %s/mod -n 3", BIN, FIX), 0);
    CU_ASSERT(strstr(OUT, "dense") != NULL);
    CU_ASSERT_EQUAL(run(30, "%s partition --model %s/mod_all -n 3 --stages 0-1,2-3,4-5", BIN, FIX),
                    0);
    CU_ASSERT_NOT_EQUAL(
        run(30, "%s partition --model %s/mod_all -n 3 --stages 0-1,3-2,4-5", BIN, FIX), 0);
    CU_ASSERT_NOT_EQUAL(run(30, "%s partition --model %s/mod_all -n 8", BIN, FIX), 0);
    CU_ASSERT(strstr(OUT, "8 stages") != NULL);
}

/* ---- bad input: one clear line, non-zero, nobody hangs --------------------------------------- */

static void test_bad_input(void)
{
    /* token id out of range */
    CU_ASSERT_NOT_EQUAL(run(60, "%s -np 2 %s generate --model %s/mod --prompt-ids 1,2,97 --quiet",
                            MPIRUN, BIN, FIX),
                        0);
    CU_ASSERT(strstr(OUT, "97") && strstr(OUT, "out of range"));
    /* sampling state the wire would refuse: named before the run, at any -np */
    for (int np = 1; np <= 2; np++) {
        CU_ASSERT_NOT_EQUAL(run(60,
                                "%s -np %d %s generate --model %s/mod --prompt-ids 1,2 --quiet "
                                "--temperature 0.8 --top-p 0",
                                MPIRUN, np, BIN, FIX),
                            0);
        CU_ASSERT(strstr(OUT, "--top-p must be in (0, 1]") != NULL);
    }
    /* a topk model cannot decode */
    CU_ASSERT_NOT_EQUAL(run(60, "%s -np 1 %s generate --model %s/mod_topk --prompt-ids 1,2 --quiet",
                            MPIRUN, BIN, FIX),
                        0);
    CU_ASSERT(strstr(OUT, "eval") != NULL);
    /* an empty stage range */
    CU_ASSERT_NOT_EQUAL(
        run(60, "%s -np 2 %s generate --model %s/mod --prompt-ids 1,2 --stages 0-2,4-3 --quiet",
            MPIRUN, BIN, FIX),
        0);
    /* more ranks than layers */
    CU_ASSERT_NOT_EQUAL(
        run(60, "%s -np 7 %s generate --model %s/mod --prompt-ids 1,2 --quiet", MPIRUN, BIN, FIX),
        0);
    /* missing model / missing tensor / truncated safetensors: named */
    CU_ASSERT_NOT_EQUAL(
        run(60, "%s -np 2 %s generate --model %s/nope --prompt-ids 1,2 --quiet", MPIRUN, BIN, TMP),
        0);
    CU_ASSERT(strstr(OUT, "nope") != NULL);
    char d[512];
    snprintf(d, sizeof d, "%s/trunc", TMP);
    CU_ASSERT_EQUAL(run(30,
                        "mkdir -p %s && cp %s/mod/config.json %s/ && head -c 300000 "
                        "%s/mod/model.safetensors > %s/model.safetensors",
                        d, FIX, d, FIX, d),
                    0);
    CU_ASSERT_NOT_EQUAL(
        run(60, "%s -np 3 %s generate --model %s --prompt-ids 1,2 --quiet", MPIRUN, BIN, d), 0);
    CU_ASSERT(strstr(OUT, "model.safetensors") != NULL);
    /* unknown layer type in config.json */
    snprintf(d, sizeof d, "%s/badtype", TMP);
    CU_ASSERT_EQUAL(run(30,
                        "mkdir -p %s && sed s/mode_staged/moe_wat/ %s/mixed/config.json > "
                        "%s/config.json && cp %s/mixed/model.safetensors %s/",
                        d, FIX, d, FIX, d),
                    0);
    CU_ASSERT_NOT_EQUAL(
        run(60, "%s -np 2 %s generate --model %s --prompt-ids 1,2 --quiet", MPIRUN, BIN, d), 0);
    CU_ASSERT(strstr(OUT, "moe_wat") != NULL);
    /* unknown flag, bad numbers */
    CU_ASSERT_NOT_EQUAL(run(30, "%s -np 1 %s generate --model %s/mod --prompt-ids 1 --frobnicate",
                            MPIRUN, BIN, FIX),
                        0);
    CU_ASSERT(strstr(OUT, "frobnicate") != NULL);
    CU_ASSERT_NOT_EQUAL(run(30,
                            "%s -np 1 %s generate --model %s/mod --prompt-ids 1 --micro-batch 0",
                            MPIRUN, BIN, FIX),
                        0);
    CU_ASSERT(strstr(OUT, "--micro-batch") != NULL);
    /* a context too short for the prompt + new tokens; slots fewer than a decode group */
    CU_ASSERT_NOT_EQUAL(
        run(30,
            "%s -np 2 %s generate --model %s/mod --prompt-ids 1,2,3 --max-new 4 --ctx 5 --quiet",
            MPIRUN, BIN, FIX),
        0);
    CU_ASSERT(strstr(OUT, "needs 6 positions") && strstr(OUT, "--ctx is 5"));
    CU_ASSERT_NOT_EQUAL(run(30,
                            "%s -np 1 %s generate --model %s/mod %s --groups 1 --slots 2 --quiet",
                            MPIRUN, BIN, FIX, PROMPTS),
                        0);
    CU_ASSERT(strstr(OUT, "--slots 2") != NULL);
}

static double parse_nll(void)
{
    const char *p = strstr(OUT, "mean NLL ");
    return p ? atof(p + 9) : NAN;
}

/* eval lines of any lengths: the mean NLL is the target-weighted mean of each line alone,
 * the dump is [n, Tmax, vocab] with NaN past a line's end, the same at -np 1 and 3 and with
 * fewer slots than lines (lines then wait for a slot). */
static void test_eval_ragged(void)
{
    char tf[512], one[512], d_all[512], d_np3[512], d_slot[512];
    const char *lines[3] = {"3 14 15 92 65", "89 79", "32 38 46 26"};
    int targets[3] = {4, 1, 3};
    double sum = 0;
    char dl[3][512];
    for (int i = 0; i < 3; i++) {
        snprintf(one, sizeof one, "%s/line%d.txt", TMP, i);
        FILE *f = fopen(one, "w");
        fprintf(f, "%s\n", lines[i]);
        fclose(f);
        snprintf(dl[i], sizeof dl[i], "%s/line%d.npy", TMP, i);
        CU_ASSERT_EQUAL_FATAL(
            run(60, "%s -np 1 %s eval --model %s/mod --tokens-file %s --quiet --dump-logits %s",
                MPIRUN, BIN, FIX, one, dl[i]),
            0);
        sum += parse_nll() * targets[i];
    }
    double want = sum / 8;
    snprintf(tf, sizeof tf, "%s/ragged.txt", TMP);
    FILE *f = fopen(tf, "w");
    for (int i = 0; i < 3; i++) fprintf(f, "%s\n", lines[i]);
    fclose(f);
    snprintf(d_all, sizeof d_all, "%s/ragged1.npy", TMP);
    snprintf(d_np3, sizeof d_np3, "%s/ragged3.npy", TMP);
    snprintf(d_slot, sizeof d_slot, "%s/ragged-slot.npy", TMP);
    CU_ASSERT_EQUAL_FATAL(
        run(60,
            "%s -np 1 %s eval --model %s/mod --tokens-file %s --quiet --micro-batch 4 "
            "--dump-logits %s",
            MPIRUN, BIN, FIX, tf, d_all),
        0);
    CU_ASSERT(strstr(OUT, "8 scored") != NULL);
    CU_ASSERT(fabs(parse_nll() - want) < 2e-6);
    CU_ASSERT_EQUAL(run(60,
                        "%s -np 3 %s eval --model %s/mod --tokens-file %s --quiet --micro-batch 4 "
                        "--dump-logits %s",
                        MPIRUN, BIN, FIX, tf, d_np3),
                    0);
    CU_ASSERT(files_identical(d_all, d_np3));
    CU_ASSERT_EQUAL(run(60,
                        "%s -np 2 %s eval --model %s/mod --tokens-file %s --quiet --slots 1 "
                        "--dump-logits %s",
                        MPIRUN, BIN, FIX, tf, d_slot),
                    0);
    CU_ASSERT(fabs(parse_nll() - want) < 2e-6);
    /* the layout: line i at [i, 0..len), NaN after; each line as its own eval run */
    float *a = NULL, *b = NULL;
    int na = 0, nb = 0;
    int64_t sa[8], sb[8];
    char err[256];
    CU_ASSERT_EQUAL_FATAL(npy_read_f32(d_slot, &a, &na, sa, err, sizeof err), 0);
    CU_ASSERT(na == 3 && sa[0] == 3 && sa[1] == 5 && sa[2] == 97);
    for (int i = 0; i < 3 && na == 3; i++) {
        CU_ASSERT_EQUAL_FATAL(npy_read_f32(dl[i], &b, &nb, sb, err, sizeof err), 0);
        int len = (int)sb[1];
        double md = 0;
        for (int t = 0; t < 5; t++)
            for (int v = 0; v < 97; v++) {
                float x = a[((size_t)i * 5 + t) * 97 + v];
                if (t >= len) {
                    CU_ASSERT(isnan(x));
                } else if (fabs(x - b[(size_t)t * 97 + v]) > md) {
                    md = fabs(x - b[(size_t)t * 97 + v]);
                }
            }
        CU_ASSERT(md < 1e-4);
        free(b);
        b = NULL;
    }
    free(a);
}

/* EOS (config eos_token_id) stops a sequence: its line ends with the EOS id, its dump rows
 * after that are NaN and the others match the run without EOS (to 1e-5: the later decode
 * micro-batches have one row fewer, so their GEMMs differ); --ignore-eos restores the full
 * run; -np 3 gives the same bits as -np 1. */
static void test_generate_eos(void)
{
    char d[512], full[512], e1[512], e3[512];
    snprintf(d, sizeof d, "%s/mod_eos", TMP);
    CU_ASSERT_EQUAL_FATAL(run(30,
                              "mkdir -p %s && sed \"s/\\\"vocab_size\\\": 97,/\\\"vocab_size\\\": "
                              "97, \\\"eos_token_id\\\": 56,/\" "
                              "%s/mod/config.json > %s/config.json && ln -sf $(realpath "
                              "%s/mod/model.safetensors) %s/",
                              d, FIX, d, FIX, d),
                          0);
    CU_ASSERT_EQUAL_FATAL(run(30, "grep -c eos_token_id %s/config.json", d), 0);
    snprintf(full, sizeof full, "%s/eos-full.npy", TMP);
    snprintf(e1, sizeof e1, "%s/eos-np1.npy", TMP);
    snprintf(e3, sizeof e3, "%s/eos-np3.npy", TMP);
    CU_ASSERT_EQUAL_FATAL(
        run(60,
            "%s -np 1 %s generate --model %s %s --max-new 5 --quiet --ignore-eos --dump-logits %s",
            MPIRUN, BIN, d, PROMPTS, full),
        0);
    CU_ASSERT(tokens_match("mod"));
    CU_ASSERT_EQUAL_FATAL(
        run(60, "%s -np 1 %s generate --model %s %s --max-new 5 --quiet --dump-logits %s", MPIRUN,
            BIN, d, PROMPTS, e1),
        0);
    CU_ASSERT(strstr(OUT, "generated 84,56\n") != NULL);
    CU_ASSERT(strstr(OUT, "generated 60,70,53,90,32\n") != NULL);
    CU_ASSERT(strstr(OUT, "generated 6,63,16,11,65\n") != NULL);
    CU_ASSERT_EQUAL(run(60,
                        "%s -np 3 %s generate --model %s %s --max-new 5 --quiet --dump-logits %s",
                        MPIRUN, BIN, d, PROMPTS, e3),
                    0);
    CU_ASSERT(strstr(OUT, "generated 84,56\n") != NULL);
    CU_ASSERT(files_identical(e1, e3));
    float *a = NULL, *b = NULL;
    int na = 0, nb = 0;
    int64_t sa[8], sb[8];
    char err[256];
    CU_ASSERT_EQUAL_FATAL(npy_read_f32(e1, &a, &na, sa, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(npy_read_f32(full, &b, &nb, sb, err, sizeof err), 0);
    CU_ASSERT(na == 3 && sa[0] == 3 && sa[1] == 5 && sa[2] == 97);
    size_t row = 97, n = 3 * 5 * row;
    int nan_rows = 0, same = 1;
    for (size_t k = 0; k < n; k++) {
        int seq0_after = k / row < 5 && k / row >= 2; /* sequence 0 stopped after 2 tokens */
        if (seq0_after)
            nan_rows += isnan(a[k]) != 0;
        else
            same &= fabs((double)a[k] - b[k]) <= 1e-5 * (1 + fabs((double)b[k]));
    }
    CU_ASSERT_EQUAL(nan_rows, 3 * 97);
    CU_ASSERT(same);
    free(a);
    free(b);
}

/* Text in: --prompt goes through the model's tokenizer (stories260K's known answer: "Once
 * upon a time" -> 1,403,407,261,378, then 432,383,... = ", there was a little girl named
 * Lily"); eval --text-file scores the same ids `modpipe tokenize` gives, one document per
 * blank-line-separated block. */
static void test_text_prompts(void)
{
    for (int np = 1; np <= 3; np += 2) {
        CU_ASSERT_EQUAL(
            run(120,
                "%s -np %d %s generate --model %s/stories260K --prompt \"Once upon a time\" "
                "--prompt-ids 1,403,407,261,378 --max-new 10 --quiet",
                MPIRUN, np, BIN, FIX),
            0);
        CU_ASSERT(strstr(OUT, "generated 432,383,286,261,376,298,315,421,395,317\n") != NULL);
        CU_ASSERT(strstr(OUT, "text: , there was a little girl named Lily\n") != NULL);
    }
    char tf[512], idf[512];
    snprintf(tf, sizeof tf, "%s/docs.txt", TMP);
    snprintf(idf, sizeof idf, "%s/docs.ids", TMP);
    FILE *f = fopen(tf, "w");
    fprintf(f, "Once upon a time, there was a little girl.\nShe liked to play.\n\n  \nTom had a "
               "big dog.\n");
    fclose(f);
    CU_ASSERT_EQUAL_FATAL(
        run(30,
            "printf \"Once upon a time, there was a little girl.\\nShe liked to play.\" > %s.1 && "
            "printf \"Tom had a big dog.\" > %s.2 && %s tokenize --model %s/stories260K "
            "--text-file %s.1 > %s && "
            "%s tokenize --model %s/stories260K --text-file %s.2 >> %s",
            tf, tf, BIN, FIX, tf, idf, BIN, FIX, tf, idf),
        0);
    CU_ASSERT_EQUAL_FATAL(run(60,
                              "%s -np 2 %s eval --model %s/stories260K --tokens-file %s --quiet",
                              MPIRUN, BIN, FIX, idf),
                          0);
    char *m = strstr(OUT, "eval: ");
    char want[256] = "";
    if (m) snprintf(want, sizeof want, "%.*s", (int)(strchr(m, '\n') - m), m);
    CU_ASSERT(strstr(want, "eval: 2 sequences") == want);
    CU_ASSERT_EQUAL(run(60, "%s -np 2 %s eval --model %s/stories260K --text-file %s --quiet",
                        MPIRUN, BIN, FIX, tf),
                    0);
    CU_ASSERT(want[0] && strstr(OUT, want) != NULL);
    /* a model without tokenizer.json: a clear error */
    CU_ASSERT_NOT_EQUAL(
        run(30, "%s -np 1 %s generate --model %s/mod --prompt hello --quiet", MPIRUN, BIN, FIX), 0);
    CU_ASSERT(strstr(OUT, "tokenizer") != NULL);
}

/* bf16 weights on the many-row path (stage/matmul.h): eval lines of 150 tokens at
 * --micro-batch 256 put 150-256 rows into a projection (fewer on routed layers), past the
 * streaming kernel, so on a CPU with AVX512-BF16 the products run on oneDNN's bf16 matmul.
 * --matmul exact: within 1e-4 of the f32 arithmetic on the same rounded weights
 * (ONEDNN_MAX_CPU_ISA=AVX512_CORE: no bf16 kernels, the weights converted exactly) and -np 3
 * bit-identical to -np 1 (measured 1.1e-5); --matmul fast: -np 3 = -np 1 as well, within
 * 1e-1 (x rounded to bf16; measured 6.5e-3 on dense, 3.2e-2 on mod, where the rounding moves
 * a router score and so which tokens a layer takes). */
static void test_bf16_many_rows(void)
{
    char tok[512], ref[512], out[2][512];
    snprintf(tok, sizeof tok, "%s/bf16-rows.txt", TMP);
    FILE *f = fopen(tok, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    unsigned s = 7;
    for (int l = 0; l < 3; l++) {
        for (int t = 0; t < 150; t++) {
            s = s * 1103515245u + 12345u;
            fprintf(f, "%s%u", t ? " " : "", (s >> 16) % 97);
        }
        fputc('\n', f);
    }
    fclose(f);
    static const char *const models[] = {"dense", "mod"}, *const modes[] = {"exact", "fast"};
    for (int mi = 0; mi < 2; mi++) {
        snprintf(ref, sizeof ref, "%s/bf16-%s-f32.npy", TMP, models[mi]);
        int rc = run(120,
                     "ONEDNN_MAX_CPU_ISA=AVX512_CORE %s -np 1 %s eval --model %s/%s --tokens-file "
                     "%s --micro-batch 256 --weights-dtype bf16 --quiet --dump-logits %s",
                     MPIRUN, BIN, FIX, models[mi], tok, ref);
        if (rc) fprintf(stderr, "\n%s\n", OUT);
        CU_ASSERT_EQUAL_FATAL(rc, 0);
        for (int md = 0; md < 2; md++) {
            for (int k = 0; k < 2; k++) {
                snprintf(out[k], sizeof out[k], "%s/bf16-%s-%s-np%d.npy", TMP, models[mi],
                         modes[md], k ? 3 : 1);
                rc = run(120,
                         "%s -np %d %s eval --model %s/%s --tokens-file %s --micro-batch 256 "
                         "--weights-dtype bf16 --matmul %s --quiet --dump-logits %s",
                         MPIRUN, k ? 3 : 1, BIN, FIX, models[mi], tok, modes[md], out[k]);
                if (rc) fprintf(stderr, "\n%s\n", OUT);
                CU_ASSERT_EQUAL_FATAL(rc, 0);
            }
            const int same = tu_files_identical(out[0], out[1]);
            const double rel = tu_npy_rel_err(out[0], ref), bound = md ? 1e-1 : 1e-4;
            if (!same || !(rel <= bound) || getenv("MODPIPE_TEST_VERBOSE"))
                fprintf(stderr, "\n  %s bf16 --matmul %s: -np 3 %s -np 1, %.3g from f32\n",
                        models[mi], modes[md], same ? "=" : "!=", rel);
            CU_ASSERT(same);
            CU_ASSERT(rel <= bound);
        }
    }
}

/* Default decode groups: 16 sequences at R 32 on one stage (-np 1) make one group of 16,
 * its 32 prompt rows one prefill micro-batch, then 4 decode micro-batches of 16 rows; on two
 * stages 2 groups of 8, so every decode micro-batch has 8 rows (not 8 groups of 2): 2 prefill
 * + 2 x 4 decode micro-batches. The logits are the same bits either way (every layer here
 * computes a row alone). R 4 forces 4 groups of 4. */
static void test_default_groups(void)
{
    char stats[512], pf[512], dump[2][512];
    snprintf(pf, sizeof pf, "%s/p16.txt", TMP);
    FILE *f = fopen(pf, "w");
    for (int i = 0; i < 16; i++) fprintf(f, "%d,%d\n", 3 + i, 40 + i);
    fclose(f);
    snprintf(stats, sizeof stats, "%s/g16.json", TMP);
    for (int np = 1; np <= 2; np++) {
        snprintf(dump[np - 1], sizeof dump[0], "%s/g16_np%d.bin", TMP, np);
        CU_ASSERT_EQUAL_FATAL(
            run(60,
                "%s -np %d %s generate --model %s/mod --prompts-file %s --max-new 5 "
                "--quiet --stats %s --dump-logits %s",
                MPIRUN, np, BIN, FIX, pf, stats, dump[np - 1]),
            0);
        cJSON *j = read_json(stats);
        CU_ASSERT_PTR_NOT_NULL_FATAL(j);
        CU_ASSERT_EQUAL(jnum(j, "micro_batches"), np == 1 ? 1 + 4 : 2 + 2 * 4);
        cJSON_Delete(j);
    }
    CU_ASSERT(files_identical(dump[0], dump[1]));
    CU_ASSERT_EQUAL_FATAL(run(60,
                              "%s -np 1 %s generate --model %s/mod --prompts-file %s --max-new 5 "
                              "--micro-batch 4 --quiet --stats %s",
                              MPIRUN, BIN, FIX, pf, stats),
                          0);
    cJSON *j = read_json(stats);
    CU_ASSERT_PTR_NOT_NULL_FATAL(j);
    CU_ASSERT_EQUAL(jnum(j, "micro_batches"),
                    4 * 2 + 4 * 4); /* 8 rows of prompt a group: 2 chunks */
    cJSON_Delete(j);
}

/* A rank that dies mid-run: the whole job ends, non-zero, naming the rank. */
static void test_dead_rank(void)
{
    char model[512], spec[512];
    snprintf(model, sizeof model, "%s/slow", TMP);
    snprintf(spec, sizeof spec, "%s/slow.yaml", TMP);
    FILE *f = fopen(spec, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fprintf(
        f,
        "hidden_size: 256\nintermediate_size: 512\nnum_attention_heads: 4\nnum_key_value_heads: 4\n"
        "num_hidden_layers: 6\nvocab_size: 512\nmax_position_embeddings: 4096\nlayer_pattern: "
        "[dense]\n");
    fclose(f);
    CU_ASSERT_EQUAL_FATAL(run(120, "%s init-model --spec %s --out %s --quiet", BIN, spec, model),
                          0);
    /* kill the last rank after a second; generating 3000 tokens takes far longer */
    double t0 = 0;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    t0 = ts.tv_sec + ts.tv_nsec * 1e-9;
    int rc = run(90,
                 "%s -np 3 %s generate --model %s --prompt-ids 1,2,3 --max-new 3000 --quiet & "
                 "sleep 2; pkill -9 -n -f \"[m]odpipe generate --model %s\"; wait $!",
                 MPIRUN, BIN, model, model);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double el = ts.tv_sec + ts.tv_nsec * 1e-9 - t0;
    CU_ASSERT_NOT_EQUAL(rc, 0);
    CU_ASSERT(el < 60.0);
    CU_ASSERT(strstr(OUT, "rank") != NULL);
    CU_ASSERT(run(5, "pgrep -f \"[m]odpipe generate --model %s\"", model) != 0); /* nobody left */
}

/* ---- init-model streams the weights; generate runs the result; memory planning --------------- */

/* The files of mod.yaml (bf16, 3 shards, not calibrated) as the in-memory writer wrote them
 * before init-model streamed: the streaming writer must give the same bytes (here with the
 * draw split over 3 threads). */
static const char *MOD_BF16_SHA[] = {
    "4b0cb950a12a537f8b330ce5e40048afd7d6400b8041596fd1b3614fc7fbd222  "
    "model-00001-of-00003.safetensors",
    "f49ca75570b5aae52864d516c416d685e1ba4f36c71c07944a66ad8383e18a8e  "
    "model-00002-of-00003.safetensors",
    "798ebafecec19efbbfda8e08d1c79549c128da9882a6cd09decff30c0c161ad7  "
    "model-00003-of-00003.safetensors",
    "952ab0bdb162487f2c0699e5a4b1ab3d887c79576db9e3ff7b7f806be5ad8376  "
    "model.safetensors.index.json",
};

static void test_init_model_stream(void)
{
    char m1[512], m2[512];
    snprintf(m1, sizeof m1, "%s/stream-nc", TMP);
    snprintf(m2, sizeof m2, "%s/stream-cal", TMP);
    CU_ASSERT_EQUAL_FATAL(run(120,
                              "%s init-model --spec configs/models/mod.yaml --out %s --dtype bf16 "
                              "--shards 3 --no-calibrate --quiet --threads 3",
                              BIN, m1),
                          0);
    CU_ASSERT_EQUAL(OUT[0], 0); /* --quiet: no progress */
    CU_ASSERT_EQUAL_FATAL(run(30, "cd %s && sha256sum model*", m1), 0);
    for (size_t i = 0; i < sizeof MOD_BF16_SHA / sizeof *MOD_BF16_SHA; i++) {
        int has = strstr(OUT, MOD_BF16_SHA[i]) != NULL;
        CU_ASSERT(has);
        if (!has)
            fprintf(stderr, "\n  init-model output changed: want %s\n  got %s", MOD_BF16_SHA[i],
                    OUT);
    }

    /* calibrated: progress line, routers calibrated from the written files */
    CU_ASSERT_EQUAL_FATAL(run(120,
                              "%s init-model --spec configs/models/mod.yaml --out %s --dtype bf16 "
                              "--shards 3",
                              BIN, m2),
                          0);
    /* 2 x (embedding and lm_head 97 x 64 + 6 layers of 12288 + 24576 + 128, 3 routers of 65,
     * model.norm 64) = 469254 bytes */
    CU_ASSERT(strstr(OUT, "init-model: 0.47 / 0.47 MB written") != NULL);
    CU_ASSERT(strstr(OUT, "MB/s, took") != NULL);
    int n_layers = 0;
    for (const char *p = strstr(OUT, "participation "); p; p = strstr(p + 1, "participation ")) {
        double part = atof(p + strlen("participation "));
        CU_ASSERT(part > 0.05 && part < 0.25); /* capacity 0.125 on fresh prompts */
        n_layers++;
    }
    CU_ASSERT_EQUAL(n_layers, 3);
    /* the biases were patched in place: they differ from the uncalibrated files' zeros */
    CU_ASSERT_NOT_EQUAL(
        run(30, "cmp -s %s/model-00002-of-00003.safetensors %s/model-00002-of-00003.safetensors",
            m1, m2),
        0);
    CU_ASSERT_EQUAL(
        run(30, "cmp -s %s/model-00001-of-00003.safetensors %s/model-00001-of-00003.safetensors",
            m1, m2),
        0); /* embedding + layer 0: no router */

    /* generate runs it; N ranks bit-identical to 1; each rank's peak RSS in the stats */
    char one[512], three[512], stats[512];
    snprintf(one, sizeof one, "%s/stream-np1.npy", TMP);
    snprintf(three, sizeof three, "%s/stream-np3.npy", TMP);
    snprintf(stats, sizeof stats, "%s/stream-stats.json", TMP);
    CU_ASSERT_EQUAL_FATAL(
        run(120, "%s -np 1 %s generate --model %s %s --max-new 4 --quiet --dump-logits %s", MPIRUN,
            BIN, m2, PROMPTS, one),
        0);
    CU_ASSERT_EQUAL_FATAL(
        run(120, "%s -np 3 %s generate --model %s %s --max-new 4 --dump-logits %s --stats %s",
            MPIRUN, BIN, m2, PROMPTS, three, stats),
        0);
    CU_ASSERT(files_identical(one, three));
    CU_ASSERT(strstr(OUT, "[modpipe] peak RSS per stage: 0: ") != NULL);
    cJSON *j = read_json(stats);
    CU_ASSERT_PTR_NOT_NULL_FATAL(j);
    const cJSON *st;
    int n = 0;
    cJSON_ArrayForEach(st, cJSON_GetObjectItemCaseSensitive(j, "stages"))
    {
        double rss = jnum(st, "peak_rss_bytes"), w = jnum(st, "weight_bytes");
        CU_ASSERT(rss > w && rss > 1e6 && rss < 1e9);
        n++;
    }
    CU_ASSERT_EQUAL(n, 3);
    cJSON_Delete(j);

    /* a directory that cannot be made: one line, non-zero, nothing left behind */
    CU_ASSERT_NOT_EQUAL(
        run(30, "%s init-model --spec configs/models/mod.yaml --out %s/x/y --quiet", BIN, one), 0);
    CU_ASSERT(strstr(OUT, "cannot create directory") != NULL);
}

static void test_partition_memory_command(void)
{
    /* fixture mod (f32): explicit plan under a limit too small for it */
    CU_ASSERT_EQUAL(
        run(30, "%s partition --model %s/mod -n 2 --mem-per-rank 1G --slots 4 --ctx 128", BIN, FIX),
        0);
    CU_ASSERT(strstr(OUT, "KV MiB  work MiB  total MiB") != NULL);
    CU_ASSERT(strstr(OUT, "KV for 4 sequences of 128 positions") != NULL);
    CU_ASSERT(strstr(OUT, "of --mem-per-rank 1.00 GiB") != NULL);
    CU_ASSERT(strstr(OUT, "(f32, as in the checkpoint)") != NULL);
    CU_ASSERT_NOT_EQUAL(
        run(30, "%s partition --model %s/mod -n 2 --stages 0-2,3-5 --mem-per-rank 20M", BIN, FIX),
        0);
    CU_ASSERT(strstr(OUT,
                     "modpipe partition: --stages: stage 0 does not fit --mem-per-rank 20.0 MiB: "
                     "its layers 0-2 need") != NULL);
    CU_ASSERT_NOT_EQUAL(run(30, "%s partition --model %s/mod -n 2 --mem-per-rank 20M", BIN, FIX),
                        0);
    CU_ASSERT(strstr(OUT, "no split of 6 layers into 2 stages fits --mem-per-rank 20.0 MiB") !=
              NULL);
    CU_ASSERT_NOT_EQUAL(run(30, "%s partition --model %s/mod -n 2 --mem-per-rank lots", BIN, FIX),
                        0);
    CU_ASSERT(strstr(OUT, "--mem-per-rank: expected a size like 6G") != NULL);
    /* generate checks the same limit (its own slots and positions) before it loads anything */
    CU_ASSERT_NOT_EQUAL(
        run(60, "%s -np 2 %s generate --model %s/mod --prompt-ids 1,2 --mem-per-rank 20M", MPIRUN,
            BIN, FIX),
        0);
    CU_ASSERT(strstr(OUT, "fits --mem-per-rank 20.0 MiB") != NULL);
    CU_ASSERT_EQUAL(run(60,
                        "%s -np 2 %s generate --model %s/mod --prompt-ids 1,2 --max-new 2 --quiet "
                        "--mem-per-rank 200M",
                        MPIRUN, BIN, FIX),
                    0);
}

int main(void)
{
    BIN = getenv("MODPIPE") ? getenv("MODPIPE") : "build/modpipe";
    FIX = getenv("MODPIPE_FIXTURES") ? getenv("MODPIPE_FIXTURES") : "tests/fixtures";
    snprintf(TMP, sizeof TMP, "/tmp/modpipe-test-XXXXXX");
    if (!mkdtemp(TMP)) {
        perror("mkdtemp");
        return 1;
    }
    if (tu_mpi_env("test_pipeline", BIN)) return 1;

    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("pipeline", NULL, NULL);
    CU_add_test(s, "generate exact, default micro-batching, np 1-4", test_generate_exact_default);
    CU_add_test(s, "generate exact, micro-batch 3, one group, np 1-4",
                test_generate_exact_microbatch);
    CU_add_test(s, "eval exact incl. topk, np 1-4", test_eval_exact);
    CU_add_test(s, "q8_0 weights: np 1-3 bitwise, refusals", test_q8_0_ranks);
    CU_add_test(s, "quantize: a q8_0 directory, in place, same bits", test_quantize_command);
    CU_add_test(s, "quantize --skip: projections kept as stored, ignore list", test_quantize_skip);
    CU_add_test(s, "byte counters = fixture routes (mod_all)", test_routes_mod_all);
    CU_add_test(s, "byte counters = fixture routes (mixed)", test_routes_mixed);
    CU_add_test(s, "bf16 wire bytes; dense transport", test_wire_dtype_and_dense_transport);
    CU_add_test(s, "topk carries every row; stage times", test_topk_dense_links_and_stage_times);
    CU_add_test(s, "YAML config, overrides, errors", test_yaml_config_and_override);
    CU_add_test(s, "partition command", test_partition_command);
    CU_add_test(s, "init-model streams; generate runs it; peak RSS", test_init_model_stream);
    CU_add_test(s, "partition --mem-per-rank", test_partition_memory_command);
    CU_add_test(s, "bad input", test_bad_input);
    CU_add_test(s, "eval of lines of any lengths", test_eval_ragged);
    CU_add_test(s, "generate stops at EOS", test_generate_eos);
    CU_add_test(s, "text prompts and eval --text-file", test_text_prompts);
    CU_add_test(s, "default decode groups", test_default_groups);
    CU_add_test(s, "bf16 weights on many rows: exact and fast, -np 3 = -np 1", test_bf16_many_rows);
    CU_add_test(s, "dead rank ends the job", test_dead_rank);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    run(30, "rm -rf %s", TMP);
    return fails != 0;
}
