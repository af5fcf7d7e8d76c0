/* cli/modelspec.c — the `modpipe init-model` spec YAML -> cli_model_spec. */
#include "cli/modelspec.h"
#include "base/err.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cJSON.h>

#include "cli/yamlcfg.h"
#include "stage/arch.h"

static const char *const spec_keys[] = {
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "layer_types",
    "layer_pattern",
    "mod.capacity",
    "mod.routing",
    "mod.threshold",
    "mod.router_scale",
    "mod.router_bias",
    "mod.predictor_hidden",
    "mode.num_experts",
    "mode.num_noop_experts",
    "mode.experts_per_token",
    "mode.expert_intermediate_size",
    "mindskip.granularity",
    "mindskip.threshold",
    "init.seed",
    "init.std",
    "init.router_std",
    "output.dtype",
    "output.shards",
    "calibrate.enabled",
    "calibrate.prompts",
    "calibrate.length",
    "head_dim",
    "model_type",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "rope_scaling.rope_type",
    "rope_scaling.factor",
    "rope_scaling.low_freq_factor",
    "rope_scaling.high_freq_factor",
    "rope_scaling.original_max_position_embeddings",
    NULL,
};

/* Error at an entry's position, or at the file when the value was defaulted. */
static int err_at(const cli_yaml *y, const cli_yaml_entry *e, char *err, size_t errlen,
                  const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (e)
        base_set_err(err, errlen, "%s:%d:%d: %s", y->path, e->line, e->col, msg);
    else
        base_set_err(err, errlen, "%s: %s", y->path, msg);
    return -1;
}

/* Optional integer: keeps *out (the default) when the key is absent. */
static int opt_int(const cli_yaml *y, const char *key, long lo, long hi, int *out, char *err,
                   size_t errlen)
{
    const cli_yaml_entry *e = cli_yaml_get(y, key);
    if (!e) return 0;
    long v;
    if (cli_yaml_int(y, e, lo, hi, &v, err, errlen)) return -1;
    *out = (int)v;
    return 0;
}

static int req_int(const cli_yaml *y, const char *key, long lo, long hi, int *out, char *err,
                   size_t errlen)
{
    if (!cli_yaml_get(y, key)) {
        base_set_err(err, errlen, "%s: missing required key %s", y->path, key);
        return -1;
    }
    return opt_int(y, key, lo, hi, out, err, errlen);
}

/* Optional float in an interval; lo_open / hi_open make that end exclusive. */
static int opt_num(const cli_yaml *y, const char *key, double lo, int lo_open, double hi,
                   int hi_open, double *out, char *err, size_t errlen)
{
    const cli_yaml_entry *e = cli_yaml_get(y, key);
    if (!e) return 0;
    char want[96];
    if (hi >= 1e300)
        snprintf(want, sizeof want, "a number %s %g", lo_open ? ">" : ">=", lo);
    else
        snprintf(want, sizeof want, "a number in %c%g, %g%c", lo_open ? '(' : '[', lo, hi,
                 hi_open ? ')' : ']');
    if (e->is_list || e->n_vals != 1)
        return err_at(y, e, err, errlen, "%s: expected %s, got a list", key, want);
    double v;
    if (cli_yaml_double(y, e, -1e300, 1e300, &v, err, errlen) || (lo_open ? v <= lo : v < lo) ||
        (hi_open ? v >= hi : v > hi))
        return err_at(y, e, err, errlen, "%s: expected %s, got '%s'", key, want, e->vals[0]);
    *out = v;
    return 0;
}

static int opt_bool(const cli_yaml *y, const char *key, int *out, char *err, size_t errlen)
{
    const cli_yaml_entry *e = cli_yaml_get(y, key);
    return e ? cli_yaml_bool(y, e, out, err, errlen) : 0;
}

/* Optional one-of-names value; *out keeps its default when absent. */
static int opt_enum(const cli_yaml *y, const char *key, const char *const *names, const int *values,
                    const char *expect, int *out, char *err, size_t errlen)
{
    const cli_yaml_entry *e = cli_yaml_get(y, key);
    if (!e) return 0;
    if (e->is_list || e->n_vals != 1)
        return err_at(y, e, err, errlen, "%s: expected %s, got a list", key, expect);
    for (int i = 0; names[i]; i++) {
        if (strcasecmp(e->vals[0], names[i]) == 0) {
            *out = values[i];
            return 0;
        }
    }
    return err_at(y, e, err, errlen, "%s: expected %s, got '%s'", key, expect, e->vals[0]);
}

static int parse_kind(const char *s, stage_kind *k)
{
    static const struct {
        const char *name;
        stage_kind kind;
    } kinds[] = {
        {"dense", STAGE_KIND_DENSE},
        {"mod", STAGE_KIND_MOD},
        {"mode_staged", STAGE_KIND_MODE_STAGED},
        {"mode_integrated", STAGE_KIND_MODE_INTEGRATED},
        {"mindskip", STAGE_KIND_MINDSKIP},
    };
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        if (strcmp(s, kinds[i].name) == 0) {
            *k = kinds[i].kind;
            return 0;
        }
    }
    return -1;
}

/* layer_types (one per layer) or layer_pattern (repeated); neither: every layer dense. */
static int parse_layers(const cli_yaml *y, stage_config *c, char *err, size_t errlen)
{
    const cli_yaml_entry *lt = cli_yaml_get(y, "layer_types");
    const cli_yaml_entry *lp = cli_yaml_get(y, "layer_pattern");
    if (lt && lp)
        return err_at(y, lp, err, errlen,
                      "layer_pattern: give layer_types or layer_pattern, not both");
    const cli_yaml_entry *e = lt ? lt : lp;
    const char *key = lt ? "layer_types" : "layer_pattern";
    if (e && !e->is_list)
        return err_at(y, e, err, errlen, "%s: expected a list like [dense, mod], got '%s'", key,
                      e->vals[0]);
    if (e && e->n_vals == 0) return err_at(y, e, err, errlen, "%s: empty list", key);

    if (c->n_layers == 0) {
        /* num_hidden_layers may be left out when layer_types lists every layer */
        if (!lt) {
            base_set_err(err, errlen, "%s: missing required key num_hidden_layers", y->path);
            return -1;
        }
        c->n_layers = lt->n_vals;
    }
    if (lt && lt->n_vals != c->n_layers)
        return err_at(y, lt, err, errlen, "layer_types: %d entries but num_hidden_layers is %d",
                      lt->n_vals, c->n_layers);

    c->layer_kind = calloc((size_t)c->n_layers, sizeof *c->layer_kind);
    if (!c->layer_kind) {
        base_set_err(err, errlen, "%s: out of memory", y->path);
        return -1;
    }
    if (!e) return 0; /* calloc: STAGE_KIND_DENSE == 0 */
    for (int i = 0; i < e->n_vals; i++) {
        stage_kind k;
        if (parse_kind(e->vals[i], &k))
            return err_at(y, e, err, errlen,
                          "%s: item %d: unknown layer kind '%s' (expected dense, mod, "
                          "mode_staged, mode_integrated or mindskip)",
                          key, i + 1, e->vals[i]);
        for (int l = i; l < c->n_layers; l += e->n_vals) c->layer_kind[l] = k;
    }
    return 0;
}

cJSON *cli_model_spec_config_json(const cli_model_spec *sp)
{
    const stage_config *c = &sp->cfg;
    static const char *routing[] = {"threshold", "predictor", "topk"};
    cJSON *j = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(j, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString(stage_arch_class_name(c->arch)));
    cJSON_AddStringToObject(j, "model_type", stage_arch_name(c->arch));
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
    cJSON_AddNumberToObject(j, "head_dim", c->head_dim);
    cJSON_AddStringToObject(j, "hidden_act", "silu");
    /* the block variant's keys as the spec gave them (its flags were parsed from them) */
    const cJSON *ak;
    cJSON_ArrayForEach(ak, sp->arch_keys)
    {
        if (strcmp(ak->string, "model_type") == 0) continue;
        cJSON_AddItemToObject(j, ak->string, cJSON_Duplicate(ak, 1));
    }
    cJSON_AddStringToObject(j, "torch_dtype",
                            sp->dtype == STAGE_F32    ? "float32"
                            : sp->dtype == STAGE_BF16 ? "bfloat16"
                                                      : "float16");
    cJSON *lt = cJSON_AddArrayToObject(j, "layer_types");
    for (int l = 0; l < c->n_layers; l++)
        cJSON_AddItemToArray(lt, cJSON_CreateString(stage_kind_name(c->layer_kind[l])));
    cJSON *mod = cJSON_AddObjectToObject(j, "mod");
    cJSON_AddNumberToObject(mod, "capacity", c->mod_capacity);
    cJSON_AddStringToObject(mod, "routing", routing[c->mod_routing]);
    cJSON_AddNumberToObject(mod, "threshold", c->mod_threshold);
    cJSON_AddStringToObject(mod, "router_scale",
                            c->mod_scale == STAGE_SCALE_SIGMOID ? "sigmoid" : "none");
    cJSON *mode = cJSON_AddObjectToObject(j, "mode");
    cJSON_AddNumberToObject(mode, "num_experts", c->n_experts);
    cJSON_AddNumberToObject(mode, "num_noop_experts", c->n_noop_experts);
    cJSON_AddNumberToObject(mode, "experts_per_token", c->experts_per_token);
    cJSON_AddNumberToObject(mode, "expert_intermediate_size", c->expert_inter);
    cJSON *ms = cJSON_AddObjectToObject(j, "mindskip");
    cJSON_AddStringToObject(ms, "granularity",
                            c->ms_granularity == STAGE_GRAN_TOKEN ? "token" : "sequence");
    cJSON_AddNumberToObject(ms, "threshold", c->ms_threshold);
    return j;
}

/* The block-variant keys of the YAML into s->arch_keys, as config.json will carry them, then
 * the config's own parser on them (with the sizes) sets cfg's flags: one set of rules. */
static int parse_arch(const cli_yaml *y, cli_model_spec *s, char *err, size_t errlen)
{
    static const char *const bools[] = {"attention_bias", "mlp_bias", "use_sliding_window"};
    static const char *const ints[] = {"sliding_window", "max_window_layers"};
    static const char *const rope_nums[] = {"factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings"};
    cJSON *a = cJSON_CreateObject(), *rs = NULL;
    s->arch_keys = a;
    if (!a) return err_at(y, NULL, err, errlen, "out of memory");
    const cli_yaml_entry *e = cli_yaml_get(y, "model_type");
    if (e) {
        if (e->is_list || e->n_vals != 1)
            return err_at(y, e, err, errlen, "model_type: expected a name, got a list");
        cJSON_AddStringToObject(a, "model_type", e->vals[0]);
    }
    for (size_t i = 0; i < sizeof bools / sizeof *bools; i++) {
        int v = 0;
        if (!cli_yaml_get(y, bools[i])) continue;
        if (opt_bool(y, bools[i], &v, err, errlen)) return -1;
        cJSON_AddBoolToObject(a, bools[i], v);
    }
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++) {
        int v = 0;
        if (!cli_yaml_get(y, ints[i])) continue;
        if (opt_int(y, ints[i], 0, INT_MAX, &v, err, errlen)) return -1;
        cJSON_AddNumberToObject(a, ints[i], v);
    }
    e = cli_yaml_get(y, "rope_scaling.rope_type");
    if (e) {
        if (e->is_list || e->n_vals != 1)
            return err_at(y, e, err, errlen, "rope_scaling.rope_type: expected a name");
        rs = cJSON_AddObjectToObject(a, "rope_scaling");
        cJSON_AddStringToObject(rs, "rope_type", e->vals[0]);
    }
    for (size_t i = 0; i < sizeof rope_nums / sizeof *rope_nums; i++) {
        char key[64];
        snprintf(key, sizeof key, "rope_scaling.%s", rope_nums[i]);
        e = cli_yaml_get(y, key);
        if (!e) continue;
        if (!rs) return err_at(y, e, err, errlen, "%s: give rope_scaling.rope_type too", key);
        double v = 0;
        if (opt_num(y, key, 0, 1, 1e300, 0, &v, err, errlen)) return -1;
        cJSON_AddNumberToObject(rs, rope_nums[i], v);
    }
    /* the config.json this spec will write, through the parser a model directory meets (the
     * family from the YAML's model_type, not the default the flags still hold) */
    cJSON *j = cli_model_spec_config_json(s);
    stage_config *c = &s->cfg;
    if (j) {
        cJSON_DeleteItemFromObject(j, "architectures");
        cJSON_DeleteItemFromObject(j, "model_type");
        const cJSON *mt = cJSON_GetObjectItem(a, "model_type");
        if (mt) cJSON_AddItemToObject(j, "model_type", cJSON_Duplicate(mt, 1));
    }
    char *txt = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    if (!txt) return err_at(y, NULL, err, errlen, "out of memory");
    stage_config v;
    char e2[400];
    int rc = stage_config_parse(txt, "config.json", &v, e2, sizeof e2);
    free(txt);
    if (rc) return err_at(y, NULL, err, errlen, "as %s", e2);
    c->arch = v.arch;
    c->qkv_bias = v.qkv_bias;
    c->o_bias = v.o_bias;
    c->mlp_bias = v.mlp_bias;
    c->qk_norm = v.qk_norm;
    c->rope_type = v.rope_type;
    c->rope_factor = v.rope_factor;
    c->rope_low_freq = v.rope_low_freq;
    c->rope_high_freq = v.rope_high_freq;
    c->rope_orig_ctx = v.rope_orig_ctx;
    c->window = v.window;
    c->window_from = v.window_from;
    stage_config_free(&v);
    return 0;
}

static void set_defaults(cli_model_spec *s)
{
    stage_config_defaults(&s->cfg);
    s->cfg.eps = 1e-5f; /* new models: the common Llama value (config.json's default is 1e-6) */
    s->router_bias = 1;
    s->predictor_hidden = 16;
    s->seed = 0;
    s->init_std = 0.02f;
    s->router_std = 1.0f;
    s->dtype = STAGE_F32;
    s->shards = 1;
    s->calibrate = 0;
    s->calib_prompts = 16;
    s->calib_length = 32;
    s->threads = 1;
}

static int fill(const cli_yaml *y, cli_model_spec *s, char *err, size_t errlen)
{
    stage_config *c = &s->cfg;
    if (cli_yaml_check_keys(y, spec_keys, err, errlen)) return -1;

    /* sizes: bounded so later products (vocab*hidden, ...) stay sane */
    if (req_int(y, "hidden_size", 1, 1 << 16, &c->hidden, err, errlen) ||
        req_int(y, "intermediate_size", 1, 1 << 18, &c->inter, err, errlen) ||
        req_int(y, "num_attention_heads", 1, 1024, &c->n_heads, err, errlen) ||
        req_int(y, "vocab_size", 1, 1 << 22, &c->vocab, err, errlen))
        return -1;
    if (opt_int(y, "num_hidden_layers", 1, 4096, &c->n_layers, err, errlen)) return -1;
    c->n_kv_heads = c->n_heads;
    /* via doubles: stage_config's float fields may be float or double */
    double eps = c->eps, theta = c->rope_theta;
    if (opt_int(y, "num_key_value_heads", 1, 1024, &c->n_kv_heads, err, errlen) ||
        opt_num(y, "rms_norm_eps", 0, 1, 1, 1, &eps, err, errlen) ||
        opt_num(y, "rope_theta", 0, 1, 1e300, 0, &theta, err, errlen) ||
        opt_int(y, "max_position_embeddings", 1, 1 << 24, &c->max_pos, err, errlen) ||
        opt_bool(y, "tie_word_embeddings", &c->tie_embeddings, err, errlen))
        return -1;
    c->eps = eps;
    c->rope_theta = theta;

    const cli_yaml_entry *he = cli_yaml_get(y, "num_attention_heads");
    if (c->hidden % c->n_heads && !cli_yaml_get(y, "head_dim"))
        return err_at(y, he, err, errlen,
                      "num_attention_heads: hidden_size %d is not divisible by %d heads", c->hidden,
                      c->n_heads);
    c->head_dim = c->hidden / c->n_heads;
    if (opt_int(y, "head_dim", 2, 1 << 16, &c->head_dim, err, errlen)) return -1;
    const cli_yaml_entry *hde = cli_yaml_get(y, "head_dim");
    if (c->head_dim % 2) /* rotate_half RoPE pairs up the two halves of a head */
        return hde ? err_at(y, hde, err, errlen, "head_dim: %d must be even for RoPE", c->head_dim)
                   : err_at(y, he, err, errlen,
                            "num_attention_heads: head_dim %d (hidden_size / heads) must be even "
                            "for RoPE",
                            c->head_dim);
    if (c->n_heads % c->n_kv_heads)
        return err_at(y, cli_yaml_get(y, "num_key_value_heads"), err, errlen,
                      "num_key_value_heads: %d attention heads are not divisible by %d KV heads",
                      c->n_heads, c->n_kv_heads);

    if (parse_layers(y, c, err, errlen)) return -1;

    static const char *const routing_names[] = {"threshold", "predictor", "topk", NULL};
    static const int routing_vals[] = {STAGE_ROUTING_THRESHOLD, STAGE_ROUTING_PREDICTOR,
                                       STAGE_ROUTING_TOPK};
    static const char *const scale_names[] = {"none", "sigmoid", NULL};
    static const int scale_vals[] = {STAGE_SCALE_NONE, STAGE_SCALE_SIGMOID};
    /* attn_* are Router-Tuning's spellings (docs/SPEC.md §3) */
    static const char *const gran_names[] = {"sequence", "token", "attn_sequence", "attn_token",
                                             NULL};
    static const int gran_vals[] = {STAGE_GRAN_SEQUENCE, STAGE_GRAN_TOKEN, STAGE_GRAN_SEQUENCE,
                                    STAGE_GRAN_TOKEN};
    static const char *const dtype_names[] = {"f32", "bf16", "f16", NULL};
    static const int dtype_vals[] = {STAGE_F32, STAGE_BF16, STAGE_F16};
    int routing = (int)c->mod_routing, scale = (int)c->mod_scale;
    int gran = (int)c->ms_granularity, dtype = (int)s->dtype;

    double cap = c->mod_capacity, thr = c->mod_threshold, ms_thr = c->ms_threshold;
    if (opt_num(y, "mod.capacity", 0, 1, 1, 0, &cap, err, errlen) ||
        opt_enum(y, "mod.routing", routing_names, routing_vals, "threshold, predictor or topk",
                 &routing, err, errlen) ||
        opt_num(y, "mod.threshold", 0, 1, 1, 1, &thr, err, errlen) ||
        opt_enum(y, "mod.router_scale", scale_names, scale_vals, "none or sigmoid", &scale, err,
                 errlen) ||
        opt_bool(y, "mod.router_bias", &s->router_bias, err, errlen) ||
        opt_int(y, "mod.predictor_hidden", 1, 1 << 16, &s->predictor_hidden, err, errlen))
        return -1;
    c->mod_capacity = cap;
    c->mod_threshold = thr;
    c->mod_routing = (stage_routing)routing;
    c->mod_scale = (stage_router_scale)scale;

    c->expert_inter = c->inter;
    if (opt_int(y, "mode.num_experts", 1, 1024, &c->n_experts, err, errlen) ||
        opt_int(y, "mode.num_noop_experts", 0, 1024, &c->n_noop_experts, err, errlen) ||
        opt_int(y, "mode.experts_per_token", 1, 1024, &c->experts_per_token, err, errlen) ||
        opt_int(y, "mode.expert_intermediate_size", 1, 1 << 18, &c->expert_inter, err, errlen))
        return -1;
    if (c->experts_per_token > c->n_experts)
        return err_at(y, cli_yaml_get(y, "mode.experts_per_token"), err, errlen,
                      "mode.experts_per_token: %d is more than num_experts (%d)",
                      c->experts_per_token, c->n_experts);

    if (opt_enum(y, "mindskip.granularity", gran_names, gran_vals, "sequence or token", &gran, err,
                 errlen) ||
        opt_num(y, "mindskip.threshold", 0, 1, 1, 1, &ms_thr, err, errlen))
        return -1;
    c->ms_threshold = ms_thr;
    c->ms_granularity = (stage_granularity)gran;

    const cli_yaml_entry *se = cli_yaml_get(y, "init.seed");
    if (se) {
        long v;
        if (cli_yaml_int(y, se, 0, LONG_MAX, &v, err, errlen)) return -1;
        s->seed = (unsigned long)v;
    }
    double std = s->init_std, rstd = s->router_std;
    if (opt_num(y, "init.std", 0, 0, 1e300, 0, &std, err, errlen) ||
        opt_num(y, "init.router_std", 0, 0, 1e300, 0, &rstd, err, errlen) ||
        opt_enum(y, "output.dtype", dtype_names, dtype_vals, "f32, bf16 or f16", &dtype, err,
                 errlen) ||
        opt_int(y, "output.shards", 1, 999, &s->shards, err, errlen) ||
        opt_bool(y, "calibrate.enabled", &s->calibrate, err, errlen) ||
        opt_int(y, "calibrate.prompts", 1, 1 << 20, &s->calib_prompts, err, errlen) ||
        opt_int(y, "calibrate.length", 1, 1 << 24, &s->calib_length, err, errlen))
        return -1;
    s->dtype = (stage_dtype)dtype;
    s->init_std = (float)std;
    s->router_std = (float)rstd;
    if (s->calibrate && s->calib_length > c->max_pos)
        return err_at(y, cli_yaml_get(y, "calibrate.length"), err, errlen,
                      "calibrate.length: %d is more than max_position_embeddings (%d)",
                      s->calib_length, c->max_pos);
    return parse_arch(y, s, err, errlen); /* last: it checks the whole config.json */
}

static int from_yaml(const cli_yaml *y, cli_model_spec *spec, char *err, size_t errlen)
{
    set_defaults(spec);
    if (fill(y, spec, err, errlen)) {
        cli_model_spec_free(spec);
        return -1;
    }
    return 0;
}

int cli_model_spec_parse(const char *text, size_t len, const char *path, cli_model_spec *spec,
                         char *err, size_t errlen)
{
    if (!spec) return -1;
    memset(spec, 0, sizeof *spec);
    cli_yaml y;
    if (cli_yaml_parse(text, len, path, &y, err, errlen)) return -1;
    int rc = from_yaml(&y, spec, err, errlen);
    cli_yaml_free(&y);
    return rc;
}

int cli_model_spec_load(const char *path, cli_model_spec *spec, char *err, size_t errlen)
{
    if (!spec) return -1;
    memset(spec, 0, sizeof *spec);
    cli_yaml y;
    if (cli_yaml_load(path, &y, err, errlen)) return -1;
    int rc = from_yaml(&y, spec, err, errlen);
    cli_yaml_free(&y);
    return rc;
}

void cli_model_spec_free(cli_model_spec *spec)
{
    if (!spec) return;
    free(spec->cfg.layer_kind);
    spec->cfg.layer_kind = NULL;
    cJSON_Delete(spec->arch_keys);
    spec->arch_keys = NULL;
}
