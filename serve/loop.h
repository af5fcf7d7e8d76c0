/* serve/loop.h — `modpipe serve`'s pipeline side.
 *
 * serve_loop_run is called by every rank of `comm` after the HTTP layer has been set up on
 * rank 0. Rank 0 runs the pipeline loop (engine/pipeline.h) with the srvq scheduler
 * (serve/queue_sched.h: continuous batching — requests join between micro-batches, prompts
 * are prefilled in chunks of at most micro_batch rows mixed with decode rows, a finished or
 * cancelled request frees its slot at once); ranks > 0 run their stage loop until rank 0
 * ends the run. The sparse transport and the byte accounting are the ones of generate; the
 * per-link bytes (and what a dense pipeline would have sent) reach srvq_get_stats at least
 * once a second: ranks > 0 send their counters to rank 0 at most every 0.25 s while they
 * change (a small message on link s -> 0, counted on that link as payload).
 *
 * Rank 0 passes the queue `q` (srvq_new(o->slots, o->ctx, ...), owned by the caller; other
 * ranks pass NULL) and `ready`, called once on rank 0 when every rank has loaded its stage
 * (the HTTP layer then answers /health with 200); ready may be NULL.
 *
 * Shutdown: the caller calls srvq_close(q) (from a normal thread, e.g. one that waits for
 * SIGTERM with sigwait: srvq_close takes a mutex, so not from a signal handler); queued and
 * running requests go on, then serve_loop_run returns 0 on every rank. The caller may
 * srvq_cancel what has not finished by its deadline. When idle, rank 0 sleeps on the queue's
 * condvar (50 ms timed waits) and ranks > 0 in growing sleeps: no core spins.
 * Errors: start-up failures (model, memory, bad options: a topk model, q's slots/ctx not
 * o's) return non-zero with one line in err on the failing rank (-1; -2 elsewhere); every
 * request already submitted then ends with SRVQ_FINISH_ERROR. A dead or stuck rank during
 * the run ends the job through COMM_FATAL / mpirun with a message, never a hang.
 */
#ifndef SERVE_LOOP_H
#define SERVE_LOOP_H

#include <mpi.h>
#include <stddef.h>

#include "engine/partition.h"
#include "engine/pipeline.h"
#include "engine/sched.h"
#include "serve/queue.h"
#include "comm/comm.h"
#include "stage/config.h"
#include "stage/stage.h"

typedef struct {
    engine_pipe_opts pipe; /* model, plan (n_stages == ranks of comm), micro-batch (R),
                            * in flight (>= 1; e.g. 2 x stages), KV pool, dtypes, transport,
                            * peer timeout; its progress is not used (the server logs) */
    int slots, ctx;        /* KV slots x positions per slot (must equal the srvq's) */
    int decode_groups;     /* the queue's decode groups (0: one per stage) */
} serve_loop_opts;

int serve_loop_run(MPI_Comm comm, const serve_loop_opts *o, srvq *q, void (*ready)(void *),
                   void *arg, char *err, size_t errlen);

/* The same loop with another scheduler on rank 0 (ops, self; bad: a start-up error found on
 * this rank before, NULL: none — still collective). serve_loop_run is this with the queue. */
int serve_loop_run_ops(MPI_Comm comm, const serve_loop_opts *o, const char *bad,
                       const engine_sched_ops *ops, void *self, void (*ready)(void *), void *arg,
                       char *err, size_t errlen);
/* The most rows of a micro-batch, and whether prompts must stay whole (*whole), as the loop
 * runs with o: a scheduler elsewhere (the front's queue) is configured the same way. */
int serve_loop_rows(const serve_loop_opts *o, int *whole);

/* The job side of the front (serve/front.h): rank 0's scheduler relays micro-batches from
 * the front and sampled tokens back over fd, a connected socket (serve/chan.h). Rank 0 sends
 * READY once every rank has loaded its stage and BEAT frames while it runs; the run ends (0)
 * when the front sends END or goes away. Other ranks pass fd -1. */
int serve_loop_run_job(MPI_Comm comm, const serve_loop_opts *o, int fd, char *err, size_t errlen);

#endif
