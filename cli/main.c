/* cli/main.c — the modpipe command line: dispatch to one file per command.
 *
 *   modpipe generate | eval    (under mpirun: one rank per pipeline stage; -np 1 works too; cli/run.h)
 *   modpipe partition          (no MPI: print the stage plan, cli/partition.h)
 *   modpipe init-model         (no MPI: write a random model from a YAML spec, cli/initmodel.h)
 *   modpipe quantize           (no MPI: a copy with Q8_0 projections, cli/quantize.h)
 *   modpipe router-tune        (under mpirun, data-parallel: cli/routertune.h)
 *   modpipe tokenize | detokenize (no MPI: text <-> ids, cli/tokenize.h)
 *   modpipe serve              (under mpirun: OpenAI-compatible HTTP server, cli/serve.h)
 *
 * Every command's options come from the one table in cli/opts.c (`modpipe CMD --help` lists
 * them); the pipeline commands also read them from a YAML file (--config F.yaml: keys are the
 * option names without "--"), flags given on the command line override it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/initmodel.h"
#include "cli/opts.h"
#include "cli/partition.h"
#include "cli/quantize.h"
#include "cli/routertune.h"
#include "cli/run.h"
#include "cli/serve.h"
#include "cli/tokenize.h"
#include "stage/matmul.h"

#define MODPIPE_VERSION "0.1.0"

/* ---- Help ------------------------------------------------------------------------------------ */

static void usage_main(FILE *f)
{
    fprintf(
        f,
        "modpipe %s — pipeline-parallel inference for dynamic-depth transformers\n"
        "(Mixture-of-Depths, MoDE, MindSkip): between MPI ranks only the rows a stage\n"
        "computes on travel, with a bitmask of which rows they are.\n\n"
        "usage:\n"
        "  mpirun -np N modpipe generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) "
        "[options]\n"
        "  mpirun -np N modpipe eval --model DIR (--tokens-file F | --text-file F) [options]\n"
        "  modpipe partition --model DIR -n N [--stages ...]\n"
        "  modpipe init-model --spec F.yaml --out DIR [options]\n"
        "  modpipe quantize --model DIR --out DIR      (Q8_0 projections, docs/SPEC.md §9)\n"
        "  mpirun -np K modpipe router-tune --model DIR --data FILE --out DIR [options]\n"
        "  mpirun -np N modpipe serve --model DIR [--port 8080] [options]   (HTTP, OpenAI API)\n"
        "  modpipe tokenize --model DIR --text S [--no-special]\n"
        "  modpipe detokenize --model DIR --ids \"1 2 3\" [--skip-special]\n"
        "  modpipe COMMAND --help      options of a command\n"
        "  modpipe --version\n\n"
        "One MPI rank is one pipeline stage; -np 1 runs the whole model in one process.\n",
        MODPIPE_VERSION);
}

/* OpenBLAS picks its kernels when the library loads; on a CPU id it does not know (VMs) it
 * falls back to SSE3 kernels, 4x slower (stage/matmul.h). Only a fresh process image can fix
 * that, so set OPENBLAS_CORETYPE and exec ourselves once, before MPI_Init. */
static void fix_blas_coretype(char **argv)
{
    const char *core = stage_blas_coretype_hint();
    if (!core || getenv("MODPIPE_BLAS_REEXEC")) return;
    setenv("OPENBLAS_CORETYPE", core, 1);
    setenv("MODPIPE_BLAS_REEXEC", "1", 1);
    execv("/proc/self/exe", argv);
    /* exec failed: carry on with the slow kernels (results are the same) */
}

int main(int argc, char **argv)
{
    fix_blas_coretype(argv);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
        !strcmp(argv[1], "help")) {
        usage_main(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("modpipe %s\n", MODPIPE_VERSION);
        return 0;
    }
    if (!strcmp(argv[1], "generate")) return cli_run_main(CLI_GENERATE, argc - 2, argv + 2);
    if (!strcmp(argv[1], "eval")) return cli_run_main(CLI_EVAL, argc - 2, argv + 2);
    if (!strcmp(argv[1], "partition")) return cli_partition_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "init-model")) return cli_init_model_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "quantize")) return cli_quantize_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "router-tune")) return cli_routertune_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "serve")) return cli_serve_main(argc - 2, argv + 2, serve_pipeline_run);
    if (!strcmp(argv[1], "tokenize")) return cli_tok_tokenize(argc - 2, argv + 2);
    if (!strcmp(argv[1], "detokenize")) return cli_tok_detokenize(argc - 2, argv + 2);
    fprintf(stderr, "modpipe: unknown command '%s' (try modpipe --help)\n", argv[1]);
    return 2;
}
