/* tests/test_stage.c — the stage module (stage/ sources) on the known-answer fixtures.
 *
 *   2. the SPEC known-answer fixtures (tests/fixtures, override: MODPIPE_FIXTURES), driven
 *      through the stage API by a tiny greedy generation driver (tests/stage_util.h; one
 *      sequence at a time, and all sequences in one micro-batch), plus the teacher-forced eval
 *      ones; weights rounded to bf16 / f16 / q8_0 within their bounds;
 *   4. KV cache vs recompute for every fixture model, KV entries vs router decisions.
 * Sections 1, 5, 6 are in tests/test_stage_unit.c, 3 in tests/test_layers.c.
 * Run from the repository root. MODPIPE_TEST_VERBOSE=1 prints the measured errors.
 */
#include "tests/stage_util.h"

#include "cli/quantize.h"
#include "stage/wmem.h"

/* All NSEQ prompts in one micro-batch (sequence s in slot NSEQ-1-s), then NSEQ-row decode
 * steps (rows in reverse sequence order). logits [NSEQ][NNEW][V], toks [NSEQ][NNEW]. */
static int gen_batched(stage_state *st, const stage_model *m, float *logits, int32_t *toks)
{
    const int V = stage_model_config(m)->vocab;
    int32_t sl[16], ps[16], tk[16];
    uint8_t fl[16];
    float *lg = malloc((size_t)NSEQ * V * sizeof *lg);
    int n = 0, rc = 0;
    for (int s = 0; s < NSEQ; s++)
        for (int i = 0; i < PLEN[s]; i++, n++) {
            sl[n] = NSEQ - 1 - s;
            ps[n] = i;
            tk[n] = PROMPTS[s][i];
            fl[n] = STAGE_ROW_PROMPT | (i == PLEN[s] - 1 ? STAGE_ROW_NEED_LOGITS : 0);
        }
    if (run_rows(st, m, n, sl, ps, tk, fl, lg) != NSEQ) rc = -1;
    for (int s = 0; s < NSEQ && !rc; s++) {
        memcpy(logits + (size_t)s * NNEW * V, lg + (size_t)s * V, (size_t)V * sizeof *lg);
        toks[s * NNEW] = argmax(lg + (size_t)s * V, V);
    }
    for (int j = 1; j < NNEW && !rc; j++) {
        for (int u = 0; u < NSEQ; u++) {
            int s = NSEQ - 1 - u;
            sl[u] = NSEQ - 1 - s;
            ps[u] = PLEN[s] + j - 1;
            tk[u] = toks[s * NNEW + j - 1];
            fl[u] = STAGE_ROW_NEED_LOGITS;
        }
        if (run_rows(st, m, NSEQ, sl, ps, tk, fl, lg) != NSEQ) {
            rc = -1;
            break;
        }
        for (int u = 0; u < NSEQ; u++) {
            int s = NSEQ - 1 - u;
            float *dst = logits + ((size_t)s * NNEW + j) * V;
            memcpy(dst, lg + (size_t)u * V, (size_t)V * sizeof *lg);
            toks[s * NNEW + j] = argmax(dst, V);
        }
    }
    free(lg);
    return rc;
}

/* "generated 3,44,33,3,44" per line */
static int read_gen_tokens(const char *name, int32_t toks[NSEQ][NNEW])
{
    char path[1024], line[512];
    snprintf(path, sizeof path, "%s/%s.generate.txt", fixtures(), name);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int s = 0;
    while (s < NSEQ && fgets(line, sizeof line, f)) {
        char *p = line;
        while (*p && !(*p >= '0' && *p <= '9')) p++;
        if (!*p) continue;
        for (int j = 0; j < NNEW; j++) {
            char *end;
            long v = strtol(p, &end, 10);
            if (end == p) {
                fclose(f);
                return -1;
            }
            toks[s][j] = (int32_t)v;
            p = end;
            if (*p == ',') p++;
        }
        s++;
    }
    fclose(f);
    return s == NSEQ ? 0 : -1;
}

static float *read_npy(const char *name, const char *suffix, int ndim_want,
                       const int64_t *shape_want)
{
    char path[1024], err[ERRLEN];
    snprintf(path, sizeof path, "%s/%s.%s.npy", fixtures(), name, suffix);
    float *d = NULL;
    int ndim = 0;
    int64_t shape[8];
    if (npy_read_f32(path, &d, &ndim, shape, err, sizeof err)) {
        fprintf(stderr, "\n  %s\n", err);
        return NULL;
    }
    int ok = ndim == ndim_want;
    for (int i = 0; ok && i < ndim; i++) ok = shape[i] == shape_want[i];
    if (!ok) {
        fprintf(stderr, "\n  %s: unexpected shape\n", path);
        free(d);
        return NULL;
    }
    return d;
}

static void check_tokens(const char *name, const char *how, int32_t got[NSEQ][NNEW],
                         int32_t want[NSEQ][NNEW])
{
    int same = memcmp(got, want, sizeof(int32_t) * NSEQ * NNEW) == 0;
    if (!same) {
        fprintf(stderr, "\n  %s (%s): tokens differ\n", name, how);
        for (int s = 0; s < NSEQ; s++) {
            fprintf(stderr, "    got ");
            for (int j = 0; j < NNEW; j++) fprintf(stderr, "%d ", got[s][j]);
            fprintf(stderr, " want ");
            for (int j = 0; j < NNEW; j++) fprintf(stderr, "%d ", want[s][j]);
            fprintf(stderr, "\n");
        }
    }
    CU_ASSERT(same);
}

static void check_generate(const char *name)
{
    fxm f;
    if (fx_open(name, &f)) {
        CU_FAIL("fixture model does not load");
        return;
    }
    const int V = f.cfg.vocab;
    int64_t shape[3] = {NSEQ, NNEW, V};
    float *want = read_npy(name, "generate", 3, shape);
    int32_t want_tok[NSEQ][NNEW], got_tok[NSEQ][NNEW], bat_tok[NSEQ][NNEW];
    CU_ASSERT_FATAL(want != NULL);
    CU_ASSERT_FATAL(read_gen_tokens(name, want_tok) == 0);
    float *got = calloc((size_t)NSEQ * NNEW * V, sizeof *got);
    float *bat = calloc((size_t)NSEQ * NNEW * V, sizeof *bat);

    /* one sequence at a time, all in slot 0 (a position-0 prompt row resets the slot) */
    stage_state *st = state_new(f.m, 1, 16, 64);
    CU_ASSERT_FATAL(st != NULL);
    int rc = 0;
    for (int s = 0; s < NSEQ && !rc; s++)
        rc = gen_one(st, f.m, s, 0, got + (size_t)s * NNEW * V, got_tok[s]);
    CU_ASSERT_EQUAL(rc, 0);
    stage_state_free(st);
    double e1 = rel_err(got, want, (size_t)NSEQ * NNEW * V);
    check_tokens(name, "one sequence at a time", got_tok, want_tok);
    if (verbose() || !(e1 <= 1e-4)) fprintf(stderr, "\n  %s generate: rel err %.3g\n", name, e1);
    CU_ASSERT(e1 <= 1e-4);

    /* all three sequences in one micro-batch */
    st = state_new(f.m, NSEQ, 16, 64);
    CU_ASSERT_FATAL(st != NULL);
    CU_ASSERT_EQUAL(gen_batched(st, f.m, bat, &bat_tok[0][0]), 0);
    stage_state_free(st);
    double e2 = rel_err(bat, want, (size_t)NSEQ * NNEW * V);
    check_tokens(name, "batched", bat_tok, want_tok);
    if (verbose() || !(e2 <= 1e-4))
        fprintf(stderr, "\n  %s generate batched: rel err %.3g\n", name, e2);
    CU_ASSERT(e2 <= 1e-4);
    double e3 = rel_err(bat, got, (size_t)NSEQ * NNEW * V);
    CU_ASSERT(e3 <= 1e-5);

    free(got);
    free(bat);
    free(want);
    fx_close(&f);
}

static int read_eval_tokens(int32_t toks[2][8])
{
    char path[1024];
    snprintf(path, sizeof path, "%s/eval_tokens.txt", fixtures());
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int n = 0;
    while (n < 16 && fscanf(f, "%d", &toks[n / 8][n % 8]) == 1) n++;
    fclose(f);
    return n == 16 ? 0 : -1;
}

static void check_eval(const char *name)
{
    fxm f;
    if (fx_open(name, &f)) {
        CU_FAIL("fixture model does not load");
        return;
    }
    const int V = f.cfg.vocab;
    int64_t shape[3] = {2, 8, V};
    float *want = read_npy(name, "eval", 3, shape);
    int32_t toks[2][8];
    CU_ASSERT_FATAL(want != NULL);
    CU_ASSERT_FATAL(read_eval_tokens(toks) == 0);
    float *got = calloc((size_t)16 * V, sizeof *got), *bat = calloc((size_t)16 * V, sizeof *bat);
    int32_t sl[16], ps[16], tk[16];
    uint8_t fl[16];

    /* one forward per sequence */
    stage_state *st = state_new(f.m, 1, 16, 64);
    CU_ASSERT_FATAL(st != NULL);
    for (int s = 0; s < 2; s++) {
        for (int i = 0; i < 8; i++) {
            sl[i] = 0;
            ps[i] = i;
            tk[i] = toks[s][i];
            fl[i] = STAGE_ROW_PROMPT | STAGE_ROW_NEED_LOGITS;
        }
        CU_ASSERT_EQUAL(run_rows(st, f.m, 8, sl, ps, tk, fl, got + (size_t)s * 8 * V), 8);
    }
    stage_state_free(st);
    double e1 = rel_err(got, want, (size_t)16 * V);
    if (verbose() || !(e1 <= 1e-4)) fprintf(stderr, "\n  %s eval: rel err %.3g\n", name, e1);
    CU_ASSERT(e1 <= 1e-4);

    /* both sequences in one forward, rows interleaved, slots 1 and 0 */
    st = state_new(f.m, 2, 16, 64);
    CU_ASSERT_FATAL(st != NULL);
    for (int r = 0; r < 16; r++) {
        int s = r % 2, i = r / 2;
        sl[r] = 1 - s;
        ps[r] = i;
        tk[r] = toks[s][i];
        fl[r] = STAGE_ROW_PROMPT | STAGE_ROW_NEED_LOGITS;
    }
    float *tmp = calloc((size_t)16 * V, sizeof *tmp);
    CU_ASSERT_EQUAL(run_rows(st, f.m, 16, sl, ps, tk, fl, tmp), 16);
    for (int r = 0; r < 16; r++)
        memcpy(bat + ((size_t)(r % 2) * 8 + r / 2) * V, tmp + (size_t)r * V,
               (size_t)V * sizeof *tmp);
    stage_state_free(st);
    double e2 = rel_err(bat, want, (size_t)16 * V);
    if (verbose() || !(e2 <= 1e-4))
        fprintf(stderr, "\n  %s eval batched: rel err %.3g\n", name, e2);
    CU_ASSERT(e2 <= 1e-4);

    /* NLL of the teacher-forced next tokens agrees with the fixture's logits */
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < 7; i++) {
            double a = stage_nll(got + ((size_t)s * 8 + i) * V, V, toks[s][i + 1]);
            double b = stage_nll(want + ((size_t)s * 8 + i) * V, V, toks[s][i + 1]);
            ASSERT_NEAR(a, b, 1e-3, "eval nll");
        }
    free(tmp);
    free(got);
    free(bat);
    free(want);
    fx_close(&f);
}

#define GEN_TEST(M)                                                                                \
    static void test_gen_##M(void) { check_generate(#M); }
GEN_TEST(dense)
GEN_TEST(mod)
GEN_TEST(mod_all)
GEN_TEST(mod_predictor)
GEN_TEST(mode_staged)
GEN_TEST(mode_integrated)
GEN_TEST(mindskip)
GEN_TEST(mindskip_token)
GEN_TEST(mixed)
#define EVAL_TEST(M)                                                                               \
    static void test_eval_##M(void) { check_eval(#M); }
EVAL_TEST(dense)
EVAL_TEST(mod)
EVAL_TEST(mod_topk)
EVAL_TEST(mixed)

/* rows x cols values through Q8_0 and back: the values q8_0 weights hold (dst may be src). */
static int q8_round(const float *src, int rows, int cols, float *dst)
{
    const int nb = stage_q8_blocks(cols);
    int8_t *q = malloc((size_t)cols + 1);
    uint16_t *d = malloc((size_t)nb * sizeof *d + 2);
    int rc = !q || !d;
    for (int r = 0; !rc && r < rows; r++) {
        rc = stage_q8_quantize_row(src + (size_t)r * cols, cols, q, d);
        if (!rc) stage_q8_dequant(q, d, 0, cols, dst + (size_t)r * cols);
    }
    free(q);
    free(d);
    return rc;
}

/* ---- weights kept in their dtype ----------------------------------------------
 * Every tensor of fixture `name`, rounded to dtype `dt` (f32 fixtures) or as stored, written
 * again as dtype `out` into a temp dir with the fixture's config.json. */
static char *rewrite_fixture(const char *name, stage_dtype round_to, stage_dtype out)
{
    char src[1024], err[ERRLEN];
    snprintf(src, sizeof src, "%s/%s", fixtures(), name);
    st_model *in = NULL;
    if (st_open(src, &in, err, sizeof err)) {
        fprintf(stderr, "\n  %s\n", err);
        return NULL;
    }
    char *dir = make_tmpdir();
    st_writer *w = st_writer_new();
    int rc = !dir || !w;
    for (size_t i = 0; !rc && i < st_count(in); i++) {
        const char *nm = st_name_at(in, i);
        st_tensor t;
        rc = st_find(in, nm, &t, err, sizeof err) != 1;
        const float *v = rc ? NULL : st_get_f32(in, nm, t.ndim, t.shape, err, sizeof err);
        size_t n = 1;
        for (int d = 0; d < t.ndim; d++) n *= (size_t)t.shape[d];
        float *r = v ? malloc(n * sizeof *r) : NULL;
        uint16_t *h = v ? malloc(n * 2 + 2) : NULL;
        rc = !r || !h;
        if (!rc) { /* round through the dtype: exactly the values a bf16 / f16 checkpoint holds */
            if (round_to == STAGE_Q8_0 && t.ndim == 2 && stage_q8_quantizes(nm))
                rc = q8_round(v, (int)t.shape[0], (int)t.shape[1], r);
            else if (round_to == STAGE_Q8_0 || round_to == STAGE_F32)
                memcpy(r, v, n * sizeof *r);
            else {
                stage_dtype_from_f32(round_to, v, h, n);
                stage_dtype_to_f32(round_to, h, r, n);
            }
            rc = rc || st_writer_add(w, nm, out, t.ndim, t.shape, r);
        }
        free(r);
        free(h);
    }
    if (!rc) rc = st_writer_save(w, dir, 1, err, sizeof err);
    st_writer_free(w);
    st_close(in);
    if (!rc) { /* the config, as it is */
        char cs[1100], cd[1100], buf[8192];
        snprintf(cs, sizeof cs, "%s/config.json", src);
        snprintf(cd, sizeof cd, "%s/config.json", dir);
        FILE *a = fopen(cs, "rb"), *b = fopen(cd, "wb");
        size_t k = a ? fread(buf, 1, sizeof buf, a) : 0;
        rc = !a || !b || fwrite(buf, 1, k, b) != k;
        if (a) fclose(a);
        if (b) fclose(b);
    }
    if (rc) {
        fprintf(stderr, "\n  rewrite_fixture %s: %s\n", name, err);
        rm_tmpdir(dir);
        return NULL;
    }
    return dir;
}

/* Batched greedy generation of the fixture prompts from model dir (weights held in wdt, -1:
 * as stored) into logits [NSEQ][NNEW][V]. */
static int gen_dir(const char *dir, int wdt, float *logits, int32_t *toks)
{
    stage_config cfg;
    char err[ERRLEN];
    if (stage_config_load(dir, &cfg, err, sizeof err)) return -1;
    stage_model *m = NULL;
    stage_range r = {0, cfg.n_layers - 1, 1, 1};
    int rc = stage_model_load_dtype(dir, &cfg, r, wdt, &m, err, sizeof err);
    stage_state *st = rc ? NULL : state_new(m, NSEQ, 16, 64);
    rc = rc || !st || gen_batched(st, m, logits, toks);
    if (rc) fprintf(stderr, "\n  gen_dir %s: %s\n", dir, err);
    stage_state_free(st);
    stage_model_free(m);
    stage_config_free(&cfg);
    return rc ? -1 : 0;
}

/* bf16 / f16 weights: logits within 1e-4 (relative) of the f32 computation on the same rounded
 * weights; converting an f32 checkpoint at load (--weights-dtype) gives exactly what a
 * checkpoint stored in that dtype gives; weight bytes follow the dtype. */
static void check_weights_dtype(const char *name, stage_dtype dt)
{
    fxm f;
    CU_ASSERT_FATAL(fx_open(name, &f) == 0);
    const size_t n = (size_t)NSEQ * NNEW * f.cfg.vocab;
    size_t f32_bytes = 0;
    fx_close(&f);
    char *as_f32 = rewrite_fixture(name, dt, STAGE_F32); /* rounded values, stored f32 */
    char *as_dt = rewrite_fixture(name, dt, dt);         /* the same values, stored in dt */
    CU_ASSERT_FATAL(as_f32 && as_dt);
    float *a = calloc(n, sizeof *a), *b = calloc(n, sizeof *b), *c = calloc(n, sizeof *c);
    int32_t ta[NSEQ * NNEW], tb[NSEQ * NNEW], tc[NSEQ * NNEW];
    CU_ASSERT_FATAL(gen_dir(as_f32, -1, a, ta) == 0);      /* f32 kernels */
    CU_ASSERT_FATAL(gen_dir(as_dt, -1, b, tb) == 0);       /* dt kernels, as stored */
    CU_ASSERT_FATAL(gen_dir(as_f32, (int)dt, c, tc) == 0); /* converted at load */
    double e = rel_err(b, a, n);
    if (verbose() || !(e <= 1e-4))
        fprintf(stderr, "\n  %s as %s vs f32 on the same values: rel err %.3g\n", name,
                stage_dtype_name(dt), e);
    CU_ASSERT(e <= 1e-4);
    CU_ASSERT(memcmp(ta, tb, sizeof ta) == 0);
    CU_ASSERT(memcmp(b, c, n * sizeof *b) == 0);
    /* weight bytes: the dt model holds half the f32 one's matrix bytes */
    stage_config cfg;
    char err[ERRLEN];
    CU_ASSERT_FATAL(stage_config_load(as_f32, &cfg, err, sizeof err) == 0);
    stage_range r = {0, cfg.n_layers - 1, 1, 1};
    stage_model *m1 = NULL, *m2 = NULL;
    CU_ASSERT_FATAL(stage_model_load_dtype(as_f32, &cfg, r, -1, &m1, err, sizeof err) == 0);
    CU_ASSERT_FATAL(stage_model_load_dtype(as_dt, &cfg, r, -1, &m2, err, sizeof err) == 0);
    f32_bytes = stage_model_weight_bytes(m1);
    size_t dt_bytes = stage_model_weight_bytes(m2);
    CU_ASSERT(dt_bytes < f32_bytes * 0.52 && dt_bytes > f32_bytes * 0.49);
    stage_model_free(m1);
    stage_model_free(m2);
    stage_config_free(&cfg);
    free(a);
    free(b);
    free(c);
    rm_tmpdir(as_f32);
    rm_tmpdir(as_dt);
}
/* q8_0 weights (docs/SPEC.md §9) on fixture `name`: the q8_0 kernels give within 1e-4 of the
 * f32 computation on the dequantized values (the same tokens); against the fixture's exact
 * logits the weights' rounding stays within Q8_FIXTURE_BOUND with the same tokens, unless
 * `flips`: there a threshold routing decision (mod / mindskip) lies within the rounding of its
 * threshold and the runs part (measured: mod, mindskip, mixed), so only the first check holds;
 * the quantized matrices hold 34 bytes per 32 weights, everything else as stored. */
#define Q8_FIXTURE_BOUND 7.5e-2 /* measured worst 0.058 (mode_staged), random weights */
static void check_weights_q8(const char *name, int flips)
{
    fxm f;
    CU_ASSERT_FATAL(fx_open(name, &f) == 0);
    const int V = f.cfg.vocab;
    const size_t n = (size_t)NSEQ * NNEW * V;
    fx_close(&f);
    char src[1024], err[ERRLEN];
    snprintf(src, sizeof src, "%s/%s", fixtures(), name);
    char *deq = rewrite_fixture(name, STAGE_Q8_0, STAGE_F32); /* dequantized values, f32 */
    CU_ASSERT_FATAL(deq != NULL);
    float *a = calloc(n, sizeof *a), *c = calloc(n, sizeof *c);
    int32_t ta[NSEQ * NNEW], tc[NSEQ * NNEW], want_tok[NSEQ][NNEW];
    CU_ASSERT_FATAL(gen_dir(deq, -1, a, ta) == 0);         /* f32 kernels */
    CU_ASSERT_FATAL(gen_dir(src, STAGE_Q8_0, c, tc) == 0); /* quantized at load, q8_0 kernels */
    int64_t shape[3] = {NSEQ, NNEW, V};
    float *want = read_npy(name, "generate", 3, shape);
    CU_ASSERT_FATAL(want != NULL);
    CU_ASSERT_FATAL(read_gen_tokens(name, want_tok) == 0);
    double e = rel_err(c, a, n), eq = rel_err(c, want, n);
    int same_tok = !memcmp(tc, want_tok, sizeof tc);
    if (verbose() || !(e <= 1e-4) || (!flips && !(eq <= Q8_FIXTURE_BOUND)))
        fprintf(stderr,
                "\n  %s q8_0: rel err %.3g vs f32 on the dequantized values, %.3g vs the exact "
                "logits, tokens %s\n",
                name, e, eq, same_tok ? "as exact" : "differ from exact");
    CU_ASSERT(e <= 1e-4);
    CU_ASSERT(memcmp(ta, tc, sizeof ta) == 0);
    if (!flips) {
        CU_ASSERT(eq <= Q8_FIXTURE_BOUND);
        CU_ASSERT(same_tok);
    }
    /* bytes: the checkpoint's less (element size - 34/32) per weight of a quantized matrix */
    stage_config cfg;
    CU_ASSERT_FATAL(stage_config_load(src, &cfg, err, sizeof err) == 0);
    stage_range r = {0, cfg.n_layers - 1, 1, 1};
    stage_model *m1 = NULL, *m2 = NULL;
    CU_ASSERT_FATAL(stage_model_load_dtype(src, &cfg, r, -1, &m1, err, sizeof err) == 0);
    CU_ASSERT_FATAL(stage_model_load_dtype(src, &cfg, r, STAGE_Q8_0, &m2, err, sizeof err) == 0);
    st_model *in = NULL;
    CU_ASSERT_FATAL(st_open(src, &in, err, sizeof err) == 0);
    size_t saved = 0, quantized = 0;
    for (size_t i = 0; i < st_count(in); i++) {
        st_tensor t;
        CU_ASSERT_FATAL(st_find(in, st_name_at(in, i), &t, err, sizeof err) == 1);
        if (t.ndim != 2 || !stage_q8_quantizes(st_name_at(in, i))) continue;
        size_t rows = (size_t)t.shape[0], cols = (size_t)t.shape[1];
        saved += t.nbytes - rows * (cols + 2 * (size_t)stage_q8_blocks((int)cols));
        quantized++;
    }
    CU_ASSERT(quantized > 0);
    CU_ASSERT_EQUAL(stage_model_weight_bytes(m2), stage_model_weight_bytes(m1) - saved);
    st_close(in);
    stage_model_free(m1);
    stage_model_free(m2);
    stage_config_free(&cfg);
    free(a);
    free(c);
    free(want);
    rm_tmpdir(deq);
}
#define Q8_TEST(M, F)                                                                              \
    static void test_q8_##M(void) { check_weights_q8(#M, F); }
Q8_TEST(dense, 0)
Q8_TEST(mod, 1)
Q8_TEST(mod_all, 0)
Q8_TEST(mod_predictor, 0)
Q8_TEST(mode_staged, 0)
Q8_TEST(mode_integrated, 0)
Q8_TEST(mindskip, 1)
Q8_TEST(mindskip_token, 0)
Q8_TEST(mixed, 1)

static void test_weights_bf16_dense(void) { check_weights_dtype("dense", STAGE_BF16); }
static void test_weights_bf16_mixed(void) { check_weights_dtype("mixed", STAGE_BF16); }
static void test_weights_f16_mode_integrated(void)
{
    check_weights_dtype("mode_integrated", STAGE_F16);
}
static void test_weights_f16_mod(void) { check_weights_dtype("mod", STAGE_F16); }
/* the block variants of docs/SPEC.md §10 (biases, q/k norms stay f32 vectors) */
static void test_weights_bf16_qwen3_mod(void) { check_weights_dtype("arch/qwen3_mod", STAGE_BF16); }
static void test_weights_f16_mistral_mod(void)
{
    check_weights_dtype("arch/mistral_mod", STAGE_F16);
}
static void test_weights_bf16_llama3(void) { check_weights_dtype("arch/llama3", STAGE_BF16); }

/* Weights on 2 MiB pages (stage/wmem.h): the matrices copied into the arena give the same bits
 * as read in place, stored f32 (the mixed fixture: every layer kind), converted at load to
 * bf16 and q8_0, and stored as q8_0 (modpipe quantize); the copies are counted (each matrix
 * plus at most 127 bytes of alignment), none without it. */
static void test_huge_pages(void)
{
    char src[1024], err[ERRLEN];
    snprintf(src, sizeof src, "%s/mixed", fixtures());
    char *q8 = make_tmpdir();
    CU_ASSERT_FATAL(q8 && cli_quantize(src, q8, NULL, 0, NULL, err, sizeof err) == 0);
    fxm f;
    CU_ASSERT_FATAL(fx_open("mixed", &f) == 0);
    const size_t n = (size_t)NSEQ * NNEW * f.cfg.vocab;
    fx_close(&f);
    float *a = calloc(n, sizeof *a), *b = calloc(n, sizeof *b);
    int32_t ta[NSEQ * NNEW], tb[NSEQ * NNEW];
    const char *dirs[4] = {src, src, src, q8};
    const int wdt[4] = {-1, STAGE_BF16, STAGE_Q8_0, -1};
    for (int i = 0; i < 4; i++) {
        CU_ASSERT_FATAL(gen_dir(dirs[i], wdt[i], a, ta) == 0);
        stage_wmem_set_huge(1);
        CU_ASSERT_FATAL(gen_dir(dirs[i], wdt[i], b, tb) == 0);
        CU_ASSERT(memcmp(a, b, n * sizeof *a) == 0);
        CU_ASSERT(memcmp(ta, tb, sizeof ta) == 0);
        stage_config cfg;
        CU_ASSERT_FATAL(stage_config_load(dirs[i], &cfg, err, sizeof err) == 0);
        stage_range r = {0, cfg.n_layers - 1, 1, 1};
        stage_model *m = NULL;
        st_model *st = NULL;
        CU_ASSERT_FATAL(stage_model_load_dtype(dirs[i], &cfg, r, wdt[i], &m, err, sizeof err) == 0);
        CU_ASSERT_FATAL(st_open(dirs[i], &st, err, sizeof err) == 0);
        size_t want = 0, slack = 0;
        for (size_t e = 0; e < st_count(st); e++) {
            const char *nm = st_name_at(st, e);
            st_tensor t;
            CU_ASSERT_FATAL(st_find(st, nm, &t, err, sizeof err) == 1);
            if (t.ndim != 2 || strstr(nm, "_scale") || strstr(nm, "router") ||
                (!cfg.tie_embeddings && !strcmp(nm, "model.embed_tokens.weight")))
                continue;
            stage_weight w;
            CU_ASSERT_FATAL(
                st_get_weight(st, nm, t.shape[0], t.shape[1], wdt[i], &w, err, sizeof err) == 0);
            want += stage_weight_bytes(&w);
            slack += 2 * 127;
        }
        size_t backed = 0, got = stage_model_huge_bytes(m, &backed);
        if (verbose() || got < want || got > want + slack)
            fprintf(stderr, "\n  huge pages %s (dtype %d): %zu bytes copied, matrices %zu\n",
                    dirs[i], wdt[i], got, want);
        CU_ASSERT(got >= want && got <= want + slack);
        stage_model_free(m);
        stage_wmem_set_huge(0);
        CU_ASSERT_FATAL(stage_model_load_dtype(dirs[i], &cfg, r, wdt[i], &m, err, sizeof err) == 0);
        CU_ASSERT_EQUAL(stage_model_huge_bytes(m, &backed), 0);
        stage_model_free(m);
        st_close(st);
        stage_config_free(&cfg);
    }
    free(a);
    free(b);
    rm_tmpdir(q8);
}

/* ---- 4. KV cache vs recompute ---------------------------------------------------------------- */

static void check_recompute(const char *name)
{
    fxm f;
    if (fx_open(name, &f)) {
        CU_FAIL("fixture model does not load");
        return;
    }
    const int V = f.cfg.vocab;
    float *cached = malloc((size_t)NNEW * V * sizeof *cached);
    float *full = malloc((size_t)NNEW * V * sizeof *full);
    stage_state *st = state_new(f.m, 1, 16, 64);
    CU_ASSERT_FATAL(st != NULL);
    double worst = 0.0;
    for (int s = 0; s < NSEQ; s++) {
        int32_t toks[NNEW];
        CU_ASSERT_FATAL(gen_one(st, f.m, s, 0, cached, toks) == 0);
        /* prompt + the first NNEW-1 generated tokens in one forward, fresh state: prompt rows
         * flagged PROMPT, generated rows as decode rows */
        const int P = PLEN[s], n = P + NNEW - 1;
        int32_t sl[16], ps[16], tk[16];
        uint8_t fl[16];
        for (int i = 0; i < n; i++) {
            sl[i] = 0;
            ps[i] = i;
            tk[i] = i < P ? PROMPTS[s][i] : toks[i - P];
            fl[i] = i < P ? STAGE_ROW_PROMPT : 0;
            if (i >= P - 1) fl[i] |= STAGE_ROW_NEED_LOGITS;
        }
        stage_state *st2 = state_new(f.m, 1, 16, 64);
        CU_ASSERT_FATAL(st2 != NULL);
        CU_ASSERT_EQUAL(run_rows(st2, f.m, n, sl, ps, tk, fl, full), NNEW);
        stage_state_free(st2);
        double e = rel_err(full, cached, (size_t)NNEW * V);
        if (e > worst) worst = e;
        for (int j = 0; j < NNEW; j++) CU_ASSERT_EQUAL(argmax(full + (size_t)j * V, V), toks[j]);
    }
    if (verbose() || !(worst <= 1e-5))
        fprintf(stderr, "\n  %s cache vs recompute: rel err %.3g\n", name, worst);
    CU_ASSERT(worst <= 1e-5);
    stage_state_free(st);
    free(cached);
    free(full);
    fx_close(&f);
}

#define RECOMP_TEST(M)                                                                             \
    static void test_recompute_##M(void) { check_recompute(#M); }
RECOMP_TEST(dense)
RECOMP_TEST(mod)
RECOMP_TEST(mod_all)
RECOMP_TEST(mod_predictor)
RECOMP_TEST(mode_staged)
RECOMP_TEST(mode_integrated)
RECOMP_TEST(mindskip)
RECOMP_TEST(mindskip_token)
RECOMP_TEST(mixed)

/* KV entries of each routed layer == rows its router selected (decided here on the layer's
 * input, running the stage one layer at a time); dense-attention layers hold every row. The
 * layer-at-a-time run must give the same bits as a whole-stage forward. */
static void check_kv_entries(const char *name)
{
    fxm f;
    if (fx_open(name, &f)) {
        CU_FAIL("fixture model does not load");
        return;
    }
    const stage_config *c = &f.cfg;
    const int D = c->hidden, L = c->n_layers;
    stage_state *st = state_new(f.m, 2, 16, 64), *ref = state_new(f.m, 2, 16, 64);
    CU_ASSERT_FATAL(st && ref);
    uint64_t want[16] = {0}, rows = 0;
    int partial = 0;
    char err[ERRLEN];
    for (int s = 0; s < NSEQ; s++) {
        /* prefill, then 3 decode rows (token ids arbitrary) */
        for (int step = 0; step < 4; step++) {
            int32_t sl[8], ps[8], tk[8];
            uint8_t fl[8], present[8];
            int n = step == 0 ? PLEN[s] : 1;
            for (int i = 0; i < n; i++) {
                sl[i] = s % 2;
                ps[i] = step == 0 ? i : PLEN[s] + step - 1;
                tk[i] = step == 0 ? PROMPTS[s][i] : (17 * step + s) % c->vocab;
                fl[i] = step == 0 ? STAGE_ROW_PROMPT : STAGE_ROW_NEED_LOGITS;
                present[i] = 1;
            }
            stage_batch b = {.n = n, .slot = sl, .pos = ps, .token = tk, .flags = fl};
            float x[8 * 64], x2[8 * 64];
            CU_ASSERT_FATAL(D <= 64);
            CU_ASSERT_EQUAL(stage_embed(f.m, tk, n, x, err, sizeof err), 0);
            memcpy(x2, x, (size_t)n * D * sizeof(float));
            for (int l = 0; l < L; l++) {
                if (stage_kind_is_routed(c->layer_kind[l])) {
                    int cnt = 0;
                    for (int i = 0; i < n; i++)
                        cnt += stage_router_selects(f.m, l, x + (size_t)i * D);
                    want[l] += (uint64_t)cnt;
                } else {
                    want[l] += (uint64_t)n;
                }
                CU_ASSERT_EQUAL(stage_forward_range(st, &b, x, present, l, l, err, sizeof err), 0);
            }
            rows += (uint64_t)n;
            CU_ASSERT_EQUAL(stage_forward(ref, &b, x2, present, err, sizeof err), 0);
            CU_ASSERT(memcmp(x, x2, (size_t)n * D * sizeof(float)) == 0);
        }
    }
    for (int l = 0; l < L; l++) {
        const stage_layer_stats *ls = stage_state_layer_stats(st, l);
        CU_ASSERT_FATAL(ls != NULL);
        CU_ASSERT_EQUAL(ls->rows, rows);
        if (c->layer_kind[l] == STAGE_KIND_MINDSKIP) continue; /* decided per sequence */
        if (ls->kv_entries != want[l])
            fprintf(stderr, "\n  %s layer %d: kv_entries %llu, router selected %llu\n", name, l,
                    (unsigned long long)ls->kv_entries, (unsigned long long)want[l]);
        CU_ASSERT_EQUAL(ls->kv_entries, want[l]);
        if (stage_kind_is_routed(c->layer_kind[l])) {
            CU_ASSERT_EQUAL(ls->active, want[l]);
            if (want[l] > 0 && want[l] < rows) partial++;
        }
    }
    CU_ASSERT(partial > 0); /* the routers really skipped some rows and took others */
    stage_state_free(st);
    stage_state_free(ref);
    fx_close(&f);
}

static void test_kv_entries_mod(void) { check_kv_entries("mod"); }
static void test_kv_entries_mod_all(void) { check_kv_entries("mod_all"); }
static void test_kv_entries_mod_predictor(void) { check_kv_entries("mod_predictor"); }
static void test_kv_entries_mode_staged(void) { check_kv_entries("mode_staged"); }
static void test_kv_entries_mixed(void) { check_kv_entries("mixed"); }

/* Without a --kv-mem budget the page pool holds every position of every slot on every layer
 * (K + V + an int32 position per entry), routed or not; tests/test_kv.c checks the pages a
 * routed layer actually takes. */
static void test_kv_alloc_capacity(void)
{
    fxm d, m;
    if (fx_open("dense", &d)) {
        CU_FAIL("dense");
        return;
    }
    if (fx_open("mod_all", &m)) {
        CU_FAIL("mod_all");
        fx_close(&d);
        return;
    }
    stage_state *sd = state_new(d.m, 4, 8, 256), *sm = state_new(m.m, 4, 8, 256);
    CU_ASSERT_FATAL(sd && sm);
    size_t bd = stage_state_kv_alloc_bytes(sd), bm = stage_state_kv_alloc_bytes(sm);
    const size_t kvd = (size_t)d.cfg.n_kv_heads * d.cfg.head_dim;
    CU_ASSERT_EQUAL(bd, (size_t)6 * 4 * 256 * (kvd * 2 * sizeof(float) + sizeof(int32_t)));
    CU_ASSERT_EQUAL(bm, bd);
    CU_ASSERT_EQUAL(stage_state_slots(sd), 4);
    CU_ASSERT_EQUAL(stage_state_ctx(sd), 256);
    stage_state_free(sd);
    stage_state_free(sm);
    fx_close(&d);
    fx_close(&m);
}

/* Reset / release: a released slot rejects rows until a new prompt starts there; a slot past
 * its ctx is an error, not a reallocation; reuse after a reset gives the same logits. */
static void test_slot_reset_release(void)
{
    fxm f;
    if (fx_open("dense", &f)) {
        CU_FAIL("dense");
        return;
    }
    stage_state *st = state_new(f.m, 2, 8, 4);
    CU_ASSERT_FATAL(st != NULL);
    const int D = f.cfg.hidden;
    float x[8 * 64], y[8 * 64];
    CU_ASSERT_FATAL(D <= 64);
    int32_t slot[4] = {1, 1, 1, 1}, pos[4] = {0, 1, 2, 3}, tok[4] = {5, 6, 7, 8};
    uint8_t fl[4] = {STAGE_ROW_PROMPT, STAGE_ROW_PROMPT, STAGE_ROW_PROMPT, STAGE_ROW_PROMPT};
    uint8_t present[4] = {1, 1, 1, 1};
    char err[256];
    stage_batch b = {.n = 4, .slot = slot, .pos = pos, .token = tok, .flags = fl};
    CU_ASSERT_EQUAL_FATAL(stage_embed(f.m, tok, 4, x, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(stage_forward(st, &b, x, present, err, sizeof err), 0);
    CU_ASSERT_EQUAL(stage_state_slot_len(st, 1), 4);
    CU_ASSERT_EQUAL(stage_state_slot_len(st, 0), 0);
    /* position 4 is past ctx 4 */
    int32_t p4 = 4, t4 = 9, s1 = 1;
    uint8_t f0 = 0, one = 1;
    stage_batch d = {.n = 1, .slot = &s1, .pos = &p4, .token = &t4, .flags = &f0};
    CU_ASSERT_EQUAL(stage_embed(f.m, &t4, 1, y, err, sizeof err), 0);
    CU_ASSERT_NOT_EQUAL(stage_forward(st, &d, y, &one, err, sizeof err), 0);
    CU_ASSERT(strstr(err, "4 positions") != NULL);
    /* released: a decode row is rejected, a new prompt is accepted */
    stage_state_slot_release(st, 1);
    CU_ASSERT_EQUAL(stage_state_slot_len(st, 1), 0);
    int32_t p1 = 1;
    stage_batch d1 = {.n = 1, .slot = &s1, .pos = &p1, .token = &t4, .flags = &f0};
    CU_ASSERT_NOT_EQUAL(stage_forward(st, &d1, y, &one, err, sizeof err), 0);
    CU_ASSERT(strstr(err, "released") != NULL);
    CU_ASSERT_EQUAL_FATAL(stage_embed(f.m, tok, 4, y, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(stage_forward(st, &b, y, present, err, sizeof err), 0);
    CU_ASSERT(memcmp(x, y, (size_t)4 * D * sizeof(float)) == 0); /* same as the first use */
    /* explicit reset also re-opens a released slot */
    stage_state_slot_release(st, 0);
    stage_state_slot_reset(st, 0);
    int32_t s0 = 0, p0 = 0;
    stage_batch d0 = {.n = 1, .slot = &s0, .pos = &p0, .token = &t4, .flags = &f0};
    CU_ASSERT_EQUAL(stage_embed(f.m, &t4, 1, y, err, sizeof err), 0);
    CU_ASSERT_EQUAL(stage_forward(st, &d0, y, &one, err, sizeof err), 0);
    stage_state_free(st);
    fx_close(&f);
}

/* One generator per draw: a function of (seed, seq, step) only. */
static void test_rng_seed_draw(void)
{
    stage_rng a, b;
    stage_rng_seed_draw(&a, 7, 3, 11);
    stage_rng_seed_draw(&b, 7, 3, 11);
    CU_ASSERT(stage_rng_uniform(&a) == stage_rng_uniform(&b));
    double u[4];
    uint64_t args[4][3] = {{7, 3, 11}, {7, 3, 12}, {7, 4, 11}, {8, 3, 11}};
    for (int i = 0; i < 4; i++) {
        stage_rng_seed_draw(&a, args[i][0], args[i][1], args[i][2]);
        u[i] = stage_rng_uniform(&a);
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < i; j++) CU_ASSERT(u[i] != u[j]);
    /* first draws over many steps look uniform: mean 0.5 +- 4 sigma (sigma = 1/sqrt(12 n)) */
    double sum = 0;
    const int n = 20000;
    for (int k = 0; k < n; k++) {
        stage_rng_seed_draw(&a, 5, 0, (uint64_t)k);
        sum += stage_rng_uniform(&a);
    }
    CU_ASSERT(fabs(sum / n - 0.5) < 4.0 / sqrt(12.0 * n));
}

/* ---- main ------------------------------------------------------------------------------------ */

int main(void)
{
    static const test_def fixtures_t[] = {
        T_(test_gen_dense),
        T_(test_gen_mod),
        T_(test_gen_mod_all),
        T_(test_gen_mod_predictor),
        T_(test_gen_mode_staged),
        T_(test_gen_mode_integrated),
        T_(test_gen_mindskip),
        T_(test_gen_mindskip_token),
        T_(test_gen_mixed),
        T_(test_eval_dense),
        T_(test_eval_mod),
        T_(test_eval_mod_topk),
        T_(test_eval_mixed),
        T_(test_weights_bf16_dense),
        T_(test_weights_bf16_mixed),
        T_(test_weights_f16_mode_integrated),
        T_(test_weights_f16_mod),
        T_(test_q8_dense),
        T_(test_q8_mod),
        T_(test_q8_mod_all),
        T_(test_q8_mod_predictor),
        T_(test_q8_mode_staged),
        T_(test_q8_mode_integrated),
        T_(test_q8_mindskip),
        T_(test_q8_mindskip_token),
        T_(test_q8_mixed),
        T_(test_weights_bf16_qwen3_mod),
        T_(test_weights_f16_mistral_mod),
        T_(test_weights_bf16_llama3),
        T_(test_huge_pages),
    };
    static const test_def cache[] = {
        T_(test_recompute_dense),        T_(test_recompute_mod),
        T_(test_recompute_mod_all),      T_(test_recompute_mod_predictor),
        T_(test_recompute_mode_staged),  T_(test_recompute_mode_integrated),
        T_(test_recompute_mindskip),     T_(test_recompute_mindskip_token),
        T_(test_recompute_mixed),        T_(test_kv_entries_mod),
        T_(test_kv_entries_mod_all),     T_(test_kv_entries_mod_predictor),
        T_(test_kv_entries_mode_staged), T_(test_kv_entries_mixed),
        T_(test_kv_alloc_capacity),      T_(test_slot_reset_release),
        T_(test_rng_seed_draw),
    };
    static const suite_def all[] = {
        {"fixtures", fixtures_t, N_(fixtures_t)},
        {"cache", cache, N_(cache)},
        {NULL, NULL, 0},
    };
    return run_suites(all);
}
