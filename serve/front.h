/* serve/front.h — `modpipe serve --ranks N`: the front outside the MPI job (docs/SERVE.md).
 *
 * The front is the process a user or a service manager starts. It owns the HTTP server, the
 * request queue and so every request's state (prompt, tokens sent, seed, step); the queue
 * is its scheduler. It starts the MPI job itself (`mpirun ... modpipe serve ... --job SOCK`),
 * whose rank 0 connects back over a Unix socket (serve/chan.h) and only relays: micro-batches
 * in, sampled tokens out (serve/loop.h serve_loop_run_job).
 *
 * serve_front_run runs the relay on the caller's thread. When the job dies (mpirun exits, the
 * channel closes) or stalls (no frame for stall_s seconds — the job beats every 0.25 s while
 * its loop runs — or, with work in flight, no result for stall_s seconds: a micro-batch's
 * round trip must take less), the front ends it (SIGTERM, then SIGKILL, to its process
 * group), waits a back-off (0.5 s, doubling, at most 5 s), starts it again and rewinds the queue
 * (srvq_rewind): every running request prefills its prompt and the tokens already sent and
 * goes on with the same seed and step, so its client gets the text of an uninterrupted run
 * after a pause. /health says "recovering" (503) meanwhile. After max_restarts failures in a
 * row (a job that ran 60 s resets the count), or when the first start fails, every request
 * ends with an error (srvq_fail_all) and it returns -1 with one line in err. A stall names
 * the rank holding the job up and its host (the job's PROGRESS and RANKS frames,
 * engine_stuck_stage) in the log line and srvq_note_stall (/metrics); with hosts, that host
 * (never the first) is counted dead like a killed rank's.
 *
 * It returns 0 once the queue is closed (serve_server_shutdown: SIGTERM to the front) and
 * drained: it sends END and the job exits. The job's stderr (mpirun's and the ranks') passes
 * through the front to its own, read for the host a failure names (serve_hosts_blame). Threads: the HTTP threads use the queue as
 * before; srvq_set_notify wakes the relay. The job's rank 0 must run on this host.
 */
#ifndef SERVE_FRONT_H
#define SERVE_FRONT_H

#include <stddef.h>

#include "serve/hosts.h"
#include "serve/queue.h"
#include "serve/serve.h"

/* The job's command line for `ranks` ranks on the hosts of `hostfile` (NULL: as the user gave
 * them): *argv NULL-terminated, the caller's until the next call (the front appends the
 * socket's path: its last option must be --job); *stages: that plan's stage count. 0, or -1
 * with err (no plan for that many ranks). */
typedef int (*serve_job_cmd_fn)(void *arg, int ranks, const char *hostfile, char *const **argv,
                                int *stages, char *err, size_t errlen);

typedef struct {
    serve_job_cmd_fn job_cmd;
    void *job_arg;
    int ranks;          /* the plan's rank count */
    serve_hosts *hosts; /* --spare-hosts: a host a failure is attributed to (serve/hosts.h) is
                         * dropped and the job restarted on the hosts left plus spares,
                         * re-partitioned when the rank count changes; NULL: the same job */
    int slots, ctx;     /* the job's HELLO must agree (the queue's) */
    int micro_batch, whole_prompts, max_rows; /* as serve_loop_rows says for the job */
    int max_in_flight;                        /* micro-batches in flight */
    int decode_groups;                        /* the queue's (srvq_sched_groups); 0: the stage
                                               * count of each job's plan */
    double stall_s;                           /* silence that counts as a stuck job */
    int max_restarts;                         /* restarts in a row, then give up */
    double start_timeout_s;                   /* longest wait for a (re)started job's READY */
    int quiet;
} serve_front_opts;

int serve_front_run(const serve_front_opts *o, srvq *q, serve_server *srv, char *err,
                    size_t errlen);

#endif
