/* tests/test_cluster.c — YAML config reader, model spec, partitioner (CUnit). */
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

static int contains(const char *hay, const char *needle)
{
    int ok = strstr(hay, needle) != NULL;
    if (!ok) fprintf(stderr, "\n  expected '%s'\n  in '%s'\n", needle, hay);
    return ok;
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
    CU_ASSERT(contains(err, msg));
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
    CU_ASSERT(contains(err, "while parsing a flow sequence at 2:9"));
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
    CU_ASSERT(contains(err, "t.yaml:3:6: big: expected an integer"));
    CU_ASSERT_NOT_EQUAL(cli_yaml_int(&y, cli_yaml_get(&y, "f"), 0, 10, &v, err, ERRLEN), 0);
    CU_ASSERT(contains(err, "t.yaml:4:4: f: expected an integer"));
    CU_ASSERT_NOT_EQUAL(cli_yaml_int(&y, cli_yaml_get(&y, "half"), 0, 100, &v, err, ERRLEN), 0);
    CU_ASSERT(contains(err, "got '12x'"));
    CU_ASSERT_NOT_EQUAL(cli_yaml_int(&y, cli_yaml_get(&y, "list"), 0, 10, &v, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(err, "t.yaml:6:7: list: expected an integer in [0, 10], got a list");
    CU_ASSERT_NOT_EQUAL(cli_yaml_int(&y, NULL, 0, 10, &v, err, ERRLEN), 0);

    CU_ASSERT_EQUAL(cli_yaml_double(&y, cli_yaml_get(&y, "f"), 0, 1, &d, err, ERRLEN), 0);
    CU_ASSERT_DOUBLE_EQUAL(d, 1.5e-3, 1e-15);
    CU_ASSERT_NOT_EQUAL(cli_yaml_double(&y, cli_yaml_get(&y, "n"), 0, 1, &d, err, ERRLEN), 0);
    CU_ASSERT_STRING_EQUAL(err, "t.yaml:1:4: n: expected a number in [0, 1], got '42'");
    CU_ASSERT_NOT_EQUAL(cli_yaml_double(&y, cli_yaml_get(&y, "word"), 0, 1, &d, err, ERRLEN), 0);
    CU_ASSERT(contains(err, "t.yaml:5:7: word: expected a number"));
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
    CU_ASSERT(contains(err, "/nonexistent/x.yaml: cannot open"));
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
    CU_ASSERT(contains(err, "/nonexistent.yaml: cannot open"));
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

/* ---- partitioner ----------------------------------------------------------------------------- */

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
    CU_ASSERT(contains(p.st[1].why, "stage 1 has dense layers (1, 4, 7,"));
    CU_ASSERT(contains(p.st[1].why, ", ...)"));
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
    CU_ASSERT(contains(s, "mod x2"));
    CU_ASSERT(contains(s, "[head]"));
    CU_ASSERT(contains(s, "the head (stage 2) must receive every decode row"));
    CU_ASSERT(contains(s, "2 of 2 boundaries can carry fewer rows than dense"));
    /* plan 0-1 | 2-4 | 5: stage p = 1 - 0.875^k, k = 3 and 1 -> 0.3301, 0.125;
     * prefill (0.3301 + 0.125) / 2 = 22.8%, decode (1 + 0.3301) / 2 = 66.5% */
    CU_ASSERT(p.st[1].first == 2 && p.st[1].last == 4);
    CU_ASSERT(contains(s, "not a measurement: prefill ~22.8%, decode ~66.5%"));
    CU_ASSERT(contains(s, "all (stage 0 embeds every row)"));
    CU_ASSERT(contains(s, "sparse: only the rows its routers select"));
    CU_ASSERT(!strstr(s, "mix routed"));
    free(s);
    engine_plan_free(&p);
    stage_config_free(&c);

    c = tiny_cfg("dmdmdm");
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 3, &p, err, ERRLEN), 0);
    s = print_plan(&c, &p);
    CU_ASSERT(contains(s, "dense, mod"));
    CU_ASSERT(contains(s, "all: stage 1 has dense layers (2): every row must reach it"));
    CU_ASSERT(contains(s, "stages 1, 2 mix routed layers with layers that need every row"));
    CU_ASSERT(contains(s, "0 of 2 boundaries"));
    CU_ASSERT(contains(s, "the same as a dense pipeline"));
    free(s);
    engine_plan_free(&p);
    CU_ASSERT_EQUAL_FATAL(engine_partition_auto(&c, 1, &p, err, ERRLEN), 0);
    s = print_plan(&c, &p);
    CU_ASSERT(contains(s, "one stage: nothing crosses the wire"));
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
    CU_pSuite y = CU_add_suite("yamlcfg", NULL, NULL);
    CU_pSuite m = CU_add_suite("modelspec", NULL, NULL);
    CU_pSuite p = CU_add_suite("partition", NULL, NULL);
    if (!y || !m || !p ||
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
        !CU_add_test(m, "example specs in configs/models", test_spec_examples) ||
        !CU_add_test(p, "layer cost model", test_layer_cost) ||
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
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    /* CU_basic_run_tests() reports success even when assertions failed */
    unsigned failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
