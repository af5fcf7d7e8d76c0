/* tests/test_arch.c — the block families beyond plain Llama (docs/SPEC.md §10).
 *
 * Config: each family's keys -> flags (HF's defaults and rules), every refusal one clear line.
 * Loader: a tensor the config's block does not use is refused; a windowed layer's KV cache is
 * bounded by its window and gives the same bits as an unbounded one. init-model specs and
 * router-tune for each family.
 * Exactness: the known answers of tests/fixtures/arch (tests/fixtures-gen/arch.py, an
 * independent numpy implementation) at -np 1 within 1e-4 with the same greedy tokens, -np 2..4
 * bit-identical to -np 1, prompts cut into micro-batches of 3, and --tp 2 within 1e-4.
 * Rounded weights (--weights-dtype bf16, q8_0): the first step's logits within the bounds of
 * docs/SPEC.md §10, -np 3 bit-identical to -np 1.
 * Needs: MODPIPE (default build/modpipe), mpirun, tests/fixtures/arch.
 */
#include <CUnit/Basic.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stage/arch.h"
#include "stage/config.h"
#include "stage/kernels.h"
#include "stage/stage.h"
#include "testutil.h"

static const char *BIN, *FIX;
static char TMP[256];
static char OUT[1 << 16];
#define run(secs, ...) tu_run(OUT, sizeof OUT, (secs), __VA_ARGS__)
#define MPIRUN TU_MPIRUN
/* the fixtures' prompts (tests/fixtures-gen/arch.py PROMPTS): the first is longer than every
 * window, so prefill and decode both cross it */
static const char *PROMPTS =
    "--prompt-ids 3,14,15,92,65,35,89,79,32,38,46,26 --prompt-ids 89,79 --prompt-ids 32,38,46,26";

static const char *MODELS[] = {"llama3",     "llama3_mod",     "mistral", "mistral_mod",
                               "qwen2",      "qwen2_mindskip", "qwen3",   "qwen3_mod",
                               "qwen3_mode", "llama3_mindskip"};
#define N_MODELS (sizeof MODELS / sizeof *MODELS)

/* ---- config ---------------------------------------------------------------------------------- */

#define BASE                                                                                       \
    "\"hidden_size\": 64, \"intermediate_size\": 128, \"num_attention_heads\": 4, "                \
    "\"vocab_size\": 97, \"num_hidden_layers\": 4"

static int parse(const char *json, stage_config *c, char *err, size_t errlen)
{
    err[0] = '\0';
    return stage_config_parse(json, "/x/config.json", c, err, errlen);
}

static void test_config_families(void)
{
    stage_config c;
    char err[512];
    /* plain: llama, no variant */
    CU_ASSERT_EQUAL_FATAL(parse("{" BASE "}", &c, err, sizeof err), 0);
    CU_ASSERT_EQUAL(c.arch, STAGE_ARCH_LLAMA);
    CU_ASSERT(!c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.qk_norm && !c.window);
    CU_ASSERT_EQUAL(c.rope_type, STAGE_ROPE_DEFAULT);
    stage_config_free(&c);

    /* Llama 3.1: llama3 RoPE, biases by attention_bias / mlp_bias */
    CU_ASSERT_EQUAL_FATAL(
        parse("{" BASE ", \"model_type\": \"llama\", \"attention_bias\": true, \"mlp_bias\": "
              "true, \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, "
              "\"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, "
              "\"original_max_position_embeddings\": 8192}}",
              &c, err, sizeof err),
        0);
    CU_ASSERT(c.qkv_bias && c.o_bias && c.mlp_bias && !c.qk_norm);
    CU_ASSERT_EQUAL(c.rope_type, STAGE_ROPE_LLAMA3);
    CU_ASSERT_DOUBLE_EQUAL(c.rope_factor, 8.0, 0);
    CU_ASSERT_EQUAL(c.rope_orig_ctx, 8192);
    /* the three bands: high frequencies kept, low ones divided by the factor */
    float f0[16], f1[16];
    stage_rope_inv_freq(c.rope_theta, 16, f0);
    stage_arch_inv_freq(&c, f1);
    CU_ASSERT_EQUAL(f1[0], f0[0]);
    CU_ASSERT_DOUBLE_EQUAL(f1[7], f0[7] / 8.0, 1e-7 * f0[7]);
    stage_config_free(&c);

    /* Mistral: the window on every layer; an absent sliding_window is HF's 4096 */
    CU_ASSERT_EQUAL_FATAL(parse("{" BASE ", \"model_type\": \"mistral\", \"sliding_window\": 16}",
                                &c, err, sizeof err),
                          0);
    CU_ASSERT_EQUAL(c.arch, STAGE_ARCH_MISTRAL);
    CU_ASSERT_EQUAL(c.window, 16);
    for (int l = 0; l < 4; l++) CU_ASSERT_EQUAL(stage_layer_window(&c, l), 16);
    stage_config_free(&c);
    CU_ASSERT_EQUAL_FATAL(
        parse("{" BASE ", \"architectures\": [\"MistralForCausalLM\"], \"sliding_window\": null}",
              &c, err, sizeof err),
        0);
    CU_ASSERT_EQUAL(c.window, 0);
    stage_config_free(&c);
    CU_ASSERT_EQUAL_FATAL(parse("{" BASE ", \"model_type\": \"mistral\"}", &c, err, sizeof err), 0);
    CU_ASSERT_EQUAL(c.window, 4096);
    stage_config_free(&c);

    /* Qwen2: q/k/v biases always, no o bias; the window only with use_sliding_window, on
     * layers >= max_window_layers */
    CU_ASSERT_EQUAL_FATAL(parse("{" BASE ", \"model_type\": \"qwen2\", \"sliding_window\": "
                                "131072, \"use_sliding_window\": false, \"max_window_layers\": 2}",
                                &c, err, sizeof err),
                          0);
    CU_ASSERT(c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.qk_norm);
    CU_ASSERT_EQUAL(c.window, 0);
    stage_config_free(&c);
    CU_ASSERT_EQUAL_FATAL(parse("{" BASE ", \"model_type\": \"qwen2\", \"sliding_window\": 8, "
                                "\"use_sliding_window\": true, \"max_window_layers\": 2}",
                                &c, err, sizeof err),
                          0);
    CU_ASSERT_EQUAL(stage_layer_window(&c, 1), 0);
    CU_ASSERT_EQUAL(stage_layer_window(&c, 2), 8);
    CU_ASSERT_EQUAL(stage_layer_window(&c, 3), 8);
    stage_config_free(&c);
    /* HF's own layer_types (attention kinds) decide the windowed layers; all dense */
    CU_ASSERT_EQUAL_FATAL(
        parse("{" BASE ", \"model_type\": \"qwen2\", \"sliding_window\": 8, "
              "\"use_sliding_window\": true, \"layer_types\": [\"full_attention\", "
              "\"full_attention\", \"full_attention\", \"sliding_attention\"]}",
              &c, err, sizeof err),
        0);
    CU_ASSERT_EQUAL(stage_layer_window(&c, 2), 0);
    CU_ASSERT_EQUAL(stage_layer_window(&c, 3), 8);
    for (int l = 0; l < 4; l++) CU_ASSERT_EQUAL(c.layer_kind[l], STAGE_KIND_DENSE);
    stage_config_free(&c);

    /* Qwen3: q/k norms, biases by attention_bias, explicit head_dim, linear RoPE */
    CU_ASSERT_EQUAL_FATAL(
        parse("{" BASE ", \"model_type\": \"qwen3\", \"head_dim\": 24, \"attention_bias\": "
              "false, \"rope_scaling\": {\"type\": \"linear\", \"factor\": 4.0}, "
              "\"tie_word_embeddings\": true}",
              &c, err, sizeof err),
        0);
    CU_ASSERT(c.qk_norm && !c.qkv_bias && !c.o_bias);
    CU_ASSERT_EQUAL(c.head_dim, 24);
    CU_ASSERT_EQUAL(c.tie_embeddings, 1);
    CU_ASSERT_EQUAL(c.rope_type, STAGE_ROPE_LINEAR);
    stage_rope_inv_freq(c.rope_theta, 24, f0);
    stage_arch_inv_freq(&c, f1);
    for (int i = 0; i < 12; i++) CU_ASSERT_DOUBLE_EQUAL(f1[i], f0[i] / 4.0, 1e-7 * f0[i]);
    stage_config_free(&c);
}

typedef struct {
    const char *json, *needle;
} bad_cfg;

static const bad_cfg bad_cfgs[] = {
    {"{" BASE ", \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}}",
     "rope_scaling.rope_type: \"yarn\" is not supported"},
    {"{" BASE ", \"rope_parameters\": {\"rope_type\": \"longrope\"}}",
     "rope_parameters.rope_type: \"longrope\""},
    {"{" BASE ", \"rope_scaling\": {\"type\": \"linear\"}}", "rope_scaling.factor: missing"},
    {"{" BASE ", \"rope_scaling\": {\"type\": \"linear\", \"factor\": 0}}", "rope_scaling.factor"},
    {"{" BASE ", \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, "
     "\"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0}}",
     "rope_scaling.original_max_position_embeddings: missing"},
    {"{" BASE ", \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, "
     "\"low_freq_factor\": 4.0, \"high_freq_factor\": 4.0, "
     "\"original_max_position_embeddings\": 8192}}",
     "rope_scaling.high_freq_factor"},
    {"{" BASE ", \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0, "
     "\"attention_factor\": 0.5}}",
     "rope_scaling.attention_factor: is not supported"},
    {"{" BASE ", \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}, "
     "\"rope_parameters\": {\"rope_type\": \"linear\", \"factor\": 2.0}}",
     "both rope_scaling and rope_parameters"},
    {"{" BASE ", \"rope_scaling\": 2}", "rope_scaling: expected an object"},
    {"{" BASE ", \"model_type\": \"llama\", \"sliding_window\": 64}", "sliding_window"},
    {"{" BASE ", \"model_type\": \"llama\", \"use_sliding_window\": true}", "use_sliding_window"},
    {"{" BASE ", \"model_type\": \"mistral\", \"sliding_window\": 0}", "sliding_window"},
    {"{" BASE ", \"model_type\": \"qwen2\", \"use_sliding_window\": \"yes\"}",
     "use_sliding_window"},
    {"{" BASE ", \"model_type\": \"qwen2\", \"max_window_layers\": -1}", "max_window_layers"},
    {"{" BASE ", \"model_type\": \"qwen2\", \"sliding_window\": 8, \"use_sliding_window\": true, "
     "\"layer_types\": [\"sliding_attention\", \"full_attention\", \"full_attention\", "
     "\"full_attention\"]}",
     "layer_types[1]"},
    {"{" BASE ", \"model_type\": \"qwen2\", \"layer_types\": [\"full_attention\"]}",
     "layer_types: has 1 entries"},
    {"{" BASE ", \"model_type\": \"qwen3\"}", "head_dim: missing"},
    {"{" BASE ", \"model_type\": \"qwen2\", \"architectures\": [\"LlamaForCausalLM\"]}",
     "name different families"},
    {"{" BASE ", \"architectures\": [\"LlamaForCausalLM\", \"Qwen2ForCausalLM\"]}", "lists both"},
    {"{" BASE ", \"model_type\": \"qwen2_moe\"}", "model_type: \"qwen2_moe\""},
    {"{" BASE ", \"attention_bias\": 1}", "attention_bias: expected a boolean"},
    {"{" BASE ", \"head_dim\": 15}", "head_dim: 15 is odd"},
};

static void test_config_refusals(void)
{
    for (size_t i = 0; i < sizeof bad_cfgs / sizeof *bad_cfgs; i++) {
        stage_config c;
        char err[512];
        int rc = parse(bad_cfgs[i].json, &c, err, sizeof err);
        if (rc == 0) fprintf(stderr, "\n  accepted: %s\n", bad_cfgs[i].json);
        CU_ASSERT_NOT_EQUAL(rc, 0);
        CU_ASSERT_PTR_NULL(c.layer_kind);
        ASSERT_HAS(err, "/x/config.json: ");
        ASSERT_HAS(err, bad_cfgs[i].needle);
        CU_ASSERT_PTR_NULL(strchr(err, '\n'));
        stage_config_free(&c);
    }
}

/* ---- loader ---------------------------------------------------------------------------------- */

/* DIR = a fixture's weights (a symlink) with its config.json patched: every key of the JSON
 * object `patch` is set, or removed when its value is null. */
static int fixture_with_config(const char *model, const char *patch, const char *dir)
{
    char path[600], *abs = NULL;
    snprintf(path, sizeof path, "%s/arch/%s/model.safetensors", FIX, model);
    abs = realpath(path, NULL);
    int rc = !abs || run(30, "rm -rf %s && mkdir -p %s && ln -s %s %s/", dir, dir, abs, dir);
    free(abs);
    snprintf(path, sizeof path, "%s/arch/%s/config.json", FIX, model);
    cJSON *c = tu_read_json(path), *p = cJSON_Parse(patch);
    if (rc || !c || !p) {
        cJSON_Delete(c);
        cJSON_Delete(p);
        return -1;
    }
    const cJSON *e;
    cJSON_ArrayForEach(e, p)
    {
        cJSON_DeleteItemFromObjectCaseSensitive(c, e->string);
        if (!cJSON_IsNull(e)) cJSON_AddItemToObject(c, e->string, cJSON_Duplicate(e, 1));
    }
    char *txt = cJSON_Print(c);
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    rc = !f || !txt || fputs(txt, f) < 0;
    if (f) rc |= fclose(f) != 0;
    free(txt);
    cJSON_Delete(c);
    cJSON_Delete(p);
    return rc ? -1 : 0;
}

static int load(const char *dir, stage_config *cfg, stage_model **m, char *err, size_t errlen)
{
    if (stage_config_load(dir, cfg, err, errlen)) return -1;
    stage_range r = {0, cfg->n_layers - 1, 1, 1};
    int rc = stage_model_load(dir, cfg, r, m, err, errlen);
    return rc;
}

static void test_tensor_refusals(void)
{
    char dir[512], err[512];
    stage_config cfg;
    stage_model *m = NULL;
    snprintf(dir, sizeof dir, "%s/refuse", TMP);
    /* qwen2 weights (q/k/v biases) described as llama: the biases are refused by name */
    CU_ASSERT_EQUAL_FATAL(
        fixture_with_config("qwen2",
                            "{\"model_type\": \"llama\", \"architectures\": null, "
                            "\"sliding_window\": null, \"use_sliding_window\": null}",
                            dir),
        0);
    CU_ASSERT_NOT_EQUAL(load(dir, &cfg, &m, err, sizeof err), 0);
    ASSERT_HAS(err, "_proj.bias is not part of");
    ASSERT_HAS(err, "llama block");
    stage_config_free(&cfg);
    /* qwen3 weights (q/k norms) described as qwen2: q_norm refused */
    CU_ASSERT_EQUAL_FATAL(
        fixture_with_config("qwen3", "{\"model_type\": \"qwen2\", \"architectures\": null}", dir),
        0);
    CU_ASSERT_NOT_EQUAL(load(dir, &cfg, &m, err, sizeof err), 0);
    ASSERT_HAS(err, "tensor model.layers.");
    stage_config_free(&cfg);
    /* a llama config that says mlp_bias without the tensors: the missing one is named */
    CU_ASSERT_EQUAL_FATAL(
        fixture_with_config("mistral",
                            "{\"model_type\": \"llama\", \"architectures\": null, "
                            "\"sliding_window\": null, \"mlp_bias\": true}",
                            dir),
        0);
    CU_ASSERT_NOT_EQUAL(load(dir, &cfg, &m, err, sizeof err), 0);
    ASSERT_HAS(err, "mlp.gate_proj.bias");
    stage_config_free(&cfg);
    CU_ASSERT_PTR_NULL(m);
}

/* A windowed layer gives its KV pages back (docs/SPEC.md §10.4): its pool is sized to the
 * window — ceil((W - 1 + rows) / page) + 1 pages per (layer, slot), not ctx / page — and a
 * decode far longer than that runs in it with the same bits as an unbounded cache fed the
 * same rows. */
static void test_window_kv_bound(void)
{
    char dir[512], err[512];
    snprintf(dir, sizeof dir, "%s/arch/mistral", FIX);
    stage_config cfg;
    stage_model *m = NULL;
    CU_ASSERT_EQUAL_FATAL(load(dir, &cfg, &m, err, sizeof err), 0);
    const int W = cfg.window, T = 200, D = cfg.hidden, V = cfg.vocab, P = 16;
    CU_ASSERT_EQUAL_FATAL(W, 4);
    const size_t kvd = (size_t)cfg.n_kv_heads * cfg.head_dim;
    const size_t page_bytes = (size_t)P * (2 * kvd * sizeof(float) + sizeof(int32_t));
    /* ring: 1-row micro-batches, 1000 positions: (3 + 1) / 16 -> 1 page + 1 per (layer, slot);
     * full: a window wider than the context (rows 2T), so ceil(200 / 16) = 13 pages each */
    stage_state *ring = stage_state_init(m, 2, 1, 1000, err, sizeof err);
    stage_state *full = stage_state_init(m, 2, 2 * T, T, err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ring);
    CU_ASSERT_PTR_NOT_NULL_FATAL(full);
    CU_ASSERT_EQUAL(stage_state_kv_alloc_bytes(ring), (size_t)cfg.n_layers * 2 * 2 * page_bytes);
    CU_ASSERT_EQUAL(stage_state_kv_alloc_bytes(full),
                    (size_t)cfg.n_layers * 2 * ((T + P - 1) / P) * page_bytes);
    float x[2][64], lr[97], lf[97];
    CU_ASSERT_FATAL(D <= 64 && V <= 97);
    int same = 1;
    for (int t = 0; t < T; t++) {
        int32_t slot = 1, pos = t, tok = (t * 37 + 11) % V;
        uint8_t fl = STAGE_ROW_NEED_LOGITS | (t < 8 ? STAGE_ROW_PROMPT : 0), present = 1;
        stage_batch b = {.n = 1, .slot = &slot, .pos = &pos, .token = &tok, .flags = &fl};
        int row = 0;
        CU_ASSERT_EQUAL_FATAL(stage_embed(m, &tok, 1, x[0], err, sizeof err), 0);
        memcpy(x[1], x[0], sizeof x[0]);
        int rc = stage_forward(ring, &b, x[0], &present, err, sizeof err);
        if (rc) fprintf(stderr, "\n  ring: %s\n", err);
        CU_ASSERT_EQUAL_FATAL(rc, 0);
        CU_ASSERT_EQUAL_FATAL(stage_forward(full, &b, x[1], &present, err, sizeof err), 0);
        CU_ASSERT_EQUAL_FATAL(stage_head_logits(ring, x[0], &row, 1, lr, err, sizeof err), 0);
        CU_ASSERT_EQUAL_FATAL(stage_head_logits(full, x[1], &row, 1, lf, err, sizeof err), 0);
        same &= memcmp(lr, lf, (size_t)V * sizeof(float)) == 0;
    }
    CU_ASSERT(same);
    CU_ASSERT_EQUAL(stage_state_slot_len(ring, 1), T);
    stage_kv_stats ks;
    stage_state_kv_stats(ring, &ks);
    CU_ASSERT(ks.pages_peak <= cfg.n_layers * 2); /* one slot: two pages a layer at most */
    stage_state_free(ring);
    stage_state_free(full);
    stage_model_free(m);
    stage_config_free(&cfg);
}

/* init-model on configs/models/{llama3,mistral,qwen2,qwen3}.yaml: the written config.json
 * reads back as the family, the model loads (every tensor of the variant present), runs at
 * -np 2, and partition counts a windowed layer's bounded cache. */
static void test_init_model_specs(void)
{
    static const char *const specs[] = {"llama3", "mistral", "qwen2", "qwen3"};
    for (int i = 0; i < 4; i++) {
        char dir[512], err[512];
        snprintf(dir, sizeof dir, "%s/im-%s", TMP, specs[i]);
        int rc = run(300, "%s init-model --spec configs/models/%s.yaml --out %s --quiet", BIN,
                     specs[i], dir);
        if (rc) fprintf(stderr, "\n%s\n", OUT);
        CU_ASSERT_EQUAL_FATAL(rc, 0);
        stage_config c;
        stage_model *m = NULL;
        CU_ASSERT_EQUAL_FATAL(load(dir, &c, &m, err, sizeof err), 0);
        CU_ASSERT_EQUAL(c.arch, (stage_arch)i);
        switch (i) {
        case 0: CU_ASSERT(c.rope_type == STAGE_ROPE_LLAMA3 && c.tie_embeddings); break;
        case 1: CU_ASSERT(c.window == 32 && c.window_from == 0 && !c.qkv_bias); break;
        case 2: CU_ASSERT(c.qkv_bias && c.window == 32 && c.window_from == 3); break;
        case 3: CU_ASSERT(c.qk_norm && c.head_dim == 32 && !c.qkv_bias); break;
        }
        stage_model_free(m);
        stage_config_free(&c);
        rc = run(120, "%s -np 2 %s generate --model %s --prompt-ids 1,2,3,4,5 --max-new 40 --quiet",
                 MPIRUN, BIN, dir);
        CU_ASSERT_EQUAL(rc, 0);
        CU_ASSERT(strstr(OUT, "generated ") != NULL);
    }
    /* mistral: 6 windowed layers of 32 - 1 + 8 entries (not 256, nor the routed layers'
     * 1.25 x capacity x ctx + 8 = 88), each f32 K and V of 2 x 16 features and an int32
     * position: 6 x 39 x 260 bytes = 0.06 MiB (0.26 without the window) */
    char dir[512];
    snprintf(dir, sizeof dir, "%s/im-mistral", TMP);
    CU_ASSERT_EQUAL(
        run(60, "%s partition --model %s -n 1 --ctx 256 --micro-batch 8 --slots 1", BIN, dir), 0);
    const char *row = strstr(OUT, "3 dense + 3 mod");
    CU_ASSERT_PTR_NOT_NULL_FATAL(row);
    double w = 0, kv = 0;
    CU_ASSERT_EQUAL(sscanf(row, "3 dense + 3 mod %*f%% %lf %lf", &w, &kv), 2);
    CU_ASSERT_DOUBLE_EQUAL(kv, 6 * 39 * 260 / (1024.0 * 1024.0), 0.006);
}

/* ---- exactness under mpirun ------------------------------------------------------------------ */

static void check_model(const char *model, const char *extra, const char *tag, int np_max)
{
    char one[512], many[512], want[512], txt[512];
    snprintf(one, sizeof one, "%s/%s-%s-np1.npy", TMP, model, tag);
    snprintf(want, sizeof want, "%s/arch/%s.generate.npy", FIX, model);
    snprintf(txt, sizeof txt, "%s/arch/%s.generate.txt", FIX, model);
    int rc = run(120,
                 "%s -np 1 %s generate --model %s/arch/%s %s --max-new 5 --quiet %s "
                 "--dump-logits %s",
                 MPIRUN, BIN, FIX, model, PROMPTS, extra, one);
    if (rc) fprintf(stderr, "\n%s\n", OUT);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT(tu_lines_in(OUT, txt));
    double rel = tu_npy_rel_err(one, want);
    CU_ASSERT(rel <= 1e-4);
    if (!(rel <= 1e-4)) fprintf(stderr, "\n%s (%s): rel err %g vs known answer\n", model, tag, rel);
    for (int np = 2; np <= np_max; np++) {
        snprintf(many, sizeof many, "%s/%s-%s-np%d.npy", TMP, model, tag, np);
        rc = run(120,
                 "%s -np %d %s generate --model %s/arch/%s %s --max-new 5 --quiet %s "
                 "--dump-logits %s",
                 MPIRUN, np, BIN, FIX, model, PROMPTS, extra, many);
        CU_ASSERT_EQUAL(rc, 0);
        CU_ASSERT(tu_lines_in(OUT, txt));
        int same = tu_files_identical(one, many);
        CU_ASSERT(same);
        if (!same) fprintf(stderr, "\n%s -np %d (%s): logits differ from -np 1\n", model, np, tag);
    }
}

static void test_exact_default(void)
{
    for (size_t i = 0; i < N_MODELS; i++) check_model(MODELS[i], "", "default", 4);
}

/* prompts cut into micro-batches of 3 rows: the window spans micro-batches, and with pages of
 * 2 positions the windowed layers give pages back as the window passes */
static void test_exact_microbatch(void)
{
    for (size_t i = 0; i < N_MODELS; i++)
        check_model(MODELS[i], "--micro-batch 3 --groups 1 --kv-page 2", "mb3", 3);
}

/* tensor-parallel stages: biases and q/k norms on each rank's heads, within 1e-4 */
static void test_exact_tp(void)
{
    for (size_t i = 0; i < N_MODELS; i++) {
        char out[512], want[512], txt[512];
        snprintf(out, sizeof out, "%s/%s-tp2.npy", TMP, MODELS[i]);
        snprintf(want, sizeof want, "%s/arch/%s.generate.npy", FIX, MODELS[i]);
        snprintf(txt, sizeof txt, "%s/arch/%s.generate.txt", FIX, MODELS[i]);
        int np = i % 2 ? 4 : 2; /* routed models: two stages of two ranks */
        int rc = run(120,
                     "%s -np %d %s generate --model %s/arch/%s --tp 2 %s --max-new 5 --quiet "
                     "--dump-logits %s",
                     MPIRUN, np, BIN, FIX, MODELS[i], PROMPTS, out);
        if (rc) fprintf(stderr, "\n%s\n", OUT);
        CU_ASSERT_EQUAL(rc, 0);
        CU_ASSERT(tu_lines_in(OUT, txt));
        double rel = tu_npy_rel_err(out, want);
        CU_ASSERT(rel <= 1e-4);
        if (!(rel <= 1e-4)) fprintf(stderr, "\n%s --tp 2: rel err %g\n", MODELS[i], rel);
    }
}

/* Weights rounded at load (--weights-dtype bf16, q8_0: docs/SPEC.md §3.2, §9) on every family:
 * they load (biases, q/k norms and norms stay as stored), run, -np 3 is bit-identical to
 * -np 1, and the first step's logits are within the documented bound of the known answers
 * (docs/SPEC.md §10 "Rounded weights"). Later steps are not compared: on these tiny random
 * models greedy decoding flips a near-tied token within a few steps under any weight rounding,
 * after which the runs part (q8_0 flips llama3_mod's first token already). Measured first-step
 * max |a-b| / max |b|: bf16 0.0064 (qwen2_mindskip) - 0.031 (llama3_mod), bound 5e-2; q8_0
 * 0.018 (qwen2_mindskip) - 0.047 (llama3_mod), bound 7.5e-2 (the bound of docs/SPEC.md §9). */
static void check_rounded(const char *dtype, double bound)
{
    for (size_t i = 0; i < N_MODELS; i++) {
        const char *m = MODELS[i];
        char out[2][512], want[512];
        snprintf(want, sizeof want, "%s/arch/%s.generate.npy", FIX, m);
        for (int k = 0; k < 2; k++) {
            int np = k ? 3 : 1;
            snprintf(out[k], sizeof out[k], "%s/%s-%s-np%d.npy", TMP, m, dtype, np);
            int rc = run(120,
                         "%s -np %d %s generate --model %s/arch/%s %s --max-new 5 --quiet "
                         "--weights-dtype %s --dump-logits %s",
                         MPIRUN, np, BIN, FIX, m, PROMPTS, dtype, out[k]);
            if (rc) fprintf(stderr, "\n%s\n", OUT);
            CU_ASSERT_EQUAL_FATAL(rc, 0);
        }
        int same = tu_files_identical(out[0], out[1]);
        CU_ASSERT(same);
        if (!same) fprintf(stderr, "\n%s %s: -np 3 logits differ from -np 1\n", m, dtype);
        double rel = tu_npy_rel_err_at(out[0], want, 1);
        CU_ASSERT(rel <= bound);
        if (!(rel <= bound))
            fprintf(stderr, "\n%s %s: first-step rel err %g > %g\n", m, dtype, rel, bound);
    }
}

static void test_bf16(void) { check_rounded("bf16", 5e-2); }
static void test_q8_0(void) { check_rounded("q8_0", 7.5e-2); }

/* Router-Tuning on each family (its training forward computes the variants; tests/test_train.c
 * checks its gradients and its agreement with the engine): a few steps, then the tuned model
 * (MindSkip layers over the family's block) generates. */
static void test_router_tune(void)
{
    static const char *const fam[] = {"llama3", "mistral", "qwen2", "qwen3"};
    for (int i = 0; i < 4; i++) {
        int rc = run(120,
                     "%s -np 2 %s router-tune --model %s/arch/%s --data-ids %s/eval_tokens.txt "
                     "--seq-len 4 --batch 2 --steps 2 --out %s/rt-%s --quiet",
                     MPIRUN, BIN, FIX, fam[i], FIX, TMP, fam[i]);
        if (rc) fprintf(stderr, "\n%s\n", OUT);
        CU_ASSERT_EQUAL(rc, 0);
        rc =
            run(120, "%s -np 2 %s generate --model %s/rt-%s --prompt-ids 1,2,3 --max-new 4 --quiet",
                MPIRUN, BIN, TMP, fam[i]);
        CU_ASSERT_EQUAL(rc, 0);
        CU_ASSERT(strstr(OUT, "generated ") != NULL);
    }
}

int main(void)
{
    BIN = getenv("MODPIPE") ? getenv("MODPIPE") : "build/modpipe";
    FIX = getenv("MODPIPE_FIXTURES") ? getenv("MODPIPE_FIXTURES") : "tests/fixtures";
    snprintf(TMP, sizeof TMP, "/tmp/modpipe-arch-XXXXXX");
    if (!mkdtemp(TMP)) {
        perror("mkdtemp");
        return 1;
    }
    if (tu_mpi_env("test_arch", BIN)) return 1;
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("arch", NULL, NULL);
    CU_add_test(s, "config: families -> flags", test_config_families);
    CU_add_test(s, "config: refusals", test_config_refusals);
    CU_add_test(s, "loader: tensors the block does not use", test_tensor_refusals);
    CU_add_test(s, "windowed KV cache bounded, same bits", test_window_kv_bound);
    CU_add_test(s, "router-tune on each family", test_router_tune);
    if (!getenv("MODPIPE_TEST_QUICK")) { /* the mpirun runs (development: skip them) */
        CU_add_test(s, "generate exact, np 1-4", test_exact_default);
        CU_add_test(s, "generate exact, micro-batch 3, pages of 2, np 1-3", test_exact_microbatch);
        CU_add_test(s, "generate --tp 2 within 1e-4", test_exact_tp);
        CU_add_test(s, "generate bf16 weights: within 5e-2 at step 1, -np 3 = -np 1", test_bf16);
        CU_add_test(s, "generate q8_0 weights: within 7.5e-2 at step 1, -np 3 = -np 1", test_q8_0);
        CU_add_test(s, "init-model specs of each family", test_init_model_specs);
    }
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    run(30, "rm -rf %s", TMP);
    return fails ? 1 : 0;
}
