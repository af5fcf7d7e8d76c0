/* stage/config.h — the model's config.json (docs/SPEC.md §3).
 *
 * stage_config_load() reads DIR/config.json with cJSON into a stage_config.
 * Inputs : a model directory.
 * Output : *cfg filled; cfg->layer_kind and cfg->q8_keep are malloc'd (free with
 *          stage_config_free).
 * Errors : returns non-zero and writes one line into err naming the file and the key
 *          (missing key, wrong type, bad value, unknown layer type, a config feature the
 *          engine does not implement, e.g. a rope_scaling type other than linear / llama3).
 * Accepted: the families llama, mistral, qwen2, qwen3 with their keys (stage/arch.h), the
 *          Llama keys, `layer_types` (dense, mod, mode_staged, mode_integrated,
 *          mindskip) with top-level "mod" / "mode" / "mindskip" settings objects, and
 *          Router-Tuning's `is_mindskip: [bool per layer]` + top-level `threshold` and
 *          `granularity` ("sequence", "token", "attn_sequence", "attn_token").
 */
#ifndef STAGE_CONFIG_H
#define STAGE_CONFIG_H

#include <stddef.h>

typedef enum {
    STAGE_KIND_DENSE = 0,
    STAGE_KIND_MOD,
    STAGE_KIND_MODE_STAGED,
    STAGE_KIND_MODE_INTEGRATED,
    STAGE_KIND_MINDSKIP,
} stage_kind;

typedef enum {
    STAGE_ROUTING_THRESHOLD = 0,
    STAGE_ROUTING_PREDICTOR,
    STAGE_ROUTING_TOPK,
} stage_routing;

typedef enum { STAGE_SCALE_NONE = 0, STAGE_SCALE_SIGMOID } stage_router_scale;
typedef enum { STAGE_GRAN_SEQUENCE = 0, STAGE_GRAN_TOKEN } stage_granularity;

/* The block family (model_type / architectures, docs/SPEC.md §10); stage/arch.c maps it and
 * its keys to the flags below. */
typedef enum {
    STAGE_ARCH_LLAMA = 0,
    STAGE_ARCH_MISTRAL,
    STAGE_ARCH_QWEN2,
    STAGE_ARCH_QWEN3,
} stage_arch;

typedef enum { STAGE_ROPE_DEFAULT = 0, STAGE_ROPE_LINEAR, STAGE_ROPE_LLAMA3 } stage_rope_type;

typedef struct stage_config {
    int hidden;             /* hidden_size D */
    int inter;              /* intermediate_size */
    int n_heads;            /* num_attention_heads */
    int n_kv_heads;         /* num_key_value_heads (defaults to n_heads) */
    int head_dim;           /* head_dim key, else hidden / n_heads */
    int n_layers;           /* num_hidden_layers */
    int vocab;              /* vocab_size */
    int max_pos;            /* max_position_embeddings (default 2048) */
    float eps;              /* rms_norm_eps (default 1e-6) */
    float rope_theta;       /* rope_theta (default 10000) */
    int tie_embeddings;     /* tie_word_embeddings (default 0) */
    int eos_token_id;       /* -1 when absent (or a list: first entry) */
    stage_kind *layer_kind; /* [n_layers] */
    int q8_0;               /* quantization_config of a `modpipe quantize` directory: its
                               projections are stored as Q8_0 (docs/SPEC.md §9) */
    char *q8_keep;          /* owned: the projections its ignore list keeps in their dtype,
                               module names ("lm_head"), each NUL-terminated; NULL: none */
    size_t q8_keep_len;     /* bytes of q8_keep */

    /* block variant (docs/SPEC.md §10, set by stage/arch.c) */
    stage_arch arch;
    int qkv_bias; /* self_attn.{q,k,v}_proj.bias */
    int o_bias;   /* self_attn.o_proj.bias */
    int mlp_bias; /* mlp.{gate,up,down}_proj.bias */
    int qk_norm;  /* self_attn.{q,k}_norm.weight [head_dim]: per-head RMSNorm */
    stage_rope_type rope_type;
    double rope_factor;    /* linear, llama3 */
    double rope_low_freq;  /* llama3 low_freq_factor */
    double rope_high_freq; /* llama3 high_freq_factor */
    int rope_orig_ctx;     /* llama3 original_max_position_embeddings */
    int window;            /* sliding window W: a key is seen iff q_pos - k_pos < W; 0: none */
    int window_from;       /* layers l >= window_from are windowed (when window > 0) */

    /* "mod" settings (also the router of mode_staged) */
    double mod_capacity; /* default 0.125 (double: topk k = floor(capacity*T) must match Python) */
    stage_routing mod_routing;    /* default threshold */
    double mod_threshold;         /* default 0.5 */
    stage_router_scale mod_scale; /* default none: g(r) = r */

    /* "mode" settings */
    int n_experts;         /* num_experts, default 4 */
    int n_noop_experts;    /* num_noop_experts, default 0 */
    int experts_per_token; /* default 1 */
    int expert_inter;      /* expert_intermediate_size, default intermediate_size */

    /* "mindskip" settings */
    stage_granularity ms_granularity; /* default sequence */
    double ms_threshold;              /* default 0.5 */
} stage_config;

int stage_config_load(const char *dir, stage_config *cfg, char *err, size_t errlen);
/* Parse config.json text (for tests); `path` is only used in messages. */
int stage_config_parse(const char *json_text, const char *path, stage_config *cfg, char *err,
                       size_t errlen);
void stage_config_free(stage_config *cfg);
/* Zero *cfg and set every default this header documents (layer_kind stays NULL). */
void stage_config_defaults(stage_config *cfg);

/* The FLOP model, per row (2 FLOPs per multiply-add): the one used by --stats and by the
 * partitioner's cost model. */
double stage_flops_attn_proj(const stage_config *c); /* q, k, v, o projections (+ biases, norms) */
double stage_flops_attn_ctx(const stage_config *c, double ctx); /* scores + mix over ctx entries */
double stage_flops_mlp(const stage_config *c);                  /* dense SwiGLU MLP */
double stage_flops_expert(const stage_config *c);               /* one MoE expert */
double stage_flops_gate(const stage_config *c, int n_gate);     /* MoE gate of n_gate rows */

/* Q8_0 directories (docs/SPEC.md §9, stage/config_quant.c). stage_q8_kept: 1 when tensor
 * (e.g. "lm_head.weight") belongs to a module the directory's quantization_config.ignore lists
 * among the projections, so it stays in its stored dtype. stage_q8_quant_config_json: the
 * config.json text config_text with its quantization_config replaced by the one modpipe
 * quantize writes (compressed-tensors, format int-quantized, 8-bit groups of 32, `ignore` =
 * the n_ignore module names); malloc'd, NULL when config_text is not a JSON object or memory
 * is short. */
int stage_q8_kept(const stage_config *cfg, const char *tensor);
/* The same test against any list of module names, NUL-separated in names [len]. */
int stage_q8_module_listed(const char *names, size_t len, const char *tensor);
char *stage_q8_quant_config_json(const char *const *ignore, int n_ignore, const char *config_text);

const char *stage_kind_name(stage_kind k);
/* Does a layer of this kind carry a causal or top-k MoD router (mod, mode_staged)? */
int stage_kind_is_routed(stage_kind k);

#endif
