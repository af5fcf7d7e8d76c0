/* tests/test_layers.c — every layer type (docs/SPEC.md §2) on a tiny 1-layer model written
 * with st_writer (tests/stage_util.h), compared with a reference single-layer forward written
 * from docs/SPEC.md §2 in double precision, and two cases whose answers are worked out by hand
 * (section 3 of the stage tests; tests/test_stage.c has the others).
 * Run from the repository root. MODPIPE_TEST_VERBOSE=1 prints the measured errors.
 */
#include "tests/stage_util.h"

/* ---- the reference, in double, straight from docs/SPEC.md §2 --------------------------------- */

typedef struct {
    int att;       /* routed: selected; mindskip: attention kept; others: 1 */
    int tok_keep;  /* mindskip: the per-token decision sigmoid(w.h_t) > threshold */
    int winner;    /* MoE: the (first) chosen gate row */
    double r;      /* router score w.x + b */
    double xp[TD]; /* x' = x + a (x where attention is skipped) */
} ref_row;

static double sigm(double z) { return 1.0 / (1.0 + exp(-z)); }
static double silu_d(double z) { return z / (1.0 + exp(-z)); }

static void ref_rms(const double *x, const float *w, double eps, double *y)
{
    double ss = 0.0;
    for (int i = 0; i < TD; i++) ss += x[i] * x[i];
    double inv = 1.0 / sqrt(ss / TD + eps);
    for (int i = 0; i < TD; i++) y[i] = x[i] * inv * w[i];
}

/* y [n_out] = W [n_out][n_in] x */
static void ref_lin(const float *W, int n_out, int n_in, const double *x, double *y)
{
    for (int o = 0; o < n_out; o++) {
        double s = 0.0;
        for (int i = 0; i < n_in; i++) s += (double)W[o * n_in + i] * x[i];
        y[o] = s;
    }
}

static void ref_swiglu(const float *wg, const float *wu, const float *wd, int I, const double *h,
                       double *out)
{
    double g[TI], u[TI];
    ref_lin(wg, I, TD, h, g);
    ref_lin(wu, I, TD, h, u);
    for (int i = 0; i < I; i++) g[i] = silu_d(g[i]) * u[i];
    ref_lin(wd, TD, I, g, out);
}

static void ref_rope(double *v, int nheads, int pos, double theta)
{
    for (int h = 0; h < nheads; h++)
        for (int i = 0; i < THD / 2; i++) {
            double ang = pos * pow(theta, -2.0 * i / THD);
            double a = v[h * THD + i], b = v[h * THD + i + THD / 2];
            v[h * THD + i] = a * cos(ang) - b * sin(ang);
            v[h * THD + i + THD / 2] = b * cos(ang) + a * sin(ang);
        }
}

/* MoE of h2 into out; returns the first chosen gate row. */
static int ref_moe(const tiny *t, const double *h2, double *out)
{
    const int integrated = t->kind == STAGE_KIND_MODE_INTEGRATED;
    const int G = t->E + (integrated ? t->n_noop : 0), k = integrated ? 1 : t->ept;
    double g[TG], mx = -INFINITY, sum = 0.0;
    ref_lin(t->gate, G, TD, h2, g);
    for (int e = 0; e < G; e++) mx = g[e] > mx ? g[e] : mx;
    for (int e = 0; e < G; e++) sum += (g[e] = exp(g[e] - mx));
    for (int e = 0; e < G; e++) g[e] /= sum;
    int chosen[TG], first = -1;
    double wsum = 0.0;
    for (int t2 = 0; t2 < k; t2++) {
        int best = -1;
        for (int e = 0; e < G; e++) {
            int taken = 0;
            for (int u = 0; u < t2; u++) taken |= chosen[u] == e;
            if (!taken && (best < 0 || g[e] > g[best])) best = e;
        }
        chosen[t2] = best;
        wsum += g[best];
        if (first < 0) first = best;
    }
    for (int i = 0; i < TD; i++) out[i] = 0.0;
    for (int t2 = 0; t2 < k; t2++) {
        int e = chosen[t2];
        if (e >= t->E) continue; /* no-op expert: m = 0 */
        double w = integrated ? g[e] : g[e] / wsum, eo[TD];
        ref_swiglu(t->w1[e], t->w3[e], t->w2[e], TIE, h2, eo);
        for (int i = 0; i < TD; i++) out[i] += w * eo[i];
    }
    return first;
}

/* One sequence's rows (its whole history at this layer, in position order) through the tiny
 * layer. prompt[t]: the row is a prompt row (mindskip sequence decision). kv_all: for a
 * routed layer, let unselected rows write K/V anyway (what a wrong implementation would do;
 * used to show that the tests tell the difference). For topk the T rows are one forward. */
static void ref_layer(const tiny *t, int T, const float *x, const int *pos, const int *prompt,
                      int kv_all, double *y, ref_row *info)
{
    double xd[RMAX][TD], h[RMAX][TD], q[RMAX][TQD], k[RMAX][TKVD], v[RMAX][TKVD];
    const int routed = stage_kind_is_routed(t->kind);
    const double rb = t->has_rb ? t->rb : 0.0;
    for (int r = 0; r < T; r++) {
        memset(&info[r], 0, sizeof info[r]);
        for (int i = 0; i < TD; i++) xd[r][i] = x[r * TD + i];
        ref_rms(xd[r], t->ln1, t->eps, h[r]);
        double s = rb;
        for (int i = 0; i < TD; i++) s += (double)t->rw[i] * xd[r][i];
        info[r].r = s;
        info[r].att = 1;
    }
    if (routed) {
        for (int r = 0; r < T; r++) {
            if (!strcmp(t->routing, "topk")) {
                int kk = (int)floor(t->capacity * T), rank = 0;
                if (kk < 1) kk = 1;
                for (int u = 0; u < T; u++)
                    rank += info[u].r > info[r].r || (info[u].r == info[r].r && pos[u] < pos[r]);
                info[r].att = rank < kk;
            } else if (!strcmp(t->routing, "predictor")) {
                double z = t->pb2;
                for (int j = 0; j < TPH; j++) {
                    double a = t->pb1[j];
                    for (int i = 0; i < TD; i++) a += (double)t->p1[j * TD + i] * xd[r][i];
                    z += t->p2[j] * silu_d(a);
                }
                info[r].att = sigm(z) > t->mod_thr;
            } else {
                info[r].att = sigm(info[r].r) > t->mod_thr;
            }
        }
    } else if (t->kind == STAGE_KIND_MINDSKIP) {
        double mean[TD] = {0}, cnt = 0;
        for (int r = 0; r < T; r++) {
            double s = rb;
            for (int i = 0; i < TD; i++) s += (double)t->rw[i] * h[r][i];
            info[r].tok_keep = sigm(s) > t->ms_thr;
            if (prompt[r]) {
                for (int i = 0; i < TD; i++) mean[i] += h[r][i];
                cnt++;
            }
        }
        double s = rb;
        for (int i = 0; i < TD; i++) s += (double)t->rw[i] * mean[i] / cnt;
        int keep = sigm(s) > t->ms_thr;
        for (int r = 0; r < T; r++)
            info[r].att = strcmp(t->gran, "token") ? keep : info[r].tok_keep;
    }
    for (int r = 0; r < T; r++) {
        ref_lin(t->wq, TQD, TD, h[r], q[r]);
        ref_lin(t->wk, TKVD, TD, h[r], k[r]);
        ref_lin(t->wv, TKVD, TD, h[r], v[r]);
        ref_rope(q[r], TNH, pos[r], t->theta);
        ref_rope(k[r], TNKV, pos[r], t->theta);
    }
    for (int r = 0; r < T; r++) {
        double a[TD] = {0};
        if (info[r].att) {
            double o[TQD];
            for (int hh = 0; hh < TNH; hh++) {
                int kh = hh / (TNH / TNKV);
                double sc[RMAX], mx = -INFINITY, sum = 0.0;
                for (int u = 0; u <= r; u++) {
                    sc[u] = -INFINITY;
                    if (!(info[u].att || (routed && kv_all))) continue;
                    double d = 0.0;
                    for (int i = 0; i < THD; i++) d += q[r][hh * THD + i] * k[u][kh * THD + i];
                    sc[u] = d / sqrt((double)THD);
                    if (sc[u] > mx) mx = sc[u];
                }
                for (int u = 0; u <= r; u++) sum += (sc[u] = isinf(sc[u]) ? 0.0 : exp(sc[u] - mx));
                for (int i = 0; i < THD; i++) {
                    double acc = 0.0;
                    for (int u = 0; u <= r; u++) acc += sc[u] / sum * v[u][kh * THD + i];
                    o[hh * THD + i] = acc;
                }
            }
            ref_lin(t->wo, TD, TQD, o, a);
        }
        double *yr = y + r * TD;
        if (routed && !info[r].att) {
            for (int i = 0; i < TD; i++) yr[i] = info[r].xp[i] = xd[r][i];
            continue;
        }
        double h2[TD], m[TD];
        for (int i = 0; i < TD; i++) info[r].xp[i] = xd[r][i] + a[i];
        ref_rms(info[r].xp, t->ln2, t->eps, h2);
        if (t->kind == STAGE_KIND_MODE_STAGED || t->kind == STAGE_KIND_MODE_INTEGRATED)
            info[r].winner = ref_moe(t, h2, m);
        else
            ref_swiglu(t->wg, t->wu, t->wd, TI, h2, m);
        if (routed) {
            double g = t->scale_sigmoid ? sigm(info[r].r) : info[r].r;
            for (int i = 0; i < TD; i++) yr[i] = xd[r][i] + g * (a[i] + m[i]);
        } else {
            for (int i = 0; i < TD; i++) yr[i] = info[r].xp[i] + m[i];
        }
    }
}

/* max |got - want| <= tol * max(1, max |want|) over n values */
static int close_rows(const float *got, const double *want, int n, double tol, const char *what)
{
    double mx = 1.0, d = 0.0;
    for (int i = 0; i < n; i++) {
        if (fabs(want[i]) > mx) mx = fabs(want[i]);
        double e = fabs((double)got[i] - want[i]);
        if (e > d || isnan(e)) d = isnan(e) ? INFINITY : e;
    }
    int ok = d <= tol * mx;
    if (!ok) {
        fprintf(stderr, "\n  %s: max err %.3g (scale %.3g)\n", what, d, mx);
        for (int i = 0; i < n; i++)
            if (fabs((double)got[i] - want[i]) > tol * mx)
                fprintf(stderr, "    [%d] got %.7g want %.7g\n", i, got[i], want[i]);
    }
    return ok;
}

enum { MODE_ONE = 1, MODE_PREFILL_DECODE = 2, MODE_ROWWISE = 4 };

/* One sequence of T rows (first P are prompt rows) with inputs x [T][TD] through the tiny
 * layer in each of `modes`, checked row by row against the reference; unselected rows of a
 * routed layer must come back bit for bit; the layer's stats must count the K/V entries the
 * reference says it writes. info (optional) gets the reference's per-row decisions. */
static void tiny_check_seq(const tiny *t, const stage_model *m, int T, int P, const float *x,
                           int modes, const char *what, ref_row *info_out)
{
    double y[RMAX * TD];
    ref_row info[RMAX];
    int pos[RMAX] = {0}, prm[RMAX] = {0};
    for (int r = 0; r < T; r++) {
        pos[r] = r;
        prm[r] = r < P;
    }
    ref_layer(t, T, x, pos, prm, 0, y, info);
    if (info_out) memcpy(info_out, info, (size_t)T * sizeof *info);
    int natt = 0;
    for (int r = 0; r < T; r++) natt += info[r].att;

    for (int mode = 1; mode <= MODE_ROWWISE; mode <<= 1) {
        if (!(modes & mode)) continue;
        char err[ERRLEN], label[128];
        snprintf(label, sizeof label, "%s (mode %d)", what, mode);
        stage_state *st = state_new(m, 2, RMAX, 64);
        CU_ASSERT_FATAL(st != NULL);
        float out[RMAX * TD];
        int32_t slot[RMAX], ps[RMAX];
        uint8_t fl[RMAX];
        memcpy(out, x, (size_t)T * TD * sizeof(float));
        for (int r = 0; r < T; r++) {
            slot[r] = 0;
            ps[r] = r;
            fl[r] = r < P ? STAGE_ROW_PROMPT : STAGE_ROW_NEED_LOGITS;
        }
        int starts[RMAX + 1], nb = 0;
        if (mode == MODE_ONE) {
            starts[nb++] = 0;
        } else if (mode == MODE_PREFILL_DECODE) {
            starts[nb++] = 0;
            for (int r = P; r < T; r++) starts[nb++] = r;
        } else {
            for (int r = 0; r < T; r++) starts[nb++] = r;
        }
        starts[nb] = T;
        int rc = 0;
        for (int bi = 0; bi < nb && !rc; bi++) {
            int a = starts[bi], n = starts[bi + 1] - a;
            if (n <= 0) continue;
            rc = fwd_rows(st, n, slot + a, ps + a, fl + a, out + (size_t)a * TD, err, sizeof err);
            if (rc) fprintf(stderr, "\n  %s: %s\n", label, err);
        }
        CU_ASSERT_EQUAL(rc, 0);
        for (int r = 0; r < T && !rc; r++) {
            char l2[160];
            snprintf(l2, sizeof l2, "%s row %d", label, r);
            CU_ASSERT(close_rows(out + r * TD, y + r * TD, TD, 2e-5, l2));
            if (stage_kind_is_routed(t->kind) && !info[r].att)
                CU_ASSERT(memcmp(out + r * TD, x + r * TD, TD * sizeof(float)) == 0);
        }
        const stage_layer_stats *ls = stage_state_layer_stats(st, 0);
        CU_ASSERT_FATAL(ls != NULL);
        CU_ASSERT_EQUAL(ls->kv_entries, (uint64_t)natt);
        CU_ASSERT_EQUAL(ls->rows, (uint64_t)T);
        if (stage_kind_is_routed(t->kind) || t->kind == STAGE_KIND_MINDSKIP)
            CU_ASSERT_EQUAL(ls->active, (uint64_t)natt);
        stage_state_free(st);
    }
}

/* Several sequences' rows interleaved round-robin in ONE micro-batch, sequence q in slot q;
 * every row against its own sequence's reference. */
static void tiny_check_interleaved(const tiny *t, const stage_model *m, int nseq, const int *T,
                                   const int *P, const float *const *xs, const char *what)
{
    double y[4][RMAX * TD];
    ref_row info[4][RMAX];
    float out[4 * RMAX * TD];
    int32_t slot[4 * RMAX], ps[4 * RMAX];
    uint8_t fl[4 * RMAX];
    int who[4 * RMAX], idx[4 * RMAX], n = 0, maxT = 0;
    for (int q = 0; q < nseq; q++) {
        int pos[RMAX] = {0}, prm[RMAX] = {0};
        for (int r = 0; r < T[q]; r++) {
            pos[r] = r;
            prm[r] = r < P[q];
        }
        ref_layer(t, T[q], xs[q], pos, prm, 0, y[q], info[q]);
        if (T[q] > maxT) maxT = T[q];
    }
    for (int r = 0; r < maxT; r++)
        for (int q = 0; q < nseq; q++) {
            if (r >= T[q]) continue;
            who[n] = q;
            idx[n] = r;
            slot[n] = q;
            ps[n] = r;
            fl[n] = r < P[q] ? STAGE_ROW_PROMPT : STAGE_ROW_NEED_LOGITS;
            memcpy(out + (size_t)n * TD, xs[q] + (size_t)r * TD, TD * sizeof(float));
            n++;
        }
    char err[ERRLEN];
    stage_state *st = state_new(m, 4, 4 * RMAX, 64);
    CU_ASSERT_FATAL(st != NULL);
    int rc = fwd_rows(st, n, slot, ps, fl, out, err, sizeof err);
    if (rc) fprintf(stderr, "\n  %s: %s\n", what, err);
    CU_ASSERT_EQUAL(rc, 0);
    for (int i = 0; i < n && !rc; i++) {
        char l2[160];
        snprintf(l2, sizeof l2, "%s seq %d row %d", what, who[i], idx[i]);
        CU_ASSERT(close_rows(out + (size_t)i * TD, y[who[i]] + (size_t)idx[i] * TD, TD, 2e-5, l2));
    }
    stage_state_free(st);
}

/* x rows: x[r][0] = x0[r], the rest small values (multiples of 1/16). */
static void make_x(float *x, int T, const float *x0, uint32_t seed)
{
    g_lcg = seed;
    for (int r = 0; r < T; r++) {
        for (int i = 0; i < TD; i++) x[r * TD + i] = rnd_q() * 1.5f;
        x[r * TD] = x0[r];
    }
}

/* Hand-checkable weights: q = k = 0 (uniform attention over the attended rows), v = h[0..4),
 * o = identity (both heads share the one KV head, so a = [mean v, mean v]), down_proj = 0
 * (m = 0). Rows of +-2 have rms 2, so h = x / 2. */
static void tiny_hand(tiny *t)
{
    for (int i = 0; i < TD; i++) t->ln1[i] = 1.0f;
    memset(t->wq, 0, sizeof t->wq);
    memset(t->wk, 0, sizeof t->wk);
    memset(t->wv, 0, sizeof t->wv);
    memset(t->wo, 0, sizeof t->wo);
    memset(t->wd, 0, sizeof t->wd);
    for (int i = 0; i < TKVD; i++) t->wv[i * TD + i] = 1.0f;
    for (int i = 0; i < TD; i++) t->wo[i * TQD + i] = 1.0f;
}

static const float HAND_X[3 * TD] = {
    2,  2,  -2, 2,  2,  -2, 2,  2,  /* h[0..4) = [ 1, 1,-1, 1] */
    -2, 2,  2,  -2, 2,  2,  -2, 2,  /* h[0..4) = [-1, 1, 1,-1] */
    2,  -2, 2,  2,  -2, 2,  2,  -2, /* h[0..4) = [ 1,-1, 1, 1] */
};

static void check_hand(const tiny *t, const stage_model *m, const double *want, const char *what)
{
    /* the reference agrees with the hand answer (validates the reference itself) */
    double y[3 * TD];
    ref_row info[3];
    int pos[3] = {0, 1, 2}, prm[3] = {1, 1, 1};
    ref_layer(t, 3, HAND_X, pos, prm, 0, y, info);
    for (int i = 0; i < 3 * TD; i++) ASSERT_NEAR(y[i], want[i], 1e-6, "reference vs hand");
    /* the engine, all rows at once and one by one */
    for (int mode = 0; mode < 2; mode++) {
        char err[ERRLEN];
        stage_state *st = state_new(m, 1, 4, 16);
        CU_ASSERT_FATAL(st != NULL);
        float out[3 * TD];
        memcpy(out, HAND_X, sizeof out);
        int32_t slot[3] = {0, 0, 0}, ps[3] = {0, 1, 2};
        uint8_t fl[3] = {STAGE_ROW_PROMPT, STAGE_ROW_PROMPT, STAGE_ROW_PROMPT};
        int rc = 0;
        if (mode == 0) rc = fwd_rows(st, 3, slot, ps, fl, out, err, sizeof err);
        for (int r = 0; r < 3 && mode == 1 && !rc; r++)
            rc = fwd_rows(st, 1, slot + r, ps + r, fl + r, out + r * TD, err, sizeof err);
        if (rc) fprintf(stderr, "\n  %s: %s\n", what, err);
        CU_ASSERT_EQUAL(rc, 0);
        for (int i = 0; i < 3 * TD; i++) ASSERT_NEAR(out[i], want[i], 1e-5, what);
        stage_state_free(st);
    }
}

static void test_layer_dense_hand(void)
{
    tiny t;
    tiny_model tm;
    tiny_init(&t, STAGE_KIND_DENSE, 11);
    tiny_hand(&t);
    if (load_or_fail(&t, &tm)) return;
    /* y_t = x_t + tile(mean_{u<=t} h_u[0..4)) */
    const double th = 1.0 / 3.0;
    const double want[3 * TD] = {
        3,      3,       -3,     3,      3,       -1,     1,      3,       /* + [1,1,-1,1] */
        -2,     3,       2,      -2,     2,       3,      -2,     2,       /* + [0,1,0,0] */
        2 + th, -2 + th, 2 + th, 2 + th, -2 + th, 2 + th, 2 + th, -2 + th, /* + 1/3 */
    };
    check_hand(&t, tm.m, want, "dense hand");
    tiny_unload(&tm);
}

static void test_layer_mod_hand(void)
{
    tiny t;
    tiny_model tm;
    tiny_init(&t, STAGE_KIND_MOD, 12);
    tiny_hand(&t);
    if (load_or_fail(&t, &tm)) return;
    /* r = 2 x0 - 1: rows 0 and 2 have r = 3 (selected), row 1 r = -5 (not selected).
     * y_0 = x_0 + 3 tile(h_0), y_1 = x_1, y_2 = x_2 + 3 tile(mean(h_0, h_2)) = x_2 + 3 [1,0,0,1]
     * (were row 1 in the cache: x_2 + 3 * 1/3 = x_2 + 1). */
    const double want[3 * TD] = {
        5, 5, -5, 5, 5, 1, -1, 5, -2, 2, 2, -2, 2, 2, -2, 2, 5, -2, 2, 5, 1, 2, 2, 1,
    };
    check_hand(&t, tm.m, want, "mod hand");
    CU_ASSERT(stage_router_score(tm.m, 0, HAND_X) == 3.0f);
    CU_ASSERT(stage_router_score(tm.m, 0, HAND_X + TD) == -5.0f);
    CU_ASSERT(stage_router_selects(tm.m, 0, HAND_X) == 1);
    CU_ASSERT(stage_router_selects(tm.m, 0, HAND_X + TD) == 0);
    CU_ASSERT(stage_range_needs_row(tm.m, 0, 0, HAND_X) == 1);
    CU_ASSERT(stage_range_needs_row(tm.m, 0, 0, HAND_X + TD) == 0);
    tiny_unload(&tm);
}

static void test_layer_dense(void)
{
    tiny t;
    tiny_model tm;
    tiny_init(&t, STAGE_KIND_DENSE, 21);
    if (load_or_fail(&t, &tm)) return;
    float x[6 * TD], x0[6] = {0.3f, -1, 0.7f, 1.2f, -0.4f, 0.9f};
    make_x(x, 6, x0, 5);
    tiny_check_seq(&t, tm.m, 6, 3, x, MODE_ONE | MODE_PREFILL_DECODE | MODE_ROWWISE, "dense", NULL);
    float y[4 * TD], y0[4] = {1, 0, -1, 0.5f};
    make_x(y, 4, y0, 6);
    const float *xs[2] = {x, y};
    int T[2] = {6, 4}, P[2] = {3, 4};
    tiny_check_interleaved(&t, tm.m, 2, T, P, xs, "dense interleaved");

    /* embedding and head against the reference */
    char err[ERRLEN];
    int32_t tok[3] = {3, 0, 4};
    float e[3 * TD];
    CU_ASSERT_EQUAL(stage_embed(tm.m, tok, 3, e, err, sizeof err), 0);
    for (int r = 0; r < 3; r++)
        CU_ASSERT(memcmp(e + r * TD, t.embed + tok[r] * TD, TD * sizeof(float)) == 0);
    stage_state *st = state_new(tm.m, 1, 4, 8);
    CU_ASSERT_FATAL(st != NULL);
    int rows[2] = {2, 0};
    float lg[2 * TV];
    CU_ASSERT_EQUAL(stage_head_logits(st, x, rows, 2, lg, err, sizeof err), 0);
    for (int j = 0; j < 2; j++) {
        double xd[TD], hn[TD], want[TV];
        for (int i = 0; i < TD; i++) xd[i] = x[rows[j] * TD + i];
        ref_rms(xd, t.norm, t.eps, hn);
        ref_lin(t.lm, TV, TD, hn, want);
        CU_ASSERT(close_rows(lg + j * TV, want, TV, 1e-5, "head logits"));
    }
    stage_state_free(st);
    tiny_unload(&tm);
}

/* selection x0 -> r = 2 x0 - 1 */
static const float MOD_X0[6] = {1.5f, -1.0f, 2.0f, 1.0f, -0.5f, 0.75f};
static const int MOD_SEL[6] = {1, 0, 1, 1, 0, 1};

static void check_mod_threshold(int sigmoid_scale)
{
    tiny t;
    tiny_model tm;
    tiny_init(&t, STAGE_KIND_MOD, 31);
    t.scale_sigmoid = sigmoid_scale;
    if (load_or_fail(&t, &tm)) return;
    const char *what = sigmoid_scale ? "mod threshold sigmoid" : "mod threshold none";
    float x[6 * TD];
    make_x(x, 6, MOD_X0, 7);
    ref_row info[6];
    tiny_check_seq(&t, tm.m, 6, 3, x, MODE_ONE | MODE_PREFILL_DECODE | MODE_ROWWISE, what, info);
    for (int r = 0; r < 6; r++) CU_ASSERT_EQUAL(info[r].att, MOD_SEL[r]);
    for (int r = 0; r < 6; r++) {
        ASSERT_NEAR(stage_router_score(tm.m, 0, x + r * TD), 2.0 * MOD_X0[r] - 1.0, 1e-6,
                    "router score with bias");
        CU_ASSERT_EQUAL(stage_router_selects(tm.m, 0, x + r * TD), MOD_SEL[r]);
    }

    /* The unselected row 1 is not in the KV cache: row 2's output matches the reference
     * without it (checked above) and is far from the one a cache holding it would give. */
    double yall[6 * TD];
    ref_row iall[6];
    int pos[6] = {0, 1, 2, 3, 4, 5}, prm[6] = {1, 1, 1, 0, 0, 0};
    ref_layer(&t, 6, x, pos, prm, 1, yall, iall);
    stage_state *st = state_new(tm.m, 1, 8, 16);
    CU_ASSERT_FATAL(st != NULL);
    float out[6 * TD];
    memcpy(out, x, sizeof out);
    int32_t slot[6] = {0}, ps[6] = {0, 1, 2, 3, 4, 5};
    uint8_t fl[6] = {STAGE_ROW_PROMPT, STAGE_ROW_PROMPT, STAGE_ROW_PROMPT, 1, 1, 1};
    char err[ERRLEN];
    CU_ASSERT_EQUAL(fwd_rows(st, 6, slot, ps, fl, out, err, sizeof err), 0);
    double d = 0.0;
    for (int i = 0; i < TD; i++) d = fmax(d, fabs(out[2 * TD + i] - yall[2 * TD + i]));
    if (verbose())
        fprintf(stderr, "\n  %s: row 2 differs by %.3g from a cache holding row 1\n", what, d);
    CU_ASSERT(d > 1e-3);
    stage_state_free(st);

    /* two sequences interleaved in one micro-batch */
    float y[5 * TD], y0[5] = {-1, 2, 0.25f, 1.25f, -2};
    make_x(y, 5, y0, 8);
    const float *xs[2] = {x, y};
    int T[2] = {6, 5}, P[2] = {3, 2};
    tiny_check_interleaved(&t, tm.m, 2, T, P, xs, what);
    tiny_unload(&tm);
}

static void test_layer_mod_threshold(void) { check_mod_threshold(0); }
static void test_layer_mod_sigmoid(void) { check_mod_threshold(1); }

static void test_layer_mod_predictor(void)
{
    tiny t;
    tiny_model tm;
    tiny_init(&t, STAGE_KIND_MOD, 41);
    t.routing = "predictor";
    t.has_pred = 1;
    /* predictor logit ~ silu(-2 x0) - 0.3 (+ small terms): selects rows with x0 < 0, the
     * opposite of the router r = 2 x0 - 1, whose (negative) r still scales the update. */
    for (int i = 0; i < TPH * TD; i++) t.p1[i] *= 0.25f;
    t.p1[0] = -2.0f;
    t.pb1[0] = 0.0f;
    t.p2[0] = 1.0f;
    t.p2[1] = 0.0625f;
    t.p2[2] = -0.0625f;
    t.pb2 = -0.3f;
    if (load_or_fail(&t, &tm)) return;
    float x[6 * TD];
    make_x(x, 6, MOD_X0, 9);
    ref_row info[6];
    tiny_check_seq(&t, tm.m, 6, 3, x, MODE_ONE | MODE_PREFILL_DECODE | MODE_ROWWISE,
                   "mod predictor", info);
    const int want_sel[6] = {0, 1, 0, 0, 1, 0};
    for (int r = 0; r < 6; r++) {
        CU_ASSERT_EQUAL(info[r].att, want_sel[r]);
        CU_ASSERT_EQUAL(stage_router_selects(tm.m, 0, x + r * TD), want_sel[r]);
        if (want_sel[r]) CU_ASSERT(info[r].r < 0); /* g(r) = r < 0 for the selected rows */
    }
    tiny_unload(&tm);
}

static void test_layer_mod_topk(void)
{
    tiny t;
    tiny_model tm;
    tiny_init(&t, STAGE_KIND_MOD, 51);
    t.routing = "topk";
    t.capacity = 0.5;
    if (load_or_fail(&t, &tm)) return;
    /* r = [0, 2, 2, -3, 2]: k = floor(0.5 * 5) = 2 -> rows 1 and 2 (row 4 ties, higher pos) */
    float x[5 * TD], x0[5] = {0.5f, 1.5f, 1.5f, -1.0f, 1.5f};
    make_x(x, 5, x0, 10);
    ref_row info[5];
    tiny_check_seq(&t, tm.m, 5, 5, x, MODE_ONE, "mod topk", info);
    const int want_sel[5] = {0, 1, 1, 0, 0};
    for (int r = 0; r < 5; r++) CU_ASSERT_EQUAL(info[r].att, want_sel[r]);
    /* T = 3: k = max(1, floor(1.5)) = 1; r = [1, 1, -1] -> row 0 (tie to the lower position) */
    float y[3 * TD], y0[3] = {1.0f, 1.0f, 0.0f};
    make_x(y, 3, y0, 11);
    tiny_check_seq(&t, tm.m, 3, 3, y, MODE_ONE, "mod topk T=3", info);
    CU_ASSERT(info[0].att == 1 && info[1].att == 0 && info[2].att == 0);
    /* T = 1: k = max(1, 0) = 1 */
    tiny_check_seq(&t, tm.m, 1, 1, y + TD, MODE_ONE, "mod topk T=1", info);
    CU_ASSERT_EQUAL(info[0].att, 1);
    /* both sequences in one forward: top-k per sequence */
    const float *xs[2] = {x, y};
    int T[2] = {5, 3}, P[2] = {5, 3};
    tiny_check_interleaved(&t, tm.m, 2, T, P, xs, "mod topk interleaved");
    /* top-k is non-causal: a decode row is an error (stage.h), not a silent k = 1 */
    stage_state *st = state_new(tm.m, 1, 8, 16);
    CU_ASSERT_FATAL(st != NULL);
    float out[5 * TD];
    memcpy(out, x, sizeof out);
    int32_t slot[5] = {0}, ps[5] = {0, 1, 2, 3, 4};
    uint8_t fl[5] = {STAGE_ROW_PROMPT, STAGE_ROW_PROMPT, STAGE_ROW_PROMPT, STAGE_ROW_PROMPT,
                     STAGE_ROW_NEED_LOGITS};
    char err[ERRLEN] = "";
    CU_ASSERT_EQUAL(fwd_rows(st, 4, slot, ps, fl, out, err, sizeof err), 0);
    CU_ASSERT_NOT_EQUAL(fwd_rows(st, 1, slot + 4, ps + 4, fl + 4, out + 4 * TD, err, sizeof err),
                        0);
    ASSERT_HAS(err, "topk");
    stage_state_free(st);
    tiny_unload(&tm);
}

static void test_layer_mode_staged(void)
{
    tiny t;
    tiny_model tm;
    tiny_init(&t, STAGE_KIND_MODE_STAGED, 61);
    t.E = 3;
    t.ept = 2;
    t.scale_sigmoid = 1;
    if (load_or_fail(&t, &tm)) return;
    float x[6 * TD];
    make_x(x, 6, MOD_X0, 12);
    ref_row info[6];
    tiny_check_seq(&t, tm.m, 6, 3, x, MODE_ONE | MODE_PREFILL_DECODE | MODE_ROWWISE, "mode_staged",
                   info);
    for (int r = 0; r < 6; r++) CU_ASSERT_EQUAL(info[r].att, MOD_SEL[r]);
    tiny_unload(&tm);
}

static void test_layer_mode_integrated(void)
{
    tiny t;
    tiny_model tm;
    tiny_init(&t, STAGE_KIND_MODE_INTEGRATED, 71);
    t.E = 2;
    t.n_noop = 1;
    /* gate logits = 3 h2[1] (expert 0), 3 h2[2] (expert 1), 3 h2[0] (no-op) */
    memset(t.gate, 0, sizeof t.gate);
    t.gate[0 * TD + 1] = 3.0f;
    t.gate[1 * TD + 2] = 3.0f;
    t.gate[2 * TD + 0] = 3.0f;
    for (int i = 0; i < TD; i++) t.ln2[i] = 1.0f;
    for (int i = 0; i < TD * TQD; i++) t.wo[i] *= 0.25f;
    if (load_or_fail(&t, &tm)) return;
    /* rows dominated by x[0] (no-op), x[1] (expert 0) or x[2] (expert 1) */
    const int dom[6] = {0, 1, 2, 0, 1, 2};
    float x[6 * TD];
    g_lcg = 13;
    for (int r = 0; r < 6; r++) {
        for (int i = 0; i < TD; i++) x[r * TD + i] = rnd_q();
        x[r * TD + dom[r]] = 3.0f;
    }
    ref_row info[6];
    tiny_check_seq(&t, tm.m, 6, 3, x, MODE_ONE | MODE_PREFILL_DECODE | MODE_ROWWISE,
                   "mode_integrated", info);
    const int want_win[6] = {2, 0, 1, 2, 0, 1};
    for (int r = 0; r < 6; r++) CU_ASSERT_EQUAL(info[r].winner, want_win[r]);
    /* a no-op winner skips the MLP: y = x + a exactly as after attention */
    stage_state *st = state_new(tm.m, 1, 8, 16);
    CU_ASSERT_FATAL(st != NULL);
    float out[6 * TD];
    memcpy(out, x, sizeof out);
    int32_t slot[6] = {0}, ps[6] = {0, 1, 2, 3, 4, 5};
    uint8_t fl[6] = {STAGE_ROW_PROMPT, STAGE_ROW_PROMPT, STAGE_ROW_PROMPT, 1, 1, 1};
    char err[ERRLEN];
    CU_ASSERT_EQUAL(fwd_rows(st, 6, slot, ps, fl, out, err, sizeof err), 0);
    for (int r = 0; r < 6; r++) {
        if (want_win[r] != 2) continue;
        CU_ASSERT(close_rows(out + r * TD, info[r].xp, TD, 2e-5, "no-op expert: m = 0"));
    }
    stage_state_free(st);
    tiny_unload(&tm);
}

static void test_layer_mindskip_sequence(void)
{
    tiny t;
    tiny_model tm;
    tiny_init(&t, STAGE_KIND_MINDSKIP, 81);
    t.has_rb = 0;
    t.ms_thr = 0.75; /* keep iff 2 mean(h)[0] > ln 3 (at 0.5 a sum would decide the same) */
    if (load_or_fail(&t, &tm)) return;
    /* s = sigmoid(2 mean(h)[0]) over the prompt rows. Sequence A: prompt x0 = [2, -0.5, 1]
     * (kept), decode rows x0 = -2 that the token rule would skip (and that would flip the
     * decision were they averaged in); sequence B: prompt x0 = [-2, 0.5, -1] (skipped) with
     * decode rows the token rule would keep; sequence C: small positive prompt rows whose
     * mean is below the threshold but whose sum is above it. */
    float xa[5 * TD], xa0[5] = {2, -0.5f, 1, -2, -2};
    float xb[5 * TD], xb0[5] = {-2, 0.5f, -1, 2, 1.5f};
    float xc[4 * TD], xc0[4] = {0.15f, 0.15f, 0.15f, 2};
    make_x(xa, 5, xa0, 14);
    make_x(xb, 5, xb0, 15);
    make_x(xc, 4, xc0, 16);
    ref_row ia[5], ib[5], ic[4];
    tiny_check_seq(&t, tm.m, 5, 3, xa, MODE_ONE | MODE_PREFILL_DECODE, "mindskip seq A", ia);
    tiny_check_seq(&t, tm.m, 5, 3, xb, MODE_ONE | MODE_PREFILL_DECODE, "mindskip seq B", ib);
    tiny_check_seq(&t, tm.m, 4, 3, xc, MODE_ONE | MODE_PREFILL_DECODE, "mindskip seq C", ic);
    for (int r = 0; r < 5; r++) {
        CU_ASSERT_EQUAL(ia[r].att, 1);
        CU_ASSERT_EQUAL(ib[r].att, 0);
    }
    for (int r = 0; r < 4; r++) CU_ASSERT_EQUAL(ic[r].att, 0);
    CU_ASSERT(ia[1].tok_keep == 0 && ia[3].tok_keep == 0); /* the decision is the sequence's */
    CU_ASSERT(ib[1].tok_keep == 1 && ib[3].tok_keep == 1);
    CU_ASSERT(ic[3].tok_keep == 1);
    {
        double mean_all = 0.0, sum_c = 0.0, xd[TD], h[TD];
        for (int r = 0; r < 5; r++) {
            for (int i = 0; i < TD; i++) xd[i] = xa[r * TD + i];
            ref_rms(xd, t.ln1, t.eps, h);
            mean_all += h[0] / 5;
        }
        for (int r = 0; r < 3; r++) {
            for (int i = 0; i < TD; i++) xd[i] = xc[r * TD + i];
            ref_rms(xd, t.ln1, t.eps, h);
            sum_c += h[0];
        }
        CU_ASSERT(sigm(2 * mean_all) <= 0.75); /* A over all rows would skip */
        CU_ASSERT(sigm(2 * sum_c) > 0.75);     /* C by the sum would keep */
    }
    const float *xs[3] = {xa, xb, xc};
    int T[3] = {5, 5, 4}, P[3] = {3, 3, 3};
    tiny_check_interleaved(&t, tm.m, 3, T, P, xs, "mindskip seq interleaved");

    /* a skipped sequence: x' = x, y = x + mlp(rmsnorm(x)) (row 0 of B, by hand from the
     * weights without the attention path) */
    double xd[TD], h2[TD], mm[TD], want[TD];
    for (int i = 0; i < TD; i++) xd[i] = xb[i];
    ref_rms(xd, t.ln2, t.eps, h2);
    ref_swiglu(t.wg, t.wu, t.wd, TI, h2, mm);
    for (int i = 0; i < TD; i++) want[i] = xd[i] + mm[i];
    stage_state *st = state_new(tm.m, 1, 8, 16);
    CU_ASSERT_FATAL(st != NULL);
    float out[5 * TD];
    memcpy(out, xb, sizeof out);
    int32_t slot[5] = {0}, ps[5] = {0, 1, 2, 3, 4};
    uint8_t fl[5] = {STAGE_ROW_PROMPT, STAGE_ROW_PROMPT, STAGE_ROW_PROMPT, 1, 1};
    char err[ERRLEN];
    CU_ASSERT_EQUAL(fwd_rows(st, 3, slot, ps, fl, out, err, sizeof err), 0);
    CU_ASSERT(close_rows(out, want, TD, 2e-5, "mindskip skipped row"));
    /* decode rows keep the prefill decision */
    CU_ASSERT_EQUAL(fwd_rows(st, 1, slot + 3, ps + 3, fl + 3, out + 3 * TD, err, sizeof err), 0);
    CU_ASSERT_EQUAL(stage_state_layer_stats(st, 0)->kv_entries, 0);
    stage_state_free(st);
    /* the decision needs the whole prompt in one forward: a split prompt is an error */
    st = state_new(tm.m, 1, 8, 16);
    CU_ASSERT_FATAL(st != NULL);
    memcpy(out, xa, sizeof out);
    CU_ASSERT_EQUAL(fwd_rows(st, 2, slot, ps, fl, out, err, sizeof err), 0);
    CU_ASSERT_NOT_EQUAL(fwd_rows(st, 1, slot + 2, ps + 2, fl + 2, out + 2 * TD, err, sizeof err),
                        0);
    stage_state_free(st);
    tiny_unload(&tm);
}

static void test_layer_mindskip_token(void)
{
    tiny t;
    tiny_model tm;
    tiny_init(&t, STAGE_KIND_MINDSKIP, 91);
    t.has_rb = 0;
    t.gran = "token";
    t.ms_thr = 0.75; /* keep iff 2 h[0] > ln 3: row 2 (x0 = 0.4, h0 ~ 0.9) is kept on h, not on x */
    if (load_or_fail(&t, &tm)) return;
    float x[6 * TD], x0[6] = {2, -1.5f, 0.4f, -2, 1.5f, -0.75f};
    make_x(x, 6, x0, 16);
    ref_row info[6];
    tiny_check_seq(&t, tm.m, 6, 3, x, MODE_ONE | MODE_PREFILL_DECODE | MODE_ROWWISE,
                   "mindskip token", info);
    const int want[6] = {1, 0, 1, 0, 1, 0};
    for (int r = 0; r < 6; r++) CU_ASSERT_EQUAL(info[r].att, want[r]);
    tiny_unload(&tm);
}

/* ---- main ------------------------------------------------------------------------------------ */

int main(void)
{
    static const test_def layers[] = {
        T_(test_layer_dense_hand),      T_(test_layer_mod_hand),
        T_(test_layer_dense),           T_(test_layer_mod_threshold),
        T_(test_layer_mod_sigmoid),     T_(test_layer_mod_predictor),
        T_(test_layer_mod_topk),        T_(test_layer_mode_staged),
        T_(test_layer_mode_integrated), T_(test_layer_mindskip_sequence),
        T_(test_layer_mindskip_token),
    };
    static const suite_def all[] = {
        {"layers", layers, N_(layers)},
        {NULL, NULL, 0},
    };
    return run_suites(all);
}
