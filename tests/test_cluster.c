/* tests/test_cluster.c — the YAML config reader (cli/yamlcfg.h) and model specs
 * (cli/modelspec.h) (CUnit); the partitioner is tested in tests/test_partition.c. */
#include <CUnit/Basic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/modelspec.h"
#include "engine/partition.h"
#include "cli/yamlcfg.h"
#include "stage/safetensors.h"
#include "stage/stage.h"
#include "tests/testutil.h"

#define ERRLEN 512

/* ---- helpers --------------------------------------------------------------------------------- */

static int yparse(const char *text, cli_yaml *y, char *err)
{
    err[0] = '\0';
    return cli_yaml_parse(text, strlen(text), "t.yaml", y, err, ERRLEN);
}

/* Parse must fail with an error that starts with `prefix`. */
static void expect_yaml_err(const char *text, const char *prefix)
{
    cli_yaml y;
    char err[ERRLEN];
    int rc = yparse(text, &y, err);
    CU_ASSERT_NOT_EQUAL(rc, 0);
    CU_ASSERT_EQUAL(strncmp(err, prefix, strlen(prefix)), 0);
    if (strncmp(err, prefix, strlen(prefix)) != 0)
        fprintf(stderr, "\n  expected prefix '%s'\n  got '%s'\n", prefix, err);
    CU_ASSERT_EQUAL(y.n, 0);
    CU_ASSERT_PTR_NULL(y.e);
    cli_yaml_free(&y);
}

static int spec_parse(const char *text, cli_model_spec *s, char *err)
{
    err[0] = '\0';
    return cli_model_spec_parse(text, strlen(text), "m.yaml", s, err, ERRLEN);
}

static void expect_spec_err(const char *text, const char *msg)
{
    cli_model_spec s;
    char err[ERRLEN];
    int rc = spec_parse(text, &s, err);
    CU_ASSERT_NOT_EQUAL(rc, 0);
    CU_ASSERT_PTR_NULL(s.cfg.layer_kind);
    CU_ASSERT(tu_contains(err, msg));
    cli_model_spec_free(&s);
}

/* ---- YAML ------------------------------------------------------------------------------------ */

static void test_yaml_flatten(void)
{
    const char *text = "# a run config\n"
                       "model: out/demo\n"
                       "mod:\n"
                       "  capacity: 0.25\n"
                       "  deeper:\n"
                       "    x: \"quoted\"\n"
                       "stages: [0-1, '2-3',  4-5]\n"
                       "prompt-ids:\n"
                       "  - 1,2,3\n"
                       "  - 4\n"
                       "empty: []\n"
                       "flow: {a: 1, b: [x]}\n";
    cli_yaml y;
    char err[ERRLEN];
    CU_ASSERT_EQUAL_FATAL(yparse(text, &y, err), 0);
    CU_ASSERT_EQUAL_FATAL(y.n, 8);
    CU_ASSERT_STRING_EQUAL(y.path, "t.yaml");
    static const struct {
        const char *key;
        int is_list, n, line, col;
        const char *v0;
    } want[] = {
        {"model", 0, 1, 2, 8, "out/demo"},      {"mod.capacity", 0, 1, 4, 13, "0.25"},
        {"mod.deeper.x", 0, 1, 6, 8, "quoted"}, {"stages", 1, 3, 7, 9, "0-1"},
        {"prompt-ids", 1, 2, 9, 3, "1,2,3"},    {"empty", 1, 0, 11, 8, NULL},
        {"flow.a", 0, 1, 12, 11, "1"},          {"flow.b", 1, 1, 12, 17, "x"},
    };
    for (int i = 0; i < 8; i++) {
        const cli_yaml_entry *e = &y.e[i];
        CU_ASSERT_STRING_EQUAL(e->key, want[i].key);
        CU_ASSERT_EQUAL(e->is_list, want[i].is_list);
        CU_ASSERT_EQUAL(e->n_vals, want[i].n);
        CU_ASSERT_EQUAL(e->line, want[i].line);
        CU_ASSERT_EQUAL(e->col, want[i].col);
        if (want[i].v0) CU_ASSERT_STRING_EQUAL(e->vals[0], want[i].v0);
    }
    const cli_yaml_entry *st = cli_yaml_get(&y, "stages");
    CU_ASSERT_PTR_EQUAL(st, &y.e[3]);
    CU_ASSERT_STRING_EQUAL(st->vals[1], "2-3");
    CU_ASSERT_STRING_EQUAL(st->vals[2], "4-5");
    CU_ASSERT_STRING_EQUAL(cli_yaml_get(&y, "prompt-ids")->vals[1], "4");
    CU_ASSERT_PTR_NULL(cli_yaml_get(&y, "mod"));
    CU_ASSERT_PTR_NULL(cli_yaml_get(&y, "nope"));
    CU_ASSERT_PTR_NULL(cli_yaml_get(NULL, "model"));
    cli_yaml_free(&y);
    cli_yaml_free(&y); /* freed twice: the struct was zeroed */
    cli_yaml_free(NULL);
}

static void test_yaml_empty(void)
{
    cli_yaml y;
    char err[ERRLEN];
    CU_ASSERT_EQUAL(yparse("", &y, err), 0);
    CU_ASSERT_EQUAL(y.n, 0);
    cli_yaml_free(&y);
    CU_ASSERT_EQUAL(yparse("# nothing but a comment\n", &y, err), 0);
    CU_ASSERT_EQUAL(y.n, 0);
    cli_yaml_free(&y);
    /* a key without a value is an empty scalar */
    CU_ASSERT_EQUAL_FATAL(yparse("a:\nb: 1\n", &y, err), 0);
    CU_ASSERT_EQUAL_FATAL(y.n, 2);
    CU_ASSERT_EQUAL(y.e[0].is_list, 0);
    CU_ASSERT_STRING_EQUAL(y.e[0].vals[0], "");
    cli_yaml_free(&y);
}

static void test_yaml_syntax_errors(void)
{
    /* the second line is indented under a scalar: libyaml stops at its ':' */
    expect_yaml_err("model: a\n stages: 2\n", "t.yaml:2:8: mapping values are not allowed");
    expect_yaml_err("a:\n  b: 1\n   c: 2\n", "t.yaml:3:5: mapping values are not allowed");
    /* unclosed flow sequence: found at the end of the input, line 3 col 1 (after 2 lines) */
    expect_yaml_err("x: 1\nstages: [0-1, 2-3\n", "t.yaml:3:1: did not find expected ',' or ']'");
    CU_ASSERT(1);
    cli_yaml y;
    char err[ERRLEN];
    CU_ASSERT_NOT_EQUAL(yparse("x: 1\nstages: [0-1, 2-3\n", &y, err), 0);
    CU_ASSERT(tu_contains(err, "while parsing a flow sequence at 2:9"));
    expect_yaml_err("a: {x: 1\n", "t.yaml:2:1: did not find expected ',' or '}'");
    expect_yaml_err("a: \"open\n", "t.yaml:2:1: found unexpected end of stream");
    expect_yaml_err("a: 1\nb: @x\n", "t.yaml:2:4: found character that cannot start any token");
    /* invalid UTF-8: a reader error, positioned from its byte offset */
    expect_yaml_err("ok: 1\nv: \xff\n", "t.yaml:2:4: invalid leading UTF-8 octet");
}

static void test_yaml_structure_errors(void)
{
    expect_yaml_err("- a\n- b\n", "t.yaml:1:1: the top level must be a mapping");
    expect_yaml_err("just a scalar\n", "t.yaml:1:1: the top level must be a mapping");
    expect_yaml_err("a: 1\na: 2\n", "t.yaml:2:1: key a given twice (first value at 1:4)");
    /* nested and dotted spellings of one key collide too */
    expect_yaml_err("mod:\n  capacity: 0.5\nmod.capacity: 0.2\n",
                    "t.yaml:3:1: key mod.capacity given twice (first value at 2:13)");
    expect_yaml_err("m:\n  x: 1\n  x: 2\n", "t.yaml:3:3: key m.x given twice");
    expect_yaml_err("a:\n  - [1, 2]\n", "t.yaml:2:5: a: item 1 is a list");
    /* a list item may be a flat mapping ("k=v k=v"), not a nested one */
    expect_yaml_err("a:\n  - ok\n  - k: {x: 1}\n",
                    "t.yaml:3:5: a: item 2: a mapping in a list may only hold plain");
    expect_yaml_err("a:\n  - k: x=1\n", "t.yaml:2:5: a: item 1: a mapping in a list");
    {
        const char *txt = "stages:\n  - {layers: \"0-2\", ranks: 2}\n  - layers: 3-5\n";
        cli_yaml y;
        char err[256];
        CU_ASSERT_EQUAL_FATAL(cli_yaml_parse(txt, strlen(txt), "t.yaml", &y, err, sizeof err), 0);
        const cli_yaml_entry *e = cli_yaml_get(&y, "stages");
        CU_ASSERT_FATAL(e && e->is_list && e->n_vals == 2);
        CU_ASSERT_STRING_EQUAL(e->vals[0], "layers=0-2 ranks=2");
        CU_ASSERT_STRING_EQUAL(e->vals[1], "layers=3-5");
        cli_yaml_free(&y);
    }
    expect_yaml_err("? [a, b]\n: 1\n", "t.yaml:1:3: a key must be a plain value");
    expect_yaml_err("a: &x 1\nb: 2\n", "t.yaml:1:4: anchors (&name) are not supported");
    expect_yaml_err("a: &x 1\nb: *x\n", "t.yaml:1:4: anchors");
    expect_yaml_err("b: *x\n", "t.yaml:1:4: found undefined alias");
    expect_yaml_err("a: 1\n---\nb: 2\n", "t.yaml:3:1: a second YAML document");
}

static void test_yaml_check_keys(void)
{
    cli_yaml y;
    char err[ERRLEN];
    CU_ASSERT_EQUAL_FATAL(yparse("model: m\nmod:\n  capcity: 0.3\n", &y, err), 0);
    static const char *const ok[] = {"model", "mod.capacity", NULL};
    CU_ASSERT_NOT_EQUAL(cli_yaml_check_keys(&y, ok, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(err, "t.yaml:3:12: unknown key mod.capcity");
    static const char *const ok2[] = {"model", "mod.capcity", NULL};
    CU_ASSERT_EQUAL(cli_yaml_check_keys(&y, ok2, err, ERRLEN), 0);
    cli_yaml_free(&y);
}

static void test_yaml_typed(void)
{
    cli_yaml y;
    char err[ERRLEN];
    const char *text = "n: 42\nneg: -7\nbig: 100000000000000000000000\nf: 1.5e-3\n"
                       "word: abc\nlist: [1, 2]\nyes: Yes\nno: off\nt: true\nhalf: 12x\n"
                       "nan: nan\nhex: 0x10\n";
    CU_ASSERT_EQUAL_FATAL(yparse(text, &y, err), 0);
    long v;
    double d;
    int b;
    CU_ASSERT_EQUAL(cli_yaml_int(&y, cli_yaml_get(&y, "n"), 0, 100, &v, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(v, 42);
    CU_ASSERT_EQUAL(cli_yaml_int(&y, cli_yaml_get(&y, "neg"), -10, 0, &v, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(v, -7);
    CU_ASSERT_NOT_EQUAL(cli_yaml_int(&y, cli_yaml_get(&y, "n"), 0, 10, &v, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(err, "t.yaml:1:4: n: expected an integer in [0, 10], got '42'");
    CU_ASSERT_NOT_EQUAL(cli_yaml_int(&y, cli_yaml_get(&y, "neg"), 0, 10, &v, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(err, "t.yaml:2:6: neg: expected an integer in [0, 10], got '-7'");
    CU_ASSERT_NOT_EQUAL(cli_yaml_int(&y, cli_yaml_get(&y, "big"), 0, 10, &v, err, ERRLEN), 0);
    CU_ASSERT(tu_contains(err, "t.yaml:3:6: big: expected an integer"));
    CU_ASSERT_NOT_EQUAL(cli_yaml_int(&y, cli_yaml_get(&y, "f"), 0, 10, &v, err, ERRLEN), 0);
    CU_ASSERT(tu_contains(err, "t.yaml:4:4: f: expected an integer"));
    CU_ASSERT_NOT_EQUAL(cli_yaml_int(&y, cli_yaml_get(&y, "half"), 0, 100, &v, err, ERRLEN), 0);
    CU_ASSERT(tu_contains(err, "got '12x'"));
    CU_ASSERT_NOT_EQUAL(cli_yaml_int(&y, cli_yaml_get(&y, "list"), 0, 10, &v, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(err, "t.yaml:6:7: list: expected an integer in [0, 10], got a list");
    CU_ASSERT_NOT_EQUAL(cli_yaml_int(&y, NULL, 0, 10, &v, err, ERRLEN), 0);

    CU_ASSERT_EQUAL(cli_yaml_double(&y, cli_yaml_get(&y, "f"), 0, 1, &d, err, ERRLEN), 0);
    CU_ASSERT_DOUBLE_EQUAL(d, 1.5e-3, 1e-15);
    CU_ASSERT_NOT_EQUAL(cli_yaml_double(&y, cli_yaml_get(&y, "n"), 0, 1, &d, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(err, "t.yaml:1:4: n: expected a number in [0, 1], got '42'");
    CU_ASSERT_NOT_EQUAL(cli_yaml_double(&y, cli_yaml_get(&y, "word"), 0, 1, &d, err, ERRLEN), 0);
    CU_ASSERT(tu_contains(err, "t.yaml:5:7: word: expected a number"));
    CU_ASSERT_NOT_EQUAL(cli_yaml_double(&y, cli_yaml_get(&y, "nan"), -1e9, 1e9, &d, err, ERRLEN),
                        0);
    CU_ASSERT_NOT_EQUAL(cli_yaml_double(&y, cli_yaml_get(&y, "hex"), -1e9, 1e9, &d, err, ERRLEN),
                        0);

    CU_ASSERT_EQUAL(cli_yaml_bool(&y, cli_yaml_get(&y, "yes"), &b, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(b, 1);
    CU_ASSERT_EQUAL(cli_yaml_bool(&y, cli_yaml_get(&y, "no"), &b, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(b, 0);
    CU_ASSERT_EQUAL(cli_yaml_bool(&y, cli_yaml_get(&y, "t"), &b, err, ERRLEN), 0);
    CU_ASSERT_EQUAL(b, 1);
    CU_ASSERT_NOT_EQUAL(cli_yaml_bool(&y, cli_yaml_get(&y, "n"), &b, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(err, "t.yaml:1:4: n: expected true or false, got '42'");
    cli_yaml_free(&y);
}

static void test_yaml_load_file(void)
{
    char path[] = "/tmp/test_cluster_XXXXXX";
    int fd = mkstemp(path);
    CU_ASSERT_FATAL(fd >= 0);
    const char *text = "a:\n  b: [x, y]\n";
    CU_ASSERT_EQUAL(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    cli_yaml y;
    char err[ERRLEN];
    CU_ASSERT_EQUAL_FATAL(cli_yaml_load(path, &y, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(y.path, path);
    CU_ASSERT_EQUAL(y.n, 1);
    CU_ASSERT_STRING_EQUAL(y.e[0].key, "a.b");
    CU_ASSERT_EQUAL(y.e[0].line, 2);
    CU_ASSERT_EQUAL(y.e[0].col, 6);
    cli_yaml_free(&y);
    unlink(path);
    CU_ASSERT_NOT_EQUAL(cli_yaml_load("/nonexistent/x.yaml", &y, err, ERRLEN), 0);
    CU_ASSERT(tu_contains(err, "/nonexistent/x.yaml: cannot open"));
}

/* ---- model spec ------------------------------------------------------------------------------ */

static void test_spec_full(void)
{
    const char *text = "hidden_size: 64\n"
                       "intermediate_size: 128\n"
                       "num_attention_heads: 4\n"
                       "num_key_value_heads: 2\n"
                       "num_hidden_layers: 6\n"
                       "vocab_size: 97\n"
                       "rms_norm_eps: 1.0e-6\n"
                       "rope_theta: 500000\n"
                       "max_position_embeddings: 256\n"
                       "tie_word_embeddings: true\n"
                       "layer_types: [dense, mod, mode_staged, mindskip, mode_integrated, mod]\n"
                       "mod:\n"
                       "  capacity: 0.25\n"
                       "  routing: predictor\n"
                       "  threshold: 0.4\n"
                       "  router_scale: sigmoid\n"
                       "  router_bias: false\n"
                       "  predictor_hidden: 8\n"
                       "mode:\n"
                       "  num_experts: 8\n"
                       "  num_noop_experts: 1\n"
                       "  experts_per_token: 2\n"
                       "  expert_intermediate_size: 64\n"
                       "mindskip:\n"
                       "  granularity: token\n"
                       "  threshold: 0.6\n"
                       "init:\n"
                       "  seed: 1234\n"
                       "  std: 0.05\n"
                       "  router_std: 2.0\n"
                       "output:\n"
                       "  dtype: bf16\n"
                       "  shards: 3\n"
                       "calibrate:\n"
                       "  enabled: true\n"
                       "  prompts: 8\n"
                       "  length: 24\n";
    cli_model_spec s;
    char err[ERRLEN];
    int rc = spec_parse(text, &s, err);
    if (rc) fprintf(stderr, "\n  %s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    const stage_config *c = &s.cfg;
    CU_ASSERT_EQUAL(c->hidden, 64);
    CU_ASSERT_EQUAL(c->inter, 128);
    CU_ASSERT_EQUAL(c->n_heads, 4);
    CU_ASSERT_EQUAL(c->n_kv_heads, 2);
    CU_ASSERT_EQUAL(c->head_dim, 16);
    CU_ASSERT_EQUAL(c->n_layers, 6);
    CU_ASSERT_EQUAL(c->vocab, 97);
    CU_ASSERT_EQUAL(c->max_pos, 256);
    CU_ASSERT_DOUBLE_EQUAL(c->eps, 1e-6, 1e-12);
    CU_ASSERT_DOUBLE_EQUAL(c->rope_theta, 500000.0, 1e-3);
    CU_ASSERT_EQUAL(c->tie_embeddings, 1);
    CU_ASSERT_EQUAL(c->eos_token_id, -1);
    static const stage_kind kinds[6] = {STAGE_KIND_DENSE,           STAGE_KIND_MOD,
                                        STAGE_KIND_MODE_STAGED,     STAGE_KIND_MINDSKIP,
                                        STAGE_KIND_MODE_INTEGRATED, STAGE_KIND_MOD};
    for (int i = 0; i < 6; i++) CU_ASSERT_EQUAL(c->layer_kind[i], kinds[i]);
    CU_ASSERT_DOUBLE_EQUAL(c->mod_capacity, 0.25, 1e-7);
    CU_ASSERT_EQUAL(c->mod_routing, STAGE_ROUTING_PREDICTOR);
    CU_ASSERT_DOUBLE_EQUAL(c->mod_threshold, 0.4, 1e-7);
    CU_ASSERT_EQUAL(c->mod_scale, STAGE_SCALE_SIGMOID);
    CU_ASSERT_EQUAL(c->n_experts, 8);
    CU_ASSERT_EQUAL(c->n_noop_experts, 1);
    CU_ASSERT_EQUAL(c->experts_per_token, 2);
    CU_ASSERT_EQUAL(c->expert_inter, 64);
    CU_ASSERT_EQUAL(c->ms_granularity, STAGE_GRAN_TOKEN);
    CU_ASSERT_DOUBLE_EQUAL(c->ms_threshold, 0.6, 1e-7);
    CU_ASSERT_EQUAL(s.router_bias, 0);
    CU_ASSERT_EQUAL(s.predictor_hidden, 8);
    CU_ASSERT_EQUAL(s.seed, 1234UL);
    CU_ASSERT_DOUBLE_EQUAL(s.init_std, 0.05, 1e-7);
    CU_ASSERT_DOUBLE_EQUAL(s.router_std, 2.0, 1e-7);
    CU_ASSERT_EQUAL(s.dtype, STAGE_BF16);
    CU_ASSERT_EQUAL(s.shards, 3);
    CU_ASSERT_EQUAL(s.calibrate, 1);
    CU_ASSERT_EQUAL(s.calib_prompts, 8);
    CU_ASSERT_EQUAL(s.calib_length, 24);
    cli_model_spec_free(&s);
    CU_ASSERT_PTR_NULL(s.cfg.layer_kind);
    cli_model_spec_free(&s);
    cli_model_spec_free(NULL);
}

static void test_spec_defaults(void)
{
    const char *text = "hidden_size: 32\nintermediate_size: 48\nnum_attention_heads: 2\n"
                       "num_hidden_layers: 3\nvocab_size: 50\n";
    cli_model_spec s;
    char err[ERRLEN];
    CU_ASSERT_EQUAL_FATAL(spec_parse(text, &s, err), 0);
    const stage_config *c = &s.cfg;
    CU_ASSERT_EQUAL(c->n_kv_heads, 2);
    CU_ASSERT_EQUAL(c->head_dim, 16);
    CU_ASSERT_EQUAL(c->max_pos, 2048);
    CU_ASSERT_DOUBLE_EQUAL(c->eps, 1e-5, 1e-12);
    CU_ASSERT_DOUBLE_EQUAL(c->rope_theta, 10000.0, 1e-6);
    CU_ASSERT_EQUAL(c->tie_embeddings, 0);
    CU_ASSERT_EQUAL(c->eos_token_id, -1);
    for (int i = 0; i < 3; i++) CU_ASSERT_EQUAL(c->layer_kind[i], STAGE_KIND_DENSE);
    CU_ASSERT_DOUBLE_EQUAL(c->mod_capacity, 0.125, 1e-9);
    CU_ASSERT_EQUAL(c->mod_routing, STAGE_ROUTING_THRESHOLD);
    CU_ASSERT_DOUBLE_EQUAL(c->mod_threshold, 0.5, 1e-9);
    CU_ASSERT_EQUAL(c->mod_scale, STAGE_SCALE_NONE);
    CU_ASSERT_EQUAL(c->n_experts, 4);
    CU_ASSERT_EQUAL(c->n_noop_experts, 0);
    CU_ASSERT_EQUAL(c->experts_per_token, 1);
    CU_ASSERT_EQUAL(c->expert_inter, 48);
    CU_ASSERT_EQUAL(c->ms_granularity, STAGE_GRAN_SEQUENCE);
    CU_ASSERT_DOUBLE_EQUAL(c->ms_threshold, 0.5, 1e-9);
    CU_ASSERT_EQUAL(s.router_bias, 1);
    CU_ASSERT_EQUAL(s.predictor_hidden, 16);
    CU_ASSERT_EQUAL(s.seed, 0UL);
    CU_ASSERT_DOUBLE_EQUAL(s.init_std, 0.02, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(s.router_std, 1.0, 1e-9);
    CU_ASSERT_EQUAL(s.dtype, STAGE_F32);
    CU_ASSERT_EQUAL(s.shards, 1);
    CU_ASSERT_EQUAL(s.calibrate, 0);
    CU_ASSERT_EQUAL(s.calib_prompts, 16);
    CU_ASSERT_EQUAL(s.calib_length, 32);
    cli_model_spec_free(&s);
}

static void test_spec_layer_pattern(void)
{
    cli_model_spec s;
    char err[ERRLEN];
    const char *base = "hidden_size: 64\nintermediate_size: 128\nnum_attention_heads: 4\n"
                       "vocab_size: 97\n";
    char text[1024];
    /* repeated, and cut where the layers end */
    snprintf(text, sizeof text, "%snum_hidden_layers: 7\nlayer_pattern: [dense, mod, mindskip]\n",
             base);
    CU_ASSERT_EQUAL_FATAL(spec_parse(text, &s, err), 0);
    static const stage_kind want[7] = {STAGE_KIND_DENSE, STAGE_KIND_MOD, STAGE_KIND_MINDSKIP,
                                       STAGE_KIND_DENSE, STAGE_KIND_MOD, STAGE_KIND_MINDSKIP,
                                       STAGE_KIND_DENSE};
    CU_ASSERT_EQUAL(s.cfg.n_layers, 7);
    for (int i = 0; i < 7; i++) CU_ASSERT_EQUAL(s.cfg.layer_kind[i], want[i]);
    cli_model_spec_free(&s);
    /* block-list form, one kind */
    snprintf(text, sizeof text, "%snum_hidden_layers: 4\nlayer_pattern:\n  - mode_staged\n", base);
    CU_ASSERT_EQUAL_FATAL(spec_parse(text, &s, err), 0);
    for (int i = 0; i < 4; i++) CU_ASSERT_EQUAL(s.cfg.layer_kind[i], STAGE_KIND_MODE_STAGED);
    cli_model_spec_free(&s);
    /* layer_types alone sets the layer count */
    snprintf(text, sizeof text, "%slayer_types: [mod, dense]\n", base);
    CU_ASSERT_EQUAL_FATAL(spec_parse(text, &s, err), 0);
    CU_ASSERT_EQUAL(s.cfg.n_layers, 2);
    CU_ASSERT_EQUAL(s.cfg.layer_kind[0], STAGE_KIND_MOD);
    CU_ASSERT_EQUAL(s.cfg.layer_kind[1], STAGE_KIND_DENSE);
    cli_model_spec_free(&s);
}

static void test_spec_errors(void)
{
    const char *base = "hidden_size: 64\nintermediate_size: 128\nvocab_size: 97\n"
                       "num_hidden_layers: 4\n";
    char t[1024];
#define SPEC_ERR(extra, msg)                                                                       \
    do {                                                                                           \
        snprintf(t, sizeof t, "%s%s", base, extra);                                                \
        expect_spec_err(t, msg);                                                                   \
    } while (0)
    /* base is 4 lines, so the extra text starts on line 5 */
    SPEC_ERR("", "m.yaml: missing required key num_attention_heads");
    SPEC_ERR("num_attention_heads: 0\n",
             "m.yaml:5:22: num_attention_heads: expected an integer in [1, 1024], got '0'");
    SPEC_ERR("num_attention_heads: 5\n",
             "m.yaml:5:22: num_attention_heads: hidden_size 64 is not divisible by 5 heads");
    SPEC_ERR("num_attention_heads: 64\n", "m.yaml:5:22: num_attention_heads: head_dim 1");
    SPEC_ERR("num_attention_heads: 4\nnum_key_value_heads: 3\n",
             "m.yaml:6:22: num_key_value_heads: 4 attention heads are not divisible by 3");
    SPEC_ERR("num_attention_heads: 4\nnum_key_value_heads: 8\n", "m.yaml:6:22:");
    SPEC_ERR("num_attention_heads: 4\nmod:\n  capacity: 0\n",
             "m.yaml:7:13: mod.capacity: expected a number in (0, 1], got '0'");
    SPEC_ERR("num_attention_heads: 4\nmod:\n  capacity: 1.5\n", "m.yaml:7:13: mod.capacity:");
    SPEC_ERR("num_attention_heads: 4\nmod:\n  threshold: 1\n",
             "m.yaml:7:14: mod.threshold: expected a number in (0, 1), got '1'");
    SPEC_ERR("num_attention_heads: 4\nmindskip:\n  threshold: 0\n",
             "m.yaml:7:14: mindskip.threshold: expected a number in (0, 1)");
    SPEC_ERR("num_attention_heads: 4\nmod:\n  routing: random\n",
             "m.yaml:7:12: mod.routing: expected threshold, predictor or topk, got 'random'");
    SPEC_ERR("num_attention_heads: 4\nmindskip:\n  granularity: layer\n",
             "m.yaml:7:16: mindskip.granularity: expected sequence or token");
    SPEC_ERR("num_attention_heads: 4\noutput:\n  dtype: f64\n",
             "m.yaml:7:10: output.dtype: expected f32, bf16 or f16, got 'f64'");
    SPEC_ERR("num_attention_heads: 4\nlayer_types: [dense, mod, moe, dense]\n",
             "m.yaml:6:14: layer_types: item 3: unknown layer kind 'moe'");
    SPEC_ERR("num_attention_heads: 4\nlayer_types: [dense, mod]\n",
             "m.yaml:6:14: layer_types: 2 entries but num_hidden_layers is 4");
    SPEC_ERR("num_attention_heads: 4\nlayer_types: mod\n",
             "m.yaml:6:14: layer_types: expected a list like [dense, mod], got 'mod'");
    SPEC_ERR("num_attention_heads: 4\nlayer_pattern: []\n", "m.yaml:6:16: layer_pattern: empty");
    SPEC_ERR("num_attention_heads: 4\nlayer_types: [mod, mod, mod, mod]\nlayer_pattern: [mod]\n",
             "m.yaml:7:16: layer_pattern: give layer_types or layer_pattern, not both");
    SPEC_ERR("num_attention_heads: 4\nmode:\n  num_experts: 2\n  experts_per_token: 3\n",
             "m.yaml:8:22: mode.experts_per_token: 3 is more than num_experts (2)");
    SPEC_ERR("num_attention_heads: 4\nmod:\n  capacty: 0.5\n",
             "m.yaml:7:12: unknown key mod.capacty");
    SPEC_ERR("num_attention_heads: 4\nrope_scalng: 2\n", "m.yaml:6:14: unknown key rope_scalng");
    /* the block-variant keys go through config.json's own parser (docs/SPEC.md §10) */
    SPEC_ERR("num_attention_heads: 4\nmodel_type: gemma\n",
             "m.yaml: as config.json: model_type: \"gemma\" is not supported");
    SPEC_ERR("num_attention_heads: 4\nmodel_type: qwen3\nhead_dim: 15\n",
             "m.yaml:7:11: head_dim: 15 must be even");
    SPEC_ERR("num_attention_heads: 4\nrope_scaling:\n  factor: 2\n",
             "give rope_scaling.rope_type too");
    SPEC_ERR("num_attention_heads: 4\nrope_scaling:\n  rope_type: yarn\n",
             "rope_scaling.rope_type: \"yarn\" is not supported");
    SPEC_ERR("num_attention_heads: 4\nmod: 0.5\n", "m.yaml:6:6: unknown key mod");
    SPEC_ERR("num_attention_heads: 4\ntie_word_embeddings: maybe\n",
             "m.yaml:6:22: tie_word_embeddings: expected true or false, got 'maybe'");
    SPEC_ERR("num_attention_heads: 4\nrms_norm_eps: 0\n", "m.yaml:6:15: rms_norm_eps:");
    SPEC_ERR("num_attention_heads: 4\nrope_theta: big\n",
             "m.yaml:6:13: rope_theta: expected a number > 0, got 'big'");
    SPEC_ERR("num_attention_heads: 4\nmod:\n  capacity: [0.5]\n",
             "m.yaml:7:13: mod.capacity: expected a number in (0, 1], got a list");
    SPEC_ERR("num_attention_heads: 4\nmod:\n  predictor_hidden: 0\n",
             "m.yaml:7:21: mod.predictor_hidden: expected an integer");
    SPEC_ERR("num_attention_heads: 4\noutput:\n  shards: 0\n", "m.yaml:7:11: output.shards:");
    SPEC_ERR("num_attention_heads: 4\nmax_position_embeddings: 16\ncalibrate:\n  enabled: true\n"
             "  length: 32\n",
             "m.yaml:9:11: calibrate.length: 32 is more than max_position_embeddings (16)");
    SPEC_ERR("num_attention_heads: 4\ninit:\n  std: -1\n",
             "m.yaml:7:8: init.std: expected a number >= 0, got '-1'");
#undef SPEC_ERR
    /* no layer count at all */
    expect_spec_err("hidden_size: 64\nintermediate_size: 128\nvocab_size: 97\n"
                    "num_attention_heads: 4\n",
                    "m.yaml: missing required key num_hidden_layers");
    /* YAML errors come through with their position */
    expect_spec_err("hidden_size: 64\n  vocab_size: 3\n", "m.yaml:2:13: mapping values");
    cli_model_spec s;
    char err[ERRLEN];
    CU_ASSERT_NOT_EQUAL(cli_model_spec_load("/nonexistent.yaml", &s, err, ERRLEN), 0);
    CU_ASSERT(tu_contains(err, "/nonexistent.yaml: cannot open"));
}

/* The shipped example specs parse and say what their names promise (run from the repo root). */
static void test_spec_examples(void)
{
    static const struct {
        const char *file;
        int n_layers;
        stage_kind k0, k1;
        int routing;
    } ex[] = {
        {"configs/models/dense.yaml", 6, STAGE_KIND_DENSE, STAGE_KIND_DENSE, -1},
        {"configs/models/mod.yaml", 6, STAGE_KIND_DENSE, STAGE_KIND_MOD, STAGE_ROUTING_THRESHOLD},
        {"configs/models/mod_predictor.yaml", 6, STAGE_KIND_DENSE, STAGE_KIND_MOD,
         STAGE_ROUTING_PREDICTOR},
        {"configs/models/mod_topk.yaml", 6, STAGE_KIND_DENSE, STAGE_KIND_MOD, STAGE_ROUTING_TOPK},
        {"configs/models/mode_staged.yaml", 6, STAGE_KIND_DENSE, STAGE_KIND_MODE_STAGED, -1},
        {"configs/models/mode_integrated.yaml", 6, STAGE_KIND_MODE_INTEGRATED,
         STAGE_KIND_MODE_INTEGRATED, -1},
        {"configs/models/mindskip.yaml", 6, STAGE_KIND_DENSE, STAGE_KIND_DENSE, -1},
        {"configs/models/mixed.yaml", 6, STAGE_KIND_DENSE, STAGE_KIND_MOD, -1},
        {"configs/models/demo.yaml", 12, STAGE_KIND_MOD, STAGE_KIND_MOD, STAGE_ROUTING_THRESHOLD},
    };
    if (access("configs/models/dense.yaml", R_OK) != 0) {
        fprintf(stderr, "\n  configs/models not found from here: run from the repo root\n");
        CU_FAIL("configs/models/dense.yaml not readable");
        return;
    }
    for (size_t i = 0; i < sizeof ex / sizeof ex[0]; i++) {
        cli_model_spec s;
        char err[ERRLEN] = "";
        int rc = cli_model_spec_load(ex[i].file, &s, err, ERRLEN);
        if (rc) fprintf(stderr, "\n  %s\n", err);
        CU_ASSERT_EQUAL(rc, 0);
        if (rc) continue;
        CU_ASSERT_EQUAL(s.cfg.n_layers, ex[i].n_layers);
        CU_ASSERT_EQUAL(s.cfg.layer_kind[0], ex[i].k0);
        CU_ASSERT_EQUAL(s.cfg.layer_kind[1], ex[i].k1);
        if (ex[i].routing >= 0) CU_ASSERT_EQUAL((int)s.cfg.mod_routing, ex[i].routing);
        cli_model_spec_free(&s);
    }
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    CU_pSuite y = CU_add_suite("yamlcfg", NULL, NULL);
    CU_pSuite m = CU_add_suite("modelspec", NULL, NULL);
    if (!y || !m ||
        !CU_add_test(y, "flatten nested maps and lists with positions", test_yaml_flatten) ||
        !CU_add_test(y, "empty documents and values", test_yaml_empty) ||
        !CU_add_test(y, "syntax errors at libyaml's position", test_yaml_syntax_errors) ||
        !CU_add_test(y, "structure errors", test_yaml_structure_errors) ||
        !CU_add_test(y, "unknown keys", test_yaml_check_keys) ||
        !CU_add_test(y, "typed getters", test_yaml_typed) ||
        !CU_add_test(y, "load from file", test_yaml_load_file) ||
        !CU_add_test(m, "full spec", test_spec_full) ||
        !CU_add_test(m, "defaults", test_spec_defaults) ||
        !CU_add_test(m, "layer_pattern", test_spec_layer_pattern) ||
        !CU_add_test(m, "validation errors", test_spec_errors) ||
        !CU_add_test(m, "example specs in configs/models", test_spec_examples)) {
        CU_cleanup_registry();
        return 2;
    }
    return tu_cunit_run();
}
