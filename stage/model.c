/* stage/model.c — a stage's weights (loaded from safetensors, in their dtype) and the
 * routers every stage evaluates (docs/SPEC.md §2, §3). See stage.h for the contract. */
#include "stage/stage_impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stage/arch.h"
#include "stage/kernels.h"
#include "stage/wmem.h"

/* ---- Weights --------------------------------------------------------------------------------- */

static const float *get_w(stage_model *m, const char *name, int ndim, int64_t d0, int64_t d1,
                          char *err, size_t errlen)
{
    int64_t shape[2] = {d0, d1};
    const float *p = st_get_f32(m->st, name, ndim, shape, err, errlen);
    if (p) m->weight_bytes += (size_t)(ndim == 1 ? d0 : d0 * d1) * sizeof(float);
    return p;
}

int stage_q8_quantizes(const char *name)
{
    static const char *const tails[] = {"_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"};
    size_t n = strlen(name);
    if (!strcmp(name, "lm_head.weight")) return 1;
    if (strncmp(name, "model.layers.", 13)) return 0;
    for (size_t i = 0; i < sizeof tails / sizeof *tails; i++) {
        size_t t = strlen(tails[i]);
        if (n > t && !strcmp(name + n - t, tails[i])) return 1;
    }
    return 0;
}

/* A weight matrix [d0][d1], kept in its dtype (no f32 copy); with q8_0 weights only the
 * matrices stage_q8_quantizes names are quantized, the others keep the checkpoint's dtype. */
static int get_m(stage_model *m, const char *name, int64_t d0, int64_t d1, stage_weight *w,
                 char *err, size_t errlen)
{
    int want = m->weights_dtype;
    const int kept = stage_q8_kept(&m->cfg, name); /* its directory left it unquantized */
    if (want == STAGE_Q8_0 && (!stage_q8_quantizes(name) || kept)) want = -1;
    if (st_get_weight(m->st, name, d0, d1, want, w, err, errlen)) return -1;
    if (w->dtype == STAGE_Q8_0 && (!stage_q8_quantizes(name) || (!m->cfg.q8_0 && want < 0))) {
        snprintf(err, errlen,
                 "tensor %s is I8 (q8_0): only the projections of a directory whose config.json "
                 "has a q8_0 quantization_config may be (docs/SPEC.md §9)",
                 name);
        return -1;
    }
    /* a quantized directory: its config says which projections are I8, the file must agree */
    if (m->cfg.q8_0 && stage_q8_quantizes(name) && (w->dtype == STAGE_Q8_0) == kept) {
        snprintf(err, errlen,
                 "tensor %s is %s, but config.json's quantization_config %s (docs/SPEC.md §9)",
                 name, stage_wdtype_name(w->dtype),
                 kept ? "keeps it as stored (ignore)" : "quantizes it (not in ignore)");
        return -1;
    }
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
#define NEED(ptr)                                                                                  \
    do {                                                                                           \
        if (!(ptr)) return -1;                                                                     \
    } while (0)
#define NEED0(call)                                                                                \
    do {                                                                                           \
        if (call) return -1;                                                                       \
    } while (0)

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
    if (c->qkv_bias) {
        LNAME(name, l, "self_attn.q_proj.bias");
        NEED(L->bq = get_w(m, name, 1, qd, 0, err, errlen));
        LNAME(name, l, "self_attn.k_proj.bias");
        NEED(L->bk = get_w(m, name, 1, kvd, 0, err, errlen));
        LNAME(name, l, "self_attn.v_proj.bias");
        NEED(L->bv = get_w(m, name, 1, kvd, 0, err, errlen));
    }
    if (c->o_bias) {
        LNAME(name, l, "self_attn.o_proj.bias");
        NEED(L->bo = get_w(m, name, 1, D, 0, err, errlen));
    }
    if (c->qk_norm) {
        LNAME(name, l, "self_attn.q_norm.weight");
        NEED(L->qnorm = get_w(m, name, 1, hd, 0, err, errlen));
        LNAME(name, l, "self_attn.k_norm.weight");
        NEED(L->knorm = get_w(m, name, 1, hd, 0, err, errlen));
    }

    if (L->kind == STAGE_KIND_MODE_STAGED || L->kind == STAGE_KIND_MODE_INTEGRATED) {
        int E = c->n_experts, Ie = c->expert_inter;
        if (c->mlp_bias) { /* the experts have no biases: mlp_bias has no meaning there */
            snprintf(err, errlen, "layer %d: mlp_bias with a %s layer is not supported", l,
                     stage_kind_name(L->kind));
            return -1;
        }
        L->n_gate = E + (L->kind == STAGE_KIND_MODE_INTEGRATED ? c->n_noop_experts : 0);
        LNAME(name, l, "block_sparse_moe.gate.weight");
        NEED0(get_m(m, name, L->n_gate, D, &L->moe_gate, err, errlen));
        L->ew1 = calloc((size_t)E, sizeof *L->ew1);
        L->ew2 = calloc((size_t)E, sizeof *L->ew2);
        L->ew3 = calloc((size_t)E, sizeof *L->ew3);
        if (!L->ew1 || !L->ew2 || !L->ew3) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        if (m->tp) {
            L->tew1 = calloc((size_t)E, sizeof *L->tew1);
            L->tew2 = calloc((size_t)E, sizeof *L->tew2);
            L->tew3 = calloc((size_t)E, sizeof *L->tew3);
            if (!L->tew1 || !L->tew2 || !L->tew3) {
                snprintf(err, errlen, "out of memory");
                return -1;
            }
        }
        for (int e = 0; e < E; e++) {
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l,
                     e);
            NEED0(get_pm(m, name, Ie, D, &L->ew1[e], m->tp ? &L->tew1[e] : NULL, err, errlen));
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.w2.weight", l,
                     e);
            NEED0(get_pm(m, name, D, Ie, &L->ew2[e], m->tp ? &L->tew2[e] : NULL, err, errlen));
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.w3.weight", l,
                     e);
            NEED0(get_pm(m, name, Ie, D, &L->ew3[e], m->tp ? &L->tew3[e] : NULL, err, errlen));
        }
    } else {
        LNAME(name, l, "mlp.gate_proj.weight");
        NEED0(get_pm(m, name, c->inter, D, &L->w_gate, &L->tgate, err, errlen));
        LNAME(name, l, "mlp.up_proj.weight");
        NEED0(get_pm(m, name, c->inter, D, &L->w_up, &L->tup, err, errlen));
        LNAME(name, l, "mlp.down_proj.weight");
        NEED0(get_pm(m, name, D, c->inter, &L->w_down, &L->tdown, err, errlen));
        if (c->mlp_bias) {
            LNAME(name, l, "mlp.gate_proj.bias");
            NEED(L->bgate = get_w(m, name, 1, c->inter, 0, err, errlen));
            LNAME(name, l, "mlp.up_proj.bias");
            NEED(L->bup = get_w(m, name, 1, c->inter, 0, err, errlen));
            LNAME(name, l, "mlp.down_proj.bias");
            NEED(L->bdown = get_w(m, name, 1, D, 0, err, errlen));
        }
    }
    if (L->kind == STAGE_KIND_MINDSKIP || stage_kind_is_routed(L->kind))
        return load_router(m, l, err, errlen);
    return 0;
}

/* Every tensor of the checkpoint must be one this engine reads (or a known buffer that does
 * not change the math): a q/k/v bias, a per-head q/k norm or any other tensor of a block
 * variant that is not implemented would otherwise be ignored silently and give wrong logits
 * with exit 0 (docs/SPEC.md §3). Checked on names only: cheap, no shard is opened. */
static int known_layer_tensor(const char *s)
{
    static const char *const names[] = {
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "self_attn.rotary_emb.inv_freq", /* a buffer of rope_theta */
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "block_sparse_moe.gate.weight",
        "router.weight",
        "router.bias",
        "router_predictor.fc1.weight",
        "router_predictor.fc1.bias",
        "router_predictor.fc2.weight",
        "router_predictor.fc2.bias",
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

static int check_tensor_names(const st_model *st, const stage_config *cfg, char *err, size_t errlen)
{
    static const char lp[] = "model.layers.";
    for (size_t i = 0; i < st_count(st); i++) {
        const char *nm = st_name_at(st, i);
        char base[256]; /* a q8_0 directory's NAME_scale: checked as NAME (docs/SPEC.md §9) */
        size_t n = strlen(nm);
        if (cfg->q8_0 && n > 6 && n - 6 < sizeof base && !strcmp(nm + n - 6, "_scale")) {
            memcpy(base, nm, n - 6);
            base[n - 6] = 0;
            if (stage_q8_quantizes(base)) nm = base;
        }
        if (strcmp(nm, "model.embed_tokens.weight") == 0 || strcmp(nm, "model.norm.weight") == 0 ||
            strcmp(nm, "lm_head.weight") == 0)
            continue;
        if (strncmp(nm, lp, sizeof lp - 1) == 0) {
            const char *p = nm + sizeof lp - 1;
            long l = 0;
            int digits = 0;
            while (*p >= '0' && *p <= '9' && digits < 9) {
                l = l * 10 + (*p++ - '0');
                digits++;
            }
            if (digits && *p == '.' && l < cfg->n_layers &&
                (known_layer_tensor(p + 1) || stage_arch_tensor_used(cfg, p + 1)))
                continue;
            if (digits && *p == '.' && l >= cfg->n_layers) {
                snprintf(err, errlen, "tensor %s: layer %ld, but num_hidden_layers is %d", nm, l,
                         cfg->n_layers);
                return -1;
            }
        }
        snprintf(err, errlen,
                 "tensor %s is not part of the %s block config.json describes "
                 "(a bias, norm or layer the engine would ignore, changing the results): refused",
                 nm, stage_arch_name(cfg->arch));
        return -1;
    }
    return 0;
}

int stage_model_load(const char *dir, const stage_config *cfg, stage_range range, stage_model **out,
                     char *err, size_t errlen)
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
        snprintf(err, errlen,
                 "a stage of %d ranks needs num_attention_heads (%d) and "
                 "num_key_value_heads (%d) to be multiples of %d",
                 stage_tp_size(tp), cfg->n_heads, cfg->n_kv_heads, stage_tp_size(tp));
        return -1;
    }
    if (range.first < 0 || range.last >= cfg->n_layers) {
        snprintf(err, errlen, "layer range %d-%d outside the model's %d layers", range.first,
                 range.last, cfg->n_layers);
        return -1;
    }
    stage_model *m = calloc(1, sizeof *m);
    if (!m) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    m->cfg = *cfg; /* its two buffers copied below: the model owns its config */
    m->cfg.layer_kind = malloc((size_t)cfg->n_layers * sizeof *cfg->layer_kind);
    m->cfg.q8_keep = cfg->q8_keep_len ? malloc(cfg->q8_keep_len) : NULL;
    if (m->cfg.q8_keep) memcpy(m->cfg.q8_keep, cfg->q8_keep, cfg->q8_keep_len);
    m->layers = calloc((size_t)cfg->n_layers, sizeof *m->layers);
    m->inv_freq = malloc((size_t)(cfg->head_dim / 2 + 1) * sizeof(float));
    if (!m->cfg.layer_kind || (cfg->q8_keep_len && !m->cfg.q8_keep) || !m->layers || !m->inv_freq) {
        snprintf(err, errlen, "out of memory");
        stage_model_free(m);
        return -1;
    }
    memcpy(m->cfg.layer_kind, cfg->layer_kind, (size_t)cfg->n_layers * sizeof *cfg->layer_kind);
    m->range = range;
    m->weights_dtype = weights_dtype;
    if ((weights_dtype == STAGE_Q8_0 || cfg->q8_0) && tp && stage_tp_size(tp) > 1) {
        snprintf(err, errlen, "q8_0 weights: not with tensor-parallel stages (they multiply f32)");
        stage_model_free(m);
        return -1;
    }
    m->tp = tp && stage_tp_size(tp) > 1 ? tp : NULL;
    m->has_head = range.head;
    stage_arch_inv_freq(cfg, m->inv_freq);

    char e2[512];
    if (st_open(dir, &m->st, e2, sizeof e2)) {
        snprintf(err, errlen, "%s", e2);
        stage_model_free(m);
        return -1;
    }
    /* the matrices on 2 MiB pages (stage/wmem.h); a tensor-parallel stage multiplies its own
     * f32 slices (stage/tp.h), a copy of the whole matrix would only cost memory */
    const int huge = stage_wmem_huge() && !m->tp;
    st_set_huge(m->st, huge);
    if (check_tensor_names(m->st, cfg, e2, sizeof e2)) {
        snprintf(err, errlen, "%s", e2);
        stage_model_free(m);
        return -1;
    }
    const int D = cfg->hidden;
    int rc = 0;
    for (int l = 0; l < cfg->n_layers && !rc; l++) {
        m->layers[l].kind = cfg->layer_kind[l];
        if (l >= range.first && l <= range.last)
            rc = load_layer(m, l, e2, sizeof e2);
        else if (stage_kind_is_routed(cfg->layer_kind[l]))
            rc = load_router(m, l, e2, sizeof e2);
    }
    /* a tensor-parallel head holds its slice of lm_head (or of the tied embedding); the
     * embedding lookup is the group leader's (range.embed) */
    /* an untied embedding is read a row per token: it stays in place (on huge pages it would
     * only cost the memory of the rows no prompt looks up) */
    st_set_huge(m->st, huge && range.head && cfg->tie_embeddings);
    if (!rc && (range.embed || (range.head && cfg->tie_embeddings && !m->tp)))
        rc = get_m(m, "model.embed_tokens.weight", cfg->vocab, D, &m->embed, e2, sizeof e2);
    st_set_huge(m->st, huge);
    if (!rc && range.head) {
        rc = !(m->norm = get_w(m, "model.norm.weight", 1, D, 0, e2, sizeof e2));
        if (!rc && m->tp)
            rc = get_pm(m, cfg->tie_embeddings ? "model.embed_tokens.weight" : "lm_head.weight",
                        cfg->vocab, D, &m->lm_head, &m->tlm, e2, sizeof e2);
        else if (!rc && cfg->tie_embeddings)
            m->lm_head = m->embed;
        else if (!rc)
            rc = get_m(m, "lm_head.weight", cfg->vocab, D, &m->lm_head, e2, sizeof e2);
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
    free(m->cfg.q8_keep);
    free(m->inv_freq);
    st_close(m->st);
    free(m);
}

const stage_config *stage_model_config(const stage_model *m) { return &m->cfg; }
stage_range stage_model_range(const stage_model *m) { return m->range; }
size_t stage_model_weight_bytes(const stage_model *m) { return m->weight_bytes; }
size_t stage_model_huge_bytes(const stage_model *m, size_t *backed)
{
    return st_huge_bytes(m->st, backed);
}

int stage_embed(const stage_model *m, const int32_t *tokens, int n, float *x, char *err,
                size_t errlen)
{
    const int D = m->cfg.hidden;
    if (!m->embed.data) {
        snprintf(err, errlen, "this stage has no embedding");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab) {
            snprintf(err, errlen, "token id %d out of range [0, %d)", tokens[i], m->cfg.vocab);
            return -1;
        }
        stage_weight_row_f32(&m->embed, tokens[i], x + (size_t)i * D);
    }
    return 0;
}

/* ---- Routers — plain loops in a fixed order: the holder of a row and its receiver must reach
 * the same decision bit for bit. */

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
    if (m->cfg.mod_routing == STAGE_ROUTING_PREDICTOR)
        L->pred_b2 += delta;
    else
        L->router_b += delta;
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
