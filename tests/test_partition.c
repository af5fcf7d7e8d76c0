/* tests/test_partition.c — the partitioner (engine/partition.h, docs/SPEC.md §4): the layer
 * cost model, automatic and explicit plans, their why strings and printing, memory per stage
 * (--mem-per-rank), plan weight bytes against the loader's, sizes, weight dtypes (CUnit).
 */
#include <CUnit/Basic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/partition.h"
#include "stage/safetensors.h"
#include "stage/stage.h"
#include "tests/testutil.h"

#define ERRLEN 512

/* The fixtures' shape: hidden 64, 4 heads, 2 KV heads, intermediate 128, vocab 97. */
static stage_config tiny_cfg(const char *kinds)
{
    stage_config c;
    memset(&c, 0, sizeof c);
    c.hidden = 64;
    c.inter = 128;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 16;
    c.vocab = 97;
    c.max_pos = 256;
    c.eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.eos_token_id = -1;
    c.mod_capacity = 0.125f;
    c.mod_routing = STAGE_ROUTING_THRESHOLD;
    c.mod_threshold = 0.5f;
    c.n_experts = 4;
    c.n_noop_experts = 1;
    c.experts_per_token = 1;
    c.expert_inter = 64;
    c.ms_threshold = 0.5f;
    /* one letter per layer: d dense, m mod, s mode_staged, i mode_integrated, k mindskip */
    c.n_layers = (int)strlen(kinds);
    c.layer_kind = calloc((size_t)c.n_layers, sizeof *c.layer_kind);
    for (int i = 0; i < c.n_layers; i++)
        c.layer_kind[i] = kinds[i] == 'm'   ? STAGE_KIND_MOD
                          : kinds[i] == 's' ? STAGE_KIND_MODE_STAGED
                          : kinds[i] == 'i' ? STAGE_KIND_MODE_INTEGRATED
                          : kinds[i] == 'k' ? STAGE_KIND_MINDSKIP
                                            : STAGE_KIND_DENSE;
    return c;
}

static void expect_ranges(const engine_plan *p, const int *firsts, int n)
{
    CU_ASSERT_EQUAL_FATAL(p->n_stages, n);
    for (int t = 0; t < n; t++) {
        CU_ASSERT_EQUAL(p->st[t].first, firsts[t]);
        if (p->st[t].first != firsts[t])
            fprintf(stderr, "\n  stage %d starts at %d, expected %d\n", t, p->st[t].first,
                    firsts[t]);
    }
}

static void test_layer_cost(void)
{
    stage_config c = tiny_cfg("dmsik");
    /* attention 2*64*16*(2*4+2*2) = 24576, MLP 6*64*128 = 49152 */
    CU_ASSERT_DOUBLE_EQUAL(engine_layer_cost(&c, 0), 73728.0, 1e-6);
    CU_ASSERT_DOUBLE_EQUAL(engine_layer_cost(&c, 1), 0.125 * 73728.0, 1e-6);
    /* staged: capacity * (attn + gate 2*64*4 + 1 expert 6*64*64) */
    CU_ASSERT_DOUBLE_EQUAL(engine_layer_cost(&c, 2), 0.125 * (24576 + 512 + 24576), 1e-6);
    /* integrated: attn + gate 2*64*5 + 4/5 of an expert */
    CU_ASSERT_DOUBLE_EQUAL(engine_layer_cost(&c, 3), 24576 + 640 + 0.8 * 24576, 1e-6);
    CU_ASSERT_DOUBLE_EQUAL(engine_layer_cost(&c, 4), 73728.0, 1e-6);
    CU_ASSERT_DOUBLE_EQUAL(engine_layer_cost(&c, 5), 0.0, 0);
    CU_ASSERT_DOUBLE_EQUAL(engine_layer_cost(&c, -1), 0.0, 0);
    /* f32 bytes: attention 12288 + norms 128 + MLP 24576 floats, routers D (+1 bias) */
    CU_ASSERT_EQUAL(engine_layer_weight_bytes(&c, 0, STAGE_F32, STAGE_F32), (size_t)36992 * 4);
    CU_ASSERT_EQUAL(engine_layer_weight_bytes(&c, 1, STAGE_F32, STAGE_F32),
                    (size_t)(36992 + 65) * 4);
    CU_ASSERT_EQUAL(engine_layer_weight_bytes(&c, 2, STAGE_F32, STAGE_F32),
                    (size_t)(12416 + 4 * 12288 + 4 * 64 + 65) * 4);
    CU_ASSERT_EQUAL(engine_layer_weight_bytes(&c, 3, STAGE_F32, STAGE_F32),
                    (size_t)(12416 + 4 * 12288 + 5 * 64) * 4);
    CU_ASSERT_EQUAL(engine_layer_weight_bytes(&c, 4, STAGE_F32, STAGE_F32),
                    (size_t)(36992 + 64) * 4);
    /* q8_0: a 64-column row is 64 + 2 x 2 bytes, a 128-column one 128 + 4 x 2; attention
     * 192 rows of 64 columns, MLP 256 of 64 + 64 of 128; the MoE gate (5 x 64) keeps bf16 */
    CU_ASSERT_EQUAL(engine_layer_weight_bytes(&c, 0, STAGE_Q8_0, STAGE_BF16),
                    (size_t)(192 * 68 + 256 * 68 + 64 * 136 + 128 * 4));
    CU_ASSERT_EQUAL(engine_layer_weight_bytes(&c, 3, STAGE_Q8_0, STAGE_BF16),
                    (size_t)(192 * 68 + 4 * 192 * 68 + 5 * 64 * 2 + 128 * 4));
    stage_config_free(&c);
}

static void test_partition_dense(void)
{
    stage_config c = tiny_cfg("dddddd");
    engine_plan p;
    char err[ERRLEN];
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 3, &p, err, ERRLEN), 0);
    static const int want[] = {0, 2, 4};
    expect_ranges(&p, want, 3);
    CU_ASSERT_EQUAL(p.st[2].last, 5);
    CU_ASSERT_DOUBLE_EQUAL(p.st[0].cost, 2 * 73728.0, 1e-6);
    CU_ASSERT_DOUBLE_EQUAL(p.st[2].cost, 2 * 73728.0 + 2 * 64 * 97, 1e-6);
    double total = 6 * 73728.0 + 2 * 64 * 97;
    CU_ASSERT_DOUBLE_EQUAL(p.st[1].compute_share, 2 * 73728.0 / total, 1e-12);
    CU_ASSERT_EQUAL(p.st[0].weight_bytes, (size_t)(2 * 36992 + 97 * 64) * 4);
    CU_ASSERT_EQUAL(p.st[1].weight_bytes, (size_t)(2 * 36992) * 4);
    CU_ASSERT_EQUAL(p.st[2].weight_bytes, (size_t)(2 * 36992 + 64 + 97 * 64) * 4);
    CU_ASSERT_EQUAL(p.st[0].sparse_in, 0);
    CU_ASSERT_STRING_EQUAL(p.st[0].why, "stage 0 embeds every row");
    CU_ASSERT_STRING_EQUAL(p.st[1].why, "stage 1 has dense layers (2, 3): every row must reach it");
    CU_ASSERT_STRING_EQUAL(p.st[2].why, "stage 2 has dense layers (4, 5): every row must reach it");
    engine_plan_free(&p);
    engine_plan_free(&p);
    engine_plan_free(NULL);

    /* one stage and one stage per layer are both fine */
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 1, &p, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(p.st[0].first, 0);
    CU_ASSERT_EQUAL(p.st[0].last, 5);
    CU_ASSERT_DOUBLE_EQUAL(p.st[0].compute_share, 1.0, 1e-12);
    /* a single stage holds embedding and head once even when tied */
    engine_plan_free(&p);
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 6, &p, err, ERRLEN), 0);
    for (int t = 0; t < 6; t++) CU_ASSERT_EQUAL(p.st[t].first, t);
    engine_plan_free(&p);

    CU_ASSERT_NOT_EQUAL(engine_partition_auto(&c, 8, &p, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(err,
                           "cannot split 6 layers into 8 stages: a stage needs at least one layer");
    CU_ASSERT_PTR_NULL(p.st);
    CU_ASSERT_NOT_EQUAL(engine_partition_auto(&c, 0, &p, err, ERRLEN), 0);
    stage_config_free(&c);
}

static void test_partition_prefers_sparse(void)
{
    engine_plan p;
    char err[ERRLEN];
    /* d d m m m m m m into 2: the cheapest bottleneck is [d][d m*6] (141440 FLOPs), but
     * [d d][m*6] (147456) is within 10% and its boundary carries only routed rows */
    stage_config c = tiny_cfg("ddmmmmmm");
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 2, &p, err, ERRLEN), 0);
    static const int want[] = {0, 2};
    expect_ranges(&p, want, 2);
    CU_ASSERT_EQUAL(p.st[1].sparse_in, 1);
    CU_ASSERT_STRING_EQUAL(p.st[1].why, "");
    engine_plan_free(&p);
    stage_config_free(&c);

    /* d d d m m m into 2: the sparse split [d d d][m m m] is 50% over the optimum: not taken */
    c = tiny_cfg("dddmmm");
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 2, &p, err, ERRLEN), 0);
    static const int want2[] = {0, 2};
    expect_ranges(&p, want2, 2);
    CU_ASSERT_EQUAL(p.st[1].sparse_in, 0);
    CU_ASSERT_STRING_EQUAL(p.st[1].why, "stage 1 has dense layers (2): every row must reach it");
    engine_plan_free(&p);
    stage_config_free(&c);

    /* dense, mod alternating into 3: no stage can be routed-only within budget; 2/2/2 */
    c = tiny_cfg("dmdmdm");
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 3, &p, err, ERRLEN), 0);
    static const int want3[] = {0, 2, 4};
    expect_ranges(&p, want3, 3);
    CU_ASSERT_EQUAL(p.st[1].sparse_in, 0);
    CU_ASSERT_EQUAL(p.st[2].sparse_in, 0);
    CU_ASSERT_STRING_EQUAL(p.st[1].why, "stage 1 has dense layers (2): every row must reach it");
    engine_plan_free(&p);

    /* ... but with 6 stages each mod layer is its own stage: boundaries before them sparse */
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 6, &p, err, ERRLEN), 0);
    for (int t = 1; t < 6; t++) CU_ASSERT_EQUAL(p.st[t].sparse_in, t % 2);
    engine_plan_free(&p);
    stage_config_free(&c);

    /* blocks d m m m d m m m into 4: boundaries land before the mod runs */
    c = tiny_cfg("dmmmdmmm");
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 4, &p, err, ERRLEN), 0);
    static const int want4[] = {0, 1, 4, 5};
    expect_ranges(&p, want4, 4);
    CU_ASSERT_EQUAL(p.st[1].sparse_in, 1);
    CU_ASSERT_EQUAL(p.st[2].sparse_in, 0);
    CU_ASSERT_EQUAL(p.st[3].sparse_in, 1);
    engine_plan_free(&p);
    stage_config_free(&c);

    /* every layer routed: every boundary can be sparse */
    c = tiny_cfg("mmmsss");
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 3, &p, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(p.st[1].sparse_in, 1);
    CU_ASSERT_EQUAL(p.st[2].sparse_in, 1);
    engine_plan_free(&p);
    /* top-k routing is not causal: none can */
    c.mod_routing = STAGE_ROUTING_TOPK;
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 3, &p, err, ERRLEN), 0);
    for (int t = 1; t < 3; t++) {
        CU_ASSERT_EQUAL(p.st[t].sparse_in, 0);
        CU_ASSERT_STRING_EQUAL(p.st[t].why,
                               "topk routing is non-causal: every boundary carries every row");
    }
    engine_plan_free(&p);
    stage_config_free(&c);
}

static void test_partition_why(void)
{
    engine_plan p;
    char err[ERRLEN];
    /* the mixed fixture: dense, mod, mode_staged, mindskip, mode_integrated, mod */
    stage_config c = tiny_cfg("dmskim");
    static const char *const r3[] = {"0-1", "2-3", "4-5"};
    CU_ASSERT_EQUAL_FATAL(engine_partition_explicit(&c, r3, 3, 3, &p, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(p.st[1].why, "stage 1 has mindskip layers (3): every row must reach it");
    CU_ASSERT_STRING_EQUAL(p.st[2].why,
                           "stage 2 has mode_integrated layers (4): every row must reach it");
    engine_plan_free(&p);
    static const char *const r2[] = {"0", "1-5"};
    CU_ASSERT_EQUAL_FATAL(engine_partition_explicit(&c, r2, 2, 2, &p, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(p.st[1].why, "stage 1 has mindskip layers (3) and mode_integrated "
                                        "layers (4): every row must reach it");
    engine_plan_free(&p);
    static const char *const r2b[] = {"0-1", "2"};
    stage_config_free(&c);

    /* the mindskip fixture: dense, dense, mindskip x3, dense */
    c = tiny_cfg("ddkkkd");
    static const char *const r[] = {"0", "1-5"};
    CU_ASSERT_EQUAL_FATAL(engine_partition_explicit(&c, r, 2, 2, &p, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(p.st[1].why, "stage 1 has dense layers (1, 5) and mindskip layers "
                                        "(2-4): every row must reach it");
    engine_plan_free(&p);
    stage_config_free(&c);

    /* all three kinds, and a long layer list stays inside why[] */
    c = tiny_cfg("mdkidkidkidkidkidkidkidkidkidkidkidkidkid");
    static const char *const rl[] = {"0", "1-40"};
    CU_ASSERT_EQUAL_FATAL(engine_partition_explicit(&c, rl, 2, 2, &p, err, ERRLEN), 0);
    CU_ASSERT(tu_contains(p.st[1].why, "stage 1 has dense layers (1, 4, 7,"));
    CU_ASSERT(tu_contains(p.st[1].why, ", ...)"));
    CU_ASSERT(strlen(p.st[1].why) < sizeof p.st[1].why);
    engine_plan_free(&p);
    stage_config_free(&c);

    /* a routed-only stage: sparse, and an explicit single-layer range */
    c = tiny_cfg("ddm");
    CU_ASSERT_EQUAL_FATAL(engine_partition_explicit(&c, r2b, 2, 2, &p, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(p.st[1].first, 2);
    CU_ASSERT_EQUAL(p.st[1].last, 2);
    CU_ASSERT_EQUAL(p.st[1].sparse_in, 1);
    engine_plan_free(&p);
    stage_config_free(&c);
}

static void expect_explicit_err(const stage_config *c, const char *const *r, int n, int stages,
                                const char *msg)
{
    engine_plan p;
    char err[ERRLEN] = "";
    CU_ASSERT_NOT_EQUAL(engine_partition_explicit(c, r, n, stages, &p, err, ERRLEN), 0);
    CU_ASSERT_PTR_NULL(p.st);
    CU_ASSERT_STRING_EQUAL(err, msg);
    if (strcmp(err, msg) != 0) fprintf(stderr, "\n  expected '%s'\n  got      '%s'\n", msg, err);
}

static void test_partition_explicit(void)
{
    stage_config c = tiny_cfg("dmdmdm");
    engine_plan p;
    char err[ERRLEN];
    static const char *const good[] = {"0-1", " 2 - 4 ", "5"};
    CU_ASSERT_EQUAL_FATAL(engine_partition_explicit(&c, good, 3, 3, &p, err, ERRLEN), 0);
    static const int want[] = {0, 2, 5};
    expect_ranges(&p, want, 3);
    CU_ASSERT_EQUAL(p.st[1].last, 4);
    CU_ASSERT_EQUAL(p.st[2].sparse_in, 1); /* [mod] alone */
    CU_ASSERT_DOUBLE_EQUAL(p.st[0].compute_share + p.st[1].compute_share + p.st[2].compute_share,
                           1.0, 1e-12);
    engine_plan_free(&p);

    static const char *const two[] = {"0-2", "3-5"};
    expect_explicit_err(&c, two, 2, 3, "stages: 2 ranges given but the job has 3 ranks");
    static const char *const overlap[] = {"0-2", "2-5"};
    expect_explicit_err(&c, overlap, 2, 2, "stages: ranges '0-2' and '2-5' overlap (layer 2)");
    static const char *const overlap2[] = {"0-3", "2-5"};
    expect_explicit_err(&c, overlap2, 2, 2, "stages: ranges '0-3' and '2-5' overlap (layers 2-3)");
    static const char *const gap[] = {"0-1", "3-5"};
    expect_explicit_err(&c, gap, 2, 2, "stages: layer 2 is in no stage (gap before '3-5')");
    static const char *const late[] = {"2-3", "4-5"};
    expect_explicit_err(&c, late, 2, 2, "stages: layers 0-1 are in no stage (gap before '2-3')");
    static const char *const shortr[] = {"0-1", "2-4"};
    expect_explicit_err(&c, shortr, 2, 2,
                        "stages: layer 5 is in no stage (the model has 6 layers)");
    static const char *const out[] = {"0-2", "3-6"};
    expect_explicit_err(&c, out, 2, 2,
                        "stages: range 2 '3-6' is out of range: the model has 6 layers (0-5)");
    static const char *const empty[] = {"0-2", "5-3"};
    expect_explicit_err(&c, empty, 2, 2, "stages: range 2 '5-3' is empty (5 comes after 3)");
    static const char *const order[] = {"3-5", "0-2"};
    expect_explicit_err(&c, order, 2, 2,
                        "stages: range 2 '0-2' comes before range 1 '3-5': give the ranges in "
                        "layer order");
    static const char *const junk[] = {"0-2", "three"};
    expect_explicit_err(&c, junk, 2, 2,
                        "stages: range 2 'three' is not a layer range like 0-3 or 4 (layers are "
                        "numbered from 0)");
    static const char *const neg[] = {"-1-2", "3-5"};
    expect_explicit_err(&c, neg, 2, 2,
                        "stages: range 1 '-1-2' is not a layer range like 0-3 or 4 (layers are "
                        "numbered from 0)");
    static const char *const blank[] = {"0-2", ""};
    expect_explicit_err(&c, blank, 2, 2,
                        "stages: range 2 '' is not a layer range like 0-3 or 4 (layers are "
                        "numbered from 0)");
    static const char *const trail[] = {"0-2", "3-5x"};
    expect_explicit_err(&c, trail, 2, 2,
                        "stages: range 2 '3-5x' is not a layer range like 0-3 or 4 (layers are "
                        "numbered from 0)");
    stage_config_free(&c);
}

static char *print_plan(const stage_config *c, const engine_plan *p)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    engine_plan_print(c, p, f);
    fclose(f);
    return buf;
}

static void test_plan_print(void)
{
    engine_plan p;
    char err[ERRLEN];
    stage_config c = tiny_cfg("mmmmmm");
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 3, &p, err, ERRLEN), 0);
    char *s = print_plan(&c, &p);
    CU_ASSERT(tu_contains(s, "mod x2"));
    CU_ASSERT(tu_contains(s, "[head]"));
    CU_ASSERT(tu_contains(s, "the head (stage 2) must receive every decode row"));
    CU_ASSERT(tu_contains(s, "2 of 2 boundaries can carry fewer rows than dense"));
    /* plan 0-1 | 2-4 | 5: stage p = 1 - 0.875^k, k = 3 and 1 -> 0.3301, 0.125;
     * prefill (0.3301 + 0.125) / 2 = 22.8%, decode (1 + 0.3301) / 2 = 66.5% */
    CU_ASSERT(p.st[1].first == 2 && p.st[1].last == 4);
    CU_ASSERT(tu_contains(s, "not a measurement: prefill ~22.8%, decode ~66.5%"));
    CU_ASSERT(tu_contains(s, "all (stage 0 embeds every row)"));
    CU_ASSERT(tu_contains(s, "sparse: only the rows its routers select"));
    CU_ASSERT(!strstr(s, "mix routed"));
    free(s);
    engine_plan_free(&p);
    stage_config_free(&c);

    c = tiny_cfg("dmdmdm");
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 3, &p, err, ERRLEN), 0);
    s = print_plan(&c, &p);
    CU_ASSERT(tu_contains(s, "dense, mod"));
    CU_ASSERT(tu_contains(s, "all: stage 1 has dense layers (2): every row must reach it"));
    CU_ASSERT(tu_contains(s, "stages 1, 2 mix routed layers with layers that need every row"));
    CU_ASSERT(tu_contains(s, "0 of 2 boundaries"));
    CU_ASSERT(tu_contains(s, "the same as a dense pipeline"));
    free(s);
    engine_plan_free(&p);
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 1, &p, err, ERRLEN), 0);
    s = print_plan(&c, &p);
    CU_ASSERT(tu_contains(s, "one stage: nothing crosses the wire"));
    free(s);
    engine_plan_free(&p);
    stage_config_free(&c);
}

/* A larger model: the DP stays exact and quick with hundreds of layers and 64 stages. */
static void test_partition_large(void)
{
    char kinds[321];
    for (int i = 0; i < 320; i++) kinds[i] = (i % 4 == 0) ? 'd' : 'm';
    kinds[320] = '\0';
    stage_config c = tiny_cfg(kinds);
    engine_plan p;
    char err[ERRLEN];
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 64, &p, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(p.st[0].first, 0);
    CU_ASSERT_EQUAL(p.st[63].last, 319);
    for (int t = 1; t < 64; t++) CU_ASSERT_EQUAL(p.st[t].first, p.st[t - 1].last + 1);
    engine_plan_free(&p);
    stage_config_free(&c);
}

/* Memory planning, by hand. tiny_cfg: D 64, I 128, 4 heads / 2 KV heads of 16, vocab 97,
 * capacity 0.125. bf16 matrices, f32 vectors (as the loader holds them): a dense layer is
 * 36864 matrix elements + 2 norms of 64 = 74240 bytes, a mod layer adds its router (65 f32). */
static void test_partition_memory(void)
{
    stage_config c = tiny_cfg("dmdm");
    engine_plan p;
    char err[ERRLEN];
    engine_mem_opts mo = {STAGE_BF16, 0, 2, 40, 4, STAGE_BF16};
    const char *r2[] = {"0-1", "2-3"};
    CU_ASSERT_EQUAL_FATAL(engine_partition_explicit_mem(&c, r2, 2, 2, &mo, &p, err, ERRLEN), 0);
    CU_ASSERT(p.have_mem);
    /* stage 0: two layers + embedding 97 x 64 + layer 3's router; stage 1: two layers + f32
     * norm + lm_head + layer 1's router */
    CU_ASSERT_EQUAL(p.st[0].weight_bytes, (size_t)74240 + 74500 + 97 * 64 * 2 + 260);
    CU_ASSERT_EQUAL(p.st[1].weight_bytes, (size_t)74240 + 74500 + 64 * 4 + 97 * 64 * 2 + 260);
    /* KV per slot and entry: K and V of 32 floats + a position = 260 bytes; the dense layer
     * holds 40 positions, the mod layer ceil(0.125 * 40 * 1.25) + 8 = 15; two slots */
    CU_ASSERT_EQUAL(p.st[0].kv_bytes, (size_t)2 * (40 + 15) * 260);
    CU_ASSERT_EQUAL(p.st[1].kv_bytes, (size_t)2 * (40 + 15) * 260);
    /* workspace: 4 rows x 4 bytes x (8D + 2qd + 2kvd + 2I + gate 6 + 2 + 5 + pipeline 4D + 8
     * = 1237) + 4 x (ctx + 1 + D) = 20212; the head adds 4 x 4 x 97 logits + 8 x 97 scratch;
     * and the runtime allowance */
    size_t rt = ENGINE_RUNTIME_BYTES;
    CU_ASSERT_EQUAL(p.st[0].work_bytes, (size_t)20212 + rt);
    CU_ASSERT_EQUAL(p.st[1].work_bytes, (size_t)20212 + 4 * 4 * 97 + 8 * 97 + rt);
    for (int t = 0; t < 2; t++)
        CU_ASSERT_EQUAL(p.st[t].mem_bytes,
                        p.st[t].weight_bytes + p.st[t].kv_bytes + p.st[t].work_bytes);
    size_t need1 = p.st[1].mem_bytes;
    CU_ASSERT(need1 > p.st[0].mem_bytes);
    engine_plan_free(&p);

    /* the same plan in f32 (plain variant) */
    CU_ASSERT_EQUAL_FATAL(engine_partition_explicit(&c, r2, 2, 2, &p, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(p.st[0].weight_bytes, (size_t)(36992 + 37057 + 97 * 64 + 65) * 4);
    CU_ASSERT(!p.have_mem);
    engine_plan_free(&p);

    /* a limit one byte short of stage 1: refused, naming the stage and what it needs */
    mo.mem_per_rank = need1 - 1;
    CU_ASSERT_NOT_EQUAL(engine_partition_explicit_mem(&c, r2, 2, 2, &mo, &p, err, ERRLEN), 0);
    ASSERT_HAS(err, "stages: stage 1 does not fit --mem-per-rank 40.2 MiB: its layers 2-3 need "
                    "40.2 MiB (weights 0.2 MiB bf16, KV 0.0 MiB, workspace 40.0 MiB)");
    CU_ASSERT_PTR_NULL(p.st);
    mo.mem_per_rank = need1;
    CU_ASSERT_EQUAL(engine_partition_explicit_mem(&c, r2, 2, 2, &mo, &p, err, ERRLEN), 0);
    engine_plan_free(&p);
    stage_config_free(&c);

    /* auto: a big vocab makes the head the costly stage, so the cost optimum puts 5 of 6
     * layers on stage 0 (0-4 | 5); a limit that holds only 4 layers + the embedding moves
     * the split to 0-3 | 4-5 */
    c = tiny_cfg("dddddd");
    c.vocab = 4000;
    engine_mem_opts m2 = {STAGE_BF16, 0, 1, 8, 1, STAGE_BF16};
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto_mem(&c, 2, &m2, &p, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(p.st[1].first, 5);
    size_t stage0_5 = p.st[0].mem_bytes;
    engine_plan_free(&p);
    const char *r43[] = {"0-3", "4-5"};
    CU_ASSERT_EQUAL_FATAL(engine_partition_explicit_mem(&c, r43, 2, 2, &m2, &p, err, ERRLEN), 0);
    /* one dense layer (74240 bytes) and its 8-position KV of 260-byte entries */
    CU_ASSERT_EQUAL(stage0_5 - p.st[0].mem_bytes, (size_t)74240 + 8 * 260);
    m2.mem_per_rank = p.st[0].mem_bytes > p.st[1].mem_bytes ? p.st[0].mem_bytes : p.st[1].mem_bytes;
    engine_plan_free(&p);
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto_mem(&c, 2, &m2, &p, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(p.st[1].first, 4);
    for (int t = 0; t < 2; t++) CU_ASSERT(p.st[t].mem_bytes <= m2.mem_per_rank);
    char *txt = print_plan(&c, &p);
    ASSERT_HAS(txt, "KV MiB  work MiB  total MiB");
    ASSERT_HAS(txt, "total weights 1.40 MiB (bf16, as in the checkpoint)"); /* 1469696 bytes */
    ASSERT_HAS(txt, "KV for 1 sequence of 8 positions");
    ASSERT_HAS(txt, "of --mem-per-rank 40.8 MiB");
    free(txt);
    engine_plan_free(&p);
    /* nothing fits: the message names the best plan's largest stage */
    m2.mem_per_rank = 1 << 20;
    CU_ASSERT_NOT_EQUAL(engine_partition_auto_mem(&c, 2, &m2, &p, err, ERRLEN), 0);
    ASSERT_HAS(err, "no split of 6 layers into 2 stages fits --mem-per-rank 1.0 MiB: in the best "
                    "one, layers 3-5 need 40.8 MiB (weights 0.7 MiB bf16");
    ASSERT_HAS(err, "use more ranks or a larger limit");
    stage_config_free(&c);
}

/* The plan's weight bytes are what the loader holds: every fixture (f32, bf16; dense, mod,
 * predictor, topk, MoDE, mindskip, mixed; the block families), as stored and at q8_0, each
 * stage of a 3-stage plan. */
static void test_plan_weights_match_loader(void)
{
    static const char *models[] = {"dense", "mod", "mod_all", "mod_predictor", "mod_topk",
                                   "mode_staged", "mode_integrated", "mindskip", "mixed",
                                   /* docs/SPEC.md §10: biases, q/k norms, tied, MoDE */
                                   "arch/llama3", "arch/qwen2", "arch/qwen3_mod", "arch/qwen3_mode",
                                   "arch/mistral_mod"};
    const char *fix = getenv("MODPIPE_FIXTURES") ? getenv("MODPIPE_FIXTURES") : "tests/fixtures";
    for (size_t i = 0; i < sizeof models / sizeof *models; i++) {
        char dir[512], err[ERRLEN];
        snprintf(dir, sizeof dir, "%s/%s", fix, models[i]);
        stage_config c;
        CU_ASSERT_EQUAL_FATAL(stage_config_load(dir, &c, err, ERRLEN), 0);
        engine_mem_opts mo = {STAGE_F32, 0, 1, 16, 4, STAGE_F32};
        CU_ASSERT_EQUAL_FATAL(engine_weight_dtype(dir, &mo.weight_dtype, err, ERRLEN), 0);
        mo.keep_dtype = mo.weight_dtype;
        for (int q8 = 0; q8 < 2; q8++) { /* as stored, then --weights-dtype q8_0 */
            if (q8) mo.weight_dtype = STAGE_Q8_0;
            engine_plan p;
            CU_ASSERT_EQUAL_FATAL(engine_partition_auto_mem(&c, 3, &mo, &p, err, ERRLEN), 0);
            for (int t = 0; t < 3; t++) {
                stage_range r = {p.st[t].first, p.st[t].last, t == 0, t == 2};
                stage_model *m = NULL;
                CU_ASSERT_EQUAL_FATAL(
                    stage_model_load_dtype(dir, &c, r, q8 ? STAGE_Q8_0 : -1, &m, err, ERRLEN), 0);
                size_t got = stage_model_weight_bytes(m);
                CU_ASSERT_EQUAL(p.st[t].weight_bytes, got);
                if (p.st[t].weight_bytes != got)
                    fprintf(stderr, "\n  %s %s stage %d: plan %zu bytes, loader %zu\n", models[i],
                            stage_wdtype_name(mo.weight_dtype), t, p.st[t].weight_bytes, got);
                stage_model_free(m);
            }
            engine_plan_free(&p);
        }
        stage_config_free(&c);
    }
}

static void test_parse_size(void)
{
    size_t v = 0;
    CU_ASSERT(engine_parse_size("6G", &v) == 0 && v == (size_t)6 << 30);
    CU_ASSERT(engine_parse_size("5000M", &v) == 0 && v == (size_t)5000 << 20);
    CU_ASSERT(engine_parse_size("1.5GiB", &v) == 0 && v == (size_t)3 << 29);
    CU_ASSERT(engine_parse_size("512k", &v) == 0 && v == (size_t)512 << 10);
    CU_ASSERT(engine_parse_size("100", &v) == 0 && v == 100);
    CU_ASSERT(engine_parse_size("64MB", &v) == 0 && v == (size_t)64 << 20);
    static const char *bad[] = {"", "G", "6X", "-1G", "6GG", "6 G B", "nan", NULL};
    for (int i = 0; bad[i]; i++) CU_ASSERT_NOT_EQUAL(engine_parse_size(bad[i], &v), 0);
    CU_ASSERT_NOT_EQUAL(engine_parse_size(NULL, &v), 0);
}

/* The dtype comes from the safetensors headers, not from config.json. */
static void test_weight_dtype(void)
{
    char err[ERRLEN];
    char *d = make_tmpdir_tagged("cluster");
    CU_ASSERT_PTR_NOT_NULL_FATAL(d);
    stage_dtype dt = STAGE_F32;
    CU_ASSERT_NOT_EQUAL(engine_weight_dtype(d, &dt, err, ERRLEN), 0); /* no model */
    float v[4] = {0};
    int64_t sh[2] = {2, 2};
    st_writer *w = st_writer_new();
    CU_ASSERT_EQUAL(st_writer_add(w, "model.embed_tokens.weight", STAGE_F16, 2, sh, v), 0);
    CU_ASSERT_EQUAL_FATAL(st_writer_save(w, d, 1, err, ERRLEN), 0);
    st_writer_free(w);
    CU_ASSERT_EQUAL(engine_weight_dtype(d, &dt, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(dt, STAGE_F16);
    w = st_writer_new();
    CU_ASSERT_EQUAL(st_writer_add(w, "model.embed_tokens.weight", STAGE_F32, 2, sh, v), 0);
    CU_ASSERT_EQUAL(
        st_writer_add(w, "model.layers.0.self_attn.q_proj.weight", STAGE_BF16, 2, sh, v), 0);
    CU_ASSERT_EQUAL_FATAL(st_writer_save(w, d, 1, err, ERRLEN), 0);
    st_writer_free(w);
    CU_ASSERT_EQUAL(engine_weight_dtype(d, &dt, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(dt, STAGE_BF16); /* the projections decide */
    w = st_writer_new();
    CU_ASSERT_EQUAL(st_writer_add(w, "other", STAGE_F32, 2, sh, v), 0);
    CU_ASSERT_EQUAL_FATAL(st_writer_save(w, d, 1, err, ERRLEN), 0);
    st_writer_free(w);
    CU_ASSERT_NOT_EQUAL(engine_weight_dtype(d, &dt, err, ERRLEN), 0);
    ASSERT_HAS(err, "to read the weight dtype from");
    rm_tmpdir(d);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    CU_pSuite p = CU_add_suite("partition", NULL, NULL);
    if (!p || !CU_add_test(p, "layer cost model", test_layer_cost) ||
        !CU_add_test(p, "dense model", test_partition_dense) ||
        !CU_add_test(p, "prefers sparse boundaries within 10%", test_partition_prefers_sparse) ||
        !CU_add_test(p, "why strings", test_partition_why) ||
        !CU_add_test(p, "explicit ranges", test_partition_explicit) ||
        !CU_add_test(p, "printed plan", test_plan_print) ||
        !CU_add_test(p, "320 layers, 64 stages", test_partition_large) ||
        !CU_add_test(p, "memory per stage, --mem-per-rank", test_partition_memory) ||
        !CU_add_test(p, "plan weight bytes = the loader's, every fixture",
                     test_plan_weights_match_loader) ||
        !CU_add_test(p, "sizes like 6G / 5000M", test_parse_size) ||
        !CU_add_test(p, "weight dtype from the headers", test_weight_dtype)) {
        CU_cleanup_registry();
        return 2;
    }
    return tu_cunit_run();
}
