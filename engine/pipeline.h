/* engine/pipeline.h — the distributed program: the pipeline loop (docs/SPEC.md §4).
 *
 * Every rank of `comm` is one stage (-np 1 is the same code with a single stage that is also
 * the head) — unless the plan gives stages several ranks (plan->st[s].ranks, --tp K,
 * engine/topo.h): then each stage is a group of ranks, its first rank (the leader) is the
 * stage in everything below (the loop runs on a communicator of the leaders, where leader s
 * has rank s: packets, tags and byte counts are those of a one-rank-per-stage run), and the
 * other ranks of the group repeat the stage's layer work with it (stage/tp.h, stage.h
 * "tensor-parallel stages"); engine_loop_step / _close on them follow the leader until it
 * closes, and engine_loop_rank is -1 there. Data path, per micro-batch:
 *   stage 0: the scheduler's rows -> embed -> layers -> route rows onward
 *   stage s: receive chain packet (+ the bypass packets it announces) -> layers -> route
 *   head   : ... -> logits of the rows that need them -> sample / NLL -> tokens to stage 0
 * and every rank counts the bytes it hands to MPI.
 *
 * The loop: engine_loop_open (every rank, collective: start-up failures are agreed on),
 * engine_loop_step (rank 0: issue micro-batches the scheduler has ready, up to
 * max_in_flight, and take back one returning micro-batch; returns 1 while running and 0 once
 * the scheduler is finished and nothing is in flight; ranks > 0: the first step runs the
 * stage loop until rank 0 ends the run, then returns 0), engine_loop_close (every rank,
 * collective: END packets, stats gathered on rank 0, --dump-logits written by the head).
 * A server steps forever; a batch job until done. The scheduler (engine/sched.h) is asked
 * for each micro-batch and gets the sampled tokens back; it exists on rank 0 only. The batch
 * job (engine/batch.h: generate / eval) is one scheduler, the server's queue
 * (serve/queue_sched.h) another.
 *
 * Results: the head writes --dump-logits; rank 0 writes --stats. Fatal errors during the run
 * abort the job through COMM_FATAL.
 */
#ifndef ENGINE_PIPELINE_H
#define ENGINE_PIPELINE_H

#include <mpi.h>
#include <stdint.h>

#include "engine/partition.h"
#include "engine/sched.h"
#include "comm/comm.h"
#include "stage/config.h"
#include "stage/stage.h"

/* ---- the loop -------------------------------------------------------------------------------- */

typedef enum { ENGINE_DUMP_BY_STEP = 0, ENGINE_DUMP_BY_POS } engine_dump_index;

/* How the pipeline runs, shared by every command that runs it (generate, eval, serve): read
 * once from the option table (cli/plan.h cli_pipe_opts_read) and embedded, not copied field
 * by field, in engine_run_opts (engine/batch.h), serve_loop_opts (serve/loop.h) and
 * engine_loop_opts below. */
typedef struct {
    const char *model_dir;
    const stage_config *cfg;
    const engine_plan *plan; /* its stages' ranks add up to the ranks of comm */
    stage_kv_opts kv;        /* the paged pool: page size, byte budget (0: defaults, stage.h) */
    int micro_batch;         /* most rows the scheduler puts in a micro-batch (R) */
    int max_in_flight;       /* micro-batches in flight (>= 1; 0 before the plan fills it) */
    stage_dtype wire;
    int weights_dtype;   /* stage_dtype the weight matrices are held in; -1: as stored */
    int dense_transport; /* baseline: every row on every chain link (same compute) */
    double timeout_s;    /* longest wait for a peer while work is in flight */
    int progress;        /* rank 0 prints progress lines on stderr */
} engine_pipe_opts;

typedef struct {
    engine_pipe_opts pipe;
    int slots, ctx; /* KV slots x positions per slot */
    int max_rows;   /* the most rows a micro-batch will have (workspace) */
    int serve;      /* server: ranks may idle without the timeout; ranks > 0
                     * report their link counters to rank 0 (at most twice a
                     * second, on link s -> 0, counted there) */
    /* --dump-logits (head): [dump_seqs][dump_len][vocab] float32, NaN where nothing was
     * computed; row seq, column step or pos (dump_index). NULL: none. */
    const char *dump_path;
    engine_dump_index dump_index;
    int dump_seqs, dump_len;
    long progress_total;    /* tokens (or micro-batches) expected, for the progress lines */
    int progress_tokens;    /* 1: count sampled tokens, 0: micro-batches */
    const char *stats_path; /* --stats (rank 0; NULL: none) */
    const char *command;    /* for the stats file */
    int report_nll;         /* the stats file has mean_nll / perplexity (eval) */
} engine_loop_opts;

typedef struct {
    double nll_sum; /* rank 0: summed over the head's target rows */
    long nll_count;
    long tokens; /* rank 0: sampled tokens */
    double seconds;
    double wire_bytes, dense_bytes, payload_bytes, header_bytes;
} engine_loop_result;

typedef struct engine_loop engine_loop;

/* Collective. ops/self: the scheduler (rank 0; ignored elsewhere). Returns 0, or non-zero
 * with err: -1 on the lowest failing rank (the message), -2 on the others. */
int engine_loop_open(MPI_Comm comm, const engine_loop_opts *o, const engine_sched_ops *ops,
                     void *self, engine_loop **out, char *err, size_t errlen);
int engine_loop_step(engine_loop *L);
/* Collective: ends the run (rank 0 sends END once nothing is in flight), gathers stats,
 * writes --stats / --dump-logits, frees L. res may be NULL. Returns 0 or -1/-2 like open. */
int engine_loop_close(engine_loop *L, engine_loop_result *res, char *err, size_t errlen);
int engine_loop_rank(const engine_loop *L);

#endif
