/* stage/stage.c — weights, layers, routers and KV caches of one pipeline stage (SPEC §2).
 * See stage.h for the contract. */
#include "stage/stage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "stage/kernels.h"
#include "stage/matmul.h"
#include "stage/safetensors.h"
#include "stage/tp.h"

/* ========================================================================================
 * Weights
 * ===================================================================================== */

typedef struct {
    stage_kind kind;
    int loaded;                 /* weights of this layer live on this stage */
    const float *ln1, *ln2;     /* [D] input_layernorm, post_attention_layernorm (f32: tiny) */
    /* matrices stay in the checkpoint dtype (or --weights-dtype), inside the mmap */
    stage_weight wq;            /* [n_heads*hd][D] */
    stage_weight wk, wv;        /* [n_kv*hd][D] */
    stage_weight wo;            /* [D][n_heads*hd] */
    stage_weight w_gate, w_up;  /* [I][D] dense MLP */
    stage_weight w_down;        /* [D][I] */
    stage_weight moe_gate;      /* [n_gate][D]: E (staged) or E + N_noop (integrated) */
    int n_gate;
    stage_weight *ew1, *ew3;    /* [E] -> [Ie][D] */
    stage_weight *ew2;          /* [E] -> [D][Ie] */
    /* router: routed layers on every stage, mindskip layers on their own stage */
    const float *router_w;      /* [D] */
    float router_b;             /* 0 when absent */
    const float *pred_w1;       /* [pred_h][D] */
    const float *pred_b1;       /* [pred_h] or NULL */
    const float *pred_w2;       /* [pred_h] */
    float pred_b2;
    int pred_h;
    /* tensor-parallel stage (m->tp): this rank's slices of the big matrices (stage/tp.h);
     * the stage_weight fields above then only carry the shapes (data NULL) */
    stage_tp_weight tq, tk, tv, to, tgate, tup, tdown;
    stage_tp_weight *tew1, *tew2, *tew3; /* [E] */
} layer_w;

struct stage_model {
    stage_config cfg;           /* own copy; cfg.layer_kind owned */
    stage_range range;
    st_model *st;
    layer_w *layers;            /* [n_layers] */
    stage_weight embed;         /* [vocab][D] (data NULL: not on this stage) */
    const float *norm;          /* [D] */
    stage_weight lm_head;       /* [vocab][D] (the embedding when tied; data NULL: not the head) */
    float *inv_freq;            /* [head_dim/2] */
    int weights_dtype;          /* -1: as stored, else the stage_dtype matrices are held in */
    stage_tp *tp;               /* the stage's rank group (K > 1), NULL on one rank; not owned */
    int has_head;               /* model.norm + lm_head live here */
    stage_tp_weight tlm;        /* [vocab][D] slice of lm_head (tp) */
    size_t weight_bytes;        /* bytes of the tensors this stage holds, in their dtype */
};

static const float *get_w(stage_model *m, const char *name, int ndim, int64_t d0, int64_t d1,
                          char *err, size_t errlen)
{
    int64_t shape[2] = {d0, d1};
    const float *p = st_get_f32(m->st, name, ndim, shape, err, errlen);
    if (p) m->weight_bytes += (size_t)(ndim == 1 ? d0 : d0 * d1) * sizeof(float);
    return p;
}

/* A weight matrix [d0][d1], kept in its dtype (no f32 copy). */
static int get_m(stage_model *m, const char *name, int64_t d0, int64_t d1, stage_weight *w,
                 char *err, size_t errlen)
{
    if (st_get_weight(m->st, name, d0, d1, m->weights_dtype, w, err, errlen)) return -1;
    m->weight_bytes += stage_weight_bytes(w);
    return 0;
}

/* A big projection: on one rank get_m; on a tensor-parallel group only this rank's row slice,
 * converted to f32 (psgemm), and w keeps the full shape with data NULL. */
static int get_pm(stage_model *m, const char *name, int64_t d0, int64_t d1, stage_weight *w,
                  stage_tp_weight *t, char *err, size_t errlen)
{
    if (!m->tp) return get_m(m, name, d0, d1, w, err, errlen);
    stage_weight full;
    if (st_get_weight(m->st, name, d0, d1, -1, &full, err, errlen)) return -1;
    if (stage_tp_weight_init(m->tp, &full, t, err, errlen)) return -1;
    m->weight_bytes += stage_tp_weight_bytes(t);
    *w = full;
    w->data = NULL;
    return 0;
}

/* Optional scalar-ish tensor (router.bias [1], fc2.bias [1]); absent -> 0. */
static int get_opt_scalar(stage_model *m, const char *name, float *out, char *err, size_t errlen)
{
    st_tensor t;
    int r = st_find(m->st, name, &t, err, errlen);
    if (r < 0) return -1;
    *out = 0.0f;
    if (r == 0) return 0;
    const float *p = get_w(m, name, 1, 1, 0, err, errlen);
    if (!p) return -1;
    *out = p[0];
    return 0;
}

#define LNAME(buf, l, suffix) snprintf(buf, sizeof buf, "model.layers.%d.%s", l, suffix)
#define NEED(ptr) do { if (!(ptr)) return -1; } while (0)
#define NEED0(call) do { if (call) return -1; } while (0)

static int load_router(stage_model *m, int l, char *err, size_t errlen)
{
    const stage_config *c = &m->cfg;
    layer_w *L = &m->layers[l];
    char name[256];
    LNAME(name, l, "router.weight");
    NEED(L->router_w = get_w(m, name, 2, 1, c->hidden, err, errlen));
    LNAME(name, l, "router.bias");
    if (get_opt_scalar(m, name, &L->router_b, err, errlen)) return -1;
    if (L->kind == STAGE_KIND_MINDSKIP || c->mod_routing != STAGE_ROUTING_PREDICTOR) return 0;

    st_tensor t;
    LNAME(name, l, "router_predictor.fc1.weight");
    int r = st_find(m->st, name, &t, err, errlen);
    if (r < 0) return -1;
    if (r == 0) {
        snprintf(err, errlen, "missing tensor %s (routing is \"predictor\")", name);
        return -1;
    }
    if (t.ndim != 2 || t.shape[1] != c->hidden || t.shape[0] < 1) {
        snprintf(err, errlen, "%s: tensor %s must have shape [H, %d]", t.file, name, c->hidden);
        return -1;
    }
    L->pred_h = (int)t.shape[0];
    NEED(L->pred_w1 = get_w(m, name, 2, L->pred_h, c->hidden, err, errlen));
    LNAME(name, l, "router_predictor.fc1.bias");
    r = st_find(m->st, name, &t, err, errlen);
    if (r < 0) return -1;
    if (r) NEED(L->pred_b1 = get_w(m, name, 1, L->pred_h, 0, err, errlen));
    LNAME(name, l, "router_predictor.fc2.weight");
    NEED(L->pred_w2 = get_w(m, name, 2, 1, L->pred_h, err, errlen));
    LNAME(name, l, "router_predictor.fc2.bias");
    return get_opt_scalar(m, name, &L->pred_b2, err, errlen);
}

static int load_layer(stage_model *m, int l, char *err, size_t errlen)
{
    const stage_config *c = &m->cfg;
    layer_w *L = &m->layers[l];
    const int D = c->hidden, hd = c->head_dim;
    const int qd = c->n_heads * hd, kvd = c->n_kv_heads * hd;
    char name[256];

    L->loaded = 1;
    LNAME(name, l, "input_layernorm.weight");
    NEED(L->ln1 = get_w(m, name, 1, D, 0, err, errlen));
    LNAME(name, l, "post_attention_layernorm.weight");
    NEED(L->ln2 = get_w(m, name, 1, D, 0, err, errlen));
    LNAME(name, l, "self_attn.q_proj.weight");
    NEED0(get_pm(m, name, qd, D, &L->wq, &L->tq, err, errlen));
    LNAME(name, l, "self_attn.k_proj.weight");
    NEED0(get_pm(m, name, kvd, D, &L->wk, &L->tk, err, errlen));
    LNAME(name, l, "self_attn.v_proj.weight");
    NEED0(get_pm(m, name, kvd, D, &L->wv, &L->tv, err, errlen));
    LNAME(name, l, "self_attn.o_proj.weight");
    NEED0(get_pm(m, name, D, qd, &L->wo, &L->to, err, errlen));

    if (L->kind == STAGE_KIND_MODE_STAGED || L->kind == STAGE_KIND_MODE_INTEGRATED) {
        int E = c->n_experts, Ie = c->expert_inter;
        L->n_gate = E + (L->kind == STAGE_KIND_MODE_INTEGRATED ? c->n_noop_experts : 0);
        LNAME(name, l, "block_sparse_moe.gate.weight");
        NEED0(get_m(m, name, L->n_gate, D, &L->moe_gate, err, errlen));
        L->ew1 = calloc((size_t)E, sizeof *L->ew1);
        L->ew2 = calloc((size_t)E, sizeof *L->ew2);
        L->ew3 = calloc((size_t)E, sizeof *L->ew3);
        if (!L->ew1 || !L->ew2 || !L->ew3) { snprintf(err, errlen, "out of memory"); return -1; }
        if (m->tp) {
            L->tew1 = calloc((size_t)E, sizeof *L->tew1);
            L->tew2 = calloc((size_t)E, sizeof *L->tew2);
            L->tew3 = calloc((size_t)E, sizeof *L->tew3);
            if (!L->tew1 || !L->tew2 || !L->tew3) { snprintf(err, errlen, "out of memory"); return -1; }
        }
        for (int e = 0; e < E; e++) {
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l, e);
            NEED0(get_pm(m, name, Ie, D, &L->ew1[e], m->tp ? &L->tew1[e] : NULL, err, errlen));
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.w2.weight", l, e);
            NEED0(get_pm(m, name, D, Ie, &L->ew2[e], m->tp ? &L->tew2[e] : NULL, err, errlen));
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.w3.weight", l, e);
            NEED0(get_pm(m, name, Ie, D, &L->ew3[e], m->tp ? &L->tew3[e] : NULL, err, errlen));
        }
    } else {
        LNAME(name, l, "mlp.gate_proj.weight");
        NEED0(get_pm(m, name, c->inter, D, &L->w_gate, &L->tgate, err, errlen));
        LNAME(name, l, "mlp.up_proj.weight");
        NEED0(get_pm(m, name, c->inter, D, &L->w_up, &L->tup, err, errlen));
        LNAME(name, l, "mlp.down_proj.weight");
        NEED0(get_pm(m, name, D, c->inter, &L->w_down, &L->tdown, err, errlen));
    }
    if (L->kind == STAGE_KIND_MINDSKIP || stage_kind_is_routed(L->kind)) return load_router(m, l, err, errlen);
    return 0;
}

/* Every tensor of the checkpoint must be one this engine reads (or a known buffer that does
 * not change the math): a q/k/v bias, a per-head q/k norm or any other tensor of a block
 * variant that is not implemented would otherwise be ignored silently and give wrong logits
 * with exit 0 (docs/SPEC.md §3). Checked on names only: cheap, no shard is opened. */
static int known_layer_tensor(const char *s)
{
    static const char *const names[] = {
        "input_layernorm.weight", "post_attention_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "self_attn.rotary_emb.inv_freq", /* a buffer of rope_theta */
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "block_sparse_moe.gate.weight", "router.weight", "router.bias",
        "router_predictor.fc1.weight", "router_predictor.fc1.bias",
        "router_predictor.fc2.weight", "router_predictor.fc2.bias",
    };
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (strcmp(s, names[i]) == 0) return 1;
    static const char ex[] = "block_sparse_moe.experts.";
    if (strncmp(s, ex, sizeof ex - 1) != 0) return 0;
    s += sizeof ex - 1;
    if (*s < '0' || *s > '9') return 0;
    while (*s >= '0' && *s <= '9') s++;
    return strcmp(s, ".w1.weight") == 0 || strcmp(s, ".w2.weight") == 0 ||
           strcmp(s, ".w3.weight") == 0;
}

static int check_tensor_names(const st_model *st, const stage_config *cfg, char *err,
                              size_t errlen)
{
    static const char lp[] = "model.layers.";
    for (size_t i = 0; i < st_count(st); i++) {
        const char *nm = st_name_at(st, i);
        if (strcmp(nm, "model.embed_tokens.weight") == 0 || strcmp(nm, "model.norm.weight") == 0 ||
            strcmp(nm, "lm_head.weight") == 0)
            continue;
        if (strncmp(nm, lp, sizeof lp - 1) == 0) {
            const char *p = nm + sizeof lp - 1;
            long l = 0;
            int digits = 0;
            while (*p >= '0' && *p <= '9' && digits < 9) { l = l * 10 + (*p++ - '0'); digits++; }
            if (digits && *p == '.' && l < cfg->n_layers && known_layer_tensor(p + 1)) continue;
            if (digits && *p == '.' && l >= cfg->n_layers) {
                snprintf(err, errlen, "tensor %s: layer %ld, but num_hidden_layers is %d", nm,
                         l, cfg->n_layers);
                return -1;
            }
        }
        snprintf(err, errlen, "tensor %s is not part of the Llama block this engine computes "
                 "(a bias, norm or layer it would ignore, changing the results): refused", nm);
        return -1;
    }
    return 0;
}

int stage_model_load(const char *dir, const stage_config *cfg, stage_range range,
                     stage_model **out, char *err, size_t errlen)
{
    return stage_model_load_dtype(dir, cfg, range, -1, out, err, errlen);
}

int stage_model_load_dtype(const char *dir, const stage_config *cfg, stage_range range,
                           int weights_dtype, stage_model **out, char *err, size_t errlen)
{
    return stage_model_load_tp(dir, cfg, range, weights_dtype, NULL, out, err, errlen);
}

int stage_model_load_tp(const char *dir, const stage_config *cfg, stage_range range,
                        int weights_dtype, stage_tp *tp, stage_model **out, char *err,
                        size_t errlen)
{
    *out = NULL;
    if (tp && stage_tp_size(tp) > 1 &&
        (cfg->n_heads % stage_tp_size(tp) || cfg->n_kv_heads % stage_tp_size(tp))) {
        snprintf(err, errlen, "a stage of %d ranks needs num_attention_heads (%d) and "
                 "num_key_value_heads (%d) to be multiples of %d", stage_tp_size(tp),
                 cfg->n_heads, cfg->n_kv_heads, stage_tp_size(tp));
        return -1;
    }
    if (range.first < 0 || range.last >= cfg->n_layers) {
        snprintf(err, errlen, "layer range %d-%d outside the model's %d layers", range.first,
                 range.last, cfg->n_layers);
        return -1;
    }
    stage_model *m = calloc(1, sizeof *m);
    if (!m) { snprintf(err, errlen, "out of memory"); return -1; }
    m->cfg = *cfg;
    m->cfg.layer_kind = malloc((size_t)cfg->n_layers * sizeof *cfg->layer_kind);
    m->layers = calloc((size_t)cfg->n_layers, sizeof *m->layers);
    m->inv_freq = malloc((size_t)(cfg->head_dim / 2 + 1) * sizeof(float));
    if (!m->cfg.layer_kind || !m->layers || !m->inv_freq) {
        snprintf(err, errlen, "out of memory");
        stage_model_free(m);
        return -1;
    }
    memcpy(m->cfg.layer_kind, cfg->layer_kind, (size_t)cfg->n_layers * sizeof *cfg->layer_kind);
    m->range = range;
    m->weights_dtype = weights_dtype;
    m->tp = tp && stage_tp_size(tp) > 1 ? tp : NULL;
    m->has_head = range.head;
    stage_rope_inv_freq(cfg->rope_theta, cfg->head_dim, m->inv_freq);

    char e2[512];
    if (st_open(dir, &m->st, e2, sizeof e2)) {
        snprintf(err, errlen, "%s", e2);
        stage_model_free(m);
        return -1;
    }
    if (check_tensor_names(m->st, cfg, e2, sizeof e2)) {
        snprintf(err, errlen, "%s", e2);
        stage_model_free(m);
        return -1;
    }
    const int D = cfg->hidden;
    int rc = 0;
    for (int l = 0; l < cfg->n_layers && !rc; l++) {
        m->layers[l].kind = cfg->layer_kind[l];
        if (l >= range.first && l <= range.last) rc = load_layer(m, l, e2, sizeof e2);
        else if (stage_kind_is_routed(cfg->layer_kind[l])) rc = load_router(m, l, e2, sizeof e2);
    }
    /* a tensor-parallel head holds its slice of lm_head (or of the tied embedding); the
     * embedding lookup is the group leader's (range.embed) */
    if (!rc && (range.embed || (range.head && cfg->tie_embeddings && !m->tp)))
        rc = get_m(m, "model.embed_tokens.weight", cfg->vocab, D, &m->embed, e2, sizeof e2);
    if (!rc && range.head) {
        rc = !(m->norm = get_w(m, "model.norm.weight", 1, D, 0, e2, sizeof e2));
        if (!rc && m->tp)
            rc = get_pm(m, cfg->tie_embeddings ? "model.embed_tokens.weight" : "lm_head.weight",
                        cfg->vocab, D, &m->lm_head, &m->tlm, e2, sizeof e2);
        else if (!rc && cfg->tie_embeddings) m->lm_head = m->embed;
        else if (!rc) rc = get_m(m, "lm_head.weight", cfg->vocab, D, &m->lm_head, e2, sizeof e2);
    }
    if (rc) {
        snprintf(err, errlen, "%s", e2);
        stage_model_free(m);
        return -1;
    }
    *out = m;
    return 0;
}

void stage_model_free(stage_model *m)
{
    if (!m) return;
    if (m->layers) {
        for (int l = 0; l < m->cfg.n_layers; l++) {
            free(m->layers[l].ew1);
            free(m->layers[l].ew2);
            free(m->layers[l].ew3);
            layer_w *L = &m->layers[l];
            stage_tp_weight *tw[] = {&L->tq, &L->tk, &L->tv, &L->to, &L->tgate, &L->tup, &L->tdown};
            for (size_t i = 0; i < sizeof tw / sizeof *tw; i++) stage_tp_weight_free(tw[i]);
            for (int e = 0; L->tew1 && e < m->cfg.n_experts; e++) {
                stage_tp_weight_free(&L->tew1[e]);
                stage_tp_weight_free(&L->tew2[e]);
                stage_tp_weight_free(&L->tew3[e]);
            }
            free(L->tew1);
            free(L->tew2);
            free(L->tew3);
        }
    }
    stage_tp_weight_free(&m->tlm);
    free(m->layers);
    free(m->cfg.layer_kind);
    free(m->inv_freq);
    st_close(m->st);
    free(m);
}

const stage_config *stage_model_config(const stage_model *m) { return &m->cfg; }
stage_range stage_model_range(const stage_model *m) { return m->range; }
size_t stage_model_weight_bytes(const stage_model *m) { return m->weight_bytes; }

int stage_embed(const stage_model *m, const int32_t *tokens, int n, float *x, char *err,
                size_t errlen)
{
    const int D = m->cfg.hidden;
    if (!m->embed.data) { snprintf(err, errlen, "this stage has no embedding"); return -1; }
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab) {
            snprintf(err, errlen, "token id %d out of range [0, %d)", tokens[i], m->cfg.vocab);
            return -1;
        }
        stage_weight_row_f32(&m->embed, tokens[i], x + (size_t)i * D);
    }
    return 0;
}

/* ========================================================================================
 * Routers — plain loops in a fixed order: the holder of a row and its receiver must reach
 * the same decision bit for bit.
 * ===================================================================================== */

float stage_router_score(const stage_model *m, int layer, const float *x)
{
    const layer_w *L = &m->layers[layer];
    return stage_dot(L->router_w, x, m->cfg.hidden) + L->router_b;
}

/* W2 silu(W1 x + b1) + b2: the predictor's logit. */
static float predictor_logit(const layer_w *L, const float *x, int D)
{
    double acc = 0.0;
    for (int i = 0; i < L->pred_h; i++) {
        float z = stage_dot(L->pred_w1 + (size_t)i * D, x, D) + (L->pred_b1 ? L->pred_b1[i] : 0.0f);
        acc += (double)L->pred_w2[i] * stage_silu(z);
    }
    return (float)acc + L->pred_b2;
}

float stage_router_logit(const stage_model *m, int layer, const float *x)
{
    if (m->cfg.mod_routing == STAGE_ROUTING_PREDICTOR)
        return predictor_logit(&m->layers[layer], x, m->cfg.hidden);
    return stage_router_score(m, layer, x);
}

void stage_router_shift(stage_model *m, int layer, float delta)
{
    layer_w *L = &m->layers[layer];
    if (m->cfg.mod_routing == STAGE_ROUTING_PREDICTOR) L->pred_b2 += delta;
    else L->router_b += delta;
}

float stage_router_bias(const stage_model *m, int layer)
{
    const layer_w *L = &m->layers[layer];
    return m->cfg.mod_routing == STAGE_ROUTING_PREDICTOR ? L->pred_b2 : L->router_b;
}

int stage_router_selects(const stage_model *m, int layer, const float *x)
{
    return (double)stage_sigmoid(stage_router_logit(m, layer, x)) > m->cfg.mod_threshold;
}

int stage_range_needs_row(const stage_model *m, int first, int last, const float *x)
{
    for (int l = first; l <= last; l++) {
        if (!stage_kind_is_routed(m->cfg.layer_kind[l])) return 1;
        if (m->cfg.mod_routing == STAGE_ROUTING_TOPK) return 1;
        if (stage_router_selects(m, l, x)) return 1;
    }
    return 0;
}

/* ========================================================================================
 * State: KV caches, workspace, stats
 * ===================================================================================== */

typedef struct {
    int n, cap;     /* entries used / allocated (cap = ctx: sized at init, never grows) */
    int32_t *pos;   /* [cap] positions, increasing (points into the layer's pool) */
    float *k, *v;   /* [cap][kv_dim] roped keys, values (point into the layer's pool) */
} kv_seq;

struct stage_state {
    const stage_model *m;
    /* tensor parallelism (m->tp): this rank's share of the heads and features; on one rank
     * these are the model's own numbers, so the single-rank arithmetic is unchanged */
    stage_tp *tp;               /* m->tp: NULL on one rank */
    int nh_l, nkv_l;            /* query / KV heads on this rank */
    int ff_l, fe_l;             /* intermediate / expert-intermediate features on this rank */
    double tp_io_bytes;         /* group bytes outside the layers (micro-batch in, LM head) */
    int tp_stopped;             /* leader: STOP was sent */
    /* follower copies of what the leader broadcasts */
    int32_t *f_i32;             /* [3][max_rows] slot, pos, token */
    uint8_t *f_u8;              /* [2][max_rows] flags, present */
    float *f_x;                 /* [max_rows][D] */
    float *f_logits;            /* [max_rows][vocab] (head) */
    uint8_t *f_buf;             /* [op_bytes] broadcast payload */
    size_t op_bytes;
    int n_layers;               /* layers in range */
    int n_slots, max_rows, max_seq; /* max_seq: positions per slot (--ctx) */
    kv_seq *kv;                 /* [n_layers][n_slots] views into the pools below */
    float *kv_k, *kv_v;         /* [n_layers][n_slots][max_seq][kv_dim] the slot pool */
    int32_t *kv_pos;            /* [n_layers][n_slots][max_seq] */
    uint8_t *released;          /* [n_slots] 1: no sequence holds the slot (until a reset) */
    int8_t *ms_keep;            /* [n_layers][n_slots] mindskip sequence decision: -1 undecided */
    stage_layer_stats *stats;   /* [n_layers] */
    /* workspace, all [max_rows][...] unless noted */
    int *act;                   /* [max_rows] active rows (micro-batch indices) */
    int *act2;                  /* [max_rows] second index list (mindskip kept rows) */
    int *ent;                   /* [max_rows] cache index of each active row's own entry */
    float *score;               /* [max_rows] router score */
    float *xin;                 /* [max_rows][D] gathered residual */
    float *h;                   /* [max_rows][D] normed */
    float *q;                   /* [max_rows][n_heads*hd] */
    float *k, *v;               /* [max_rows][kv_dim] */
    float *att;                 /* [max_rows][n_heads*hd] attention output before o_proj */
    float *a;                   /* [max_rows][D] attention block output */
    float *x2;                  /* [max_rows][D] x + a */
    float *h2;                  /* [max_rows][D] */
    float *f1, *f3;             /* [max_rows][max(I, Ie)] */
    float *mo;                  /* [max_rows][D] MLP / MoE output */
    float *ex;                  /* [max_rows][D] rows routed to one expert */
    float *eo;                  /* [max_rows][D] that expert's output */
    float *gate;                /* [max_rows][n_gate] */
    int *sel_e;                 /* [max_rows][experts_per_token] chosen experts */
    float *sel_w;               /* [max_rows][experts_per_token] their weights */
    int *erow;                  /* [max_rows] rows of the current expert (compact indices) */
    float *probs;               /* [n_heads/n_kv_heads][max_seq] attention weights of a GQA group */
    float *mean;                /* [D] */
    void (*progress)(void *);   /* called between layers */
    void *progress_arg;
};

static kv_seq *kv_at(stage_state *s, int li, int slot) { return &s->kv[(size_t)li * s->n_slots + slot]; }

/* The pool is sized at init: a slot holds at most max_seq entries per layer. */
static int kv_reserve(kv_seq *c, int need, int kvd, int max_seq)
{
    (void)kvd;
    (void)max_seq;
    return need <= c->cap ? 0 : -1;
}

stage_state *stage_state_init(const stage_model *m, int n_slots, int max_rows, int max_seq,
                              char *err, size_t errlen)
{
    const stage_config *c = &m->cfg;
    stage_state *s = calloc(1, sizeof *s);
    if (!s) { snprintf(err, errlen, "out of memory"); return NULL; }
    s->m = m;
    s->n_layers = m->range.last >= m->range.first ? m->range.last - m->range.first + 1 : 0;
    s->n_slots = n_slots;
    s->max_rows = max_rows < 1 ? 1 : max_rows;
    s->max_seq = max_seq;
    const size_t R = (size_t)s->max_rows, D = (size_t)c->hidden;
    const size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t ff = (size_t)(c->inter > c->expert_inter ? c->inter : c->expert_inter);
    size_t ng = (size_t)(c->n_experts + c->n_noop_experts + 1);
    size_t ept = (size_t)(c->experts_per_token > 0 ? c->experts_per_token : 1);

    s->tp = m->tp;
    const int K = s->tp ? stage_tp_size(s->tp) : 1;
    s->nh_l = c->n_heads / K;
    s->nkv_l = c->n_kv_heads / K;
    s->ff_l = c->inter;
    s->fe_l = c->expert_inter;
    if (s->tp) {
        int off;
        s->ff_l = stage_tp_split(s->tp, c->inter, &off);
        s->fe_l = stage_tp_split(s->tp, c->expert_inter, &off);
    }
    const size_t kvd_l = (size_t)s->nkv_l * c->head_dim; /* this rank's K/V width */
    const size_t n_seq = (size_t)s->n_layers * (size_t)n_slots; /* (layer, slot) caches */
    s->kv = calloc(n_seq + 1, sizeof *s->kv);
    /* calloc: Linux backs a page on its first write, so positions a routed layer never
     * stores cost address space only; the size is fixed here either way. */
    s->kv_k = calloc(n_seq * (size_t)max_seq * kvd_l + 1, sizeof(float));
    s->kv_v = calloc(n_seq * (size_t)max_seq * kvd_l + 1, sizeof(float));
    s->kv_pos = calloc(n_seq * (size_t)max_seq + 1, sizeof(int32_t));
    s->released = calloc((size_t)n_slots + 1, 1);
    s->ms_keep = malloc((size_t)s->n_layers * n_slots + 1);
    s->stats = calloc((size_t)s->n_layers + 1, sizeof *s->stats);
    s->act = malloc(R * sizeof(int));
    s->act2 = malloc(R * sizeof(int));
    s->ent = malloc(R * sizeof(int));
    s->erow = malloc(R * sizeof(int));
    s->sel_e = malloc(R * ept * sizeof(int));
    s->sel_w = malloc(R * ept * sizeof(float));
    s->score = malloc(R * sizeof(float));
    s->xin = malloc(R * D * sizeof(float));
    s->h = malloc(R * D * sizeof(float));
    s->q = malloc(R * qd * sizeof(float));
    s->k = malloc(R * kvd * sizeof(float));
    s->v = malloc(R * kvd * sizeof(float));
    s->att = malloc(R * qd * sizeof(float));
    s->a = malloc(R * D * sizeof(float));
    s->x2 = malloc(R * D * sizeof(float));
    s->h2 = malloc(R * D * sizeof(float));
    s->f1 = malloc(R * ff * sizeof(float));
    s->f3 = malloc(R * ff * sizeof(float));
    s->mo = malloc(R * D * sizeof(float));
    s->ex = malloc(R * D * sizeof(float));
    s->eo = malloc(R * D * sizeof(float));
    s->gate = malloc(R * ng * sizeof(float));
    s->probs = malloc((size_t)(max_seq + 1) * (c->n_heads / c->n_kv_heads) * sizeof(float));
    s->mean = malloc(D * sizeof(float));
    int ok = s->kv && s->kv_k && s->kv_v && s->kv_pos && s->released && s->ms_keep && s->stats && s->act && s->act2 && s->ent && s->erow &&
             s->sel_e && s->sel_w && s->score && s->xin && s->h && s->q && s->k && s->v &&
             s->att && s->a && s->x2 && s->h2 && s->f1 && s->f3 && s->mo && s->ex && s->eo &&
             s->gate && s->probs && s->mean;
    memset(s->ms_keep, -1, (size_t)s->n_layers * n_slots + 1);
    /* Every (layer, slot) cache gets max_seq entries of the pool: no growth at run time. */
    for (size_t i = 0; ok && i < n_seq; i++) {
        kv_seq *c2 = &s->kv[i];
        c2->cap = max_seq;
        c2->pos = s->kv_pos + i * (size_t)max_seq;
        c2->k = s->kv_k + i * (size_t)max_seq * kvd_l;
        c2->v = s->kv_v + i * (size_t)max_seq * kvd_l;
    }
    if (ok && s->tp) {
        size_t V = (size_t)c->vocab, w = D > ff ? D : ff;
        if (w < qd) w = qd;
        if (w < V) w = V;
        s->op_bytes = R * (3 * sizeof(int32_t) + 2) + R * D * sizeof(float);
        s->f_i32 = malloc(3 * R * sizeof(int32_t));
        s->f_u8 = malloc(2 * R);
        s->f_x = malloc(R * D * sizeof(float));
        s->f_buf = malloc(s->op_bytes);
        s->f_logits = m->has_head ? malloc(R * V * sizeof(float)) : NULL;
        ok = s->f_i32 && s->f_u8 && s->f_x && s->f_buf && (s->f_logits || !m->has_head) &&
             !stage_tp_reserve(s->tp, (int)R, (int)w, err, errlen);
    }
    if (!ok) {
        snprintf(err, errlen, "out of memory sizing the stage state (%d slots, %d rows, %d positions)",
                 n_slots, max_rows, max_seq);
        stage_state_free(s);
        return NULL;
    }
    return s;
}

void stage_state_free(stage_state *s)
{
    if (!s) return;
    free(s->kv); free(s->kv_k); free(s->kv_v); free(s->kv_pos); free(s->released);
    free(s->ms_keep); free(s->stats);
    free(s->act); free(s->act2); free(s->ent); free(s->erow); free(s->sel_e); free(s->sel_w);
    free(s->score); free(s->xin); free(s->h); free(s->q); free(s->k); free(s->v); free(s->att);
    free(s->a); free(s->x2); free(s->h2); free(s->f1); free(s->f3); free(s->mo); free(s->ex);
    free(s->eo); free(s->gate); free(s->probs); free(s->mean);
    free(s->f_i32); free(s->f_u8); free(s->f_x); free(s->f_buf); free(s->f_logits);
    free(s);
}

const stage_layer_stats *stage_state_layer_stats(const stage_state *s, int layer)
{
    int li = layer - s->m->range.first;
    if (li < 0 || li >= s->n_layers) return NULL;
    return &s->stats[li];
}

int stage_state_slots(const stage_state *s) { return s->n_slots; }
int stage_state_ctx(const stage_state *s) { return s->max_seq; }

static void slot_reset_impl(stage_state *s, int slot)
{
    if (slot < 0 || slot >= s->n_slots) return;
    for (int li = 0; li < s->n_layers; li++) {
        kv_at(s, li, slot)->n = 0;
        s->ms_keep[(size_t)li * s->n_slots + slot] = -1;
    }
    s->released[slot] = 0;
}

static void slot_release_impl(stage_state *s, int slot)
{
    if (slot < 0 || slot >= s->n_slots) return;
    slot_reset_impl(s, slot);
    s->released[slot] = 1;
}

/* ---- tensor-parallel group protocol: the leader (group rank 0) runs the pipeline and
 * broadcasts each operation on the stage state; the other ranks (followers) repeat it. ---- */
enum { TP_OP_STOP = 0, TP_OP_FORWARD, TP_OP_HEAD, TP_OP_RESET, TP_OP_RELEASE };
enum { TP_HDR = 8 }; /* op, n, first, last, slot, n_present, 0, 0 */

static int tp_leader(const stage_state *s)
{
    return s->tp && !s->tp_stopped && stage_tp_rank(s->tp) == 0;
}

static void tp_count_io(stage_state *s, size_t bytes)
{
    s->tp_io_bytes += (double)bytes * (stage_tp_size(s->tp) - 1);
}

/* The header goes by a non-blocking broadcast so an idle follower can sleep between polls. */
static void tp_send_hdr(stage_state *s, int op, int n, int first, int last, int slot, int np)
{
    int32_t hdr[TP_HDR] = {op, n, first, last, slot, np, 0, 0};
    MPI_Request rq;
    MPI_Ibcast(hdr, TP_HDR, MPI_INT32_T, 0, stage_tp_comm(s->tp), &rq);
    MPI_Wait(&rq, MPI_STATUS_IGNORE);
    tp_count_io(s, sizeof hdr);
}

static void tp_recv_hdr(stage_state *s, int32_t *hdr)
{
    MPI_Request rq;
    MPI_Ibcast(hdr, TP_HDR, MPI_INT32_T, 0, stage_tp_comm(s->tp), &rq);
    long spins = 0, nap_ns = 1000;
    for (;;) {
        int done = 0;
        MPI_Test(&rq, &done, MPI_STATUS_IGNORE);
        if (done) return;
        if (++spins < 2000) continue; /* a busy stage: the next op is microseconds away */
        struct timespec ts = {0, nap_ns};
        nanosleep(&ts, NULL);
        if (nap_ns < 1000000) nap_ns *= 2;
    }
}

void stage_state_slot_reset(stage_state *s, int slot)
{
    if (tp_leader(s)) tp_send_hdr(s, TP_OP_RESET, 0, 0, 0, slot, 0);
    slot_reset_impl(s, slot);
}

void stage_state_slot_release(stage_state *s, int slot)
{
    if (tp_leader(s)) tp_send_hdr(s, TP_OP_RELEASE, 0, 0, 0, slot, 0);
    slot_release_impl(s, slot);
}

int stage_state_slot_len(const stage_state *s, int slot)
{
    if (slot < 0 || slot >= s->n_slots) return -1;
    int n = 0;
    for (int li = 0; li < s->n_layers; li++) {
        const kv_seq *c = &s->kv[(size_t)li * s->n_slots + slot];
        if (c->n > 0 && c->pos[c->n - 1] + 1 > n) n = c->pos[c->n - 1] + 1;
    }
    return n;
}

size_t stage_state_kv_alloc_bytes(const stage_state *s)
{
    const stage_config *c = &s->m->cfg;
    size_t kvd = (size_t)s->nkv_l * c->head_dim, total = 0;
    for (size_t i = 0; i < (size_t)s->n_layers * s->n_slots; i++)
        total += (size_t)s->kv[i].cap * kvd * 2 * stage_dtype_size(STAGE_KV_DTYPE);
    return total;
}

/* ========================================================================================
 * Layer pieces. All work on a compact set of m rows (act[0..m) micro-batch indices, in
 * micro-batch order).
 * ===================================================================================== */

/* y [m][n] = x W^T: stage_matmul_w on one rank; on a tensor-parallel group the distributed
 * t, with x / y as this rank's feature slices when x_local / y_local (stage/tp.h). */
static void mm(const stage_state *s, const float *x, int m, const stage_weight *w,
               const stage_tp_weight *t, int x_local, int y_local, float *y)
{
    if (s->tp) stage_tp_matmul(s->tp, x, x_local, m, t, y, y_local);
    else stage_matmul_w(x, m, w, y);
}

static void gather(const float *x, const int *idx, int m, int D, float *dst)
{
    for (int j = 0; j < m; j++)
        memcpy(dst + (size_t)j * D, x + (size_t)idx[j] * D, (size_t)D * sizeof(float));
}

/* Self-attention of the m rows whose normed inputs are h [m][D]; rows idx[] of batch b.
 * Appends their K/V to layer li's caches, then each row attends causally over its slot's
 * cached positions up to its own. Output: s->a [m][D]. Returns the attended entries summed
 * over rows (for FLOP counts) or -1 on error. */
static double attention(stage_state *s, int li, const layer_w *L, const stage_batch *b,
                        const int *idx, int m, const float *h, char *err, size_t errlen)
{
    const stage_config *c = &s->m->cfg;
    /* this rank's heads: all of them on one rank; a tensor-parallel rank holds q/k/v, the
     * KV cache and the attention of its own n_heads/K (and n_kv_heads/K) heads */
    const int hd = c->head_dim, nh = s->nh_l, nkv = s->nkv_l;
    const int qd = nh * hd, kvd = nkv * hd, grp = nh / nkv;
    const float scale = 1.0f / sqrtf((float)hd);

    mm(s, h, m, &L->wq, &L->tq, 0, 1, s->q);
    mm(s, h, m, &L->wk, &L->tk, 0, 1, s->k);
    mm(s, h, m, &L->wv, &L->tv, 0, 1, s->v);
    for (int j = 0; j < m; j++) {
        int r = idx[j];
        stage_rope(s->q + (size_t)j * qd, nh, hd, b->pos[r], s->m->inv_freq);
        stage_rope(s->k + (size_t)j * kvd, nkv, hd, b->pos[r], s->m->inv_freq);
        kv_seq *cs = kv_at(s, li, b->slot[r]);
        if (cs->n > 0 && cs->pos[cs->n - 1] >= b->pos[r]) {
            snprintf(err, errlen, "layer %d: slot %d position %d arrives after position %d",
                     s->m->range.first + li, b->slot[r], b->pos[r], cs->pos[cs->n - 1]);
            return -1;
        }
        if (kv_reserve(cs, cs->n + 1, kvd, s->max_seq)) {
            snprintf(err, errlen, "layer %d: slot %d KV cache full (%d positions)",
                     s->m->range.first + li, b->slot[r], s->max_seq);
            return -1;
        }
        cs->pos[cs->n] = b->pos[r];
        memcpy(cs->k + (size_t)cs->n * kvd, s->k + (size_t)j * kvd, (size_t)kvd * sizeof(float));
        memcpy(cs->v + (size_t)cs->n * kvd, s->v + (size_t)j * kvd, (size_t)kvd * sizeof(float));
        s->ent[j] = cs->n++;
    }
    double ctx_total = 0.0;
    for (int j = 0; j < m; j++) {
        const kv_seq *cs = kv_at(s, li, b->slot[idx[j]]);
        int n_ctx = s->ent[j] + 1; /* entries are in position order: a causal prefix */
        ctx_total += n_ctx;
        /* the grp query heads sharing KV head kh are contiguous in q: one pass over K/V */
        for (int kh = 0; kh < nkv; kh++)
            stage_attend_gqa(s->q + (size_t)j * qd + (size_t)kh * grp * hd, grp,
                             cs->k + (size_t)kh * hd, cs->v + (size_t)kh * hd, (size_t)kvd, n_ctx,
                             hd, scale, s->probs, s->att + (size_t)j * qd + (size_t)kh * grp * hd);
    }
    mm(s, s->att, m, &L->wo, &L->to, 1, 0, s->a);
    return ctx_total;
}

/* Dense SwiGLU MLP of h2 [m][D] into s->mo [m][D]. */
static void mlp(stage_state *s, const layer_w *L, int m)
{
    const int I = s->ff_l; /* this rank's intermediate features (all on one rank) */
    mm(s, s->h2, m, &L->w_gate, &L->tgate, 0, 1, s->f1);
    mm(s, s->h2, m, &L->w_up, &L->tup, 0, 1, s->f3);
    stage_swiglu(s->f1, s->f3, (long)m * I);
    mm(s, s->f1, m, &L->w_down, &L->tdown, 1, 0, s->mo);
}

/* Mixture of experts on h2 [m][D] into s->mo. staged: softmax over E, top experts_per_token,
 * renormalised. integrated: softmax over E + N_noop, top-1; a no-op winner gives 0, a real
 * one p_winner * expert. Rows are grouped per expert (in row order) so each expert runs one
 * GEMM. Returns the number of (row, expert) evaluations. */
static long moe(stage_state *s, const layer_w *L, int m)
{
    const stage_config *c = &s->m->cfg;
    const int D = c->hidden, Ie = s->fe_l, E = c->n_experts, G = L->n_gate;
    const int integrated = L->kind == STAGE_KIND_MODE_INTEGRATED;
    const int k = integrated ? 1 : c->experts_per_token;
    stage_matmul_w(s->h2, m, &L->moe_gate, s->gate);
    for (int j = 0; j < m; j++) {
        float *g = s->gate + (size_t)j * G;
        stage_softmax(g, G);
        int *se = s->sel_e + (size_t)j * k;
        float *sw = s->sel_w + (size_t)j * k;
        float wsum = 0.0f;
        for (int t = 0; t < k; t++) { /* top-k, ties to the lower index */
            int best = -1;
            for (int e = 0; e < G; e++) {
                int taken = 0;
                for (int u = 0; u < t; u++) taken |= se[u] == e;
                if (!taken && (best < 0 || g[e] > g[best])) best = e;
            }
            se[t] = best;
            sw[t] = g[best];
            wsum += g[best];
        }
        if (!integrated)
            for (int t = 0; t < k; t++) sw[t] /= wsum;
    }
    memset(s->mo, 0, (size_t)m * D * sizeof(float));
    long evals = 0;
    for (int e = 0; e < E; e++) {
        int ne = 0;
        for (int j = 0; j < m; j++)
            for (int t = 0; t < k; t++)
                if (s->sel_e[(size_t)j * k + t] == e) s->erow[ne++] = j;
        if (!ne) continue;
        evals += ne;
        gather(s->h2, s->erow, ne, D, s->ex);
        mm(s, s->ex, ne, &L->ew1[e], L->tew1 ? &L->tew1[e] : NULL, 0, 1, s->f1);
        mm(s, s->ex, ne, &L->ew3[e], L->tew3 ? &L->tew3[e] : NULL, 0, 1, s->f3);
        stage_swiglu(s->f1, s->f3, (long)ne * Ie);
        mm(s, s->f1, ne, &L->ew2[e], L->tew2 ? &L->tew2[e] : NULL, 1, 0, s->eo);
        for (int u = 0; u < ne; u++) {
            int j = s->erow[u];
            float w = 0.0f;
            for (int t = 0; t < k; t++)
                if (s->sel_e[(size_t)j * k + t] == e) w = s->sel_w[(size_t)j * k + t];
            float *dst = s->mo + (size_t)j * D;
            const float *src = s->eo + (size_t)u * D;
            for (int i = 0; i < D; i++) dst[i] += w * src[i];
        }
    }
    return evals;
}

/* ========================================================================================
 * Blocks
 * ===================================================================================== */

/* Which present rows does routed layer l select? Fills act[] (micro-batch order) and
 * score[] (their r). */
static int route_rows(stage_state *s, int l, const stage_batch *b, const float *x,
                      const uint8_t *present, char *err, size_t errlen)
{
    const stage_model *M = s->m;
    const stage_config *c = &M->cfg;
    const int D = c->hidden;
    int m = 0;
    if (c->mod_routing != STAGE_ROUTING_TOPK) {
        for (int i = 0; i < b->n; i++) {
            if (!present[i]) continue;
            const float *xi = x + (size_t)i * D;
            if (stage_router_selects(M, l, xi)) {
                s->act[m] = i;
                s->score[m++] = stage_router_score(M, l, xi);
            }
        }
        return m;
    }
    /* top-k (expert choice) per sequence over the rows it has in this forward. Every row
     * of the micro-batch must be here: top-k is non-causal. */
    for (int i = 0; i < b->n; i++) {
        if (!present[i]) {
            snprintf(err, errlen, "layer %d: topk routing needs every row of the micro-batch", l);
            return -1;
        }
        if (!(b->flags[i] & STAGE_ROW_PROMPT)) { /* stage.h: a top-k model asked to decode */
            snprintf(err, errlen, "layer %d: topk routing is non-causal and cannot decode (row %d: "
                     "slot %d position %d is not a prompt row)", l, i, b->slot[i], b->pos[i]);
            return -1;
        }
        s->xin[i] = stage_router_score(M, l, x + (size_t)i * D); /* scratch: r per row */
    }
    for (int i = 0; i < b->n; i++) {
        int T = 0, rank = 0;
        for (int u = 0; u < b->n; u++) {
            if (b->slot[u] != b->slot[i]) continue;
            T++;
            /* u outranks i: larger r, or equal r at a lower position */
            if (s->xin[u] > s->xin[i] || (s->xin[u] == s->xin[i] && b->pos[u] < b->pos[i])) rank++;
        }
        int k = (int)floor(c->mod_capacity * T);
        if (k < 1) k = 1;
        if (rank < k) s->act[m++] = i;
    }
    for (int j = 0; j < m; j++) s->score[j] = s->xin[s->act[j]];
    return m;
}

static void count_attn(stage_layer_stats *st, const stage_config *c, const stage_batch *b,
                       double rows_done, double ctx_done)
{
    double dense_ctx = 0.0;
    for (int i = 0; i < b->n; i++) dense_ctx += b->pos[i] + 1;
    st->flops += rows_done * stage_flops_attn_proj(c) + stage_flops_attn_ctx(c, ctx_done);
    st->flops_dense += b->n * stage_flops_attn_proj(c) + stage_flops_attn_ctx(c, dense_ctx);
}

/* MoD / staged MoDE: y = x + g(r) (a + m) for selected rows, attention among them only. */
static int block_routed(stage_state *s, int li, int l, const layer_w *L, const stage_batch *b,
                        float *x, const uint8_t *present, char *err, size_t errlen)
{
    const stage_config *c = &s->m->cfg;
    const int D = c->hidden;
    stage_layer_stats *st = &s->stats[li];
    int m = route_rows(s, l, b, x, present, err, errlen);
    if (m < 0) return -1;
    st->active += m;
    double ctx = 0.0;
    if (m > 0) {
        gather(x, s->act, m, D, s->xin);
        stage_rmsnorm(s->xin, m, D, L->ln1, c->eps, s->h);
        ctx = attention(s, li, L, b, s->act, m, s->h, err, errlen);
        if (ctx < 0) return -1;
        for (size_t i = 0; i < (size_t)m * D; i++) s->x2[i] = s->xin[i] + s->a[i];
        stage_rmsnorm(s->x2, m, D, L->ln2, c->eps, s->h2);
    }
    long evals = 0;
    if (L->kind == STAGE_KIND_MODE_STAGED) evals = m ? moe(s, L, m) : 0;
    else if (m) mlp(s, L, m);
    for (int j = 0; j < m; j++) {
        float r = s->score[j];
        float g = c->mod_scale == STAGE_SCALE_SIGMOID ? stage_sigmoid(r) : r;
        float *xo = x + (size_t)s->act[j] * D;
        const float *xi = s->xin + (size_t)j * D, *a = s->a + (size_t)j * D, *mo = s->mo + (size_t)j * D;
        for (int i = 0; i < D; i++) xo[i] = xi[i] + g * (a[i] + mo[i]);
    }
    st->kv_entries += m;
    count_attn(st, c, b, m, ctx);
    if (L->kind == STAGE_KIND_MODE_STAGED) {
        double per_row = stage_flops_gate(c, L->n_gate);
        st->flops += m * per_row + evals * stage_flops_expert(c);
        st->flops_dense += b->n * (per_row + c->experts_per_token * stage_flops_expert(c));
    } else {
        st->flops += m * stage_flops_mlp(c);
        st->flops_dense += b->n * stage_flops_mlp(c);
    }
    return 0;
}

/* dense, mode_integrated, mindskip: every present row runs the MLP; attention runs for all of
 * them except rows a mindskip router skips. */
static int block_full(stage_state *s, int li, int l, const layer_w *L, const stage_batch *b,
                      float *x, const uint8_t *present, char *err, size_t errlen)
{
    const stage_config *c = &s->m->cfg;
    const int D = c->hidden;
    stage_layer_stats *st = &s->stats[li];
    int m = 0;
    for (int i = 0; i < b->n; i++)
        if (present[i]) s->act[m++] = i;
    if (m == 0) return 0;
    gather(x, s->act, m, D, s->xin);
    stage_rmsnorm(s->xin, m, D, L->ln1, c->eps, s->h);

    /* kept[j]: does compact row j run attention? act2 = compact indices of kept rows. */
    int nk = 0;
    if (L->kind != STAGE_KIND_MINDSKIP) {
        for (int j = 0; j < m; j++) s->act2[nk++] = j;
    } else if (c->ms_granularity == STAGE_GRAN_TOKEN) {
        for (int j = 0; j < m; j++) {
            float p = stage_sigmoid(stage_dot(L->router_w, s->h + (size_t)j * D, D) + L->router_b);
            if ((double)p > c->ms_threshold) s->act2[nk++] = j;
        }
    } else {
        int8_t *keep = s->ms_keep + (size_t)li * s->n_slots;
        /* Decide once per sequence, on the mean of h over all its prompt rows in this
         * forward (the scheduler keeps such a prompt in one micro-batch). */
        for (int j = 0; j < m; j++) {
            int r = s->act[j], slot = b->slot[r];
            if (!(b->flags[r] & STAGE_ROW_PROMPT)) continue;
            int first = 1;
            for (int u = 0; u < j; u++)
                if (b->slot[s->act[u]] == slot && (b->flags[s->act[u]] & STAGE_ROW_PROMPT)) first = 0;
            if (!first) continue;
            if (keep[slot] >= 0) {
                snprintf(err, errlen, "layer %d: slot %d prompt split across micro-batches "
                         "(mindskip sequence granularity needs the whole prompt at once)", l, slot);
                return -1;
            }
            memset(s->mean, 0, (size_t)D * sizeof(float));
            int cnt = 0;
            for (int u = j; u < m; u++) {
                int ru = s->act[u];
                if (b->slot[ru] != slot || !(b->flags[ru] & STAGE_ROW_PROMPT)) continue;
                const float *hu = s->h + (size_t)u * D;
                for (int i = 0; i < D; i++) s->mean[i] += hu[i];
                cnt++;
            }
            for (int i = 0; i < D; i++) s->mean[i] /= (float)cnt;
            float p = stage_sigmoid(stage_dot(L->router_w, s->mean, D) + L->router_b);
            keep[slot] = (double)p > c->ms_threshold;
        }
        for (int j = 0; j < m; j++) {
            int slot = b->slot[s->act[j]];
            if (keep[slot] < 0) {
                snprintf(err, errlen, "layer %d: slot %d decodes before its prompt was seen", l, slot);
                return -1;
            }
            if (keep[slot]) s->act2[nk++] = j;
        }
    }

    /* Attention on kept rows: compact their h into xin-sized scratch (x2 as staging). */
    double ctx = 0.0;
    memcpy(s->x2, s->xin, (size_t)m * D * sizeof(float));
    if (nk > 0) {
        int *rows = s->erow; /* micro-batch indices of kept rows */
        for (int u = 0; u < nk; u++) rows[u] = s->act[s->act2[u]];
        const float *hk = s->h;
        if (nk != m) {
            gather(s->h, s->act2, nk, D, s->ex);
            hk = s->ex;
        }
        ctx = attention(s, li, L, b, rows, nk, hk, err, errlen);
        if (ctx < 0) return -1;
        for (int u = 0; u < nk; u++) {
            float *dst = s->x2 + (size_t)s->act2[u] * D;
            const float *a = s->a + (size_t)u * D;
            for (int i = 0; i < D; i++) dst[i] += a[i];
        }
    }
    stage_rmsnorm(s->x2, m, D, L->ln2, c->eps, s->h2);
    long evals = 0;
    if (L->kind == STAGE_KIND_MODE_INTEGRATED) evals = moe(s, L, m);
    else mlp(s, L, m);
    for (int j = 0; j < m; j++) {
        float *xo = x + (size_t)s->act[j] * D;
        const float *x2 = s->x2 + (size_t)j * D, *mo = s->mo + (size_t)j * D;
        for (int i = 0; i < D; i++) xo[i] = x2[i] + mo[i];
    }
    st->active += nk;
    st->kv_entries += nk;
    count_attn(st, c, b, nk, ctx);
    if (L->kind == STAGE_KIND_MODE_INTEGRATED) {
        double per_row = stage_flops_gate(c, L->n_gate);
        st->flops += m * per_row + evals * stage_flops_expert(c);
        st->flops_dense += b->n * (per_row + stage_flops_expert(c));
    } else {
        st->flops += m * stage_flops_mlp(c);
        st->flops_dense += b->n * stage_flops_mlp(c);
    }
    return 0;
}

void stage_state_set_progress(stage_state *s, void (*fn)(void *), void *arg)
{
    s->progress = fn;
    s->progress_arg = arg;
}

int stage_forward(stage_state *s, const stage_batch *b, float *x, const uint8_t *present,
                  char *err, size_t errlen)
{
    return stage_forward_range(s, b, x, present, s->m->range.first, s->m->range.last, err, errlen);
}

static int forward_impl(stage_state *s, const stage_batch *b, float *x, const uint8_t *present,
                        int first, int last, char *err, size_t errlen)
{
    const stage_model *M = s->m;
    if (first < M->range.first || last > M->range.last) {
        snprintf(err, errlen, "layers %d-%d outside this stage's %d-%d", first, last,
                 M->range.first, M->range.last);
        return -1;
    }
    if (b->n > s->max_rows) {
        snprintf(err, errlen, "micro-batch of %d rows exceeds the workspace (%d rows)", b->n,
                 s->max_rows);
        return -1;
    }
    for (int i = 0; i < b->n; i++) {
        if (b->slot[i] < 0 || b->slot[i] >= s->n_slots || b->pos[i] < 0 || b->pos[i] >= s->max_seq) {
            snprintf(err, errlen, "row %d: slot %d / position %d outside this stage's state "
                     "(%d slots, %d positions)", i, b->slot[i], b->pos[i], s->n_slots, s->max_seq);
            return -1;
        }
    }
    /* A prompt row at position 0 starts a new sequence in its slot, on every stage, whether
     * or not this stage holds the row (the descriptor reaches every stage). */
    for (int i = 0; i < b->n && first == M->range.first; i++)
        if (b->pos[i] == 0 && (b->flags[i] & STAGE_ROW_PROMPT)) slot_reset_impl(s, b->slot[i]);
    for (int i = 0; i < b->n; i++)
        if (s->released[b->slot[i]]) {
            snprintf(err, errlen, "row %d: slot %d was released and holds no sequence (position "
                     "%d is not a new prompt)", i, b->slot[i], b->pos[i]);
            return -1;
        }
    for (int l = first; l <= last; l++) {
        int li = l - M->range.first;
        const layer_w *L = &M->layers[l];
        if (s->progress && l > first) s->progress(s->progress_arg);
        double t0 = stage_now_s(), tb0 = s->tp ? stage_tp_bytes(s->tp) : 0.0;
        int rc = stage_kind_is_routed(L->kind)
                     ? block_routed(s, li, l, L, b, x, present, err, errlen)
                     : block_full(s, li, l, L, b, x, present, err, errlen);
        if (rc) return rc;
        s->stats[li].rows += b->n;
        s->stats[li].seconds += stage_now_s() - t0;
        if (s->tp) s->stats[li].tp_bytes += stage_tp_bytes(s->tp) - tb0;
    }
    return 0;
}

/* Leader: the micro-batch's descriptor, present mask and present rows to the group. */
static int tp_send_forward(stage_state *s, const stage_batch *b, const float *x,
                           const uint8_t *present, int first, int last, char *err, size_t errlen)
{
    const int D = s->m->cfg.hidden, n = b->n;
    if (n > s->max_rows) {
        snprintf(err, errlen, "micro-batch of %d rows exceeds the workspace (%d rows)", n, s->max_rows);
        return -1;
    }
    uint8_t *p = s->f_buf;
    memcpy(p, b->slot, (size_t)n * 4); p += (size_t)n * 4;
    memcpy(p, b->pos, (size_t)n * 4); p += (size_t)n * 4;
    memcpy(p, b->token, (size_t)n * 4); p += (size_t)n * 4;
    memcpy(p, b->flags, (size_t)n); p += n;
    memcpy(p, present, (size_t)n); p += n;
    int np = 0;
    for (int i = 0; i < n; i++)
        if (present[i]) {
            memcpy(p, x + (size_t)i * D, (size_t)D * sizeof(float));
            p += (size_t)D * sizeof(float);
            np++;
        }
    size_t len = (size_t)(p - s->f_buf);
    tp_send_hdr(s, TP_OP_FORWARD, n, first, last, 0, np);
    MPI_Bcast(s->f_buf, (int)len, MPI_BYTE, 0, stage_tp_comm(s->tp));
    tp_count_io(s, len);
    return 0;
}

int stage_forward_range(stage_state *s, const stage_batch *b, float *x, const uint8_t *present,
                        int first, int last, char *err, size_t errlen)
{
    if (tp_leader(s) && tp_send_forward(s, b, x, present, first, last, err, errlen)) return -1;
    return forward_impl(s, b, x, present, first, last, err, errlen);
}

static int head_impl(stage_state *s, const float *x, const int *rows, int n_rows,
                     float *logits, char *err, size_t errlen);

int stage_head_logits(stage_state *s, const float *x, const int *rows, int n_rows,
                      float *logits, char *err, size_t errlen)
{
    if (tp_leader(s) && s->m->has_head && n_rows > 0 && n_rows <= s->max_rows) {
        const int D = s->m->cfg.hidden;
        float *p = (float *)(void *)s->f_buf;
        for (int j = 0; j < n_rows; j++)
            memcpy(p + (size_t)j * D, x + (size_t)rows[j] * D, (size_t)D * sizeof(float));
        tp_send_hdr(s, TP_OP_HEAD, n_rows, 0, 0, 0, 0);
        MPI_Bcast(s->f_buf, n_rows * D * (int)sizeof(float), MPI_BYTE, 0, stage_tp_comm(s->tp));
        tp_count_io(s, (size_t)n_rows * D * sizeof(float));
    }
    double tb0 = s->tp ? stage_tp_bytes(s->tp) : 0.0;
    int rc = head_impl(s, x, rows, n_rows, logits, err, errlen);
    if (s->tp) s->tp_io_bytes += stage_tp_bytes(s->tp) - tb0;
    return rc;
}

void stage_state_tp_stop(stage_state *s)
{
    if (!tp_leader(s)) return;
    tp_send_hdr(s, TP_OP_STOP, 0, 0, 0, 0, 0);
    s->tp_stopped = 1;
}

double stage_state_tp_io_bytes(const stage_state *s) { return s->tp_io_bytes; }

int stage_state_tp_follow(stage_state *s, char *err, size_t errlen)
{
    if (!s->tp || stage_tp_rank(s->tp) == 0) {
        snprintf(err, errlen, "stage_state_tp_follow: not a follower of a tensor-parallel stage");
        return -1;
    }
    const int D = s->m->cfg.hidden, R = s->max_rows;
    for (;;) {
        int32_t h[TP_HDR];
        tp_recv_hdr(s, h);
        const int op = h[0], n = h[1], np = h[5];
        if (op == TP_OP_STOP) return 0;
        if (op == TP_OP_RESET || op == TP_OP_RELEASE) {
            if (op == TP_OP_RESET) slot_reset_impl(s, h[4]);
            else slot_release_impl(s, h[4]);
            continue;
        }
        if (n < 0 || n > R || np < 0 || np > n || (op != TP_OP_FORWARD && op != TP_OP_HEAD)) {
            snprintf(err, errlen, "tensor-parallel op %d with %d rows (%d present) from the leader", op, n, np);
            return -1;
        }
        int32_t *slot = s->f_i32, *pos = slot + R, *tok = pos + R;
        uint8_t *flags = s->f_u8, *present = flags + R;
        if (op == TP_OP_HEAD) {
            MPI_Bcast(s->f_buf, n * D * (int)sizeof(float), MPI_BYTE, 0, stage_tp_comm(s->tp));
            for (int j = 0; j < n; j++) slot[j] = j; /* the rows come packed */
            if (head_impl(s, (const float *)(void *)s->f_buf, slot, n, s->f_logits, err, errlen)) return -1;
            continue;
        }
        size_t len = (size_t)n * 14 + (size_t)np * D * sizeof(float);
        MPI_Bcast(s->f_buf, (int)len, MPI_BYTE, 0, stage_tp_comm(s->tp));
        const uint8_t *p = s->f_buf;
        memcpy(slot, p, (size_t)n * 4); p += (size_t)n * 4;
        memcpy(pos, p, (size_t)n * 4); p += (size_t)n * 4;
        memcpy(tok, p, (size_t)n * 4); p += (size_t)n * 4;
        memcpy(flags, p, (size_t)n); p += n;
        memcpy(present, p, (size_t)n); p += n;
        for (int i = 0; i < n; i++)
            if (present[i]) {
                memcpy(s->f_x + (size_t)i * D, p, (size_t)D * sizeof(float));
                p += (size_t)D * sizeof(float);
            }
        stage_batch b = {.n = n, .slot = slot, .pos = pos, .token = tok, .flags = flags};
        if (forward_impl(s, &b, s->f_x, present, h[2], h[3], err, errlen)) return -1;
    }
}

static int head_impl(stage_state *s, const float *x, const int *rows, int n_rows,
                     float *logits, char *err, size_t errlen)
{
    const stage_model *M = s->m;
    const int D = M->cfg.hidden;
    if (!M->has_head) { snprintf(err, errlen, "this stage is not the head"); return -1; }
    if (n_rows > s->max_rows) {
        snprintf(err, errlen, "%d logits rows exceed the workspace (%d)", n_rows, s->max_rows);
        return -1;
    }
    if (n_rows == 0) return 0;
    gather(x, rows, n_rows, D, s->xin);
    stage_rmsnorm(s->xin, n_rows, D, M->norm, M->cfg.eps, s->h);
    mm(s, s->h, n_rows, &M->lm_head, &M->tlm, 0, 0, logits);
    return 0;
}
