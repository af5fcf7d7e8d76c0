/* cli/partition.c — `modpipe partition` (cli/partition.h). */
#include "cli/partition.h"

#include <stdio.h>
#include <string.h>

#include "cli/opts.h"
#include "cli/plan.h"
#include "engine/partition.h"
#include "engine/topo.h"
#include "stage/config.h"

int cli_partition_main(int argc, char **argv)
{
    char err[1024];
    cli_opts o;
    int rc = cli_opts_parse(&o, CLI_PARTITION, argc, argv, err, sizeof err);
    if (!rc && cli_opt_has(&o, "help")) {
        cli_opts_usage(
            stdout, CLI_PARTITION,
            "modpipe partition: print the stage plan (layers, compute share, memory per stage:\n"
            "weights in the checkpoint dtype, KV cache, workspace; which boundaries can carry\n"
            "fewer rows than dense and why). No MPI needed.\n",
            NULL);
        cli_opts_free(&o);
        return 0;
    }
    stage_config cfg;
    memset(&cfg, 0, sizeof cfg);
    engine_plan plan;
    long n = 0;
    const char *model = rc ? NULL : cli_opt_str(&o, "model");
    if (!rc && !model) {
        snprintf(err, sizeof err, "--model DIR is required");
        rc = -1;
    }
    if (!rc && !cli_opt_has(&o, "n")) {
        snprintf(err, sizeof err, "-n N (number of stages) is required");
        rc = -1;
    }
    if (!rc) rc = cli_opt_long(&o, "n", 1, 4096, 1, &n, err, sizeof err);
    if (!rc) rc = stage_config_load(model, &cfg, err, sizeof err);
    engine_mem_opts mem;
    long slots = 1, ctx = 1, mb = 32;
    if (!rc) rc = cli_mem_opts(&o, model, &mem, err, sizeof err);
    if (!rc) rc = cli_opt_long(&o, "slots", 1, 1 << 20, 1, &slots, err, sizeof err);
    if (!rc) rc = cli_opt_long(&o, "ctx", 1, 1 << 24, cfg.max_pos, &ctx, err, sizeof err);
    if (!rc) rc = cli_opt_long(&o, "micro-batch", 1, 1 << 20, 32, &mb, err, sizeof err);
    mem.slots = (int)slots;
    mem.ctx = (int)ctx;
    mem.micro_batch = (int)mb;
    if (!rc) rc = cli_make_plan(&o, &cfg, 0, (int)n, &mem, &plan, err, sizeof err);
    if (!rc) {
        int world = 0;
        for (int s = 0; s < plan.n_stages; s++) world += engine_stage_ranks(&plan.st[s]);
        engine_topo topo; /* K must split the heads */
        rc = engine_topo_init(&topo, &plan, world, &cfg, err, sizeof err);
        engine_topo_free(&topo);
        if (rc) engine_plan_free(&plan);
    }
    if (!rc) {
        engine_plan_print(&cfg, &plan, stdout);
        engine_plan_free(&plan);
    } else {
        fprintf(stderr, "modpipe partition: %s\n", err);
    }
    stage_config_free(&cfg);
    cli_opts_free(&o);
    return rc ? 1 : 0;
}
