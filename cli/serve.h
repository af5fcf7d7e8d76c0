/* cli/serve.h — the `modpipe serve` command, called from cli/main.c.
 *
 *   modpipe serve --model DIR --ranks N [--hostfile F] [--mpi-args '...'] [--stall-timeout S]
 *       [--max-restarts N] [HTTP and pipeline options]: the front (serve/front.h) owns HTTP
 *       and the queue and starts / restarts the MPI job (the same command with --job SOCK);
 *   mpirun -np N modpipe serve --model DIR [--host 127.0.0.1] [--port 8080] [--slots N]
 *       [--ctx N] [--queue N] [--api-key-file F] [--chat-template NAME|auto] [pipeline options]
 *       (the advanced form: HTTP on rank 0, no restarts).
 *
 * Every rank calls cli_serve_main (it calls MPI_Init_thread / MPI_Finalize itself). All ranks
 * parse the same argv and agree on errors. Rank 0 loads the tokenizer, opens the HTTP port at
 * once (/health says 503 until the pipeline is ready), and runs the pipeline loop on the main
 * thread through `run`; the other ranks run their stage loop through `run` with q == NULL.
 * The HTTP threads never call MPI (MPI_THREAD_FUNNELED).
 *
 * SIGTERM / SIGINT on rank 0: stop accepting, finish running requests within
 * --shutdown-grace seconds (then cancel them), `run` returns once the queue is closed and
 * idle, exit 0. The other ranks ignore SIGTERM (mpirun forwards it to every rank): they end
 * when rank 0's pipeline tells them to.
 *
 * `run` is the pipeline side (the scheduler's serve loop): it returns 0 when the queue was
 * closed and drained, non-zero with one line in err when the pipeline failed (a dead rank).
 * Returns the process exit code: 0, 1 (pipeline failure), 2 (bad options).
 */
#ifndef CLI_SERVE_H
#define CLI_SERVE_H

#include <mpi.h>

#include "engine/partition.h"
#include "serve/loop.h"
#include "serve/queue.h"
#include "comm/comm.h"
#include "stage/config.h"
#include "stage/dtype.h"
#include "stage/stage.h"

typedef struct {
    serve_loop_opts loop; /* what the pipeline runs with (serve/loop.h): model, plan, slots,
                             ctx, KV pool, micro-batch, in flight, dtypes, transport, timeout;
                             loop.pipe.progress is !--quiet */
    int queue;            /* --queue */
    srvq *q;              /* rank 0: the queue the HTTP layer fills; other ranks: NULL */
    /* rank 0: call once every rank has loaded its stage (then /health says 200) */
    void (*on_ready)(void *arg);
    void *ready_arg;
} serve_pipeline;

typedef int (*serve_pipeline_fn)(MPI_Comm comm, const serve_pipeline *p, char *err, size_t errlen);

int cli_serve_main(int argc, char **argv, serve_pipeline_fn run);

/* The default `run`: serve_loop_run (serve/loop.h). */
int serve_pipeline_run(MPI_Comm comm, const serve_pipeline *p, char *err, size_t errlen);
/* A job the front started (--job): serve_loop_run_job over the channel fd (rank 0). */
int serve_pipeline_run_job(MPI_Comm comm, const serve_pipeline *p, int fd, char *err,
                           size_t errlen);

#endif
