/* tests/test_cli.c — the one option table (cli/opts.h) and the shared pipeline options
 * (cli/plan.h): same spelling and meaning in every command, --config through the same table,
 * serve's --stages A-B:K and --mem-per-rank (CUnit, no MPI). */
#include <CUnit/Basic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/opts.h"
#include "cli/plan.h"
#include "stage/config.h"
#include "stage/matmul.h"
#include "tests/testutil.h"

#define FIX "tests/fixtures"

static int parse(cli_opts *o, int cmd, char *err, size_t errlen, ...)
{
    char *argv[64];
    int argc = 0;
    va_list ap;
    va_start(ap, errlen);
    for (char *s; argc < 64 && (s = va_arg(ap, char *));) argv[argc++] = s;
    va_end(ap);
    err[0] = 0;
    return cli_opts_parse(o, cmd, argc, argv, err, errlen);
}

static void test_refusals(void)
{
    cli_opts o;
    char err[1024];
    CU_ASSERT_NOT_EQUAL(parse(&o, CLI_SERVE, err, sizeof err, "--prompt-ids", "1,2", NULL), 0);
    ASSERT_HAS(err, "unknown option '--prompt-ids' for serve (see modpipe serve --help)");
    cli_opts_free(&o);
    CU_ASSERT_NOT_EQUAL(
        parse(&o, CLI_GENERATE, err, sizeof err, "--model", "a", "--model", "b", NULL), 0);
    ASSERT_HAS(err, "--model given twice");
    cli_opts_free(&o);
    CU_ASSERT_NOT_EQUAL(parse(&o, CLI_ROUTER_TUNE, err, sizeof err, "--resume=1", NULL), 0);
    ASSERT_HAS(err, "--resume takes no value");
    cli_opts_free(&o);
    CU_ASSERT_NOT_EQUAL(parse(&o, CLI_TOKENIZE, err, sizeof err, "--text", NULL), 0);
    ASSERT_HAS(err, "--text needs a value (S)");
    cli_opts_free(&o);
    CU_ASSERT_NOT_EQUAL(parse(&o, CLI_EVAL, err, sizeof err, "stray", NULL), 0);
    ASSERT_HAS(err, "unexpected argument 'stray' (see modpipe eval --help)");
    cli_opts_free(&o);
    /* a repeatable option, --name=value, -n */
    CU_ASSERT_EQUAL(
        parse(&o, CLI_GENERATE, err, sizeof err, "--prompt-ids", "1", "--prompt-ids=2,3", NULL), 0);
    CU_ASSERT_EQUAL(cli_opt(&o, "prompt-ids")->n, 2);
    CU_ASSERT_STRING_EQUAL(cli_opt(&o, "prompt-ids")->vals[1], "2,3");
    cli_opts_free(&o);
    CU_ASSERT_EQUAL(parse(&o, CLI_PARTITION, err, sizeof err, "-n", "3", NULL), 0);
    CU_ASSERT_STRING_EQUAL(cli_opt_str(&o, "n"), "3");
    cli_opts_free(&o);
}

/* One option, one meaning: the same bad value gives the same message in every command. */
static void test_shared_meaning(void)
{
    const int cmds[] = {CLI_GENERATE, CLI_EVAL, CLI_SERVE};
    for (int i = 0; i < 3; i++) {
        cli_opts o;
        char err[1024];
        engine_pipe_opts po = {0};
        CU_ASSERT_EQUAL(parse(&o, cmds[i], err, sizeof err, "--micro-batch", "0", NULL), 0);
        CU_ASSERT_NOT_EQUAL(cli_pipe_opts_read(&o, &po, err, sizeof err), 0);
        CU_ASSERT_STRING_EQUAL(err, "--micro-batch: expected an integer in [1, 1048576], got '0'");
        cli_opts_free(&o);
        CU_ASSERT_EQUAL(parse(&o, cmds[i], err, sizeof err, "--wire-dtype", "f8", NULL), 0);
        CU_ASSERT_NOT_EQUAL(cli_pipe_opts_read(&o, &po, err, sizeof err), 0);
        CU_ASSERT_STRING_EQUAL(err, "--wire-dtype: expected f32, bf16 or f16, got 'f8'");
        cli_opts_free(&o);
        CU_ASSERT_EQUAL(parse(&o, cmds[i], err, sizeof err, "--transport", "dense",
                              "--weights-dtype", "bf16", "--max-in-flight", "1", "--quiet", NULL),
                        0);
        CU_ASSERT_EQUAL(cli_pipe_opts_read(&o, &po, err, sizeof err), 0);
        CU_ASSERT_EQUAL(po.dense_transport, 1);
        CU_ASSERT_EQUAL(po.weights_dtype, STAGE_BF16);
        CU_ASSERT_EQUAL(po.max_in_flight, 2); /* at least 2 */
        CU_ASSERT_EQUAL(po.progress, 0);
        CU_ASSERT_EQUAL(po.micro_batch, 32);
        cli_opts_free(&o);
    }
    stage_threads_free();
}

/* serve plans like generate: --stages A-B:K, --mem-per-rank. */
static void test_serve_plan(void)
{
    stage_config cfg;
    char err[1024];
    CU_ASSERT_EQUAL_FATAL(stage_config_load(FIX "/mod", &cfg, err, sizeof err), 0);
    cli_opts o;
    engine_plan plan;
    CU_ASSERT_EQUAL(parse(&o, CLI_SERVE, err, sizeof err, "--stages", "0-1:2,2-5", NULL), 0);
    CU_ASSERT_EQUAL(cli_make_plan(&o, &cfg, 3, 0, NULL, &plan, err, sizeof err), 0);
    CU_ASSERT_EQUAL(plan.n_stages, 2);
    CU_ASSERT_EQUAL(plan.st[0].ranks, 2);
    CU_ASSERT_EQUAL(plan.st[1].ranks, 1);
    CU_ASSERT_EQUAL(plan.st[1].first, 2);
    engine_plan_free(&plan);
    cli_opts_free(&o);

    CU_ASSERT_EQUAL(parse(&o, CLI_SERVE, err, sizeof err, "--mem-per-rank", "1K", NULL), 0);
    engine_mem_opts mem;
    CU_ASSERT_EQUAL(cli_mem_opts(&o, FIX "/mod", &mem, err, sizeof err), 0);
    CU_ASSERT_EQUAL(mem.mem_per_rank, 1024);
    mem.slots = 8;
    mem.ctx = 64;
    mem.micro_batch = 32;
    CU_ASSERT_NOT_EQUAL(cli_make_plan(&o, &cfg, 2, 0, &mem, &plan, err, sizeof err), 0);
    ASSERT_HAS(err, "fits --mem-per-rank");
    cli_opts_free(&o);
    CU_ASSERT_EQUAL(parse(&o, CLI_SERVE, err, sizeof err, "--mem-per-rank", "lots", NULL), 0);
    CU_ASSERT_NOT_EQUAL(cli_mem_opts(&o, FIX "/mod", &mem, err, sizeof err), 0);
    ASSERT_HAS(err, "--mem-per-rank: expected a size like 6G");
    cli_opts_free(&o);
    stage_config_free(&cfg);
}

/* --config goes through the same table, with the file's positions in messages. */
static void test_yaml_config(void)
{
    char path[] = "/tmp/modpipe-cli-XXXXXX";
    int fd = mkstemp(path);
    CU_ASSERT_FATAL(fd >= 0);
    const char *text = "port: 9000\nmicro-batch: 0\nstages:\n  - {layers: \"0-2\", ranks: 2}\n"
                       "  - {layers: \"3-5\"}\n";
    CU_ASSERT_EQUAL(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    cli_opts o;
    char err[1024];
    CU_ASSERT_EQUAL(parse(&o, CLI_SERVE, err, sizeof err, "--config", path, "--port", "9001", NULL),
                    0);
    CU_ASSERT_STRING_EQUAL(cli_opt_str(&o, "port"), "9001"); /* the command line wins */
    engine_pipe_opts po = {0};
    CU_ASSERT_NOT_EQUAL(cli_pipe_opts_read(&o, &po, err, sizeof err), 0);
    char want[256];
    snprintf(want, sizeof want, "%s:2:14: micro-batch: expected an integer", path);
    ASSERT_HAS(err, want);
    stage_config cfg;
    CU_ASSERT_EQUAL_FATAL(stage_config_load(FIX "/mod", &cfg, err, sizeof err), 0);
    engine_plan plan;
    CU_ASSERT_EQUAL(cli_make_plan(&o, &cfg, 3, 0, NULL, &plan, err, sizeof err), 0);
    CU_ASSERT_EQUAL(plan.n_stages, 2);
    CU_ASSERT_EQUAL(plan.st[0].ranks, 2);
    engine_plan_free(&plan);
    cli_opts_free(&o);
    stage_config_free(&cfg);
    /* a key of another command */
    FILE *f = fopen(path, "w");
    fputs("prompt-ids: 1,2\n", f);
    fclose(f);
    CU_ASSERT_NOT_EQUAL(parse(&o, CLI_SERVE, err, sizeof err, "--config", path, NULL), 0);
    snprintf(want, sizeof want, "%s:1:13: unknown key 'prompt-ids' for serve", path);
    ASSERT_HAS(err, want);
    cli_opts_free(&o);
    unlink(path);
}

/* --help comes from the table: each command lists its own options. */
static void test_usage(void)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cli_opts_usage(f, CLI_SERVE, "intro\n", "  ex\n");
    fclose(f);
    ASSERT_HAS(buf, "intro\n\noptions:\n");
    ASSERT_HAS(buf, "  --stages auto|A-B,...");
    ASSERT_HAS(buf, "  --mem-per-rank SIZE");
    ASSERT_HAS(buf, "  --port N");
    ASSERT_HAS(buf, "\nexample:\n  ex\n");
    CU_ASSERT_PTR_NULL(strstr(buf, "--prompt-ids"));
    free(buf);
    /* the KV pool (docs/SPEC.md §11): serve, generate and eval, its default said */
    const int kv_cmds[] = {CLI_SERVE, CLI_GENERATE, CLI_EVAL};
    for (int i = 0; i < 3; i++) {
        f = open_memstream(&buf, &len);
        cli_opts_usage(f, kv_cmds[i], "", NULL);
        fclose(f);
        ASSERT_HAS(buf, "  --kv-page N                KV cache positions per page (default 16)");
        ASSERT_HAS(buf, "  --kv-mem SIZE              KV page pool per rank");
        ASSERT_HAS(buf, "Default: what --mem-per-rank leaves after the stage's weights and "
                        "workspace, else every position of every slot on every layer");
        free(buf);
    }
    f = open_memstream(&buf, &len);
    cli_opts_usage(f, CLI_PARTITION, "p\n", NULL);
    fclose(f);
    ASSERT_HAS(buf, "  -n N ");
    CU_ASSERT_PTR_NULL(strstr(buf, "--port"));
    CU_ASSERT_PTR_NULL(strstr(buf, "example"));
    free(buf);
}

static void test_choice(void)
{
    cli_opts o;
    char err[1024];
    static const char *const three[] = {"a", "b", "c", NULL};
    int k = -1;
    CU_ASSERT_EQUAL(parse(&o, CLI_ROUTER_TUNE, err, sizeof err, "--gate", "x", NULL), 0);
    CU_ASSERT_NOT_EQUAL(cli_opt_choice(&o, "gate", three, 0, &k, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(err, "--gate: expected a, b or c, got 'x'");
    cli_opts_free(&o);
    CU_ASSERT_EQUAL(parse(&o, CLI_ROUTER_TUNE, err, sizeof err, "--gate", "c", NULL), 0);
    CU_ASSERT_EQUAL(cli_opt_choice(&o, "gate", three, 0, &k, err, sizeof err), 0);
    CU_ASSERT_EQUAL(k, 2);
    cli_opts_free(&o);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    CU_pSuite s = CU_add_suite("cli options", NULL, NULL);
    if (!s || !CU_add_test(s, "refusals, repeats, -n", test_refusals) ||
        !CU_add_test(s, "shared options mean the same everywhere", test_shared_meaning) ||
        !CU_add_test(s, "serve: --stages A-B:K, --mem-per-rank", test_serve_plan) ||
        !CU_add_test(s, "--config through the table", test_yaml_config) ||
        !CU_add_test(s, "--help from the table", test_usage) ||
        !CU_add_test(s, "choices", test_choice)) {
        CU_cleanup_registry();
        return 2;
    }
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned failures = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failures != 0;
}
