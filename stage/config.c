/* stage/config.c — config.json -> stage_config (docs/SPEC.md §3). See config.h.
 *
 * Every error is one line "PATH: what" in err. Optional keys that are JSON null count as
 * absent (HF writes e.g. "rope_scaling": null, "num_key_value_heads": null).
 */
#include "stage/config.h"
#include "stage/config_json.h"

#include <cJSON.h>
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Far above any real model; keeps a hostile num_hidden_layers from a giant malloc. */
#define STAGE_MAX_LAYERS 65536
/* config.json is a few KB; refuse anything absurd before reading it whole. */
#define STAGE_MAX_CONFIG_BYTES (64L << 20)

/* ---- small helpers --------------------------------------------------------------------------- */

void stage_cfg_err(char *err, size_t errlen, const char *path, const char *fmt, ...)
{
    if (!err || errlen == 0) return;
    int n = snprintf(err, errlen, "%s: ", path ? path : "config.json");
    if (n < 0) n = 0;
    if ((size_t)n >= errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    va_end(ap);
    /* one line whatever the file holds: a value echoed with "\n" (or another control
     * character) inside it would break the message */
    for (char *p = err; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f) *p = '?';
}

const char *stage_cj_type_name(const cJSON *j)
{
    if (!j) return "nothing";
    if (cJSON_IsNull(j)) return "null";
    if (cJSON_IsBool(j)) return "a boolean";
    if (cJSON_IsNumber(j)) return "a number";
    if (cJSON_IsString(j)) return "a string";
    if (cJSON_IsArray(j)) return "a list";
    if (cJSON_IsObject(j)) return "an object";
    return "an invalid value";
}

/* Present and not null. */
const cJSON *stage_cj_opt(const cJSON *obj, const char *key)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    return (j && !cJSON_IsNull(j)) ? j : NULL;
}

int stage_cj_is_int(const cJSON *j)
{
    if (!cJSON_IsNumber(j)) return 0;
    double v = j->valuedouble;
    return isfinite(v) && v == floor(v) && v >= (double)INT_MIN && v <= (double)INT_MAX;
}

/* Integer key. required: missing is an error; else *out keeps its default.
 * min: smallest accepted value. */
int stage_cj_int(stage_cfg_ctx *c, const cJSON *obj, const char *pfx, const char *key, int required,
                 int min, int *out)
{
    const cJSON *j = stage_cj_opt(obj, key);
    if (!j) {
        if (!required) return 0;
        const cJSON *raw = cJSON_GetObjectItemCaseSensitive(obj, key);
        if (raw)
            stage_cfg_err(c->err, c->errlen, c->path, "%s%s: expected an integer, got null", pfx,
                          key);
        else
            stage_cfg_err(c->err, c->errlen, c->path, "missing key \"%s%s\"", pfx, key);
        return -1;
    }
    if (!stage_cj_is_int(j)) {
        if (cJSON_IsNumber(j))
            stage_cfg_err(c->err, c->errlen, c->path, "%s%s: expected an integer, got %g", pfx, key,
                          j->valuedouble);
        else
            stage_cfg_err(c->err, c->errlen, c->path, "%s%s: expected an integer, got %s", pfx, key,
                          stage_cj_type_name(j));
        return -1;
    }
    int v = (int)j->valuedouble;
    if (v < min) {
        stage_cfg_err(c->err, c->errlen, c->path, "%s%s: must be >= %d, got %d", pfx, key, min, v);
        return -1;
    }
    *out = v;
    return 0;
}

/* Number key (optional), range-checked: lo < v (lo_open) or lo <= v, and v <= hi. */
int stage_cj_double(stage_cfg_ctx *c, const cJSON *obj, const char *pfx, const char *key, double lo,
                    int lo_open, double hi, double *out)
{
    const cJSON *j = stage_cj_opt(obj, key);
    if (!j) return 0;
    if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble)) {
        stage_cfg_err(c->err, c->errlen, c->path, "%s%s: expected a number, got %s", pfx, key,
                      stage_cj_type_name(j));
        return -1;
    }
    double v = j->valuedouble;
    if ((lo_open ? !(v > lo) : !(v >= lo)) || v > hi) {
        if (hi >= FLT_MAX)
            stage_cfg_err(c->err, c->errlen, c->path, "%s%s: must be %s %g, got %g", pfx, key,
                          lo_open ? ">" : ">=", lo, v);
        else
            stage_cfg_err(c->err, c->errlen, c->path, "%s%s: must be in %c%g, %g], got %g", pfx,
                          key, lo_open ? '(' : '[', lo, hi, v);
        return -1;
    }
    *out = v;
    return 0;
}

int stage_cj_float(stage_cfg_ctx *c, const cJSON *obj, const char *pfx, const char *key, double lo,
                   int lo_open, double hi, float *out)
{
    double v = *out;
    if (stage_cj_double(c, obj, pfx, key, lo, lo_open, hi, &v)) return -1;
    *out = (float)v;
    return 0;
}

/* Boolean key (optional). */
int stage_cj_bool(stage_cfg_ctx *c, const cJSON *obj, const char *key, int *out)
{
    const cJSON *j = stage_cj_opt(obj, key);
    if (!j) return 0;
    if (!cJSON_IsBool(j)) {
        stage_cfg_err(c->err, c->errlen, c->path, "%s: expected a boolean, got %s", key,
                      stage_cj_type_name(j));
        return -1;
    }
    *out = cJSON_IsTrue(j) ? 1 : 0;
    return 0;
}

/* String key (optional) matched against a table; *out = index of the match. */
static int get_enum(stage_cfg_ctx *c, const cJSON *obj, const char *pfx, const char *key,
                    const char *const *names, const int *values, int n, const char *allowed,
                    int *out)
{
    const cJSON *j = stage_cj_opt(obj, key);
    if (!j) return 0;
    if (!cJSON_IsString(j)) {
        stage_cfg_err(c->err, c->errlen, c->path, "%s%s: expected a string, got %s", pfx, key,
                      stage_cj_type_name(j));
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (strcmp(j->valuestring, names[i]) == 0) {
            *out = values[i];
            return 0;
        }
    stage_cfg_err(c->err, c->errlen, c->path, "%s%s: unknown value \"%s\" (expected %s)", pfx, key,
                  j->valuestring, allowed);
    return -1;
}

/* A settings sub-object ("mod", "mode", "mindskip"): absent/null -> NULL, else must be an
 * object. */
static int get_obj(stage_cfg_ctx *c, const cJSON *root, const char *key, const cJSON **out)
{
    const cJSON *j = stage_cj_opt(root, key);
    *out = NULL;
    if (!j) return 0;
    if (!cJSON_IsObject(j)) {
        stage_cfg_err(c->err, c->errlen, c->path, "%s: expected an object, got %s", key,
                      stage_cj_type_name(j));
        return -1;
    }
    *out = j;
    return 0;
}

/* ---- unsupported features: a clear error, never silently ignored ----------------------------- */

static int check_unsupported(stage_cfg_ctx *c, const cJSON *root)
{
    static const char *const act_keys[] = {"hidden_act", "hidden_activation"};
    for (size_t i = 0; i < sizeof act_keys / sizeof act_keys[0]; i++) {
        const cJSON *a = stage_cj_opt(root, act_keys[i]);
        if (!a) continue;
        if (!cJSON_IsString(a)) {
            stage_cfg_err(c->err, c->errlen, c->path, "%s: expected a string, got %s", act_keys[i],
                          stage_cj_type_name(a));
            return -1;
        }
        /* "swish" is torch's other name for the same function. */
        if (strcmp(a->valuestring, "silu") != 0 && strcmp(a->valuestring, "swish") != 0) {
            stage_cfg_err(c->err, c->errlen, c->path, "%s: \"%s\" is not supported (only \"silu\")",
                          act_keys[i], a->valuestring);
            return -1;
        }
    }

    const cJSON *prf = stage_cj_opt(root, "partial_rotary_factor");
    if (prf && !(cJSON_IsNumber(prf) && prf->valuedouble == 1.0)) {
        stage_cfg_err(c->err, c->errlen, c->path, "partial_rotary_factor: only 1.0 is supported");
        return -1;
    }
    return 0;
}

/* ---- layer kinds ----------------------------------------------------------------------------- */

static const char *const kind_names[] = {"dense", "mod", "mode_staged", "mode_integrated",
                                         "mindskip"};
#define N_KINDS ((int)(sizeof kind_names / sizeof kind_names[0]))

const char *stage_kind_name(stage_kind k)
{
    if ((int)k < 0 || (int)k >= N_KINDS) return "?";
    return kind_names[k];
}

int stage_kind_is_routed(stage_kind k)
{
    return k == STAGE_KIND_MOD || k == STAGE_KIND_MODE_STAGED;
}

/* Map one granularity string (ours or Router-Tuning's). */
static int parse_granularity(const char *s, stage_granularity *out)
{
    if (strcmp(s, "sequence") == 0 || strcmp(s, "attn_sequence") == 0) {
        *out = STAGE_GRAN_SEQUENCE;
        return 0;
    }
    if (strcmp(s, "token") == 0 || strcmp(s, "attn_token") == 0) {
        *out = STAGE_GRAN_TOKEN;
        return 0;
    }
    return -1;
}

static int get_granularity(stage_cfg_ctx *c, const cJSON *obj, const char *pfx,
                           stage_granularity *out)
{
    const cJSON *g = stage_cj_opt(obj, "granularity");
    if (!g) return 0;
    if (!cJSON_IsString(g)) {
        stage_cfg_err(c->err, c->errlen, c->path, "%sgranularity: expected a string, got %s", pfx,
                      stage_cj_type_name(g));
        return -1;
    }
    if (parse_granularity(g->valuestring, out)) {
        stage_cfg_err(
            c->err, c->errlen, c->path,
            "%sgranularity: unknown value \"%s\" (expected sequence, token, attn_sequence "
            "or attn_token)",
            pfx, g->valuestring);
        return -1;
    }
    return 0;
}

/* Fill cfg->layer_kind from layer_types, else is_mindskip, else all dense.
 * *router_tuning = 1 when the is_mindskip form was used. */
static int parse_layers(stage_cfg_ctx *c, const cJSON *root, stage_config *cfg, int *router_tuning)
{
    int n = cfg->n_layers;
    *router_tuning = 0;
    cfg->layer_kind = calloc((size_t)n, sizeof *cfg->layer_kind); /* [n_layers] */
    if (!cfg->layer_kind) {
        stage_cfg_err(c->err, c->errlen, c->path, "out of memory for %d layers", n);
        return -1;
    }

    const cJSON *lt = stage_cj_opt(root, "layer_types");
    if (lt && stage_arch_hf_layer_types(lt)) lt = NULL; /* HF's attention kinds: stage/arch.c */
    const cJSON *ims = stage_cj_opt(root, "is_mindskip");
    const cJSON *list = lt ? lt : ims;
    const char *key = lt ? "layer_types" : "is_mindskip";
    if (!list) return 0; /* plain Llama: all dense (calloc gave STAGE_KIND_DENSE) */

    if (!cJSON_IsArray(list)) {
        stage_cfg_err(c->err, c->errlen, c->path, "%s: expected a list, got %s", key,
                      stage_cj_type_name(list));
        return -1;
    }
    int len = cJSON_GetArraySize(list);
    if (len != n) {
        stage_cfg_err(c->err, c->errlen, c->path, "%s: has %d entries but num_hidden_layers is %d",
                      key, len, n);
        return -1;
    }
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, list)
    {
        if (lt) {
            if (!cJSON_IsString(e)) {
                stage_cfg_err(c->err, c->errlen, c->path,
                              "layer_types[%d]: expected a string, got %s", i,
                              stage_cj_type_name(e));
                return -1;
            }
            int k;
            for (k = 0; k < N_KINDS; k++)
                if (strcmp(e->valuestring, kind_names[k]) == 0) break;
            if (k == N_KINDS) {
                stage_cfg_err(c->err, c->errlen, c->path,
                              "layer_types[%d]: unknown layer type \"%s\"", i, e->valuestring);
                return -1;
            }
            cfg->layer_kind[i] = (stage_kind)k;
        } else {
            if (!cJSON_IsBool(e)) {
                stage_cfg_err(c->err, c->errlen, c->path,
                              "is_mindskip[%d]: expected a boolean, got %s", i,
                              stage_cj_type_name(e));
                return -1;
            }
            cfg->layer_kind[i] = cJSON_IsTrue(e) ? STAGE_KIND_MINDSKIP : STAGE_KIND_DENSE;
        }
        i++;
    }
    *router_tuning = !lt;
    return 0;
}

/* ---- settings objects ------------------------------------------------------------------------ */

static int parse_mod(stage_cfg_ctx *c, const cJSON *root, stage_config *cfg)
{
    const cJSON *o;
    if (get_obj(c, root, "mod", &o)) return -1;
    if (!o) return 0;
    static const char *const rnames[] = {"threshold", "predictor", "topk"};
    static const int rvals[] = {STAGE_ROUTING_THRESHOLD, STAGE_ROUTING_PREDICTOR,
                                STAGE_ROUTING_TOPK};
    static const char *const snames[] = {"none", "sigmoid"};
    static const int svals[] = {STAGE_SCALE_NONE, STAGE_SCALE_SIGMOID};
    int routing = (int)cfg->mod_routing, scale = (int)cfg->mod_scale;
    /* via locals: the fields' float width is the header's business */
    double cap = cfg->mod_capacity, thr = cfg->mod_threshold;
    if (stage_cj_double(c, o, "mod.", "capacity", 0.0, 1, 1.0, &cap)) return -1;
    if (stage_cj_double(c, o, "mod.", "threshold", 0.0, 0, 1.0, &thr)) return -1;
    cfg->mod_capacity = cap;
    cfg->mod_threshold = thr;
    if (get_enum(c, o, "mod.", "routing", rnames, rvals, 3, "threshold, predictor or topk",
                 &routing))
        return -1;
    if (get_enum(c, o, "mod.", "router_scale", snames, svals, 2, "none or sigmoid", &scale))
        return -1;
    cfg->mod_routing = (stage_routing)routing;
    cfg->mod_scale = (stage_router_scale)scale;
    return 0;
}

static int parse_mode(stage_cfg_ctx *c, const cJSON *root, stage_config *cfg)
{
    const cJSON *o;
    if (get_obj(c, root, "mode", &o)) return -1;
    if (!o) return 0; /* mode layers without a "mode" object run on the header defaults */
    if (stage_cj_int(c, o, "mode.", "num_experts", 0, 1, &cfg->n_experts)) return -1;
    if (stage_cj_int(c, o, "mode.", "num_noop_experts", 0, 0, &cfg->n_noop_experts)) return -1;
    if (stage_cj_int(c, o, "mode.", "experts_per_token", 0, 1, &cfg->experts_per_token)) return -1;
    if (stage_cj_int(c, o, "mode.", "expert_intermediate_size", 0, 1, &cfg->expert_inter))
        return -1;
    if (cfg->experts_per_token > cfg->n_experts) {
        stage_cfg_err(c->err, c->errlen, c->path,
                      "mode.experts_per_token: %d is more than mode.num_experts (%d)",
                      cfg->experts_per_token, cfg->n_experts);
        return -1;
    }
    return 0;
}

static int parse_mindskip(stage_cfg_ctx *c, const cJSON *root, stage_config *cfg, int router_tuning)
{
    const cJSON *o;
    double thr = cfg->ms_threshold;
    if (get_obj(c, root, "mindskip", &o)) return -1;
    if (o) {
        if (stage_cj_double(c, o, "mindskip.", "threshold", 0.0, 0, 1.0, &thr)) return -1;
        if (get_granularity(c, o, "mindskip.", &cfg->ms_granularity)) return -1;
    }
    /* Router-Tuning keeps its settings at the top level; they win in that form. */
    if (router_tuning) {
        if (stage_cj_double(c, root, "", "threshold", 0.0, 0, 1.0, &thr)) return -1;
        if (get_granularity(c, root, "", &cfg->ms_granularity)) return -1;
    }
    cfg->ms_threshold = thr;
    return 0;
}

/* ---- entry points ---------------------------------------------------------------------------- */

static int parse_root(stage_cfg_ctx *c, const cJSON *root, stage_config *cfg)
{
    if (!cJSON_IsObject(root)) {
        stage_cfg_err(c->err, c->errlen, c->path, "expected a JSON object at the top, got %s",
                      stage_cj_type_name(root));
        return -1;
    }
    if (check_unsupported(c, root)) return -1;

    /* required Llama keys */
    if (stage_cj_int(c, root, "", "hidden_size", 1, 1, &cfg->hidden)) return -1;
    if (stage_cj_int(c, root, "", "intermediate_size", 1, 1, &cfg->inter)) return -1;
    if (stage_cj_int(c, root, "", "num_attention_heads", 1, 1, &cfg->n_heads)) return -1;
    if (stage_cj_int(c, root, "", "num_hidden_layers", 1, 1, &cfg->n_layers)) return -1;
    if (stage_cj_int(c, root, "", "vocab_size", 1, 1, &cfg->vocab)) return -1;
    if (cfg->n_layers > STAGE_MAX_LAYERS) {
        stage_cfg_err(c->err, c->errlen, c->path, "num_hidden_layers: %d is more than %d",
                      cfg->n_layers, STAGE_MAX_LAYERS);
        return -1;
    }

    /* optional Llama keys */
    cfg->n_kv_heads = cfg->n_heads;
    if (stage_cj_int(c, root, "", "num_key_value_heads", 0, 1, &cfg->n_kv_heads)) return -1;
    if (cfg->n_heads % cfg->n_kv_heads != 0) {
        stage_cfg_err(c->err, c->errlen, c->path,
                      "num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)",
                      cfg->n_heads, cfg->n_kv_heads);
        return -1;
    }
    if (stage_cj_opt(root, "head_dim")) {
        if (stage_cj_int(c, root, "", "head_dim", 1, 1, &cfg->head_dim)) return -1;
    } else {
        if (cfg->hidden % cfg->n_heads != 0) {
            stage_cfg_err(
                c->err, c->errlen, c->path,
                "hidden_size (%d) is not a multiple of num_attention_heads (%d) and there "
                "is no head_dim",
                cfg->hidden, cfg->n_heads);
            return -1;
        }
        cfg->head_dim = cfg->hidden / cfg->n_heads;
    }
    if (stage_cj_int(c, root, "", "max_position_embeddings", 0, 1, &cfg->max_pos)) return -1;
    if (stage_cj_float(c, root, "", "rms_norm_eps", 0.0, 1, FLT_MAX, &cfg->eps)) return -1;
    const cJSON *rp = stage_cj_opt(root, "rope_parameters"); /* its type: stage_arch_parse */
    if (rp && stage_cj_opt(rp, "rope_theta")) {
        if (stage_cj_float(c, rp, "rope_parameters.", "rope_theta", 0.0, 1, FLT_MAX,
                           &cfg->rope_theta))
            return -1;
    } else if (stage_cj_float(c, root, "", "rope_theta", 0.0, 1, FLT_MAX, &cfg->rope_theta)) {
        return -1;
    }
    if (stage_cj_bool(c, root, "tie_word_embeddings", &cfg->tie_embeddings)) return -1;
    if (stage_arch_parse(c, root, cfg)) return -1;

    /* eos_token_id: int, or a list (first entry), or absent/null -> -1 */
    const cJSON *eos = stage_cj_opt(root, "eos_token_id");
    if (eos) {
        const cJSON *v = eos;
        if (cJSON_IsArray(eos)) v = cJSON_GetArrayItem(eos, 0); /* empty list: stays -1 */
        if (v) {
            if (!stage_cj_is_int(v) || v->valuedouble < 0) {
                stage_cfg_err(c->err, c->errlen, c->path,
                              "eos_token_id: expected a non-negative integer or a list of them");
                return -1;
            }
            if (v->valuedouble >= cfg->vocab) {
                stage_cfg_err(c->err, c->errlen, c->path,
                              "eos_token_id: %.0f is outside the vocab (vocab_size %d)",
                              v->valuedouble, cfg->vocab);
                return -1;
            }
            cfg->eos_token_id = (int)v->valuedouble;
        }
    }

    if (stage_parse_quant(c, root, cfg)) return -1;
    int router_tuning = 0;
    if (parse_layers(c, root, cfg, &router_tuning)) return -1;
    cfg->expert_inter = cfg->inter; /* default before "mode" may override it */
    if (parse_mod(c, root, cfg)) return -1;
    if (parse_mode(c, root, cfg)) return -1;
    if (parse_mindskip(c, root, cfg, router_tuning)) return -1;
    return 0;
}

void stage_config_defaults(stage_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->max_pos = 2048;
    cfg->eps = 1e-6f;
    cfg->rope_theta = 10000.0f;
    cfg->eos_token_id = -1;
    cfg->mod_capacity = 0.125;
    cfg->mod_routing = STAGE_ROUTING_THRESHOLD;
    cfg->mod_threshold = 0.5;
    cfg->mod_scale = STAGE_SCALE_NONE;
    cfg->n_experts = 4;
    cfg->n_noop_experts = 0;
    cfg->experts_per_token = 1;
    cfg->ms_granularity = STAGE_GRAN_SEQUENCE;
    cfg->ms_threshold = 0.5;
}

/* 1-based line and column of byte offset `off` in text, for parse errors. */
static void line_col(const char *text, size_t off, int *line, int *col)
{
    *line = 1;
    *col = 1;
    for (size_t i = 0; i < off && text[i]; i++) {
        if (text[i] == '\n') {
            (*line)++;
            *col = 1;
        } else
            (*col)++;
    }
}

int stage_config_parse(const char *json_text, const char *path, stage_config *cfg, char *err,
                       size_t errlen)
{
    if (!path) path = "config.json";
    if (!cfg) {
        stage_cfg_err(err, errlen, path, "no output config");
        return -1;
    }
    stage_config_defaults(cfg);
    if (!json_text) {
        stage_cfg_err(err, errlen, path, "no text");
        return -1;
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(json_text, &end, 1);
    if (!root) {
        int line = 1, col = 1;
        size_t off = end && end >= json_text ? (size_t)(end - json_text) : 0;
        line_col(json_text, off, &line, &col);
        stage_cfg_err(err, errlen, path, "not valid JSON (near line %d, column %d)", line, col);
        return -1;
    }
    stage_cfg_ctx c = {path, err, errlen};
    int rc = parse_root(&c, root, cfg);
    cJSON_Delete(root);
    if (rc) {
        stage_config_free(cfg);
        return -1;
    }
    return 0;
}

int stage_config_load(const char *dir, stage_config *cfg, char *err, size_t errlen)
{
    if (cfg) stage_config_defaults(cfg);
    if (!dir) dir = ".";
    size_t dl = strlen(dir);
    const char *sep = (dl > 0 && dir[dl - 1] == '/') ? "" : "/";
    size_t plen = dl + strlen(sep) + sizeof "config.json";
    char *path = malloc(plen);
    if (!path) {
        stage_cfg_err(err, errlen, dir, "out of memory");
        return -1;
    }
    snprintf(path, plen, "%s%sconfig.json", dir, sep);

    int rc = -1;
    char *text = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        stage_cfg_err(err, errlen, path, "cannot open: %s", strerror(errno));
        goto out;
    }
    if (fseek(f, 0, SEEK_END) != 0) {
        stage_cfg_err(err, errlen, path, "cannot read: %s", strerror(errno));
        goto out;
    }
    long sz = ftell(f);
    if (sz < 0) {
        stage_cfg_err(err, errlen, path, "cannot read (not a regular file?)");
        goto out;
    }
    if (sz > STAGE_MAX_CONFIG_BYTES) {
        stage_cfg_err(err, errlen, path, "file is too large for a config (%ld bytes)", sz);
        goto out;
    }
    rewind(f);
    text = malloc((size_t)sz + 1);
    if (!text) {
        stage_cfg_err(err, errlen, path, "out of memory");
        goto out;
    }
    size_t got = fread(text, 1, (size_t)sz, f);
    if (got != (size_t)sz || ferror(f)) {
        stage_cfg_err(err, errlen, path, "short read (%zu of %ld bytes)", got, sz);
        goto out;
    }
    text[sz] = '\0';
    if (memchr(text, '\0', (size_t)sz)) {
        stage_cfg_err(err, errlen, path, "not valid JSON (contains a NUL byte)");
        goto out;
    }
    rc = stage_config_parse(text, path, cfg, err, errlen);
out:
    if (f) fclose(f);
    free(text);
    free(path);
    return rc;
}

void stage_config_free(stage_config *cfg)
{
    if (!cfg) return;
    free(cfg->layer_kind);
    cfg->layer_kind = NULL;
    free(cfg->q8_keep);
    cfg->q8_keep = NULL;
    cfg->q8_keep_len = 0;
}

double stage_flops_attn_proj(const stage_config *c)
{
    double qd = (double)c->n_heads * c->head_dim, kvd = (double)c->n_kv_heads * c->head_dim;
    double f = 2.0 * c->hidden * (qd + 2 * kvd) + 2.0 * qd * c->hidden;
    /* docs/SPEC.md §10: a bias add is one FLOP per feature, an RMSNorm about four */
    if (c->qkv_bias) f += qd + 2 * kvd;
    if (c->o_bias) f += c->hidden;
    if (c->qk_norm) f += 4.0 * (qd + kvd);
    return f;
}
double stage_flops_attn_ctx(const stage_config *c, double ctx)
{
    return 4.0 * c->n_heads * c->head_dim * ctx;
}
double stage_flops_mlp(const stage_config *c)
{
    return 6.0 * c->hidden * c->inter + (c->mlp_bias ? 2.0 * c->inter + c->hidden : 0.0);
}
double stage_flops_expert(const stage_config *c) { return 6.0 * c->hidden * c->expert_inter; }
double stage_flops_gate(const stage_config *c, int n_gate) { return 2.0 * c->hidden * n_gate; }
