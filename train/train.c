/* train/train.c — Router-Tuning core: frozen weights, workspace, AdamW. See train.h. */
#include "train/train.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stage/arch.h"
#include "stage/kernels.h"
#include "stage/safetensors.h"

#define LCH 64 /* logits rows per chunk: [LCH][vocab] is all the head keeps */

typedef struct {
    const float *ln1, *ln2, *wq, *wk, *wv, *wo, *wg, *wu, *wd;
    /* block-variant vectors (docs/SPEC.md §10), NULL when the config has none */
    const float *bq, *bk, *bv, *bo, *bg, *bu, *bd, *qn, *kn;
} lw_f32;

struct train_model {
    stage_config cfg;
    st_model *st;
    lw_f32 *L; /* [n_layers] pointers owned by st */
    const float *embed, *norm, *lm;
    double *dbl; /* every tensor above converted to double, one block (lazy) */
    size_t dbl_n;
};

struct train_ws {
    train_model *m;
    train_setup setup; /* layers points at own copy */
    int *layers;       /* [n_routed] */
    int *route_of;     /* [n_layers] routed index or -1 */
    int n_layers, first, max_seqs, T, D, nh, nkv, hd, FF, V;
    double eps;
    int use_double;
    int n_seq; /* of the last forward */
    double inv_ntok;
    double nll_sum;
    long n_targets, n_gates;
    double *gate_sum, *sig_sum; /* [n_routed] */
    double *rw;                 /* [n_routed][D] the last forward's router weights (dh = dz w) */
    train_stats stats;
    void *acts; /* acts_f or acts_d */
    void *wts;  /* wts_f or wts_d */
};

/* ---- the two precisions ---------------------------------------------------------------------- */
#define R float
#define RN(x) x##_f
#define GEMM cblas_sgemm
#define EXPR expf
#include "train/train_impl.h"
#undef R
#undef RN
#undef GEMM
#undef EXPR
#define R double
#define RN(x) x##_d
#define GEMM cblas_dgemm
#define EXPR exp
#include "train/train_impl.h"
#undef R
#undef RN
#undef GEMM
#undef EXPR

/* ---- model ----------------------------------------------------------------------------------- */

static const float *get2(train_model *m, const char *name, int64_t d0, int64_t d1, char *err,
                         size_t errlen)
{
    int64_t shape[2] = {d0, d1};
    return st_get_f32(m->st, name, d1 ? 2 : 1, shape, err, errlen);
}

int train_model_load(const char *dir, train_model **out, char *err, size_t errlen)
{
    *out = NULL;
    train_model *m = calloc(1, sizeof *m);
    if (!m) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (stage_config_load(dir, &m->cfg, err, errlen)) {
        free(m);
        return -1;
    }
    const stage_config *c = &m->cfg;
    for (int l = 0; l < c->n_layers; l++) {
        stage_kind k = c->layer_kind[l];
        if (k != STAGE_KIND_DENSE && k != STAGE_KIND_MINDSKIP) {
            snprintf(err, errlen,
                     "%s: layer %d is %s: router-tuning trains MindSkip routers on "
                     "dense or mindskip layers only",
                     dir, l, stage_kind_name(k));
            train_model_free(m);
            return -1;
        }
    }
    if (c->n_heads % c->n_kv_heads || c->head_dim % 2) {
        snprintf(err, errlen, "%s: %d heads / %d kv heads / head_dim %d not supported", dir,
                 c->n_heads, c->n_kv_heads, c->head_dim);
        train_model_free(m);
        return -1;
    }
    if (st_open(dir, &m->st, err, errlen)) {
        train_model_free(m);
        return -1;
    }
    m->L = calloc((size_t)c->n_layers, sizeof *m->L);
    if (!m->L) {
        snprintf(err, errlen, "out of memory");
        train_model_free(m);
        return -1;
    }
    const int D = c->hidden, qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
    char name[256];
#define GET(dst, sfx, d0, d1)                                                                      \
    do {                                                                                           \
        snprintf(name, sizeof name, "model.layers.%d.%s", l, sfx);                                 \
        if (!((dst) = get2(m, name, d0, d1, err, errlen))) {                                       \
            train_model_free(m);                                                                   \
            return -1;                                                                             \
        }                                                                                          \
    } while (0)
    for (int l = 0; l < c->n_layers; l++) {
        lw_f32 *L = &m->L[l];
        GET(L->ln1, "input_layernorm.weight", D, 0);
        GET(L->ln2, "post_attention_layernorm.weight", D, 0);
        GET(L->wq, "self_attn.q_proj.weight", qd, D);
        GET(L->wk, "self_attn.k_proj.weight", kvd, D);
        GET(L->wv, "self_attn.v_proj.weight", kvd, D);
        GET(L->wo, "self_attn.o_proj.weight", D, qd);
        GET(L->wg, "mlp.gate_proj.weight", c->inter, D);
        GET(L->wu, "mlp.up_proj.weight", c->inter, D);
        GET(L->wd, "mlp.down_proj.weight", D, c->inter);
        if (c->qkv_bias) {
            GET(L->bq, "self_attn.q_proj.bias", qd, 0);
            GET(L->bk, "self_attn.k_proj.bias", kvd, 0);
            GET(L->bv, "self_attn.v_proj.bias", kvd, 0);
        }
        if (c->o_bias) GET(L->bo, "self_attn.o_proj.bias", D, 0);
        if (c->mlp_bias) {
            GET(L->bg, "mlp.gate_proj.bias", c->inter, 0);
            GET(L->bu, "mlp.up_proj.bias", c->inter, 0);
            GET(L->bd, "mlp.down_proj.bias", D, 0);
        }
        if (c->qk_norm) {
            GET(L->qn, "self_attn.q_norm.weight", c->head_dim, 0);
            GET(L->kn, "self_attn.k_norm.weight", c->head_dim, 0);
        }
    }
#undef GET
    if (!(m->embed = get2(m, "model.embed_tokens.weight", c->vocab, D, err, errlen)) ||
        !(m->norm = get2(m, "model.norm.weight", D, 0, err, errlen)) ||
        !(m->lm =
              c->tie_embeddings ? m->embed : get2(m, "lm_head.weight", c->vocab, D, err, errlen))) {
        train_model_free(m);
        return -1;
    }
    *out = m;
    return 0;
}

void train_model_free(train_model *m)
{
    if (!m) return;
    st_close(m->st);
    free(m->L);
    free(m->dbl);
    stage_config_free(&m->cfg);
    free(m);
}

const stage_config *train_model_config(const train_model *m) { return &m->cfg; }

static const double *to_dbl(double **p, const float *src, size_t n)
{
    double *d = *p;
    for (size_t i = 0; i < n; i++) d[i] = src[i];
    *p += n;
    return d;
}

/* Weight views of one precision (double: converted once into m->dbl). */
static int make_wts(train_ws *ws, char *err, size_t errlen)
{
    train_model *m = ws->m;
    const stage_config *c = &m->cfg;
    const size_t D = c->hidden, FF = c->inter, V = c->vocab;
    const size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    const int nl = c->n_layers;
    if (!ws->use_double) {
        wts_f *w = calloc(1, sizeof *w);
        lw_f *L = calloc((size_t)nl, sizeof *L);
        if (!w || !L) {
            free(w);
            free(L);
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        for (int l = 0; l < nl; l++) {
            const lw_f32 *s = &m->L[l];
            L[l] = (lw_f){s->ln1, s->ln2, s->wq, s->wk, s->wv, s->wo, s->wg, s->wu, s->wd,
                          s->bq,  s->bk,  s->bv, s->bo, s->bg, s->bu, s->bd, s->qn, s->kn};
        }
        w->L = L;
        w->embed = m->embed;
        w->norm = m->norm;
        w->lm = m->lm;
        ws->wts = w;
        return 0;
    }
    size_t per = 2 * D + qd * D + 2 * kvd * D + D * qd + 3 * FF * D;
    per += (c->qkv_bias ? qd + 2 * kvd : 0) + (c->o_bias ? D : 0) + (c->mlp_bias ? 2 * FF + D : 0) +
           (c->qk_norm ? 2 * (size_t)c->head_dim : 0);
    size_t total = per * nl + V * D + D + (c->tie_embeddings ? 0 : V * D);
    if (!m->dbl) {
        m->dbl = malloc(total * sizeof(double));
        if (!m->dbl) {
            snprintf(err, errlen, "out of memory (double weights)");
            return -1;
        }
        m->dbl_n = total;
    }
    wts_d *w = calloc(1, sizeof *w);
    lw_d *L = calloc((size_t)nl, sizeof *L);
    if (!w || !L) {
        free(w);
        free(L);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    double *p = m->dbl;
    for (int l = 0; l < nl; l++) {
        const lw_f32 *s = &m->L[l];
        L[l].ln1 = to_dbl(&p, s->ln1, D);
        L[l].ln2 = to_dbl(&p, s->ln2, D);
        L[l].wq = to_dbl(&p, s->wq, qd * D);
        L[l].wk = to_dbl(&p, s->wk, kvd * D);
        L[l].wv = to_dbl(&p, s->wv, kvd * D);
        L[l].wo = to_dbl(&p, s->wo, D * qd);
        L[l].wg = to_dbl(&p, s->wg, FF * D);
        L[l].wu = to_dbl(&p, s->wu, FF * D);
        L[l].wd = to_dbl(&p, s->wd, D * FF);
        const size_t hd = (size_t)c->head_dim;
        L[l].bq = s->bq ? to_dbl(&p, s->bq, qd) : NULL;
        L[l].bk = s->bk ? to_dbl(&p, s->bk, kvd) : NULL;
        L[l].bv = s->bv ? to_dbl(&p, s->bv, kvd) : NULL;
        L[l].bo = s->bo ? to_dbl(&p, s->bo, D) : NULL;
        L[l].bg = s->bg ? to_dbl(&p, s->bg, FF) : NULL;
        L[l].bu = s->bu ? to_dbl(&p, s->bu, FF) : NULL;
        L[l].bd = s->bd ? to_dbl(&p, s->bd, D) : NULL;
        L[l].qn = s->qn ? to_dbl(&p, s->qn, hd) : NULL;
        L[l].kn = s->kn ? to_dbl(&p, s->kn, hd) : NULL;
    }
    w->L = L;
    w->embed = to_dbl(&p, m->embed, V * D);
    w->norm = to_dbl(&p, m->norm, D);
    w->lm = c->tie_embeddings ? w->embed : to_dbl(&p, m->lm, V * D);
    ws->wts = w;
    return 0;
}

/* ---- workspace ------------------------------------------------------------------------------- */

train_ws *train_ws_new(train_model *m, const train_setup *s, int max_seqs, int seq_len,
                       int use_double, char *err, size_t errlen)
{
    const stage_config *c = &m->cfg;
    if (s->n_routed < 1 || s->n_routed > c->n_layers) {
        snprintf(err, errlen, "need 1..%d routed layers, got %d", c->n_layers, s->n_routed);
        return NULL;
    }
    for (int i = 0; i < s->n_routed; i++) {
        if (s->layers[i] < 0 || s->layers[i] >= c->n_layers ||
            (i && s->layers[i] <= s->layers[i - 1])) {
            snprintf(err, errlen, "routed layers must be distinct, increasing and in 0..%d",
                     c->n_layers - 1);
            return NULL;
        }
    }
    if (seq_len < 2 || seq_len > c->max_pos || max_seqs < 1) {
        snprintf(err, errlen,
                 "sequence length %d must be in 2..%d (max_position_embeddings), "
                 "batch %d >= 1",
                 seq_len, c->max_pos, max_seqs);
        return NULL;
    }
    train_ws *ws = calloc(1, sizeof *ws);
    if (!ws) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    ws->m = m;
    ws->setup = *s;
    ws->layers = malloc((size_t)s->n_routed * sizeof *ws->layers);
    ws->route_of = malloc((size_t)c->n_layers * sizeof *ws->route_of);
    ws->gate_sum = calloc((size_t)s->n_routed, sizeof *ws->gate_sum);
    ws->sig_sum = calloc((size_t)s->n_routed, sizeof *ws->sig_sum);
    ws->rw = calloc((size_t)s->n_routed * c->hidden, sizeof *ws->rw);
    if (!ws->layers || !ws->route_of || !ws->gate_sum || !ws->sig_sum || !ws->rw) {
        snprintf(err, errlen, "out of memory");
        train_ws_free(ws);
        return NULL;
    }
    memcpy(ws->layers, s->layers, (size_t)s->n_routed * sizeof *ws->layers);
    ws->setup.layers = ws->layers;
    for (int l = 0; l < c->n_layers; l++) ws->route_of[l] = -1;
    for (int i = 0; i < s->n_routed; i++) ws->route_of[s->layers[i]] = i;
    ws->n_layers = c->n_layers;
    ws->first = s->layers[0];
    ws->max_seqs = max_seqs;
    ws->T = seq_len;
    ws->D = c->hidden;
    ws->nh = c->n_heads;
    ws->nkv = c->n_kv_heads;
    ws->hd = c->head_dim;
    ws->FF = c->inter;
    ws->V = c->vocab;
    ws->eps = c->eps;
    ws->use_double = use_double;
    if (make_wts(ws, err, errlen)) {
        train_ws_free(ws);
        return NULL;
    }
    int rc;
    if (use_double) {
        acts_d *A = calloc(1, sizeof *A);
        ws->acts = A;
        rc = !A || acts_alloc_d(A, ws, c);
    } else {
        acts_f *A = calloc(1, sizeof *A);
        ws->acts = A;
        rc = !A || acts_alloc_f(A, ws, c);
    }
    if (rc) {
        snprintf(err, errlen, "out of memory sizing the training workspace (%d x %d tokens)",
                 max_seqs, seq_len);
        train_ws_free(ws);
        return NULL;
    }
    return ws;
}

void train_ws_free(train_ws *ws)
{
    if (!ws) return;
    if (ws->acts) {
        if (ws->use_double)
            acts_free_d(ws->acts);
        else
            acts_free_f(ws->acts);
        free(ws->acts);
    }
    if (ws->wts) {
        if (ws->use_double)
            free(((wts_d *)ws->wts)->L);
        else
            free(((wts_f *)ws->wts)->L);
        free(ws->wts);
    }
    free(ws->layers);
    free(ws->route_of);
    free(ws->gate_sum);
    free(ws->sig_sum);
    free(ws->rw);
    free(ws);
}

int train_forward(train_ws *ws, const int32_t *tokens, int n_seq, const double *w, const double *b,
                  double inv_ntok, const double *gate_offset, char *err, size_t errlen)
{
    if (n_seq < 1 || n_seq > ws->max_seqs) {
        snprintf(err, errlen, "%d sequences, the workspace holds 1..%d", n_seq, ws->max_seqs);
        return -1;
    }
    if (gate_offset && ws->setup.gate != TRAIN_GATE_SOFT) {
        snprintf(err, errlen, "gate offsets need the soft gate");
        return -1;
    }
    for (long i = 0; i < (long)n_seq * ws->T; i++) {
        if (tokens[i] < 0 || tokens[i] >= ws->V) {
            snprintf(err, errlen, "token %d at sequence %ld position %ld outside the vocab (%d)",
                     tokens[i], i / ws->T, i % ws->T, ws->V);
            return -1;
        }
    }
    memcpy(ws->rw, w, (size_t)ws->setup.n_routed * ws->D * sizeof *ws->rw);
    if (ws->use_double)
        return forward_d(ws, ws->acts, ws->wts, tokens, n_seq, w, b, inv_ntok, gate_offset);
    return forward_f(ws, ws->acts, ws->wts, tokens, n_seq, w, b, inv_ntok, gate_offset);
}

void train_ws_set_gate(train_ws *ws, train_gate gate) { ws->setup.gate = gate; }

const train_stats *train_ws_stats(const train_ws *ws)
{
    train_stats *s = (train_stats *)&ws->stats;
    s->nll_sum = ws->nll_sum;
    s->n_targets = ws->n_targets;
    s->gate_sum = ws->gate_sum;
    s->sig_sum = ws->sig_sum;
    s->n_gates = ws->n_gates;
    return s;
}

void train_ws_gates(const train_ws *ws, int ri, double *z, double *sig, double *g)
{
    const size_t NMAX = (size_t)ws->max_seqs * ws->T, off = (size_t)ri * NMAX;
    for (long i = 0; i < ws->n_gates; i++) {
        if (ws->use_double) {
            const acts_d *A = ws->acts;
            if (z) z[i] = A->z[off + i];
            if (sig) sig[i] = A->sg[off + i];
            if (g) g[i] = A->g[off + i];
        } else {
            const acts_f *A = ws->acts;
            if (z) z[i] = A->z[off + i];
            if (sig) sig[i] = A->sg[off + i];
            if (g) g[i] = A->g[off + i];
        }
    }
}

double train_penalty_coef(const train_setup *s, const double *gate_sum, double n_gates,
                          double *coef)
{
    const int L = s->n_routed;
    double P = 0.0;
    if (s->penalty == TRAIN_PENALTY_GLOBAL) {
        double K = 0.0;
        for (int l = 0; l < L; l++) K += gate_sum[l] / n_gates;
        K /= L;
        int on = K > s->target_keep;
        if (on) P = s->lambda * (K - s->target_keep);
        for (int l = 0; l < L; l++) coef[l] = on ? s->lambda / (L * n_gates) : 0.0;
    } else {
        for (int l = 0; l < L; l++) {
            double k = gate_sum[l] / n_gates;
            int on = k > s->target_keep;
            if (on) P += s->lambda / L * (k - s->target_keep);
            coef[l] = on ? s->lambda / (L * n_gates) : 0.0;
        }
    }
    return P;
}

void train_backward(train_ws *ws, const double *coef, double *grad_w, double *grad_b)
{
    if (ws->use_double)
        backward_d(ws, ws->acts, ws->wts, coef, grad_w, grad_b, ws->rw);
    else
        backward_f(ws, ws->acts, ws->wts, coef, grad_w, grad_b, ws->rw);
}

/* ---- AdamW ----------------------------------------------------------------------------------- */

int train_adamw_init(train_adamw *o, int n)
{
    memset(o, 0, sizeof *o);
    o->n = n;
    o->m = calloc((size_t)n, sizeof *o->m);
    o->v = calloc((size_t)n, sizeof *o->v);
    if (!o->m || !o->v) {
        train_adamw_free(o);
        return -1;
    }
    return 0;
}

void train_adamw_free(train_adamw *o)
{
    if (!o) return;
    free(o->m);
    free(o->v);
    o->m = o->v = NULL;
}

void train_adamw_step(train_adamw *o, double *theta, const double *grad, double lr, double wd,
                      const uint8_t *wd_mask)
{
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
    o->t++;
    double c1 = 1.0 - pow(b1, (double)o->t), c2 = 1.0 - pow(b2, (double)o->t);
    for (int i = 0; i < o->n; i++) {
        o->m[i] = b1 * o->m[i] + (1.0 - b1) * grad[i];
        o->v[i] = b2 * o->v[i] + (1.0 - b2) * grad[i] * grad[i];
        double upd = (o->m[i] / c1) / (sqrt(o->v[i] / c2) + eps);
        if (!wd_mask || wd_mask[i]) upd += wd * theta[i];
        theta[i] -= lr * upd;
    }
}
