/* tests/stage_util.h — what the stage tests share (tests/test_stage.c: fixtures and KV cache,
 * tests/test_layers.c: every layer type vs a double reference, tests/test_stage_unit.c:
 * kernels, sampling, errors): helpers, the fixture generation driver (docs/SPEC.md §2), the
 * tiny one-layer model written with st_writer, and the suite runner. Static inline: each test
 * program takes what it uses. Single-threaded, like the tests.
 */
#ifndef TESTS_STAGE_UTIL_H
#define TESTS_STAGE_UTIL_H

#include "stage/convert.h"
#include "stage/kernels.h"
#include "stage/npy.h"
#include "stage/safetensors.h"
#include "stage/stage.h"

#include <CUnit/Basic.h>
#include <dirent.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/testutil.h"

#define ERRLEN 512

/* ---- helpers --------------------------------------------------------------------------------- */

static inline int verbose(void) { return getenv("MODPIPE_TEST_VERBOSE") != NULL; }

static inline const char *fixtures(void)
{
    const char *e = getenv("MODPIPE_FIXTURES");
    return e && *e ? e : "tests/fixtures";
}

/* |got - want| <= tol, with a message naming what failed. */
#define ASSERT_NEAR(got, want, tol, what)                                                          \
    do {                                                                                           \
        double g_ = (double)(got), w_ = (double)(want);                                            \
        int ok_ = fabs(g_ - w_) <= (tol);                                                          \
        if (!ok_) fprintf(stderr, "\n  %s: got %.9g, want %.9g\n", (what), g_, w_);                \
        CU_ASSERT(ok_);                                                                            \
    } while (0)

/* max |a - b| / max |b| */
static inline double rel_err(const float *a, const float *b, size_t n)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > num || isnan(d)) num = isnan(d) ? INFINITY : d;
        if (fabs((double)b[i]) > den) den = fabs((double)b[i]);
    }
    return den > 0.0 ? num / den : num;
}

/* Deterministic LCG (the tests must not depend on libc's rand). */
static uint32_t g_lcg = 12345u;
static inline uint32_t lcg(void)
{
    g_lcg = g_lcg * 1664525u + 1013904223u;
    return g_lcg >> 8; /* 24 bits */
}
static inline float rnd_unit(void)
{
    return (float)((double)lcg() / 16777216.0 * 2.0 - 1.0);
} /* [-1, 1) */
static inline float rnd_q(void)
{
    return (float)((int)(lcg() % 17u) - 8) / 16.0f;
} /* k/16 in [-.5, .5] */

static inline char *make_tmpdir(void) { return make_tmpdir_tagged("stage"); }

static inline float f_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* ---- 2. fixtures through the stage API ------------------------------------------------------- */

#define NSEQ 3
#define NNEW 5
static const int32_t PROMPTS[NSEQ][6] = {{3, 14, 15, 92, 65, 35}, {89, 79}, {32, 38, 46, 26}};
static const int PLEN[NSEQ] = {6, 2, 4};

typedef tu_model fxm;

static inline int fx_open(const char *name, fxm *f)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/%s", fixtures(), name);
    return tu_model_open(dir, f);
}

#define fx_close tu_model_close

static inline stage_state *state_new(const stage_model *m, int slots, int rows, int seq)
{
    char err[ERRLEN];
    stage_state *s = stage_state_init(m, slots, rows, seq, err, sizeof err);
    if (!s) fprintf(stderr, "\n  stage_state_init: %s\n", err);
    return s;
}

/* Embed, forward (every row present) and head logits of the rows flagged NEED_LOGITS (in
 * row order) into logits [*][V]. Returns the number of logits rows, or -1. */
static inline int run_rows(stage_state *st, const stage_model *m, int n, const int32_t *slot,
                           const int32_t *pos, const int32_t *tok, const uint8_t *flags,
                           float *logits)
{
    const int D = stage_model_config(m)->hidden;
    char err[ERRLEN] = "";
    float *x = malloc((size_t)n * D * sizeof *x);
    uint8_t *present = malloc((size_t)n);
    int *rows = malloc((size_t)n * sizeof *rows);
    int nl = 0, rc = -1;
    if (x && present && rows) {
        memset(present, 1, (size_t)n);
        for (int i = 0; i < n; i++)
            if (flags[i] & STAGE_ROW_NEED_LOGITS) rows[nl++] = i;
        stage_batch b = {.n = n,
                         .slot = (int32_t *)slot,
                         .pos = (int32_t *)pos,
                         .token = (int32_t *)tok,
                         .flags = (uint8_t *)flags};
        rc = stage_embed(m, tok, n, x, err, sizeof err);
        if (!rc) rc = stage_forward(st, &b, x, present, err, sizeof err);
        if (!rc) rc = stage_head_logits(st, x, rows, nl, logits, err, sizeof err);
        if (rc) fprintf(stderr, "\n  run_rows: %s\n", err);
    }
    free(x);
    free(present);
    free(rows);
    return rc ? -1 : nl;
}

static inline int argmax(const float *logits, int V)
{
    stage_rng r;
    stage_rng_seed(&r, 0, 0);
    return stage_sample(logits, V, 0.0f, 1.0f, &r, NULL);
}

/* Greedy generation of prompt s in `slot` with the KV cache: prefill (one micro-batch with
 * the prompt), then NNEW-1 decode steps one row at a time. logits [NNEW][V], toks [NNEW]. */
static inline int gen_one(stage_state *st, const stage_model *m, int s, int slot, float *logits,
                          int32_t *toks)
{
    const int V = stage_model_config(m)->vocab, P = PLEN[s];
    int32_t sl[6], ps[6], tk[6];
    uint8_t fl[6];
    for (int i = 0; i < P; i++) {
        sl[i] = slot;
        ps[i] = i;
        tk[i] = PROMPTS[s][i];
        fl[i] = STAGE_ROW_PROMPT | (i == P - 1 ? STAGE_ROW_NEED_LOGITS : 0);
    }
    if (run_rows(st, m, P, sl, ps, tk, fl, logits) != 1) return -1;
    toks[0] = argmax(logits, V);
    for (int j = 1; j < NNEW; j++) {
        int32_t s1 = slot, p1 = P + j - 1, t1 = toks[j - 1];
        uint8_t f1 = STAGE_ROW_NEED_LOGITS;
        if (run_rows(st, m, 1, &s1, &p1, &t1, &f1, logits + (size_t)j * V) != 1) return -1;
        toks[j] = argmax(logits + (size_t)j * V, V);
    }
    return 0;
}

/* ---- 3. every layer type on a tiny model vs a double-precision reference --------------------- */

#define TD 8   /* hidden */
#define TNH 2  /* heads */
#define TNKV 1 /* kv heads (GQA: both heads share one) */
#define THD 4  /* head_dim */
#define TQD (TNH * THD)
#define TKVD (TNKV * THD)
#define TI 6    /* intermediate */
#define TV 5    /* vocab */
#define TG 3    /* gate rows at most (E + noop) */
#define TIE 3   /* expert intermediate */
#define TPH 3   /* predictor hidden */
#define RMAX 16 /* rows of a scenario at most */

typedef struct {
    stage_kind kind;
    const char *routing; /* mod.routing */
    int scale_sigmoid;   /* mod.router_scale */
    double capacity, mod_thr;
    int E, n_noop, ept; /* mode */
    const char *gran;   /* mindskip.granularity */
    double ms_thr;
    int has_rb, has_pred;
    const char *extra; /* a tensor [TD] the engine does not read (tiny_write adds it) */
    float eps, theta;
    float ln1[TD], ln2[TD];
    float wq[TQD * TD], wk[TKVD * TD], wv[TKVD * TD], wo[TD * TQD];
    float wg[TI * TD], wu[TI * TD], wd[TD * TI];
    float gate[TG * TD], w1[TG][TIE * TD], w3[TG][TIE * TD], w2[TG][TD * TIE];
    float rw[TD], rb;
    float p1[TPH * TD], pb1[TPH], p2[TPH], pb2;
    float embed[TV * TD], norm[TD], lm[TV * TD];
} tiny;

static inline void fill(float *p, int n, float scale, float offset)
{
    for (int i = 0; i < n; i++) p[i] = offset + scale * rnd_q();
}

/* Random small weights (multiples of 1/32 .. 1/16); router r = 2 x[0] - 1, so a row is
 * selected by threshold routing iff x[0] > 0.5. */
static inline void tiny_init(tiny *t, stage_kind kind, uint32_t seed)
{
    memset(t, 0, sizeof *t);
    g_lcg = seed;
    t->kind = kind;
    t->routing = "threshold";
    t->capacity = 0.25;
    t->mod_thr = 0.5;
    t->E = 3;
    t->n_noop = 0;
    t->ept = 2;
    t->gran = "sequence";
    t->ms_thr = 0.5;
    t->has_rb = stage_kind_is_routed(kind);
    t->eps = 1e-6f;
    t->theta = 100.0f;
    fill(t->ln1, TD, 0.5f, 1.0f);
    fill(t->ln2, TD, 0.5f, 1.0f);
    fill(t->wq, TQD * TD, 2.0f, 0);
    fill(t->wk, TKVD * TD, 2.0f, 0);
    fill(t->wv, TKVD * TD, 1.0f, 0);
    fill(t->wo, TD * TQD, 1.0f, 0);
    fill(t->wg, TI * TD, 1.0f, 0);
    fill(t->wu, TI * TD, 1.0f, 0);
    fill(t->wd, TD * TI, 1.0f, 0);
    fill(t->gate, TG * TD, 2.0f, 0);
    for (int e = 0; e < TG; e++) {
        fill(t->w1[e], TIE * TD, 1.0f, 0);
        fill(t->w3[e], TIE * TD, 1.0f, 0);
        fill(t->w2[e], TD * TIE, 1.0f, 0);
    }
    t->rw[0] = 2.0f;
    t->rb = -1.0f;
    fill(t->p1, TPH * TD, 0.25f, 0);
    fill(t->pb1, TPH, 0.25f, 0);
    fill(t->p2, TPH, 0.25f, 0);
    fill(t->embed, TV * TD, 2.0f, 0);
    fill(t->norm, TD, 0.5f, 1.0f);
    fill(t->lm, TV * TD, 1.0f, 0);
}

static inline int st_add(st_writer *w, const char *omit, const char *name, int64_t d0, int64_t d1,
                         const float *data)
{
    if (omit && !strcmp(omit, name)) return 0;
    int64_t shape[2] = {d0, d1};
    return st_writer_add(w, name, STAGE_F32, d1 ? 2 : 1, shape, data);
}

/* config.json + model.safetensors of the 1-layer tiny model into dir (omit: a tensor left out). */
static inline int tiny_write(const tiny *t, const char *dir, const char *omit)
{
    char path[1024], err[ERRLEN];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f,
            "{\"hidden_size\": %d, \"intermediate_size\": %d, \"num_attention_heads\": %d,\n"
            " \"num_key_value_heads\": %d, \"num_hidden_layers\": 1, \"vocab_size\": %d,\n"
            " \"rms_norm_eps\": %.9g, \"rope_theta\": %.9g, \"max_position_embeddings\": 64,\n"
            " \"tie_word_embeddings\": false, \"layer_types\": [\"%s\"],\n"
            " \"mod\": {\"capacity\": %.17g, \"routing\": \"%s\", \"threshold\": %.17g,"
            " \"router_scale\": \"%s\"},\n"
            " \"mode\": {\"num_experts\": %d, \"num_noop_experts\": %d, \"experts_per_token\": %d,"
            " \"expert_intermediate_size\": %d},\n"
            " \"mindskip\": {\"granularity\": \"%s\", \"threshold\": %.17g}}\n",
            TD, TI, TNH, TNKV, TV, t->eps, t->theta, stage_kind_name(t->kind), t->capacity,
            t->routing, t->mod_thr, t->scale_sigmoid ? "sigmoid" : "none", t->E, t->n_noop, t->ept,
            TIE, t->gran, t->ms_thr);
    if (fclose(f)) return -1;

    st_writer *w = st_writer_new();
    if (!w) return -1;
    int rc = 0;
    char name[256];
#define ADD(nm, d0, d1, data) rc |= st_add(w, omit, nm, d0, d1, data)
#define LADD(sfx, d0, d1, data)                                                                    \
    do {                                                                                           \
        snprintf(name, sizeof name, "model.layers.0.%s", sfx);                                     \
        ADD(name, d0, d1, data);                                                                   \
    } while (0)
    ADD("model.embed_tokens.weight", TV, TD, t->embed);
    LADD("input_layernorm.weight", TD, 0, t->ln1);
    LADD("post_attention_layernorm.weight", TD, 0, t->ln2);
    LADD("self_attn.q_proj.weight", TQD, TD, t->wq);
    LADD("self_attn.k_proj.weight", TKVD, TD, t->wk);
    LADD("self_attn.v_proj.weight", TKVD, TD, t->wv);
    LADD("self_attn.o_proj.weight", TD, TQD, t->wo);
    if (t->kind == STAGE_KIND_MODE_STAGED || t->kind == STAGE_KIND_MODE_INTEGRATED) {
        int G = t->E + (t->kind == STAGE_KIND_MODE_INTEGRATED ? t->n_noop : 0);
        LADD("block_sparse_moe.gate.weight", G, TD, t->gate);
        for (int e = 0; e < t->E; e++) {
            char sfx[128];
            snprintf(sfx, sizeof sfx, "block_sparse_moe.experts.%d.w1.weight", e);
            LADD(sfx, TIE, TD, t->w1[e]);
            snprintf(sfx, sizeof sfx, "block_sparse_moe.experts.%d.w2.weight", e);
            LADD(sfx, TD, TIE, t->w2[e]);
            snprintf(sfx, sizeof sfx, "block_sparse_moe.experts.%d.w3.weight", e);
            LADD(sfx, TIE, TD, t->w3[e]);
        }
    } else {
        LADD("mlp.gate_proj.weight", TI, TD, t->wg);
        LADD("mlp.up_proj.weight", TI, TD, t->wu);
        LADD("mlp.down_proj.weight", TD, TI, t->wd);
    }
    if (stage_kind_is_routed(t->kind) || t->kind == STAGE_KIND_MINDSKIP) {
        LADD("router.weight", 1, TD, t->rw);
        if (t->has_rb) LADD("router.bias", 1, 0, &t->rb);
    }
    if (t->has_pred) {
        LADD("router_predictor.fc1.weight", TPH, TD, t->p1);
        LADD("router_predictor.fc1.bias", TPH, 0, t->pb1);
        LADD("router_predictor.fc2.weight", 1, TPH, t->p2);
        LADD("router_predictor.fc2.bias", 1, 0, &t->pb2);
    }
    ADD("model.norm.weight", TD, 0, t->norm);
    ADD("lm_head.weight", TV, TD, t->lm);
    if (t->extra) ADD(t->extra, TD, 0, t->norm);
#undef ADD
#undef LADD
    if (!rc) rc = st_writer_save(w, dir, 1, err, sizeof err);
    if (rc) fprintf(stderr, "\n  tiny_write: %s\n", err);
    st_writer_free(w);
    return rc;
}

typedef struct {
    char *dir;
    stage_config cfg;
    stage_model *m;
} tiny_model;

/* Write and load the tiny model (whole range, embedding and head). err gets the load error. */
static inline int tiny_load(const tiny *t, tiny_model *tm, const char *omit, char *err,
                            size_t errlen)
{
    memset(tm, 0, sizeof *tm);
    tm->dir = make_tmpdir();
    if (!tm->dir || tiny_write(t, tm->dir, omit)) {
        snprintf(err, errlen, "cannot write the tiny model");
        return -1;
    }
    if (stage_config_load(tm->dir, &tm->cfg, err, errlen)) return -1;
    stage_range r = {0, 0, 1, 1};
    return stage_model_load(tm->dir, &tm->cfg, r, &tm->m, err, errlen);
}

static inline void tiny_unload(tiny_model *tm)
{
    stage_model_free(tm->m);
    if (tm->cfg.layer_kind) stage_config_free(&tm->cfg);
    rm_tmpdir(tm->dir);
    memset(tm, 0, sizeof *tm);
}

/* Run rows [a, b) of a sequence as one micro-batch (slot, positions a..b-1 unless pos given). */
static inline int fwd_rows(stage_state *st, int n, const int32_t *slot, const int32_t *pos,
                           const uint8_t *flags, float *x, char *err, size_t errlen)
{
    int32_t tok[RMAX * 4] = {0};
    uint8_t present[RMAX * 4];
    memset(present, 1, sizeof present);
    stage_batch b = {.n = n,
                     .slot = (int32_t *)slot,
                     .pos = (int32_t *)pos,
                     .token = (int32_t *)tok,
                     .flags = (uint8_t *)flags};
    return stage_forward(st, &b, x, present, err, errlen);
}

static inline int load_or_fail(const tiny *t, tiny_model *tm)
{
    char err[ERRLEN];
    if (tiny_load(t, tm, NULL, err, sizeof err)) {
        fprintf(stderr, "\n  tiny model: %s\n", err);
        CU_FAIL("tiny model does not load");
        tiny_unload(tm);
        return -1;
    }
    return 0;
}

/* ---- the suites: each test file's main ------------------------------------------------------- */

typedef struct {
    const char *name;
    CU_TestFunc fn;
} test_def;

#define T_(f)                                                                                      \
    {                                                                                              \
#f, f                                                                                      \
    }
#define N_(a) ((int)(sizeof(a) / sizeof(a[0])))

static inline int add_suite(const char *name, const test_def *tests, int n)
{
    CU_pSuite s = CU_add_suite(name, NULL, NULL);
    if (!s) return -1;
    for (int i = 0; i < n; i++)
        if (!CU_add_test(s, tests[i].name, tests[i].fn)) return -1;
    return 0;
}

/* Runs the suites (name, tests, count; name NULL ends the list) verbosely; the exit status. */
typedef struct {
    const char *name;
    const test_def *tests;
    int n;
} suite_def;

static inline int run_suites(const suite_def *s)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    for (; s->name; s++)
        if (add_suite(s->name, s->tests, s->n)) {
            CU_cleanup_registry();
            return 1;
        }
    return tu_cunit_run();
}

#endif
