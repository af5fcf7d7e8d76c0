/* cli/modelspec.h — the YAML spec `modpipe init-model` builds a random model from.
 *
 * Keys (unknown keys are an error at file:line:col):
 *   hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
 *   num_hidden_layers, vocab_size, rms_norm_eps, rope_theta, max_position_embeddings,
 *   tie_word_embeddings, head_dim               — as in config.json (docs/SPEC.md §3)
 *   model_type (llama|mistral|qwen2|qwen3), attention_bias, mlp_bias, sliding_window,
 *   use_sliding_window, max_window_layers, rope_scaling.rope_type (default|linear|llama3),
 *   rope_scaling.factor, rope_scaling.low_freq_factor, rope_scaling.high_freq_factor,
 *   rope_scaling.original_max_position_embeddings
 *                                               — the block variant (docs/SPEC.md §10): written
 *                                                 to config.json as given and read back by
 *                                                 stage_config_parse, so the spec means exactly
 *                                                 what the model directory will
 *   layer_types: [dense, mod, ...]              — one per layer, or
 *   layer_pattern: [dense, mod]                 — repeated to num_hidden_layers
 *   mod.capacity, mod.routing (threshold|predictor|topk), mod.threshold,
 *   mod.router_scale (none|sigmoid), mod.router_bias (bool, default true),
 *   mod.predictor_hidden (default 16)
 *   mode.num_experts, mode.num_noop_experts, mode.experts_per_token,
 *   mode.expert_intermediate_size
 *   mindskip.granularity (sequence|token), mindskip.threshold
 *   init.seed (default 0), init.std (default 0.02), init.router_std (default 1.0)
 *   output.dtype (f32|bf16|f16, default f32), output.shards (default 1)
 *   calibrate.enabled (bool, default false), calibrate.prompts (default 16),
 *   calibrate.length (default 32)
 * Defaults as in stage_config for the rest. Validation: positive sizes, hidden divisible by
 * heads, heads divisible by kv heads, capacity in (0,1], thresholds in (0,1), layer list
 * length == num_hidden_layers, known kinds; errors at the value's file:line:col.
 *
 * Ownership: spec->cfg.layer_kind is malloc'd; cli_model_spec_free(NULL-safe).
 */
#ifndef CLI_MODELSPEC_H
#define CLI_MODELSPEC_H

#include <stddef.h>
#include "stage/config.h"
#include "stage/safetensors.h"

typedef struct {
    stage_config cfg;
    int router_bias;      /* write model.layers.i.router.bias */
    int predictor_hidden; /* hidden width of router_predictor.fc1 */
    unsigned long seed;
    float init_std;   /* weights ~ N(0, init_std^2); norms = 1 */
    float router_std; /* router weights ~ N(0, (router_std/sqrt(D))^2) */
    stage_dtype dtype;
    int shards;
    int calibrate;
    int calib_prompts;
    int calib_length;
    int threads; /* not a YAML key: init-model --threads (drawing the weights) */
    /* the block-variant keys (model_type, biases, windows, rope_scaling) as config.json gets
     * them; owned (cli_model_spec_free); cfg's flags were parsed from them */
    struct cJSON *arch_keys;
} cli_model_spec;

int cli_model_spec_load(const char *path, cli_model_spec *spec, char *err, size_t errlen);
int cli_model_spec_parse(const char *text, size_t len, const char *path, cli_model_spec *spec,
                         char *err, size_t errlen);
void cli_model_spec_free(cli_model_spec *spec);
/* The config.json of a model made from this spec (docs/SPEC.md §3; the caller cJSON_Deletes it), or
 * NULL when out of memory. */
struct cJSON *cli_model_spec_config_json(const cli_model_spec *spec);

#endif
