/* stage/arch.c — config.json keys of the block families -> stage_config flags (docs/SPEC.md
 * §10). See arch.h. The defaults are Hugging Face transformers' configuration classes' own
 * (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config), so a key a config.json leaves out
 * means what it means there. */
#include "stage/arch.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "stage/kernels.h"

static const char *const type_names[] = {"llama", "mistral", "qwen2", "qwen3"};
static const char *const arch_names[] = {"LlamaForCausalLM", "MistralForCausalLM",
                                         "Qwen2ForCausalLM", "Qwen3ForCausalLM"};
#define N_ARCH ((int)(sizeof type_names / sizeof *type_names))

/* HF's default sliding_window (Mistral / Qwen2 / Qwen3 configs) and max_window_layers. */
#define HF_DEFAULT_WINDOW 4096
#define HF_DEFAULT_MAX_WINDOW_LAYERS 28

const char *stage_arch_name(stage_arch a)
{
    return (int)a >= 0 && (int)a < N_ARCH ? type_names[a] : "?";
}

const char *stage_arch_class_name(stage_arch a)
{
    return (int)a >= 0 && (int)a < N_ARCH ? arch_names[a] : "?";
}

static int lookup(const char *const *names, const char *s)
{
    for (int i = 0; i < N_ARCH; i++)
        if (strcmp(s, names[i]) == 0) return i;
    return -1;
}

/* model_type and architectures must name the same supported family; neither: llama. */
static int parse_family(stage_cfg_ctx *c, const cJSON *root, stage_config *cfg)
{
    int from_type = -1, from_arch = -1;
    const cJSON *mt = stage_cj_opt(root, "model_type");
    if (mt) {
        from_type = cJSON_IsString(mt) ? lookup(type_names, mt->valuestring) : -1;
        if (from_type < 0) {
            stage_cfg_err(c->err, c->errlen, c->path,
                          "model_type: \"%s\" is not supported (supported: llama, mistral, qwen2, "
                          "qwen3)",
                          cJSON_IsString(mt) ? mt->valuestring : stage_cj_type_name(mt));
            return -1;
        }
    }
    const cJSON *ar = stage_cj_opt(root, "architectures");
    if (ar) {
        if (!cJSON_IsArray(ar)) {
            stage_cfg_err(c->err, c->errlen, c->path, "architectures: expected a list, got %s",
                          stage_cj_type_name(ar));
            return -1;
        }
        const cJSON *e;
        cJSON_ArrayForEach(e, ar)
        {
            int a = cJSON_IsString(e) ? lookup(arch_names, e->valuestring) : -1;
            if (a < 0) {
                stage_cfg_err(c->err, c->errlen, c->path,
                              "architectures: \"%s\" is not supported (supported: "
                              "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                              "Qwen3ForCausalLM)",
                              cJSON_IsString(e) ? e->valuestring : "?");
                return -1;
            }
            if (from_arch >= 0 && a != from_arch) {
                stage_cfg_err(c->err, c->errlen, c->path, "architectures: lists both %s and %s",
                              arch_names[from_arch], arch_names[a]);
                return -1;
            }
            from_arch = a;
        }
    }
    if (from_type >= 0 && from_arch >= 0 && from_type != from_arch) {
        stage_cfg_err(c->err, c->errlen, c->path,
                      "model_type \"%s\" and architectures \"%s\" name different families",
                      type_names[from_type], arch_names[from_arch]);
        return -1;
    }
    cfg->arch = (stage_arch)(from_type >= 0 ? from_type : from_arch >= 0 ? from_arch : 0);
    return 0;
}

/* ---- RoPE scaling ---------------------------------------------------------------------------- */

static int rope_number(stage_cfg_ctx *c, const cJSON *o, const char *pfx, const char *key,
                       double *out)
{
    if (!stage_cj_opt(o, key)) {
        stage_cfg_err(c->err, c->errlen, c->path, "%s%s: missing (needed by this rope_type)", pfx,
                      key);
        return -1;
    }
    return stage_cj_double(c, o, pfx, key, 0.0, 1, DBL_MAX, out);
}

/* rope_scaling (or transformers 5's rope_parameters): its type in `rope_type` or `type`. */
static int parse_rope_obj(stage_cfg_ctx *c, const cJSON *o, const char *key, stage_config *cfg)
{
    char pfx[32];
    snprintf(pfx, sizeof pfx, "%s.", key);
    if (!cJSON_IsObject(o)) {
        stage_cfg_err(c->err, c->errlen, c->path, "%s: expected an object, got %s", key,
                      stage_cj_type_name(o));
        return -1;
    }
    const cJSON *t = stage_cj_opt(o, "rope_type");
    const char *tkey = "rope_type";
    if (!t) {
        t = stage_cj_opt(o, "type");
        tkey = "type";
    }
    if (t && !cJSON_IsString(t)) {
        stage_cfg_err(c->err, c->errlen, c->path, "%s%s: expected a string, got %s", pfx, tkey,
                      stage_cj_type_name(t));
        return -1;
    }
    const char *type = t ? t->valuestring : "default";
    static const char *const known[] = {"rope_type",        "type",
                                        "factor",           "low_freq_factor",
                                        "high_freq_factor", "original_max_position_embeddings",
                                        "rope_theta"};
    const cJSON *e;
    cJSON_ArrayForEach(e, o)
    {
        size_t i = 0;
        while (i < sizeof known / sizeof *known && strcmp(e->string, known[i]) != 0) i++;
        if (i == sizeof known / sizeof *known) {
            stage_cfg_err(c->err, c->errlen, c->path,
                          "%s%s: is not supported (it would change RoPE; known keys: rope_type, "
                          "factor, low_freq_factor, high_freq_factor, "
                          "original_max_position_embeddings)",
                          pfx, e->string);
            return -1;
        }
    }
    if (strcmp(type, "default") == 0) return 0;
    if (cfg->rope_type != STAGE_ROPE_DEFAULT) {
        stage_cfg_err(c->err, c->errlen, c->path,
                      "%s: both rope_scaling and rope_parameters set a scaling", key);
        return -1;
    }
    if (strcmp(type, "linear") == 0) {
        cfg->rope_type = STAGE_ROPE_LINEAR;
        return rope_number(c, o, pfx, "factor", &cfg->rope_factor);
    }
    if (strcmp(type, "llama3") == 0) {
        cfg->rope_type = STAGE_ROPE_LLAMA3;
        if (rope_number(c, o, pfx, "factor", &cfg->rope_factor) ||
            rope_number(c, o, pfx, "low_freq_factor", &cfg->rope_low_freq) ||
            rope_number(c, o, pfx, "high_freq_factor", &cfg->rope_high_freq))
            return -1;
        if (!(cfg->rope_high_freq > cfg->rope_low_freq)) {
            stage_cfg_err(c->err, c->errlen, c->path,
                          "%shigh_freq_factor: must be greater than low_freq_factor (%g), got %g",
                          pfx, cfg->rope_low_freq, cfg->rope_high_freq);
            return -1;
        }
        if (!stage_cj_opt(o, "original_max_position_embeddings")) {
            stage_cfg_err(c->err, c->errlen, c->path,
                          "%soriginal_max_position_embeddings: missing (needed by llama3)", pfx);
            return -1;
        }
        return stage_cj_int(c, o, pfx, "original_max_position_embeddings", 1, 1,
                            &cfg->rope_orig_ctx);
    }
    stage_cfg_err(c->err, c->errlen, c->path,
                  "%s%s: \"%s\" is not supported (supported: default, linear, llama3)", pfx, tkey,
                  type);
    return -1;
}

static int parse_rope(stage_cfg_ctx *c, const cJSON *root, stage_config *cfg)
{
    static const char *const keys[] = {"rope_scaling", "rope_parameters"};
    for (int i = 0; i < 2; i++) {
        const cJSON *o = stage_cj_opt(root, keys[i]);
        if (o && parse_rope_obj(c, o, keys[i], cfg)) return -1;
    }
    return 0;
}

void stage_arch_inv_freq(const stage_config *c, float *inv_freq)
{
    const int half = c->head_dim / 2;
    stage_rope_inv_freq(c->rope_theta, c->head_dim, inv_freq);
    if (c->rope_type == STAGE_ROPE_LINEAR) {
        for (int i = 0; i < half; i++) inv_freq[i] = (float)(inv_freq[i] / c->rope_factor);
    } else if (c->rope_type == STAGE_ROPE_LLAMA3) {
        const double pi = 3.14159265358979323846;
        const double lo_wl = c->rope_orig_ctx / c->rope_low_freq; /* wavelength bounds */
        const double hi_wl = c->rope_orig_ctx / c->rope_high_freq;
        for (int i = 0; i < half; i++) {
            double f = inv_freq[i], wl = 2.0 * pi / f;
            if (wl > lo_wl) {
                f /= c->rope_factor;  /* low frequencies: scaled */
            } else if (wl >= hi_wl) { /* between: interpolated */
                double sm = (c->rope_orig_ctx / wl - c->rope_low_freq) /
                            (c->rope_high_freq - c->rope_low_freq);
                f = (1.0 - sm) * f / c->rope_factor + sm * f;
            } /* high frequencies: unchanged */
            inv_freq[i] = (float)f;
        }
    }
}

/* ---- sliding windows ------------------------------------------------------------------------- */

int stage_arch_hf_layer_types(const cJSON *list)
{
    if (!cJSON_IsArray(list) || cJSON_GetArraySize(list) == 0) return 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, list)
    {
        if (!cJSON_IsString(e) || (strcmp(e->valuestring, "full_attention") != 0 &&
                                   strcmp(e->valuestring, "sliding_attention") != 0))
            return 0;
    }
    return 1;
}

/* The window W and the windowed layers. Mistral: every layer when sliding_window is set;
 * Qwen2 / Qwen3: only with use_sliding_window, layers >= max_window_layers; HF's explicit
 * layer_types list overrides which layers (it must mark a suffix of the layers). */
static int parse_window(stage_cfg_ctx *c, const cJSON *root, stage_config *cfg)
{
    const int n = cfg->n_layers;
    int use = cfg->arch == STAGE_ARCH_MISTRAL, use_key = -1;
    if (stage_cj_bool(c, root, "use_sliding_window", &use_key)) return -1;
    if (cfg->arch != STAGE_ARCH_MISTRAL) use = use_key == 1; /* Mistral does not read it */
    int w = 0;
    const cJSON *raw = cJSON_GetObjectItemCaseSensitive(root, "sliding_window");
    if (!raw) {
        w = HF_DEFAULT_WINDOW;
    } else if (!cJSON_IsNull(raw)) {
        if (stage_cj_int(c, root, "", "sliding_window", 1, 1, &w)) return -1;
    }
    if (cfg->arch == STAGE_ARCH_LLAMA) {
        /* LlamaForCausalLM has no window: a config that turns one on is a mistake (Qwen-style
         * configs carry a value with use_sliding_window false: that one is off) */
        if (use_key == 1 || (raw && !cJSON_IsNull(raw) && use_key != 0)) {
            stage_cfg_err(c->err, c->errlen, c->path,
                          "%s: model_type llama has no sliding-window attention (mistral, qwen2 "
                          "and qwen3 do)",
                          use_key == 1 ? "use_sliding_window" : "sliding_window");
            return -1;
        }
        use = 0;
    }
    int from = 0;
    if (cfg->arch == STAGE_ARCH_QWEN2 || cfg->arch == STAGE_ARCH_QWEN3) {
        from = HF_DEFAULT_MAX_WINDOW_LAYERS;
        if (stage_cj_int(c, root, "", "max_window_layers", 0, 0, &from)) return -1;
    }
    const cJSON *lt = stage_cj_opt(root, "layer_types");
    if (lt && stage_arch_hf_layer_types(lt)) {
        if (cJSON_GetArraySize(lt) != n) {
            stage_cfg_err(c->err, c->errlen, c->path,
                          "layer_types: has %d entries but num_hidden_layers is %d",
                          cJSON_GetArraySize(lt), n);
            return -1;
        }
        from = n;
        int i = 0, seen_sliding = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, lt)
        {
            int sl = strcmp(e->valuestring, "sliding_attention") == 0;
            if (sl && !seen_sliding) from = i;
            if (!sl && seen_sliding) {
                stage_cfg_err(c->err, c->errlen, c->path,
                              "layer_types[%d]: full attention after a sliding layer is not "
                              "supported (windowed layers must be the last ones)",
                              i);
                return -1;
            }
            seen_sliding |= sl;
            i++;
        }
        if (seen_sliding && cfg->arch == STAGE_ARCH_LLAMA) {
            stage_cfg_err(c->err, c->errlen, c->path,
                          "layer_types: model_type llama has no sliding-window attention");
            return -1;
        }
        if (seen_sliding && cfg->arch == STAGE_ARCH_MISTRAL) use = 1;
    }
    cfg->window = use && w > 0 && from < n ? w : 0;
    cfg->window_from = cfg->window ? from : 0;
    return 0;
}

/* ---- the whole block ------------------------------------------------------------------------- */

int stage_arch_parse(stage_cfg_ctx *c, const cJSON *root, stage_config *cfg)
{
    if (parse_family(c, root, cfg) || parse_rope(c, root, cfg)) return -1;
    int attn_bias = 0, mlp_bias = 0;
    if (stage_cj_bool(c, root, "attention_bias", &attn_bias)) return -1;
    if (stage_cj_bool(c, root, "mlp_bias", &mlp_bias)) return -1;
    switch (cfg->arch) {
    case STAGE_ARCH_LLAMA: /* LlamaAttention: q/k/v/o bias = attention_bias; LlamaMLP: mlp_bias */
        cfg->qkv_bias = cfg->o_bias = attn_bias;
        cfg->mlp_bias = mlp_bias;
        break;
    case STAGE_ARCH_MISTRAL: /* no biases anywhere: Mistral reads neither key (nor Qwen mlp_bias) */
        break;
    case STAGE_ARCH_QWEN2: /* q/k/v always biased, o_proj never; attention_bias not read */
        cfg->qkv_bias = 1;
        break;
    case STAGE_ARCH_QWEN3: /* q/k/v/o bias = attention_bias; per-head q/k RMSNorm */
        cfg->qkv_bias = cfg->o_bias = attn_bias;
        cfg->qk_norm = 1;
        if (!stage_cj_opt(root, "head_dim")) {
            stage_cfg_err(c->err, c->errlen, c->path,
                          "head_dim: missing (qwen3 configs state it; it is not hidden_size / "
                          "num_attention_heads in general)");
            return -1;
        }
        break;
    }
    if (cfg->head_dim % 2) {
        stage_cfg_err(c->err, c->errlen, c->path, "head_dim: %d is odd (RoPE rotates pairs)",
                      cfg->head_dim);
        return -1;
    }
    return parse_window(c, root, cfg);
}

int stage_arch_tensor_used(const stage_config *c, const char *s)
{
    static const char *const qkv[] = {"self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                      "self_attn.v_proj.bias"};
    static const char *const mlp[] = {"mlp.gate_proj.bias", "mlp.up_proj.bias",
                                      "mlp.down_proj.bias"};
    static const char *const qkn[] = {"self_attn.q_norm.weight", "self_attn.k_norm.weight"};
    for (int i = 0; i < 3; i++)
        if ((c->qkv_bias && strcmp(s, qkv[i]) == 0) || (c->mlp_bias && strcmp(s, mlp[i]) == 0))
            return 1;
    for (int i = 0; i < 2; i++)
        if (c->qk_norm && strcmp(s, qkn[i]) == 0) return 1;
    return c->o_bias && strcmp(s, "self_attn.o_proj.bias") == 0;
}
