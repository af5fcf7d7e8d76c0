/* tests/test_loader.c — config.json and safetensors reading (stage/config.c,
 * stage/safetensors.c) against the fixtures in tests/fixtures (override: MODPIPE_FIXTURES),
 * hand-built malformed files and a small header fuzz. The writers (stage/safetensors_write.c)
 * are tested in tests/test_st_write.c; the shared helpers are in tests/loader_util.h.
 */
#include "tests/loader_util.h"

/* ---- config: fixtures ------------------------------------------------------------------------ */

#define D STAGE_KIND_DENSE
#define M STAGE_KIND_MOD
#define MS STAGE_KIND_MODE_STAGED
#define MI STAGE_KIND_MODE_INTEGRATED
#define K STAGE_KIND_MINDSKIP

typedef struct {
    const char *dir;
    stage_kind kinds[6];
    stage_routing routing;
    int experts_per_token;
    stage_granularity gran;
} fixture_cfg;

static const fixture_cfg fixture_cfgs[] = {
    {"dense", {D, D, D, D, D, D}, STAGE_ROUTING_THRESHOLD, 1, STAGE_GRAN_SEQUENCE},
    {"mod", {D, M, D, M, D, M}, STAGE_ROUTING_THRESHOLD, 1, STAGE_GRAN_SEQUENCE},
    {"mod_all", {M, M, M, M, M, M}, STAGE_ROUTING_THRESHOLD, 1, STAGE_GRAN_SEQUENCE},
    {"mod_predictor", {D, M, D, M, D, M}, STAGE_ROUTING_PREDICTOR, 1, STAGE_GRAN_SEQUENCE},
    {"mod_topk", {D, M, D, M, D, M}, STAGE_ROUTING_TOPK, 1, STAGE_GRAN_SEQUENCE},
    {"mode_staged", {D, MS, D, MS, D, MS}, STAGE_ROUTING_THRESHOLD, 2, STAGE_GRAN_SEQUENCE},
    {"mode_integrated", {MI, MI, MI, MI, MI, MI}, STAGE_ROUTING_THRESHOLD, 1, STAGE_GRAN_SEQUENCE},
    {"mindskip", {D, D, K, K, K, D}, STAGE_ROUTING_THRESHOLD, 1, STAGE_GRAN_SEQUENCE},
    {"mindskip_token", {D, D, K, K, K, D}, STAGE_ROUTING_THRESHOLD, 1, STAGE_GRAN_TOKEN},
    {"mixed", {D, M, MS, K, MI, M}, STAGE_ROUTING_THRESHOLD, 1, STAGE_GRAN_SEQUENCE},
};

static void test_config_fixtures(void)
{
    for (size_t f = 0; f < sizeof fixture_cfgs / sizeof fixture_cfgs[0]; f++) {
        const fixture_cfg *x = &fixture_cfgs[f];
        char dir[512], err[512] = "";
        fx_path(dir, sizeof dir, x->dir, NULL);
        stage_config c;
        int rc = stage_config_load(dir, &c, err, sizeof err);
        if (rc) fprintf(stderr, "\n  %s: %s\n", x->dir, err);
        CU_ASSERT_EQUAL_FATAL(rc, 0);
        CU_ASSERT_EQUAL(c.hidden, 64);
        CU_ASSERT_EQUAL(c.inter, 128);
        CU_ASSERT_EQUAL(c.n_heads, 4);
        CU_ASSERT_EQUAL(c.n_kv_heads, 2);
        CU_ASSERT_EQUAL(c.head_dim, 16);
        CU_ASSERT_EQUAL(c.n_layers, 6);
        CU_ASSERT_EQUAL(c.vocab, 97);
        CU_ASSERT_EQUAL(c.max_pos, 256);
        CU_ASSERT_DOUBLE_EQUAL(c.eps, 1e-5, 1e-12);
        CU_ASSERT_DOUBLE_EQUAL(c.rope_theta, 10000.0, 1e-3);
        CU_ASSERT_EQUAL(c.tie_embeddings, 0);
        CU_ASSERT_EQUAL(c.eos_token_id, -1);
        for (int l = 0; l < 6; l++) {
            if (c.layer_kind[l] != x->kinds[l])
                fprintf(stderr, "\n  %s layer %d: %s, expected %s\n", x->dir, l,
                        stage_kind_name(c.layer_kind[l]), stage_kind_name(x->kinds[l]));
            CU_ASSERT_EQUAL(c.layer_kind[l], x->kinds[l]);
        }
        CU_ASSERT_DOUBLE_EQUAL(c.mod_capacity, 0.25, 0);
        CU_ASSERT_EQUAL(c.mod_routing, x->routing);
        CU_ASSERT_DOUBLE_EQUAL(c.mod_threshold, 0.5, 0);
        CU_ASSERT_EQUAL(c.mod_scale, STAGE_SCALE_NONE);
        CU_ASSERT_EQUAL(c.n_experts, 4);
        CU_ASSERT_EQUAL(c.n_noop_experts, 1);
        CU_ASSERT_EQUAL(c.experts_per_token, x->experts_per_token);
        CU_ASSERT_EQUAL(c.expert_inter, 64);
        CU_ASSERT_EQUAL(c.ms_granularity, x->gran);
        CU_ASSERT_DOUBLE_EQUAL(c.ms_threshold, 0.5, 0);
        stage_config_free(&c);
        CU_ASSERT_PTR_NULL(c.layer_kind);
        stage_config_free(&c); /* twice is fine */
    }
    stage_config_free(NULL);
}

static void test_config_kind_names(void)
{
    CU_ASSERT_STRING_EQUAL(stage_kind_name(STAGE_KIND_DENSE), "dense");
    CU_ASSERT_STRING_EQUAL(stage_kind_name(STAGE_KIND_MOD), "mod");
    CU_ASSERT_STRING_EQUAL(stage_kind_name(STAGE_KIND_MODE_STAGED), "mode_staged");
    CU_ASSERT_STRING_EQUAL(stage_kind_name(STAGE_KIND_MODE_INTEGRATED), "mode_integrated");
    CU_ASSERT_STRING_EQUAL(stage_kind_name(STAGE_KIND_MINDSKIP), "mindskip");
    CU_ASSERT_FALSE(stage_kind_is_routed(STAGE_KIND_DENSE));
    CU_ASSERT_TRUE(stage_kind_is_routed(STAGE_KIND_MOD));
    CU_ASSERT_TRUE(stage_kind_is_routed(STAGE_KIND_MODE_STAGED));
    CU_ASSERT_FALSE(stage_kind_is_routed(STAGE_KIND_MODE_INTEGRATED));
    CU_ASSERT_FALSE(stage_kind_is_routed(STAGE_KIND_MINDSKIP));
}

/* ---- config: defaults, Router-Tuning form, errors -------------------------------------------- */

#define BASE                                                                                       \
    "\"hidden_size\": 64, \"intermediate_size\": 128, \"num_attention_heads\": 4, "                \
    "\"vocab_size\": 97"

static int parse(const char *json, stage_config *c, char *err, size_t errlen)
{
    err[0] = '\0';
    return stage_config_parse(json, "/x/config.json", c, err, errlen);
}

static void test_config_defaults(void)
{
    stage_config c;
    char err[512];
    int rc = parse("{" BASE ", \"num_hidden_layers\": 3}", &c, err, sizeof err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.n_kv_heads, 4);
    CU_ASSERT_EQUAL(c.head_dim, 16);
    CU_ASSERT_EQUAL(c.max_pos, 2048);
    CU_ASSERT_DOUBLE_EQUAL(c.eps, 1e-6, 1e-12);
    CU_ASSERT_DOUBLE_EQUAL(c.rope_theta, 10000.0, 0);
    CU_ASSERT_EQUAL(c.tie_embeddings, 0);
    CU_ASSERT_EQUAL(c.eos_token_id, -1);
    for (int l = 0; l < 3; l++) CU_ASSERT_EQUAL(c.layer_kind[l], STAGE_KIND_DENSE);
    CU_ASSERT_DOUBLE_EQUAL(c.mod_capacity, 0.125, 0);
    CU_ASSERT_EQUAL(c.mod_routing, STAGE_ROUTING_THRESHOLD);
    CU_ASSERT_DOUBLE_EQUAL(c.mod_threshold, 0.5, 0);
    CU_ASSERT_EQUAL(c.mod_scale, STAGE_SCALE_NONE);
    CU_ASSERT_EQUAL(c.n_experts, 4);
    CU_ASSERT_EQUAL(c.n_noop_experts, 0);
    CU_ASSERT_EQUAL(c.experts_per_token, 1);
    CU_ASSERT_EQUAL(c.expert_inter, 128);
    CU_ASSERT_EQUAL(c.ms_granularity, STAGE_GRAN_SEQUENCE);
    CU_ASSERT_DOUBLE_EQUAL(c.ms_threshold, 0.5, 0);
    stage_config_free(&c);

    /* explicit values, tolerated HF spellings, mode layers without a "mode" object */
    rc = parse("{" BASE ", \"num_hidden_layers\": 2, \"num_key_value_heads\": 1, "
               "\"head_dim\": 32, \"eos_token_id\": [7, 8], \"tie_word_embeddings\": true, "
               "\"rope_scaling\": null, \"sliding_window\": 4096, \"use_sliding_window\": false, "
               "\"attention_bias\": false, \"mlp_bias\": false, \"hidden_act\": \"silu\", "
               "\"rope_theta\": 500000.0, \"rms_norm_eps\": 1e-5, "
               "\"layer_types\": [\"mode_integrated\", \"mode_staged\"], "
               "\"mod\": {\"capacity\": 1, \"routing\": \"topk\", \"router_scale\": \"sigmoid\"}}",
               &c, err, sizeof err);
    if (rc) fprintf(stderr, "\n  %s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.n_kv_heads, 1);
    CU_ASSERT_EQUAL(c.head_dim, 32);
    CU_ASSERT_EQUAL(c.eos_token_id, 7);
    CU_ASSERT_EQUAL(c.tie_embeddings, 1);
    CU_ASSERT_DOUBLE_EQUAL(c.rope_theta, 500000.0, 0);
    CU_ASSERT_EQUAL(c.layer_kind[0], STAGE_KIND_MODE_INTEGRATED);
    CU_ASSERT_EQUAL(c.layer_kind[1], STAGE_KIND_MODE_STAGED);
    CU_ASSERT_EQUAL(c.n_experts, 4);
    CU_ASSERT_EQUAL(c.experts_per_token, 1);
    CU_ASSERT_EQUAL(c.expert_inter, 128);
    CU_ASSERT_DOUBLE_EQUAL(c.mod_capacity, 1.0, 0);
    CU_ASSERT_EQUAL(c.mod_routing, STAGE_ROUTING_TOPK);
    CU_ASSERT_EQUAL(c.mod_scale, STAGE_SCALE_SIGMOID);
    stage_config_free(&c);

    rc = parse("{" BASE ", \"num_hidden_layers\": 1, \"eos_token_id\": 2}", &c, err, sizeof err);
    CU_ASSERT_EQUAL(rc, 0);
    CU_ASSERT_EQUAL(c.eos_token_id, 2);
    stage_config_free(&c);
    rc = parse("{" BASE ", \"num_hidden_layers\": 1, \"eos_token_id\": null}", &c, err, sizeof err);
    CU_ASSERT_EQUAL(rc, 0);
    CU_ASSERT_EQUAL(c.eos_token_id, -1);
    stage_config_free(&c);
}

static void test_config_router_tuning(void)
{
    stage_config c;
    char err[512];
    int rc = parse("{" BASE ", \"num_hidden_layers\": 4, "
                   "\"is_mindskip\": [false, true, true, false], \"threshold\": 0.3, "
                   "\"granularity\": \"attn_token\"}",
                   &c, err, sizeof err);
    if (rc) fprintf(stderr, "\n  %s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.layer_kind[0], STAGE_KIND_DENSE);
    CU_ASSERT_EQUAL(c.layer_kind[1], STAGE_KIND_MINDSKIP);
    CU_ASSERT_EQUAL(c.layer_kind[2], STAGE_KIND_MINDSKIP);
    CU_ASSERT_EQUAL(c.layer_kind[3], STAGE_KIND_DENSE);
    CU_ASSERT_EQUAL(c.ms_granularity, STAGE_GRAN_TOKEN);
    CU_ASSERT_DOUBLE_EQUAL(c.ms_threshold, 0.3, 1e-6);
    stage_config_free(&c);

    rc = parse("{" BASE ", \"num_hidden_layers\": 2, \"is_mindskip\": [true, true], "
               "\"granularity\": \"attn_sequence\"}",
               &c, err, sizeof err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.layer_kind[0], STAGE_KIND_MINDSKIP);
    CU_ASSERT_EQUAL(c.layer_kind[1], STAGE_KIND_MINDSKIP);
    CU_ASSERT_EQUAL(c.ms_granularity, STAGE_GRAN_SEQUENCE);
    CU_ASSERT_DOUBLE_EQUAL(c.ms_threshold, 0.5, 0);
    stage_config_free(&c);

    /* layer_types wins over is_mindskip; then the top-level threshold is not MindSkip's */
    rc = parse("{" BASE ", \"num_hidden_layers\": 2, \"is_mindskip\": [true, true], "
               "\"threshold\": 0.9, \"layer_types\": [\"dense\", \"mod\"]}",
               &c, err, sizeof err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.layer_kind[0], STAGE_KIND_DENSE);
    CU_ASSERT_EQUAL(c.layer_kind[1], STAGE_KIND_MOD);
    CU_ASSERT_DOUBLE_EQUAL(c.ms_threshold, 0.5, 0);
    stage_config_free(&c);

    rc = parse("{" BASE ", \"num_hidden_layers\": 3, \"is_mindskip\": [true, true]}", &c, err,
               sizeof err);
    CU_ASSERT_NOT_EQUAL(rc, 0);
    ASSERT_HAS(err, "is_mindskip");
    rc = parse("{" BASE ", \"num_hidden_layers\": 2, \"is_mindskip\": [true, 1]}", &c, err,
               sizeof err);
    CU_ASSERT_NOT_EQUAL(rc, 0);
    ASSERT_HAS(err, "is_mindskip[1]");
    rc = parse("{" BASE ", \"num_hidden_layers\": 1, \"is_mindskip\": [true], "
               "\"granularity\": \"block\"}",
               &c, err, sizeof err);
    CU_ASSERT_NOT_EQUAL(rc, 0);
    ASSERT_HAS(err, "\"block\"");
}

typedef struct {
    const char *json;
    const char *needle; /* the message must contain it */
} bad_cfg;

#define L2 "\"num_hidden_layers\": 2"
/* A compressed-tensors quantization_config: format F, group_0's weights W, then X inside the
 * group; CT_IG: the valid scheme with `ignore` I. */
#define CT_W                                                                                       \
    "{\"num_bits\": 8, \"type\": \"int\", \"symmetric\": true, \"strategy\": \"group\", "          \
    "\"group_size\": 32, \"dynamic\": false}"
#define CT(F, W, X)                                                                                \
    "{\"quant_method\": \"compressed-tensors\", \"format\": " F                                    \
    ", \"config_groups\": {\"group_0\": {\"targets\": [\"Linear\"], \"weights\": " W X "}}}"
#define CT_IG(I)                                                                                   \
    "{\"quant_method\": \"compressed-tensors\", \"format\": \"int-quantized\", "                   \
    "\"quantization_status\": \"compressed\", \"config_groups\": {\"group_0\": {\"targets\": "     \
    "[\"Linear\"], \"weights\": " CT_W ", \"input_activations\": null}}, \"ignore\": " I "}"

static const bad_cfg bad_cfgs[] = {
    {"{" BASE ", " L2 ",", "not valid JSON"},
    {"[1, 2]", "JSON object"},
    {"{\"intermediate_size\": 128, \"num_attention_heads\": 4, \"vocab_size\": 97, " L2 "}",
     "missing key \"hidden_size\""},
    {"{\"hidden_size\": \"64\", \"intermediate_size\": 128, \"num_attention_heads\": 4, "
     "\"vocab_size\": 97, " L2 "}",
     "hidden_size"},
    {"{\"hidden_size\": 64.5, \"intermediate_size\": 128, \"num_attention_heads\": 4, "
     "\"vocab_size\": 97, " L2 "}",
     "hidden_size"},
    {"{" BASE ", \"num_hidden_layers\": 0}", "num_hidden_layers"},
    {"{" BASE ", \"num_hidden_layers\": 4, \"layer_types\": "
     "[\"dense\", \"mod\", \"dense\", \"moe\"]}",
     "layer_types[3]: unknown layer type \"moe\""},
    {"{" BASE ", \"num_hidden_layers\": 3, \"layer_types\": [\"dense\", \"mod\"]}", "layer_types"},
    {"{" BASE ", " L2 ", \"layer_types\": \"dense\"}", "layer_types"},
    {"{" BASE ", " L2 ", \"rope_scaling\": {\"type\": \"dynamic\", \"factor\": 2.0}}",
     "rope_scaling.type: \"dynamic\""},
    {"{" BASE ", " L2 ", \"sliding_window\": 4096}", "sliding_window"},
    {"{" BASE ", " L2 ", \"use_sliding_window\": true, \"sliding_window\": 16}",
     "use_sliding_window"},
    {"{" BASE ", " L2 ", \"hidden_act\": \"gelu\"}", "hidden_act"},
    {"{" BASE ", " L2 ", \"hidden_activation\": \"gelu_pytorch_tanh\"}", "hidden_activation"},
    {"{\"hidden_size\": 66, \"intermediate_size\": 128, \"num_attention_heads\": 4, "
     "\"vocab_size\": 97, " L2 "}",
     "hidden_size"},
    {"{" BASE ", " L2 ", \"num_key_value_heads\": 3}", "num_key_value_heads"},
    {"{" BASE ", " L2 ", \"mod\": {\"capacity\": 0}}", "mod.capacity"},
    {"{" BASE ", " L2 ", \"mod\": {\"capacity\": 1.5}}", "mod.capacity"},
    {"{" BASE ", " L2 ", \"mod\": {\"threshold\": -0.1}}", "mod.threshold"},
    {"{" BASE ", " L2 ", \"mod\": {\"routing\": \"random\"}}", "\"random\""},
    {"{" BASE ", " L2 ", \"mod\": {\"router_scale\": \"tanh\"}}", "mod.router_scale"},
    {"{" BASE ", " L2 ", \"mod\": 3}", "mod"},
    {"{" BASE ", " L2 ", \"mode\": {\"num_experts\": 2, \"experts_per_token\": 3}}",
     "experts_per_token"},
    {"{" BASE ", " L2 ", \"mode\": {\"num_noop_experts\": -1}}", "num_noop_experts"},
    {"{" BASE ", " L2 ", \"mindskip\": {\"threshold\": 2}}", "mindskip.threshold"},
    {"{" BASE ", " L2 ", \"mindskip\": {\"granularity\": \"layer\"}}", "mindskip.granularity"},
    {"{" BASE ", " L2 ", \"eos_token_id\": \"</s>\"}", "eos_token_id"},
    {"{" BASE ", " L2 ", \"tie_word_embeddings\": \"yes\"}", "tie_word_embeddings"},
    /* families beyond llama, mistral, qwen2, qwen3 are refused by name (tests/test_arch.c
     * has the rest of the block-variant refusals) */
    {"{" BASE ", " L2 ", \"model_type\": \"gemma\"}", "model_type: \"gemma\""},
    {"{" BASE ", " L2 ", \"model_type\": 7}", "model_type"},
    {"{" BASE ", " L2 ", \"architectures\": [\"Qwen2MoeForCausalLM\"]}", "Qwen2MoeForCausalLM"},
    {"{" BASE ", " L2 ", \"architectures\": \"LlamaForCausalLM\"}", "architectures"},
    /* quantization: only modpipe quantize's q8_0 (docs/SPEC.md §9) */
    {"{" BASE ", " L2 ", \"quantization_config\": {\"quant_method\": \"gptq\", \"bits\": 4}}",
     "quantization_config.quant_method: \"gptq\" is not supported"},
    {"{" BASE ", " L2 ", \"quantization_config\": {\"bits\": 8}}",
     "quantization_config.quant_method: missing"},
    {"{" BASE ", " L2
     ", \"quantization_config\": {\"quant_method\": \"q8_0\", \"block_size\": 64}}",
     "quantization_config.block_size: 64, expected 32"},
    {"{" BASE ", " L2 ", \"quantization_config\": \"q8_0\"}",
     "quantization_config: expected an object"},
    /* the compressed-tensors form: only what expresses the Q8_0 layout */
    {"{" BASE ", " L2 ", \"quantization_config\": " CT("\"pack-quantized\"", CT_W, "") "}",
     "quantization_config.format: \"pack-quantized\" is not read (only \"int-quantized\""},
    {"{" BASE ", " L2 ", \"quantization_config\": " CT(
         "\"int-quantized\"", "{\"num_bits\": 4, \"type\": \"int\"}", "") "}",
     "config_groups.group_0.weights.num_bits: 4, expected 8"},
    {"{" BASE ", " L2 ", \"quantization_config\": " CT(
         "\"int-quantized\"",
         "{\"num_bits\": 8, \"type\": \"int\", \"strategy\": \"group\", \"group_size\": 128}",
         "") "}",
     "weights.group_size: 128, expected 32"},
    {"{" BASE ", " L2 ", \"quantization_config\": " CT(
         "\"int-quantized\"", "{\"num_bits\": 8, \"type\": \"int\", \"strategy\": \"channel\"}",
         "") "}",
     "weights.strategy: \"channel\" is not read"},
    {"{" BASE ", " L2 ", \"quantization_config\": " CT(
         "\"int-quantized\"", "{\"num_bits\": 8, \"type\": \"float\"}", "") "}",
     "weights.type: \"float\" is not read"},
    {"{" BASE ", " L2 ", \"quantization_config\": " CT(
         "\"int-quantized\"",
         "{\"num_bits\": 8, \"type\": \"int\", \"strategy\": \"group\", \"group_size\": 32, "
         "\"symmetric\": false}",
         "") "}",
     "weights.symmetric: must be true"},
    {"{" BASE ", " L2 ", \"quantization_config\": " CT(
         "\"int-quantized\"", CT_W, ", \"input_activations\": {\"num_bits\": 8}") "}",
     "input_activations: activation quantization"},
    {"{" BASE ", " L2 ", \"quantization_config\": " CT("\"int-quantized\"", CT_W,
                                                       "}, \"group_1\": {\"weights\": " CT_W) "}",
     "config_groups: expected an object with one group, got several"},
    {"{" BASE ", " L2
     ", \"quantization_config\": {\"quant_method\": \"compressed-tensors\", \"format\": "
     "\"int-quantized\", \"config_groups\": {\"g\": {\"targets\": [\"Embedding\"], "
     "\"weights\": " CT_W "}}}}",
     "config_groups.g.targets: expected [\"Linear\"]"},
    {"{" BASE ", " L2 ", \"quantization_config\": " CT_IG("\"lm_head\"") "}",
     "quantization_config.ignore: expected a list"},
    {"{" BASE ", " L2 ", \"quantization_config\": " CT_IG("[\"re:.*gate$\"]") "}",
     "ignore[0]: \"re:.*gate$\": patterns are not read"},
    {"{" BASE ", " L2 ", \"quantization_config\": " CT_IG("[\"lm_head\", 3]") "}",
     "ignore[1]: expected a module name, got a number"},
    {"{" BASE ", " L2
     ", \"quantization_config\": {\"quant_method\": \"compressed-tensors\", \"format\": "
     "\"int-quantized\", \"quantization_status\": \"frozen\"}}",
     "quantization_status: \"frozen\" is not read"},
    {"{" BASE ", " L2
     ", \"quantization_config\": {\"quant_method\": \"compressed-tensors\", \"format\": "
     "\"int-quantized\", \"kv_cache_scheme\": {\"num_bits\": 8}}}",
     "kv_cache_scheme: KV-cache quantization is not supported"},
};

/* quantization_config read (docs/SPEC.md §9): compressed-tensors with its ignore list (the
 * projections named there stay as stored; routers named there change nothing), and the
 * earlier {"quant_method": "q8_0"}. */
static void test_quant_config(void)
{
    stage_config c;
    char err[512];
    int rc =
        parse("{" BASE ", " L2 ", \"quantization_config\": " CT_IG(
                  "[\"lm_head\", \"model.layers.0.router\", \"model.layers.1.mlp.down_proj\"]") "}",
              &c, err, sizeof err);
    show(err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.q8_0, 1);
    CU_ASSERT_EQUAL(c.q8_keep_len, strlen("lm_head") + strlen("model.layers.1.mlp.down_proj") + 2);
    CU_ASSERT_EQUAL(stage_q8_kept(&c, "lm_head.weight"), 1);
    CU_ASSERT_EQUAL(stage_q8_kept(&c, "model.layers.1.mlp.down_proj.weight"), 1);
    CU_ASSERT_EQUAL(stage_q8_kept(&c, "model.layers.1.mlp.down_proj.weight_scale"), 0);
    CU_ASSERT_EQUAL(stage_q8_kept(&c, "model.layers.1.mlp.up_proj.weight"), 0);
    CU_ASSERT_EQUAL(stage_q8_kept(&c, "model.layers.0.router.weight"), 0);
    CU_ASSERT_EQUAL(stage_q8_kept(&c, "lm_head"), 0);
    stage_config_free(&c);
    CU_ASSERT_PTR_NULL(c.q8_keep);
    rc = parse("{" BASE ", " L2 ", \"quantization_config\": {\"quant_method\": \"q8_0\", "
               "\"block_size\": 32}}",
               &c, err, sizeof err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(c.q8_0, 1);
    CU_ASSERT_PTR_NULL(c.q8_keep);
    CU_ASSERT_EQUAL(stage_q8_kept(&c, "lm_head.weight"), 0);
    stage_config_free(&c);
    /* what modpipe quantize writes reads back, its ignore list included */
    const char *ig[] = {"lm_head", "model.layers.0.router"};
    char *json = stage_q8_quant_config_json(ig, 2, "{" BASE ", " L2 "}");
    CU_ASSERT_PTR_NOT_NULL_FATAL(json);
    rc = parse(json, &c, err, sizeof err);
    show(err);
    CU_ASSERT_EQUAL(rc, 0);
    CU_ASSERT_EQUAL(c.q8_0, 1);
    CU_ASSERT_EQUAL(stage_q8_kept(&c, "lm_head.weight"), 1);
    CU_ASSERT_EQUAL(c.q8_keep_len, strlen("lm_head") + 1);
    ASSERT_HAS(json, "\"compressed-tensors\""); /* cJSON_Print: a tab after each colon */
    ASSERT_HAS(json, "\"int-quantized\"");
    stage_config_free(&c);
    free(json);
    CU_ASSERT_PTR_NULL(stage_q8_quant_config_json(ig, 2, "[1, 2]"));
}

/* config.json text mutated (every truncation, random byte flips of a quantized model's
 * config): the parser answers 0 or one line, never a crash (the sanitizer run checks memory). */
static void test_config_fuzz(void)
{
    const char *ig[] = {"lm_head", "model.layers.0.mlp.down_proj"};
    char *json =
        stage_q8_quant_config_json(ig, 2, "{" BASE ", " L2 ", \"mod\": {\"capacity\": 0.5}}");
    CU_ASSERT_PTR_NOT_NULL_FATAL(json);
    const size_t n = strlen(json);
    char *buf = malloc(n + 1);
    CU_ASSERT_PTR_NOT_NULL_FATAL(buf);
    unsigned seed = 12345, bad_lines = 0, ok = 0;
    static const char flips[] = "{}[]\":,0-9.e\\ tnfu\x01\xff";
    for (size_t it = 0; it < n + 3000; it++) {
        memcpy(buf, json, n + 1);
        if (it < n) {
            buf[it] = 0; /* every truncation */
        } else {
            for (int f = 0; f < 1 + (int)(it % 4); f++) {
                seed = seed * 1103515245u + 12345u;
                size_t at = (seed >> 8) % n;
                seed = seed * 1103515245u + 12345u;
                buf[at] = flips[(seed >> 8) % (sizeof flips - 1)];
            }
        }
        stage_config c;
        char err[512] = "";
        int rc = parse(buf, &c, err, sizeof err);
        if (rc == 0) {
            ok++;
            stage_config_free(&c);
        } else if (!err[0] || strchr(err, '\n')) {
            bad_lines++;
            fprintf(stderr, "\n  not one line (mutation %zu): %s\n", it, err);
        }
    }
    CU_ASSERT_EQUAL(bad_lines, 0);
    CU_ASSERT(ok > 0); /* some flips leave a valid config (e.g. in a number's digits) */
    free(buf);
    free(json);
}

static void test_config_errors(void)
{
    for (size_t i = 0; i < sizeof bad_cfgs / sizeof bad_cfgs[0]; i++) {
        stage_config c;
        char err[512];
        int rc = parse(bad_cfgs[i].json, &c, err, sizeof err);
        if (rc == 0) fprintf(stderr, "\n  accepted: %s\n", bad_cfgs[i].json);
        CU_ASSERT_NOT_EQUAL(rc, 0);
        show(err);
        CU_ASSERT_PTR_NULL(c.layer_kind);
        ASSERT_HAS(err, "/x/config.json: ");
        ASSERT_HAS(err, bad_cfgs[i].needle);
        CU_ASSERT_PTR_NULL(strchr(err, '\n'));
        stage_config_free(&c);
    }

    /* files: missing, bad JSON on disk (the message names DIR/config.json) */
    char *dir = make_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    stage_config c;
    char err[512], want[600];
    CU_ASSERT_NOT_EQUAL(stage_config_load(dir, &c, err, sizeof err), 0);
    snprintf(want, sizeof want, "%s/config.json: ", dir);
    ASSERT_HAS(err, want);
    spit(dir, "config.json", "{\"hidden_size\": 64,\n  oops}", 26);
    CU_ASSERT_NOT_EQUAL(stage_config_load(dir, &c, err, sizeof err), 0);
    ASSERT_HAS(err, want);
    ASSERT_HAS(err, "line 2");
    rm_tmpdir(dir);
}

/* ---- safetensors: fixtures ------------------------------------------------------------------- */

/* Compare st_get_f32(name) with an independent decode of the file's bytes. */
static void check_tensor(st_model *m, const char *file, const char *name, int ndim,
                         const int64_t *shape, const char *want_dtype, int want_zero_copy)
{
    char err[512] = "", dt[16] = "";
    const float *p = st_get_f32(m, name, ndim, shape, err, sizeof err);
    if (!p) fprintf(stderr, "\n  %s\n", err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    size_t nb = 0;
    unsigned char *raw = raw_tensor(file, name, dt, &nb);
    CU_ASSERT_PTR_NOT_NULL_FATAL(raw);
    CU_ASSERT_STRING_EQUAL(dt, want_dtype);
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) numel *= (size_t)shape[i];
    size_t esz = strcmp(dt, "F32") == 0 ? 4 : 2;
    CU_ASSERT_EQUAL(nb, numel * esz);
    size_t bad = 0;
    for (size_t i = 0; i < numel; i++) {
        float want = esz == 4                  ? hand_f32(raw + 4 * i)
                     : strcmp(dt, "BF16") == 0 ? hand_bf16(raw + 2 * i)
                                               : hand_f16(raw + 2 * i);
        if (memcmp(&want, &p[i], 4) != 0) bad++;
    }
    CU_ASSERT_EQUAL(bad, 0);
    /* the values are real weights, not all zero (small ones may be zero-init biases) */
    float mx = 0;
    for (size_t i = 0; i < numel; i++) mx = fmaxf(mx, fabsf(p[i]));
    if (numel >= 64) CU_ASSERT(mx > 0);

    st_tensor t;
    CU_ASSERT_EQUAL(st_find(m, name, &t, err, sizeof err), 1);
    CU_ASSERT_STRING_EQUAL(stage_dtype_st_name(t.dtype), want_dtype);
    CU_ASSERT_EQUAL(t.nbytes, nb);
    CU_ASSERT_STRING_EQUAL(t.file, file);
    CU_ASSERT_EQUAL(memcmp(t.data, raw, nb), 0);
    if (want_zero_copy) {
        CU_ASSERT_PTR_EQUAL(p, t.data);
    } else {
        CU_ASSERT_PTR_NOT_EQUAL(p, t.data);
    }
    /* cached: same pointer again */
    CU_ASSERT_PTR_EQUAL(st_get_f32(m, name, ndim, shape, err, sizeof err), p);
    free(raw);
}

static void test_st_f32_fixture(void)
{
    char dir[512], file[600], err[512] = "", want[800];
    fx_path(dir, sizeof dir, "dense", NULL);
    fx_path(file, sizeof file, "dense", "model.safetensors");
    st_model *m = NULL;
    int rc = st_open(dir, &m, err, sizeof err);
    if (rc) fprintf(stderr, "\n  %s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(st_loaded_bytes(m), 0);
    const int64_t emb[2] = {97, 64}, down[2] = {64, 128}, norm[1] = {64};
    check_tensor(m, file, "model.embed_tokens.weight", 2, emb, "F32", 1);
    check_tensor(m, file, "model.layers.3.mlp.down_proj.weight", 2, down, "F32", 1);
    check_tensor(m, file, "model.norm.weight", 1, norm, "F32", 1);
    CU_ASSERT_EQUAL(st_loaded_bytes(m), (97 * 64 + 64 * 128 + 64) * 4);

    const int64_t wrong[2] = {64, 64};
    CU_ASSERT_PTR_NULL(
        st_get_f32(m, "model.layers.0.mlp.down_proj.weight", 2, wrong, err, sizeof err));
    snprintf(want, sizeof want,
             "%s: tensor model.layers.0.mlp.down_proj.weight has shape [64, 128], expected "
             "[64, 64]",
             file);
    CU_ASSERT_STRING_EQUAL(err, want);
    CU_ASSERT_PTR_NULL(st_get_f32(m, "model.norm.weight", 2, wrong, err, sizeof err));
    ASSERT_HAS(err, "has shape [64], expected [64, 64]");

    CU_ASSERT_PTR_NULL(st_get_f32(m, "model.layers.9.router.weight", 1, norm, err, sizeof err));
    snprintf(want, sizeof want, "%s: missing tensor model.layers.9.router.weight", file);
    CU_ASSERT_STRING_EQUAL(err, want);
    CU_ASSERT_EQUAL(st_find(m, "nope", NULL, err, sizeof err), 0);
    st_close(m);
    st_close(NULL);
}

static void test_st_bf16_f16_fixtures(void)
{
    char dir[512], file[600], err[512] = "";
    st_model *m = NULL;
    const int64_t emb[2] = {97, 64}, norm[1] = {64}, router[2] = {1, 64}, gate[2] = {5, 64};

    fx_path(dir, sizeof dir, "mixed", NULL);
    fx_path(file, sizeof file, "mixed", "model.safetensors");
    CU_ASSERT_EQUAL_FATAL(st_open(dir, &m, err, sizeof err), 0);
    check_tensor(m, file, "lm_head.weight", 2, emb, "BF16", 0);
    check_tensor(m, file, "model.layers.1.router.weight", 2, router, "BF16", 0);
    check_tensor(m, file, "model.layers.0.input_layernorm.weight", 1, norm, "BF16", 0);
    CU_ASSERT_EQUAL(st_loaded_bytes(m), (97 * 64 + 64 + 64) * 4);
    st_close(m);

    fx_path(dir, sizeof dir, "mode_integrated", NULL);
    fx_path(file, sizeof file, "mode_integrated", "model.safetensors");
    CU_ASSERT_EQUAL_FATAL(st_open(dir, &m, err, sizeof err), 0);
    check_tensor(m, file, "model.embed_tokens.weight", 2, emb, "F16", 0);
    check_tensor(m, file, "model.layers.2.block_sparse_moe.gate.weight", 2, gate, "F16", 0);
    st_close(m);
}

static void test_st_sharded_fixture(void)
{
    char dir[512], s1[600], s2[600], idx[600], err[512] = "", want[800];
    fx_path(dir, sizeof dir, "mod_predictor", NULL);
    fx_path(s1, sizeof s1, "mod_predictor", "model-00001-of-00002.safetensors");
    fx_path(s2, sizeof s2, "mod_predictor", "model-00002-of-00002.safetensors");
    fx_path(idx, sizeof idx, "mod_predictor", "model.safetensors.index.json");
    st_model *m = NULL;
    int rc = st_open(dir, &m, err, sizeof err);
    if (rc) fprintf(stderr, "\n  %s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);

    /* which shard holds what, from the index (read here independently) */
    size_t len;
    char *text = (char *)slurp(idx, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(text);
    cJSON *root = cJSON_Parse(text);
    cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    CU_ASSERT_FATAL(cJSON_IsObject(wm));
    int n_checked[2] = {0, 0};
    const cJSON *it;
    cJSON_ArrayForEach(it, wm)
    {
        int shard = strstr(it->valuestring, "00002-of") ? 1 : 0;
        const char *file = shard ? s2 : s1;
        const char *nm = it->string;
        if (n_checked[shard] >= 4) continue;
        st_tensor t;
        CU_ASSERT_EQUAL_FATAL(st_find(m, nm, &t, err, sizeof err), 1);
        CU_ASSERT_STRING_EQUAL(t.file, file);
        check_tensor(m, file, nm, t.ndim, t.shape, "F32", 1);
        n_checked[shard]++;
    }
    CU_ASSERT_EQUAL(n_checked[0], 4);
    CU_ASSERT_EQUAL(n_checked[1], 4);
    cJSON_Delete(root);
    free(text);

    /* the predictor router of a mod layer */
    st_tensor t;
    CU_ASSERT_EQUAL(st_find(m, "model.layers.1.router_predictor.fc1.weight", &t, err, sizeof err),
                    1);
    CU_ASSERT_EQUAL(t.ndim, 2);
    CU_ASSERT_EQUAL(t.shape[1], 64);

    const int64_t s[1] = {64};
    CU_ASSERT_PTR_NULL(st_get_f32(m, "model.layers.0.router.weight", 1, s, err, sizeof err));
    snprintf(want, sizeof want, "%s: missing tensor model.layers.0.router.weight", idx);
    CU_ASSERT_STRING_EQUAL(err, want);
    st_close(m);
}

static void test_dtype_helpers(void)
{
    stage_dtype d;
    CU_ASSERT(stage_dtype_parse("bf16", &d) == 0 && d == STAGE_BF16);
    CU_ASSERT(stage_dtype_parse("BF16", &d) == 0 && d == STAGE_BF16);
    CU_ASSERT(stage_dtype_parse("f16", &d) == 0 && d == STAGE_F16);
    CU_ASSERT(stage_dtype_parse("F32", &d) == 0 && d == STAGE_F32);
    CU_ASSERT(stage_dtype_parse("I64", &d) != 0);
    CU_ASSERT_STRING_EQUAL(stage_dtype_st_name(STAGE_BF16), "BF16");
    CU_ASSERT_STRING_EQUAL(stage_dtype_st_name(STAGE_F16), "F16");
    CU_ASSERT_STRING_EQUAL(stage_dtype_st_name(STAGE_F32), "F32");
    CU_ASSERT_EQUAL(stage_dtype_size(STAGE_F32), 4);
    CU_ASSERT_EQUAL(stage_dtype_size(STAGE_F16), 2);
    CU_ASSERT_EQUAL(stage_dtype_size(STAGE_BF16), 2);
}

/* ---- safetensors: malformed files ------------------------------------------------------------ */

/* [u64 N][header][data_len zero bytes]; n_override >= 0 replaces N. */
static unsigned char *make_st(const char *header, size_t data_len, long long n_override,
                              size_t *len)
{
    size_t hl = strlen(header);
    *len = 8 + hl + data_len;
    unsigned char *b = calloc(1, *len + 1);
    uint64_t n = n_override >= 0 ? (uint64_t)n_override : hl;
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(n >> (8 * i));
    memcpy(b + 8, header, hl);
    return b;
}

typedef struct {
    const char *header;
    size_t data_len;
    long long n_override;
    const char *needle; /* besides the file name */
} bad_st;

#define E(name, body) "\"" name "\": " body
static const bad_st bad_sts[] = {
    /* file shorter than 8 bytes: header "" + truncation handled below */
    {"", 0, 1000, "past the end"}, /* header length past EOF */
    {"{\"a\": {", 0, -1, "not valid JSON"},
    {"[1, 2]", 0, -1, "not a JSON object"},
    {"{\"a\": 3}", 0, -1, "tensor a"},
    {"{" E("w", "{\"shape\": [2], \"data_offsets\": [0, 8]}") "}", 8, -1,
     "tensor w: missing dtype"},
    {"{" E("w", "{\"dtype\": \"F32\", \"data_offsets\": [0, 8]}") "}", 8, -1,
     "tensor w: missing shape"},
    {"{" E("w", "{\"dtype\": \"F32\", \"shape\": [2]}") "}", 8, -1,
     "tensor w: missing data_offsets"},
    {"{" E("w", "{\"dtype\": 7, \"shape\": [2], \"data_offsets\": [0, 8]}") "}", 8, -1, "tensor w"},
    {"{" E("w", "{\"dtype\": \"F32\", \"shape\": \"2\", \"data_offsets\": [0, 8]}") "}", 8, -1,
     "tensor w"},
    {"{" E("w", "{\"dtype\": \"F32\", \"shape\": [-2], \"data_offsets\": [0, 8]}") "}", 8, -1,
     "tensor w"},
    {"{" E("w", "{\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0]}") "}", 8, -1,
     "tensor w"},
    {"{" E("w", "{\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, \"8\"]}") "}", 8, -1,
     "tensor w"},
    {"{" E("w", "{\"dtype\": \"I64\", \"shape\": [1], \"data_offsets\": [0, 8]}") "}", 8, -1,
     "tensor w: unsupported dtype \"I64\""},
    {"{" E("w", "{\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 16]}") "}", 8, -1,
     "tensor w"}, /* past the data region */
    {"{" E("w", "{\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 0]}") "}", 8, -1,
     "tensor w"}, /* end < begin */
    {"{" E("w", "{\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 8]}") "}", 16, -1,
     "tensor w"}, /* length != numel * size */
    {"{" E("u", "{\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}") ", " E(
         "v", "{\"dtype\": \"F16\", \"shape\": [2], \"data_offsets\": [6, 10]}") "}",
     16, -1, "overlap"},
    {"{" E("u", "{\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}") ", " E(
         "v", "{\"dtype\": \"F16\", \"shape\": [2], \"data_offsets\": [4, 8]}") "}",
     16, -1, "tensors u and v overlap"}, /* one inside the other */
    {"{" E("u", "{\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}") ", " E(
         "u", "{\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}") "}",
     8, -1, "tensor u appears twice"},
    {"{" E("w", "{\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], "
                "\"data_offsets\": [0, 4]}") "}",
     4, -1, "tensor w"},
    {"{} xx", 0, -1, "junk"},
};

static void test_st_malformed(void)
{
    char *dir = make_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char file[1024], err[512];
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
    st_model *m = NULL;

    /* neither file */
    CU_ASSERT_NOT_EQUAL(st_open(dir, &m, err, sizeof err), 0);
    CU_ASSERT_PTR_NULL(m);
    ASSERT_HAS(err, dir);
    ASSERT_HAS(err, "no model.safetensors or model.safetensors.index.json");

    /* shorter than 8 bytes */
    spit(dir, "model.safetensors", "\x02\0\0\0\0", 5);
    CU_ASSERT_NOT_EQUAL(st_open(dir, &m, err, sizeof err), 0);
    ASSERT_HAS(err, file);
    ASSERT_HAS(err, "too short");

    for (size_t i = 0; i < sizeof bad_sts / sizeof bad_sts[0]; i++) {
        size_t len;
        unsigned char *b =
            make_st(bad_sts[i].header, bad_sts[i].data_len, bad_sts[i].n_override, &len);
        spit(dir, "model.safetensors", b, len);
        free(b);
        err[0] = '\0';
        m = NULL;
        int rc = st_open(dir, &m, err, sizeof err);
        if (rc == 0) fprintf(stderr, "\n  accepted: %s\n", bad_sts[i].header);
        CU_ASSERT_NOT_EQUAL(rc, 0);
        show(err);
        CU_ASSERT_PTR_NULL(m);
        ASSERT_HAS(err, file);
        ASSERT_HAS(err, bad_sts[i].needle);
        CU_ASSERT_PTR_NULL(strchr(err, '\n'));
        st_close(m);
    }

    /* accepted oddities: __metadata__, zero-size tensors, space padding, unaligned F32 */
    {
        // clang-format off
        const char *h = "{\"__metadata__\": {\"format\": \"pt\"}, "
                        E("z", "{\"dtype\": \"F32\", \"shape\": [0, 3], \"data_offsets\": [2, 2]}") ", "
                        E("h", "{\"dtype\": \"F16\", \"shape\": [1], \"data_offsets\": [0, 2]}") ", "
                        E("w", "{\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [2, 10]}")
                        "}   ";
        // clang-format on
        size_t len;
        unsigned char *b = make_st(h, 10, -1, &len);
        size_t data = len - 10;
        b[data + 0] = 0x00;
        b[data + 1] = 0x3c; /* f16 1.0 */
        const float two[2] = {2.5f, -3.0f};
        memcpy(b + data + 2, two, 8);
        spit(dir, "model.safetensors", b, len);
        free(b);
        int rc = st_open(dir, &m, err, sizeof err);
        if (rc) fprintf(stderr, "\n  %s\n", err);
        CU_ASSERT_EQUAL_FATAL(rc, 0);
        const int64_t s2[1] = {2}, s1[1] = {1}, s03[2] = {0, 3};
        const float *w = st_get_f32(m, "w", 1, s2, err, sizeof err);
        CU_ASSERT_PTR_NOT_NULL_FATAL(w);
        CU_ASSERT(w[0] == 2.5f && w[1] == -3.0f);
        const float *hh = st_get_f32(m, "h", 1, s1, err, sizeof err);
        CU_ASSERT_PTR_NOT_NULL_FATAL(hh);
        CU_ASSERT_EQUAL(hh[0], 1.0f);
        CU_ASSERT_PTR_NOT_NULL(st_get_f32(m, "z", 2, s03, err, sizeof err));
        CU_ASSERT_EQUAL(st_find(m, "__metadata__", NULL, err, sizeof err), 0);
        st_close(m);
        m = NULL;
    }
    rm_file(dir, "model.safetensors");

    /* ---- sharded ----------------------------------------------------------------------------- */
    char idx[1024];
    snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", dir);
    const char *good =
        "{" E("a", "{\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}") "}";
    size_t glen;
    unsigned char *gb = make_st(good, 8, -1, &glen);
    spit(dir, "s1.safetensors", gb, glen);

    spit(dir, "model.safetensors.index.json", "{\"weight_map\": ", 15);
    CU_ASSERT_NOT_EQUAL(st_open(dir, &m, err, sizeof err), 0);
    ASSERT_HAS(err, idx);
    ASSERT_HAS(err, "JSON");

    spit(dir, "model.safetensors.index.json", "{\"metadata\": {}}", 16);
    CU_ASSERT_NOT_EQUAL(st_open(dir, &m, err, sizeof err), 0);
    ASSERT_HAS(err, idx);
    ASSERT_HAS(err, "weight_map");

    const char *ix = "{\"weight_map\": {\"a\": \"s1.safetensors\", \"b\": \"gone.safetensors\"}}";
    spit(dir, "model.safetensors.index.json", ix, strlen(ix));
    CU_ASSERT_NOT_EQUAL(st_open(dir, &m, err, sizeof err), 0);
    ASSERT_HAS(err, idx);
    ASSERT_HAS(err, "gone.safetensors");
    ASSERT_HAS(err, "does not exist");

    /* lazy: a broken second shard only shows when one of its tensors is asked for; a name
     * the index maps to a shard that lacks it is an error naming both */
    ix = "{\"weight_map\": {\"a\": \"s1.safetensors\", \"b\": \"s2.safetensors\", "
         "\"c\": \"s1.safetensors\"}}";
    spit(dir, "model.safetensors.index.json", ix, strlen(ix));
    spit(dir, "s2.safetensors", "\x40\0\0\0\0\0\0\0{oops", 13);
    int rc = st_open(dir, &m, err, sizeof err);
    if (rc) fprintf(stderr, "\n  %s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    const int64_t s2[1] = {2};
    CU_ASSERT_PTR_NOT_NULL(st_get_f32(m, "a", 1, s2, err, sizeof err));
    CU_ASSERT_EQUAL(st_find(m, "b", NULL, err, sizeof err), -1);
    ASSERT_HAS(err, "s2.safetensors");
    CU_ASSERT_PTR_NULL(st_get_f32(m, "b", 1, s2, err, sizeof err));
    ASSERT_HAS(err, "s2.safetensors"); /* same failure again, no crash */
    CU_ASSERT_EQUAL(st_find(m, "c", NULL, err, sizeof err), -1);
    ASSERT_HAS(err, "s1.safetensors");
    ASSERT_HAS(err, "missing tensor c");
    CU_ASSERT_EQUAL(st_find(m, "d", NULL, err, sizeof err), 0);
    CU_ASSERT_PTR_NULL(st_get_f32(m, "d", 1, s2, err, sizeof err));
    ASSERT_HAS(err, idx);
    ASSERT_HAS(err, "missing tensor d");
    st_close(m);
    m = NULL;

    /* model.safetensors present: it wins over the index */
    spit(dir, "model.safetensors", gb, glen);
    CU_ASSERT_EQUAL_FATAL(st_open(dir, &m, err, sizeof err), 0);
    CU_ASSERT_EQUAL(st_find(m, "b", NULL, err, sizeof err), 0);
    st_close(m);
    free(gb);
    rm_tmpdir(dir);
}

/* ---- safetensors: fuzz (every truncation, random header byte flips) -------------------------- */

/* Open and touch every tensor; returns st_open's status. Must never crash. */
static int open_and_touch(const char *dir)
{
    st_model *m = NULL;
    char err[512];
    int rc = st_open(dir, &m, err, sizeof err);
    if (rc) return rc;
    for (int k = 0; k < N_WSPEC; k++) {
        st_tensor t;
        if (st_find(m, wspecs[k].name, &t, err, sizeof err) == 1) {
            const float *p = st_get_f32(m, wspecs[k].name, t.ndim, t.shape, err, sizeof err);
            if (p && t.nbytes) {
                volatile float s = 0;
                for (size_t i = 0; i < t.nbytes / stage_dtype_size(t.dtype); i++) s += p[i];
                (void)s;
            }
        }
    }
    st_close(m);
    return 0;
}

static void test_st_fuzz(void)
{
    char *src = make_tmpdir(), *dir = make_tmpdir(), err[512];
    CU_ASSERT_PTR_NOT_NULL_FATAL(src);
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    st_writer *w = build_writer();
    CU_ASSERT_EQUAL_FATAL(st_writer_save(w, src, 1, err, sizeof err), 0);
    st_writer_free(w);
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors", src);
    size_t len;
    unsigned char *b = slurp(path, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    uint64_t hn = 0;
    for (int i = 7; i >= 0; i--) hn = (hn << 8) | b[i];

    /* every truncation is an error (the writer leaves no trailing bytes) */
    int accepted = 0;
    for (size_t l = 0; l < len; l++) {
        spit(dir, "model.safetensors", b, l);
        if (open_and_touch(dir) == 0) accepted++;
    }
    CU_ASSERT_EQUAL(accepted, 0);
    spit(dir, "model.safetensors", b, len);
    CU_ASSERT_EQUAL(open_and_touch(dir), 0);

    /* 1-3 random byte changes in the length field or the header; only no-crash matters */
    unsigned char *c = malloc(len);
    uint32_t s = 12345;
    for (int iter = 0; iter < 3000; iter++) {
        memcpy(c, b, len);
        int flips = 1 + iter % 3;
        for (int f = 0; f < flips; f++) {
            s = s * 1664525u + 1013904223u;
            size_t at = (s >> 8) % (8 + hn);
            s = s * 1664525u + 1013904223u;
            c[at] =
                (iter & 1) ? (unsigned char)(s >> 24) : (unsigned char)(c[at] ^ (1u << (s >> 29)));
        }
        spit(dir, "model.safetensors", c, len);
        (void)open_and_touch(dir);
    }
    free(c);
    free(b);
    rm_tmpdir(src);
    rm_tmpdir(dir);
}

/* ---- main ------------------------------------------------------------------------------------ */

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    CU_pSuite cs = CU_add_suite("config", NULL, NULL);
    CU_pSuite ss = CU_add_suite("safetensors", NULL, NULL);
    if (!cs || !ss) {
        CU_cleanup_registry();
        return 2;
    }
    CU_add_test(cs, "fixture configs", test_config_fixtures);
    CU_add_test(cs, "kind names", test_config_kind_names);
    CU_add_test(cs, "defaults and accepted keys", test_config_defaults);
    CU_add_test(cs, "Router-Tuning is_mindskip", test_config_router_tuning);
    CU_add_test(cs, "malformed configs", test_config_errors);
    CU_add_test(cs, "quantization_config: compressed-tensors and q8_0", test_quant_config);
    CU_add_test(cs, "config.json fuzz (a quantized model's)", test_config_fuzz);
    CU_add_test(ss, "dtype helpers", test_dtype_helpers);
    CU_add_test(ss, "f32 fixture", test_st_f32_fixture);
    CU_add_test(ss, "bf16 and f16 fixtures", test_st_bf16_f16_fixtures);
    CU_add_test(ss, "sharded fixture", test_st_sharded_fixture);
    CU_add_test(ss, "malformed files", test_st_malformed);
    CU_add_test(ss, "fuzz", test_st_fuzz);
    return tu_cunit_run();
}
