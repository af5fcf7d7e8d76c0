/* cluster/initmodel.c — see initmodel.h. */
#include "cluster/initmodel.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "stage/safetensors.h"
#include "stage/stage.h"

/* ---- the tensors, kept in f32 until written ------------------------------------------- */
typedef struct {
    char name[160];
    int ndim;
    int64_t shape[2];
    float *data;
} tensor;

typedef struct {
    tensor *t;
    int n, cap;
    stage_rng rng;
} tensor_list;

static double gauss(stage_rng *r)
{
    double u1 = stage_rng_uniform(r), u2 = stage_rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* Add a tensor filled with mean + std * N(0,1). Returns its data or NULL (OOM). */
static float *add(tensor_list *tl, const char *name, int64_t d0, int64_t d1, double mean, double std)
{
    if (tl->n == tl->cap) {
        int cap = tl->cap ? tl->cap * 2 : 64;
        tensor *t = realloc(tl->t, (size_t)cap * sizeof *t);
        if (!t) return NULL;
        tl->t = t;
        tl->cap = cap;
    }
    tensor *t = &tl->t[tl->n];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = d1 > 0 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1;
    size_t n = (size_t)d0 * (size_t)(d1 > 0 ? d1 : 1);
    t->data = malloc(n * sizeof(float));
    if (!t->data) return NULL;
    for (size_t i = 0; i < n; i++) t->data[i] = (float)(mean + std * gauss(&tl->rng));
    tl->n++;
    return t->data;
}

static float *find(tensor_list *tl, const char *name)
{
    for (int i = 0; i < tl->n; i++)
        if (!strcmp(tl->t[i].name, name)) return tl->t[i].data;
    return NULL;
}

static void list_free(tensor_list *tl)
{
    for (int i = 0; i < tl->n; i++) free(tl->t[i].data);
    free(tl->t);
}

#define ADD(...) do { if (!add(__VA_ARGS__)) goto oom; } while (0)

static int draw(const cluster_model_spec *sp, tensor_list *tl, char *err, size_t errlen)
{
    const stage_config *c = &sp->cfg;
    const int64_t D = c->hidden, qd = (int64_t)c->n_heads * c->head_dim;
    const int64_t kvd = (int64_t)c->n_kv_heads * c->head_dim;
    const double sd = sp->init_std, rsd = sp->router_std / sqrt((double)D);
    char n[160];
    stage_rng_seed(&tl->rng, sp->seed, 0x6d6f64706970ull);
    ADD(tl, "model.embed_tokens.weight", c->vocab, D, 0.0, 1.0);
    for (int l = 0; l < c->n_layers; l++) {
        stage_kind k = c->layer_kind[l];
#define LN(suffix) (snprintf(n, sizeof n, "model.layers.%d.%s", l, suffix), n)
        ADD(tl, LN("input_layernorm.weight"), D, 0, 1.0, 0.05);
        ADD(tl, LN("self_attn.q_proj.weight"), qd, D, 0.0, sd);
        ADD(tl, LN("self_attn.k_proj.weight"), kvd, D, 0.0, sd);
        ADD(tl, LN("self_attn.v_proj.weight"), kvd, D, 0.0, sd);
        ADD(tl, LN("self_attn.o_proj.weight"), D, qd, 0.0, sd);
        ADD(tl, LN("post_attention_layernorm.weight"), D, 0, 1.0, 0.05);
        if (k == STAGE_KIND_MODE_STAGED || k == STAGE_KIND_MODE_INTEGRATED) {
            int G = c->n_experts + (k == STAGE_KIND_MODE_INTEGRATED ? c->n_noop_experts : 0);
            ADD(tl, LN("block_sparse_moe.gate.weight"), G, D, 0.0, sd);
            for (int e = 0; e < c->n_experts; e++) {
                snprintf(n, sizeof n, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l, e);
                ADD(tl, n, c->expert_inter, D, 0.0, sd);
                snprintf(n, sizeof n, "model.layers.%d.block_sparse_moe.experts.%d.w2.weight", l, e);
                ADD(tl, n, D, c->expert_inter, 0.0, sd);
                snprintf(n, sizeof n, "model.layers.%d.block_sparse_moe.experts.%d.w3.weight", l, e);
                ADD(tl, n, c->expert_inter, D, 0.0, sd);
            }
        } else {
            ADD(tl, LN("mlp.gate_proj.weight"), c->inter, D, 0.0, sd);
            ADD(tl, LN("mlp.up_proj.weight"), c->inter, D, 0.0, sd);
            ADD(tl, LN("mlp.down_proj.weight"), D, c->inter, 0.0, sd);
        }
        if (stage_kind_is_routed(k) || k == STAGE_KIND_MINDSKIP) {
            ADD(tl, LN("router.weight"), 1, D, 0.0, rsd);
            if (stage_kind_is_routed(k) && sp->router_bias) ADD(tl, LN("router.bias"), 1, 0, 0.0, 0.0);
        }
        if (stage_kind_is_routed(k) && c->mod_routing == STAGE_ROUTING_PREDICTOR) {
            int64_t H = sp->predictor_hidden;
            ADD(tl, LN("router_predictor.fc1.weight"), H, D, 0.0, 1.0 / sqrt((double)D));
            ADD(tl, LN("router_predictor.fc1.bias"), H, 0, 0.0, 0.0);
            ADD(tl, LN("router_predictor.fc2.weight"), 1, H, 0.0, 1.0 / sqrt((double)H));
            ADD(tl, LN("router_predictor.fc2.bias"), 1, 0, 0.0, 0.0);
        }
#undef LN
    }
    ADD(tl, "model.norm.weight", D, 0, 1.0, 0.05);
    if (!c->tie_embeddings) ADD(tl, "lm_head.weight", c->vocab, D, 0.0, sd);
    return 0;
oom:
    snprintf(err, errlen, "out of memory drawing the weights");
    return -1;
}

/* ---- config.json ------------------------------------------------------------------------ */
static int write_config(const cluster_model_spec *sp, const char *dir, char *err, size_t errlen)
{
    const stage_config *c = &sp->cfg;
    static const char *routing[] = {"threshold", "predictor", "topk"};
    cJSON *j = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(j, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString("LlamaForCausalLM"));
    cJSON_AddStringToObject(j, "model_type", "llama");
    cJSON_AddNumberToObject(j, "hidden_size", c->hidden);
    cJSON_AddNumberToObject(j, "intermediate_size", c->inter);
    cJSON_AddNumberToObject(j, "num_attention_heads", c->n_heads);
    cJSON_AddNumberToObject(j, "num_key_value_heads", c->n_kv_heads);
    cJSON_AddNumberToObject(j, "num_hidden_layers", c->n_layers);
    cJSON_AddNumberToObject(j, "vocab_size", c->vocab);
    cJSON_AddNumberToObject(j, "rms_norm_eps", c->eps);
    cJSON_AddNumberToObject(j, "rope_theta", c->rope_theta);
    cJSON_AddNumberToObject(j, "max_position_embeddings", c->max_pos);
    cJSON_AddBoolToObject(j, "tie_word_embeddings", c->tie_embeddings);
    cJSON_AddStringToObject(j, "hidden_act", "silu");
    cJSON_AddStringToObject(j, "torch_dtype", sp->dtype == STAGE_F32 ? "float32"
                                              : sp->dtype == STAGE_BF16 ? "bfloat16" : "float16");
    cJSON *lt = cJSON_AddArrayToObject(j, "layer_types");
    for (int l = 0; l < c->n_layers; l++)
        cJSON_AddItemToArray(lt, cJSON_CreateString(stage_kind_name(c->layer_kind[l])));
    cJSON *mod = cJSON_AddObjectToObject(j, "mod");
    cJSON_AddNumberToObject(mod, "capacity", c->mod_capacity);
    cJSON_AddStringToObject(mod, "routing", routing[c->mod_routing]);
    cJSON_AddNumberToObject(mod, "threshold", c->mod_threshold);
    cJSON_AddStringToObject(mod, "router_scale", c->mod_scale == STAGE_SCALE_SIGMOID ? "sigmoid" : "none");
    cJSON *mode = cJSON_AddObjectToObject(j, "mode");
    cJSON_AddNumberToObject(mode, "num_experts", c->n_experts);
    cJSON_AddNumberToObject(mode, "num_noop_experts", c->n_noop_experts);
    cJSON_AddNumberToObject(mode, "experts_per_token", c->experts_per_token);
    cJSON_AddNumberToObject(mode, "expert_intermediate_size", c->expert_inter);
    cJSON *ms = cJSON_AddObjectToObject(j, "mindskip");
    cJSON_AddStringToObject(ms, "granularity", c->ms_granularity == STAGE_GRAN_TOKEN ? "token" : "sequence");
    cJSON_AddNumberToObject(ms, "threshold", c->ms_threshold);
    char *txt = cJSON_Print(j);
    cJSON_Delete(j);
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    int ok = f && txt && fputs(txt, f) >= 0 && fputc('\n', f) != EOF;
    if (f && fclose(f)) ok = 0;
    free(txt);
    if (!ok) {
        snprintf(err, errlen, "%s: cannot write: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

static int write_model(const cluster_model_spec *sp, const tensor_list *tl, const char *dir,
                       char *err, size_t errlen)
{
    st_writer *w = st_writer_new();
    if (!w) { snprintf(err, errlen, "out of memory"); return -1; }
    for (int i = 0; i < tl->n; i++) {
        const tensor *t = &tl->t[i];
        if (st_writer_add(w, t->name, sp->dtype, t->ndim, t->shape, t->data)) {
            st_writer_free(w);
            snprintf(err, errlen, "out of memory");
            return -1;
        }
    }
    int rc = st_writer_save(w, dir, sp->shards, err, errlen);
    st_writer_free(w);
    return rc ? rc : write_config(sp, dir, err, errlen);
}

/* ---- calibration -------------------------------------------------------------------------- */
typedef struct {
    int n;
    int32_t *slot, *pos, *tok; /* [n] */
    uint8_t *flags, *present;  /* [n] */
    float *x;                  /* [n][D] */
} calib_batch;

static int batch_init(calib_batch *b, const stage_config *c, int prompts, int len, uint64_t seed)
{
    b->n = prompts * len;
    b->slot = malloc((size_t)b->n * 4);
    b->pos = malloc((size_t)b->n * 4);
    b->tok = malloc((size_t)b->n * 4);
    b->flags = malloc((size_t)b->n);
    b->present = malloc((size_t)b->n);
    b->x = malloc((size_t)b->n * c->hidden * sizeof(float));
    if (!b->slot || !b->pos || !b->tok || !b->flags || !b->present || !b->x) return -1;
    stage_rng r;
    stage_rng_seed(&r, seed, 0x63616c6962ull);
    for (int i = 0; i < b->n; i++) {
        b->slot[i] = i / len;
        b->pos[i] = i % len;
        b->tok[i] = (int32_t)(stage_rng_uniform(&r) * c->vocab);
        b->flags[i] = STAGE_ROW_PROMPT;
        b->present[i] = 1;
    }
    return 0;
}

static void batch_free(calib_batch *b)
{
    free(b->slot); free(b->pos); free(b->tok); free(b->flags); free(b->present); free(b->x);
}

static int cmp_desc(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* Runs the model layer by layer on random prompts; with `adjust`, shifts each calibratable
 * router first so that round(capacity * rows) rows clear the threshold. Fills part[l]. */
static int run_layers(stage_model *m, const cluster_model_spec *sp, uint64_t seed, int adjust,
                      double *part, char *err, size_t errlen)
{
    const stage_config *c = &sp->cfg;
    const int D = c->hidden, L = c->n_layers;
    calib_batch b;
    memset(&b, 0, sizeof b);
    float *v = NULL;
    stage_state *st = NULL;
    int rc = -1;
    if (batch_init(&b, c, sp->calib_prompts, sp->calib_length, seed) ||
        !(v = malloc((size_t)b.n * sizeof *v))) {
        snprintf(err, errlen, "out of memory (calibration batch)");
        goto out;
    }
    st = stage_state_init(m, sp->calib_prompts, b.n, sp->calib_length, err, errlen);
    if (!st || stage_embed(m, b.tok, b.n, b.x, err, errlen)) goto out;
    stage_batch sb = {b.n, b.slot, b.pos, b.tok, b.flags};
    const double thr_logit = log(c->mod_threshold / (1.0 - c->mod_threshold));
    for (int l = 0; l < L; l++) {
        int calib = stage_kind_is_routed(c->layer_kind[l]) && c->mod_routing != STAGE_ROUTING_TOPK;
        if (adjust && calib) {
            for (int i = 0; i < b.n; i++) v[i] = stage_router_logit(m, l, b.x + (size_t)i * D);
            qsort(v, (size_t)b.n, sizeof *v, cmp_desc);
            int k = (int)lround(c->mod_capacity * b.n);
            if (k < 1) k = 1;
            /* put the threshold half-way between the k-th and (k+1)-th largest logits */
            double cut = k < b.n ? 0.5 * ((double)v[k - 1] + v[k]) : (double)v[b.n - 1] - 1.0;
            stage_router_shift(m, l, (float)(thr_logit - cut));
        }
        if (stage_forward_range(st, &sb, b.x, b.present, l, l, err, errlen)) goto out;
        const stage_layer_stats *ls = stage_state_layer_stats(st, l);
        part[l] = ls->rows ? (double)ls->active / (double)ls->rows : 0.0;
    }
    rc = 0;
out:
    stage_state_free(st);
    free(v);
    batch_free(&b);
    return rc;
}

static int load_all(const cluster_model_spec *sp, const char *dir, stage_model **m, char *err,
                    size_t errlen)
{
    stage_range r = {0, sp->cfg.n_layers - 1, 1, 0};
    return stage_model_load(dir, &sp->cfg, r, m, err, errlen);
}

int cluster_init_model(const cluster_model_spec *sp, const char *dir, FILE *log, char *err,
                       size_t errlen)
{
    const stage_config *c = &sp->cfg;
    if (mkdir(dir, 0755) && errno != EEXIST) {
        snprintf(err, errlen, "%s: cannot create directory: %s", dir, strerror(errno));
        return -1;
    }
    tensor_list tl;
    memset(&tl, 0, sizeof tl);
    int rc = draw(sp, &tl, err, errlen);
    if (!rc) rc = write_model(sp, &tl, dir, err, errlen);
    int want = 0;
    for (int l = 0; l < c->n_layers; l++)
        want |= stage_kind_is_routed(c->layer_kind[l]) && c->mod_routing != STAGE_ROUTING_TOPK;
    if (!rc && sp->calibrate && want) {
        if (c->mod_routing == STAGE_ROUTING_THRESHOLD && !sp->router_bias) {
            snprintf(err, errlen, "calibration shifts router.bias: set mod.router_bias: true");
            rc = -1;
        }
        stage_model *m = NULL;
        double *part = calloc((size_t)c->n_layers, sizeof *part);
        if (!part) { snprintf(err, errlen, "out of memory"); rc = -1; }
        if (!rc) rc = load_all(sp, dir, &m, err, errlen);
        if (!rc && log)
            fprintf(log, "init-model: calibrating routers on %d random prompts of %d tokens\n",
                    sp->calib_prompts, sp->calib_length);
        if (!rc) rc = run_layers(m, sp, sp->seed, 1, part, err, errlen);
        /* copy the calibrated biases back into the tensors, rewrite, reload, measure */
        for (int l = 0; !rc && l < c->n_layers; l++) {
            if (!stage_kind_is_routed(c->layer_kind[l])) continue;
            char n[160];
            snprintf(n, sizeof n, c->mod_routing == STAGE_ROUTING_PREDICTOR
                                      ? "model.layers.%d.router_predictor.fc2.bias"
                                      : "model.layers.%d.router.bias", l);
            float *bias = find(&tl, n);
            if (bias) bias[0] = stage_router_bias(m, l);
        }
        stage_model_free(m);
        m = NULL;
        if (!rc) rc = write_model(sp, &tl, dir, err, errlen);
        if (!rc) rc = load_all(sp, dir, &m, err, errlen);
        if (!rc) rc = run_layers(m, sp, sp->seed + 1, 0, part, err, errlen);
        for (int l = 0; !rc && log && l < c->n_layers; l++)
            if (stage_kind_is_routed(c->layer_kind[l]))
                fprintf(log, "init-model: layer %2d %-11s bias %+.4f  participation %.3f on fresh "
                        "prompts (capacity %.3f)\n", l, stage_kind_name(c->layer_kind[l]),
                        stage_router_bias(m, l), part[l], c->mod_capacity);
        stage_model_free(m);
        free(part);
    }
    list_free(&tl);
    return rc;
}
