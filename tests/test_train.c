/* tests/test_train.c — the Router-Tuning core (train/train.h).
 *
 *   1. gradient check: analytic router gradients (w, b of two routed layers of a 3-layer tiny
 *      random model) against central finite differences of the loss, in double precision,
 *      for both granularities, the soft gate and the STE gate (through its exact surrogate:
 *      soft gate + the fixed offset hard - sigmoid), both penalty forms; max relative error
 *      < 1e-6 (measured ~1e-9).
 *   2. f32 against f64: the same gradients within 2e-3 relative.
 *   3. the STE forward against the ENGINE (stage/stage.h) on the same model written as a
 *      MindSkip model: the NLL of every sequence agrees (1e-4) for both granularities, with
 *      some sequences / tokens skipped and some kept — training sees what inference computes.
 *   4. penalty and AdamW known answers; bad input (tokens out of range, MoD layers).
 */
#include <CUnit/Basic.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "stage/config.h"
#include "stage/safetensors.h"
#include "stage/stage.h"
#include "testutil.h"
#include "train/train.h"

#define D 8
#define NH 2
#define NKV 1
#define HD 4
#define FF 6
#define V 7
#define NL 3
#define T 5
#define NS 3

static uint32_t g_lcg = 777u;
static double rnd(void) /* [-1, 1) */
{
    g_lcg = g_lcg * 1664525u + 1013904223u;
    return (double)(g_lcg >> 8) / 16777216.0 * 2.0 - 1.0;
}

static void fill(float *p, int n, double scale, double off)
{
    for (int i = 0; i < n; i++) p[i] = (float)(off + scale * rnd());
}

static int add(st_writer *w, const char *name, int64_t d0, int64_t d1, const float *data)
{
    int64_t shape[2] = {d0, d1};
    return st_writer_add(w, name, STAGE_F32, d1 ? 2 : 1, shape, data);
}

/* Block variant of the models written (docs/SPEC.md §10): 0 plain Llama; 1 qwen3 (q/k norms,
 * q/k/v/o biases, linear RoPE, a window of 3 on layers >= 1); 2 llama (q/k/v/o and MLP
 * biases, llama3 RoPE). */
static int g_variant;
static const char *const VARIANT_KEYS[] = {
    "",
    ", \"model_type\": \"qwen3\", \"head_dim\": 4, \"attention_bias\": true,"
    " \"use_sliding_window\": true, \"sliding_window\": 3, \"max_window_layers\": 1,"
    " \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}",
    ", \"model_type\": \"llama\", \"attention_bias\": true, \"mlp_bias\": true,"
    " \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 4.0, \"low_freq_factor\": 1.0,"
    " \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8}",
};

/* A 3-layer random model. kinds: layer_types JSON list text; rw/rb: routers written for the
 * mindskip layers (NULL: none). */
static int write_model(const char *dir, const char *kinds, const char *gran, const double *rw,
                       const double *rb, const int *routed, int n_routed)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f,
            "{\"hidden_size\": %d, \"intermediate_size\": %d, \"num_attention_heads\": %d,\n"
            " \"num_key_value_heads\": %d, \"num_hidden_layers\": %d, \"vocab_size\": %d,\n"
            " \"rms_norm_eps\": 1e-5, \"rope_theta\": 100.0, \"max_position_embeddings\": 32,\n"
            " \"tie_word_embeddings\": false, \"layer_types\": %s,\n"
            " \"mindskip\": {\"granularity\": \"%s\", \"threshold\": 0.5}%s}\n",
            D, FF, NH, NKV, NL, V, kinds, gran, VARIANT_KEYS[g_variant]);
    if (fclose(f)) return -1;
    g_lcg = 4242u;
    static float buf[4096];
    st_writer *w = st_writer_new();
    int rc = 0;
    char name[256];
    fill(buf, V * D, 1.0, 0);
    rc |= add(w, "model.embed_tokens.weight", V, D, buf);
    for (int l = 0; l < NL; l++) {
#define LA(sfx, d0, d1, sc, off)                                                                   \
    do {                                                                                           \
        fill(buf, (d0) * ((d1) ? (d1) : 1), sc, off);                                              \
        snprintf(name, sizeof name, "model.layers.%d.%s", l, sfx);                                 \
        rc |= add(w, name, d0, d1, buf);                                                           \
    } while (0)
        LA("input_layernorm.weight", D, 0, 0.3, 1.0);
        LA("post_attention_layernorm.weight", D, 0, 0.3, 1.0);
        LA("self_attn.q_proj.weight", NH * HD, D, 0.8, 0);
        LA("self_attn.k_proj.weight", NKV * HD, D, 0.8, 0);
        LA("self_attn.v_proj.weight", NKV * HD, D, 0.8, 0);
        LA("self_attn.o_proj.weight", D, NH * HD, 0.8, 0);
        LA("mlp.gate_proj.weight", FF, D, 0.6, 0);
        LA("mlp.up_proj.weight", FF, D, 0.6, 0);
        LA("mlp.down_proj.weight", D, FF, 0.6, 0);
        if (g_variant) {
            LA("self_attn.q_proj.bias", NH * HD, 0, 0.5, 0);
            LA("self_attn.k_proj.bias", NKV * HD, 0, 0.5, 0);
            LA("self_attn.v_proj.bias", NKV * HD, 0, 0.5, 0);
            LA("self_attn.o_proj.bias", D, 0, 0.3, 0);
        }
        if (g_variant == 1) {
            LA("self_attn.q_norm.weight", HD, 0, 0.3, 1.0);
            LA("self_attn.k_norm.weight", HD, 0, 0.3, 1.0);
        }
        if (g_variant == 2) {
            LA("mlp.gate_proj.bias", FF, 0, 0.3, 0);
            LA("mlp.up_proj.bias", FF, 0, 0.3, 0);
            LA("mlp.down_proj.bias", D, 0, 0.3, 0);
        }
#undef LA
    }
    fill(buf, D, 0.3, 1.0);
    rc |= add(w, "model.norm.weight", D, 0, buf);
    fill(buf, V * D, 1.0, 0);
    rc |= add(w, "lm_head.weight", V, D, buf);
    for (int i = 0; rw && i < n_routed; i++) {
        float fw[D], fb = (float)rb[i];
        for (int c = 0; c < D; c++) fw[c] = (float)rw[i * D + c];
        snprintf(name, sizeof name, "model.layers.%d.router.weight", routed[i]);
        rc |= add(w, name, 1, D, fw);
        snprintf(name, sizeof name, "model.layers.%d.router.bias", routed[i]);
        rc |= add(w, name, 1, 0, &fb);
    }
    char err[512];
    if (!rc) rc = st_writer_save(w, dir, 1, err, sizeof err);
    if (rc) fprintf(stderr, "\n  write_model: %s\n", err);
    st_writer_free(w);
    return rc;
}

static const int ROUTED[2] = {0, 2};
static int32_t TOKS[NS * T];

static void make_tokens(void)
{
    g_lcg = 99u;
    for (int i = 0; i < NS * T; i++) TOKS[i] = (int32_t)((rnd() + 1.0) * 0.5 * V) % V;
}

static void make_routers(double *w, double *b, double scale)
{
    g_lcg = 1234u;
    for (int i = 0; i < 2 * D; i++) w[i] = scale * rnd();
    b[0] = 0.3;
    b[1] = -0.2;
}

typedef struct {
    char *dir;
    train_model *m;
} fixture;

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Set each router bias so that about a third of its gates fall below the threshold (the
 * bias sits halfway between two neighbouring logits): the checks see skipped and kept. */
static void center_routers(train_model *m, stage_granularity gran, double *w, double *b)
{
    char err[256];
    train_setup s = {2, ROUTED, gran, TRAIN_GATE_STE, TRAIN_PENALTY_GLOBAL, 0.5, 0.3, 0.7};
    train_ws *ws = train_ws_new(m, &s, NS, T, 1, err, sizeof err);
    double b0[2] = {0, 0}, z[NS * T];
    CU_ASSERT_FATAL(ws && train_forward(ws, TOKS, NS, w, b0, 1.0, NULL, err, sizeof err) == 0);
    int ng = (int)train_ws_stats(ws)->n_gates, cut = ng / 3;
    for (int ri = 0; ri < 2; ri++) {
        train_ws_gates(ws, ri, z, NULL, NULL);
        qsort(z, (size_t)ng, sizeof *z, cmp_d);
        b[ri] = -(z[cut - 1] + z[cut]) / 2;
    }
    train_ws_free(ws);
}

static int fx_open(fixture *fx)
{
    memset(fx, 0, sizeof *fx);
    fx->dir = make_tmpdir_tagged("train");
    char err[512];
    if (!fx->dir ||
        write_model(fx->dir, "[\"dense\", \"dense\", \"dense\"]", "sequence", NULL, NULL, NULL, 0))
        return -1;
    if (train_model_load(fx->dir, &fx->m, err, sizeof err)) {
        fprintf(stderr, "\n  %s\n", err);
        return -1;
    }
    return 0;
}

static void fx_close(fixture *fx)
{
    train_model_free(fx->m);
    rm_tmpdir(fx->dir);
}

/* Loss = nll * inv + P of one forward, and (grad) its analytic gradient. */
static double loss_of(train_ws *ws, const train_setup *s, const double *w, const double *b,
                      const double *off, double *gw, double *gb)
{
    char err[256];
    double inv = 1.0 / (NS * (T - 1));
    if (train_forward(ws, TOKS, NS, w, b, inv, off, err, sizeof err)) {
        fprintf(stderr, "\n  forward: %s\n", err);
        return NAN;
    }
    const train_stats *st = train_ws_stats(ws);
    double coef[2];
    double P = train_penalty_coef(s, st->gate_sum, (double)st->n_gates, coef);
    if (gw) {
        memset(gw, 0, 2 * D * sizeof *gw);
        memset(gb, 0, 2 * sizeof *gb);
        train_backward(ws, coef, gw, gb);
    }
    return st->nll_sum * inv + P;
}

static train_setup setup_of(stage_granularity g, train_gate gate, train_penalty pen)
{
    train_setup s = {2, ROUTED, g, gate, pen, 0.5, 0.3, 0.7};
    return s;
}

/* Max relative error of the analytic gradient against central differences (h = 1e-5). */
static double grad_check(train_model *m, stage_granularity gran, train_gate gate, train_penalty pen,
                         double *kept)
{
    char err[256];
    make_tokens();
    double w[2 * D], b[2], gw[2 * D], gb[2];
    make_routers(w, b, 1.5);
    center_routers(m, gran, w, b);
    train_setup s = setup_of(gran, gate, pen);
    double *off = NULL;
    int ng = gran == STAGE_GRAN_TOKEN ? NS * T : NS;
    if (gate == TRAIN_GATE_STE) {
        /* the STE gradient at (w, b) = the exact gradient of the soft gate with offset
         * hard - sigmoid held fixed: check that surrogate */
        train_ws *h = train_ws_new(m, &s, NS, T, 1, err, sizeof err);
        double l_ste = loss_of(h, &s, w, b, NULL, gw, gb);
        off = calloc(2 * (size_t)ng, sizeof *off);
        double sig[NS * T], g[NS * T];
        *kept = 0;
        for (int ri = 0; ri < 2; ri++) {
            train_ws_gates(h, ri, NULL, sig, g);
            for (int i = 0; i < ng; i++) {
                off[ri * ng + i] = g[i] - sig[i];
                *kept += g[i] / (2.0 * ng);
            }
        }
        train_ws_free(h);
        s.gate = TRAIN_GATE_SOFT;
        train_ws *ws = train_ws_new(m, &s, NS, T, 1, err, sizeof err);
        double gw2[2 * D], gb2[2];
        double l_soft = loss_of(ws, &s, w, b, off, gw2, gb2);
        CU_ASSERT_DOUBLE_EQUAL(l_soft, l_ste, 1e-12);
        for (int i = 0; i < 2 * D; i++) CU_ASSERT_DOUBLE_EQUAL(gw2[i], gw[i], 1e-12);
        train_ws_free(ws);
    }
    train_ws *ws = train_ws_new(m, &s, NS, T, 1, err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ws);
    loss_of(ws, &s, w, b, off, gw, gb);
    if (gate != TRAIN_GATE_STE) {
        const train_stats *st = train_ws_stats(ws);
        *kept = (st->gate_sum[0] + st->gate_sum[1]) / (2.0 * st->n_gates);
    }
    double maxerr = 0, maxg = 0;
    const double hstep = 1e-5;
    for (int p = 0; p < 2 * D + 2; p++) {
        double *th = p < 2 * D ? &w[p] : &b[p - 2 * D];
        double an = p < 2 * D ? gw[p] : gb[p - 2 * D];
        double t0 = *th;
        *th = t0 + hstep;
        double lp = loss_of(ws, &s, w, b, off, NULL, NULL);
        *th = t0 - hstep;
        double lm = loss_of(ws, &s, w, b, off, NULL, NULL);
        *th = t0;
        double fd = (lp - lm) / (2 * hstep);
        if (fabs(fd - an) > maxerr) maxerr = fabs(fd - an);
        if (fabs(fd) > maxg) maxg = fabs(fd);
    }
    train_ws_free(ws);
    free(off);
    if (getenv("MODPIPE_TEST_VERBOSE"))
        fprintf(stderr,
                "\n  gran %d gate %d pen %d: max |grad| %.3g, max rel err %.3g, kept %.2f\n", gran,
                gate, pen, maxg, maxerr / maxg, *kept);
    CU_ASSERT(maxg > 1e-4); /* the check is not vacuous */
    return maxerr / maxg;
}

static void check(stage_granularity gran, train_gate gate, train_penalty pen)
{
    fixture fx;
    CU_ASSERT_FATAL(fx_open(&fx) == 0);
    double kept = -1;
    double rel = grad_check(fx.m, gran, gate, pen, &kept);
    CU_ASSERT(rel < 1e-6);
    /* the penalty is active (kept > target) and the gates are not all equal */
    CU_ASSERT(kept > 0.3 && kept < 1.0);
    fx_close(&fx);
}

static void test_grad_seq_soft(void)
{
    check(STAGE_GRAN_SEQUENCE, TRAIN_GATE_SOFT, TRAIN_PENALTY_GLOBAL);
}
static void test_grad_tok_soft(void)
{
    check(STAGE_GRAN_TOKEN, TRAIN_GATE_SOFT, TRAIN_PENALTY_GLOBAL);
}
static void test_grad_seq_ste(void)
{
    check(STAGE_GRAN_SEQUENCE, TRAIN_GATE_STE, TRAIN_PENALTY_GLOBAL);
}
static void test_grad_tok_ste(void)
{
    check(STAGE_GRAN_TOKEN, TRAIN_GATE_STE, TRAIN_PENALTY_LAYER);
}
static void test_grad_tok_soft_layer(void)
{
    check(STAGE_GRAN_TOKEN, TRAIN_GATE_SOFT, TRAIN_PENALTY_LAYER);
}

/* f32 (cblas_sgemm) against f64 */
static void test_f32_vs_f64(void)
{
    fixture fx;
    CU_ASSERT_FATAL(fx_open(&fx) == 0);
    char err[256];
    for (int gi = 0; gi < 2; gi++) {
        stage_granularity gran = gi ? STAGE_GRAN_TOKEN : STAGE_GRAN_SEQUENCE;
        train_setup s = setup_of(gran, TRAIN_GATE_STE, TRAIN_PENALTY_GLOBAL);
        make_tokens();
        double w[2 * D], b[2], g32[2 * D], b32[2], g64[2 * D], b64[2];
        make_routers(w, b, 1.5);
        center_routers(fx.m, gran, w, b);
        train_ws *wf = train_ws_new(fx.m, &s, NS, T, 0, err, sizeof err);
        train_ws *wd = train_ws_new(fx.m, &s, NS, T, 1, err, sizeof err);
        CU_ASSERT_FATAL(wf && wd);
        double lf = loss_of(wf, &s, w, b, NULL, g32, b32);
        double ld = loss_of(wd, &s, w, b, NULL, g64, b64);
        CU_ASSERT_DOUBLE_EQUAL(lf, ld, 1e-5 * fabs(ld));
        double mx = 0, me = 0;
        for (int i = 0; i < 2 * D; i++) {
            if (fabs(g64[i]) > mx) mx = fabs(g64[i]);
            if (fabs(g64[i] - g32[i]) > me) me = fabs(g64[i] - g32[i]);
        }
        for (int i = 0; i < 2; i++) CU_ASSERT_DOUBLE_EQUAL(b32[i], b64[i], 2e-3 * mx);
        CU_ASSERT(me < 2e-3 * mx);
        train_ws_free(wf);
        train_ws_free(wd);
    }
    fx_close(&fx);
}

/* The STE forward (hard gates) against the engine on the same weights as a MindSkip model. */
static void engine_nll(const char *dir, double *nll /* [NS] */)
{
    char err[512];
    stage_config cfg;
    stage_model *m = NULL;
    CU_ASSERT_FATAL(stage_config_load(dir, &cfg, err, sizeof err) == 0);
    stage_range r = {0, NL - 1, 1, 1};
    if (stage_model_load(dir, &cfg, r, &m, err, sizeof err)) fprintf(stderr, "\n  %s\n", err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(m);
    stage_state *st = stage_state_init(m, 1, T, T, err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(st);
    for (int s = 0; s < NS; s++) {
        int32_t slot[T], pos[T];
        uint8_t flags[T], present[T];
        float x[T * D], logits[T * V];
        int rows[T];
        for (int t = 0; t < T; t++) {
            slot[t] = 0;
            pos[t] = t;
            flags[t] = STAGE_ROW_PROMPT | STAGE_ROW_NEED_LOGITS;
            present[t] = 1;
            rows[t] = t;
        }
        stage_batch b = {.n = T, .slot = slot, .pos = pos, .token = TOKS + s * T, .flags = flags};
        CU_ASSERT(stage_embed(m, TOKS + s * T, T, x, err, sizeof err) == 0);
        if (stage_forward(st, &b, x, present, err, sizeof err)) fprintf(stderr, "\n  %s\n", err);
        CU_ASSERT(stage_head_logits(st, x, rows, T, logits, err, sizeof err) == 0);
        nll[s] = 0;
        for (int t = 0; t + 1 < T; t++) nll[s] += stage_nll(logits + t * V, V, TOKS[s * T + t + 1]);
    }
    stage_state_free(st);
    stage_model_free(m);
    stage_config_free(&cfg);
}

static void engine_vs_train(stage_granularity gran)
{
    make_tokens();
    double w[2 * D], b[2];
    make_routers(w, b, 3.0);
    fixture fx;
    CU_ASSERT_FATAL(fx_open(&fx) == 0);
    center_routers(fx.m, gran, w, b);
    fx_close(&fx);
    char *dir = make_tmpdir_tagged("train");
    const char *gname = gran == STAGE_GRAN_TOKEN ? "token" : "sequence";
    CU_ASSERT_FATAL(
        write_model(dir, "[\"mindskip\", \"dense\", \"mindskip\"]", gname, w, b, ROUTED, 2) == 0);
    double ref[NS];
    engine_nll(dir, ref);
    char err[512];
    train_model *m = NULL;
    CU_ASSERT_FATAL(train_model_load(dir, &m, err, sizeof err) == 0);
    train_setup s = setup_of(gran, TRAIN_GATE_STE, TRAIN_PENALTY_GLOBAL);
    train_ws *ws = train_ws_new(m, &s, 1, T, 0, err, sizeof err);
    CU_ASSERT_FATAL(ws != NULL);
    double kept = 0, n = 0;
    for (int sq = 0; sq < NS; sq++) {
        CU_ASSERT_FATAL(train_forward(ws, TOKS + sq * T, 1, w, b, 1.0, NULL, err, sizeof err) == 0);
        const train_stats *st = train_ws_stats(ws);
        CU_ASSERT_DOUBLE_EQUAL(st->nll_sum, ref[sq], 1e-4 * (1 + fabs(ref[sq])));
        kept += st->gate_sum[0] + st->gate_sum[1];
        n += 2.0 * st->n_gates;
    }
    if (getenv("MODPIPE_TEST_VERBOSE")) fprintf(stderr, "\n  %s: kept %.2f\n", gname, kept / n);
    CU_ASSERT(kept > 0 && kept < n); /* some skipped, some kept */
    train_ws_free(ws);
    train_model_free(m);
    rm_tmpdir(dir);
}

static void test_engine_sequence(void) { engine_vs_train(STAGE_GRAN_SEQUENCE); }
static void test_engine_token(void) { engine_vs_train(STAGE_GRAN_TOKEN); }

/* The block variants: gradients through biases, q/k norms, scaled RoPE and windows, and the
 * STE forward = the engine on the same model. */
static void variant_checks(int variant)
{
    g_variant = variant;
    check(STAGE_GRAN_TOKEN, TRAIN_GATE_STE, TRAIN_PENALTY_LAYER);
    check(STAGE_GRAN_SEQUENCE, TRAIN_GATE_SOFT, TRAIN_PENALTY_GLOBAL);
    engine_vs_train(STAGE_GRAN_TOKEN);
    engine_vs_train(STAGE_GRAN_SEQUENCE);
    g_variant = 0;
}
static void test_variant_qwen3(void) { variant_checks(1); }
static void test_variant_llama3(void) { variant_checks(2); }

static void test_penalty(void)
{
    train_setup s = setup_of(STAGE_GRAN_SEQUENCE, TRAIN_GATE_STE, TRAIN_PENALTY_GLOBAL);
    s.lambda = 2.0;
    s.target_keep = 0.5;
    double sums[2] = {8, 2}, coef[2]; /* k = 0.8, 0.2 of 10 gates: K = 0.5 -> inactive */
    CU_ASSERT_DOUBLE_EQUAL(train_penalty_coef(&s, sums, 10, coef), 0.0, 1e-15);
    CU_ASSERT_DOUBLE_EQUAL(coef[0], 0.0, 1e-15);
    sums[1] = 4; /* K = 0.6: P = 2 * 0.1, dP/dg = 2 / (2 * 10) */
    CU_ASSERT_DOUBLE_EQUAL(train_penalty_coef(&s, sums, 10, coef), 0.2, 1e-12);
    CU_ASSERT_DOUBLE_EQUAL(coef[1], 0.1, 1e-15);
    s.penalty = TRAIN_PENALTY_LAYER; /* only layer 0 is above 0.5: P = 2/2 * 0.3 */
    CU_ASSERT_DOUBLE_EQUAL(train_penalty_coef(&s, sums, 10, coef), 0.3, 1e-12);
    CU_ASSERT_DOUBLE_EQUAL(coef[0], 0.1, 1e-15);
    CU_ASSERT_DOUBLE_EQUAL(coef[1], 0.0, 1e-15);
}

static void test_adamw(void)
{
    train_adamw o;
    CU_ASSERT_FATAL(train_adamw_init(&o, 2) == 0);
    double th[2] = {1.0, -2.0}, g[2] = {0.5, -3.0};
    uint8_t mask[2] = {1, 0};
    train_adamw_step(&o, th, g, 0.1, 0.01, mask);
    /* step 1: mhat = g, vhat = g^2 -> update sign(g) (+ decay on the masked entry) */
    CU_ASSERT_DOUBLE_EQUAL(th[0], 1.0 - 0.1 * (0.5 / (0.5 + 1e-8) + 0.01 * 1.0), 1e-12);
    CU_ASSERT_DOUBLE_EQUAL(th[1], -2.0 + 0.1 * (3.0 / (3.0 + 1e-8)), 1e-12);
    train_adamw_step(&o, th, g, 0.1, 0.0, NULL);
    double m = 0.9 * 0.1 * 0.5 + 0.1 * 0.5, v = 0.999 * 0.001 * 0.25 + 0.001 * 0.25;
    double upd = (m / (1 - 0.81)) / (sqrt(v / (1 - 0.999 * 0.999)) + 1e-8);
    CU_ASSERT_DOUBLE_EQUAL(th[0], 1.0 - 0.1 * (0.5 / (0.5 + 1e-8) + 0.01) - 0.1 * upd, 1e-12);
    train_adamw_free(&o);
    train_adamw_free(NULL);
}

static void test_bad_input(void)
{
    fixture fx;
    CU_ASSERT_FATAL(fx_open(&fx) == 0);
    char err[512] = "";
    train_setup s = setup_of(STAGE_GRAN_SEQUENCE, TRAIN_GATE_STE, TRAIN_PENALTY_GLOBAL);
    train_ws *ws = train_ws_new(fx.m, &s, NS, T, 0, err, sizeof err);
    CU_ASSERT_FATAL(ws != NULL);
    double w[2 * D] = {0}, b[2] = {0};
    int32_t bad[T] = {1, 2, 7, 0, 0};
    CU_ASSERT(train_forward(ws, bad, 1, w, b, 1.0, NULL, err, sizeof err) != 0);
    ASSERT_HAS(err, "outside the vocab");
    CU_ASSERT(train_forward(ws, TOKS, NS + 1, w, b, 1.0, NULL, err, sizeof err) != 0);
    train_ws_free(ws);
    int lay[2] = {2, 1};
    train_setup s2 = s;
    s2.layers = lay;
    CU_ASSERT(train_ws_new(fx.m, &s2, NS, T, 0, err, sizeof err) == NULL);
    ASSERT_HAS(err, "increasing");
    CU_ASSERT(train_ws_new(fx.m, &s, NS, 33, 0, err, sizeof err) == NULL);
    ASSERT_HAS(err, "max_position_embeddings");
    train_ws_free(NULL);
    train_model_free(NULL);
    fx_close(&fx);
    /* MoD layers are refused */
    char *dir = make_tmpdir_tagged("train");
    CU_ASSERT_FATAL(
        write_model(dir, "[\"dense\", \"mod\", \"dense\"]", "sequence", NULL, NULL, NULL, 0) == 0);
    train_model *m = NULL;
    CU_ASSERT(train_model_load(dir, &m, err, sizeof err) != 0);
    ASSERT_HAS(err, "layer 1 is mod");
    rm_tmpdir(dir);
}

/* stage/safetensors.c: an index may name shards outside its directory, by a relative path
 * ("../base/model.safetensors") or an absolute one (a router-tuned model's weights stay in
 * the base model's file). */
static void test_index_outside_dir(void)
{
    char *base = make_tmpdir_tagged("train");
    CU_ASSERT_FATAL(base != NULL);
    char sub[600], path[700], abs[700];
    snprintf(sub, sizeof sub, "%s/base", base);
    CU_ASSERT_FATAL(mkdir(sub, 0777) == 0);
    st_writer *w = st_writer_new();
    float a[3] = {1.5f, -2.0f, 3.25f}, r[2] = {7.0f, 8.0f};
    int64_t s3[1] = {3}, s2[1] = {2};
    char err[512];
    CU_ASSERT(st_writer_add(w, "a", STAGE_F32, 1, s3, a) == 0);
    CU_ASSERT(st_writer_save(w, sub, 1, err, sizeof err) == 0);
    st_writer_free(w);
    char tdir[600];
    snprintf(tdir, sizeof tdir, "%s/tuned", base);
    CU_ASSERT_FATAL(mkdir(tdir, 0777) == 0);
    snprintf(path, sizeof path, "%s/own", tdir);
    CU_ASSERT_FATAL(mkdir(path, 0777) == 0);
    w = st_writer_new();
    CU_ASSERT(st_writer_add(w, "r", STAGE_F32, 1, s2, r) == 0);
    CU_ASSERT(st_writer_save(w, path, 1, err, sizeof err) == 0);
    st_writer_free(w);
    snprintf(abs, sizeof abs, "%s/tuned/own/model.safetensors", base);
    for (int form = 0; form < 2; form++) {
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", tdir);
        FILE *f = fopen(path, "w");
        CU_ASSERT_FATAL(f != NULL);
        fprintf(f, "{\"weight_map\": {\"a\": \"../base/model.safetensors\", \"r\": \"%s\"}}",
                form ? abs : "own/model.safetensors");
        fclose(f);
        st_model *m = NULL;
        CU_ASSERT_FATAL(st_open(tdir, &m, err, sizeof err) == 0);
        const float *pa = st_get_f32(m, "a", 1, s3, err, sizeof err);
        const float *pr = st_get_f32(m, "r", 1, s2, err, sizeof err);
        CU_ASSERT(pa && pa[0] == 1.5f && pa[2] == 3.25f);
        CU_ASSERT(pr && pr[1] == 8.0f);
        st_close(m);
    }
    /* a missing outside shard is still a clear error */
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", tdir);
    FILE *f = fopen(path, "w");
    fprintf(f, "{\"weight_map\": {\"a\": \"/nonexistent/x.safetensors\"}}");
    fclose(f);
    st_model *m = NULL;
    CU_ASSERT(st_open(tdir, &m, err, sizeof err) != 0);
    ASSERT_HAS(err, "/nonexistent/x.safetensors");
    char cmd[800];
    snprintf(cmd, sizeof cmd, "rm -rf %s", base);
    CU_ASSERT(system(cmd) == 0);
    free(base);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    CU_pSuite s = CU_add_suite("train", NULL, NULL);
    CU_add_test(s, "gradient check: sequence, soft gate", test_grad_seq_soft);
    CU_add_test(s, "gradient check: token, soft gate", test_grad_tok_soft);
    CU_add_test(s, "gradient check: sequence, STE gate", test_grad_seq_ste);
    CU_add_test(s, "gradient check: token, STE gate, per-layer penalty", test_grad_tok_ste);
    CU_add_test(s, "gradient check: token, soft gate, per-layer penalty", test_grad_tok_soft_layer);
    CU_add_test(s, "f32 against f64", test_f32_vs_f64);
    CU_add_test(s, "STE forward = engine, sequence granularity", test_engine_sequence);
    CU_add_test(s, "STE forward = engine, token granularity", test_engine_token);
    CU_add_test(s, "qwen3 block (q/k norms, biases, window, linear RoPE): gradients, engine",
                test_variant_qwen3);
    CU_add_test(s, "llama block (all biases, llama3 RoPE): gradients, engine", test_variant_llama3);
    CU_add_test(s, "penalty known answers", test_penalty);
    CU_add_test(s, "AdamW known answers", test_adamw);
    CU_add_test(s, "bad input", test_bad_input);
    CU_add_test(s, "index with shards outside the directory", test_index_outside_dir);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    return fails ? 1 : 0;
}
