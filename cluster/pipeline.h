/* cluster/pipeline.h — the distributed program: scheduler + per-stage loop (SPEC §4).
 *
 * cluster_run() is called by every rank of `comm` (one rank = one stage; -np 1 is the same
 * code with a single stage that is also the head). Data path, per micro-batch:
 *   stage 0: scheduler picks rows -> embed -> layers -> route rows onward
 *   stage s: receive chain packet (+ the bypass packets it announces) -> layers -> route
 *   head   : ... -> logits of the rows that need them -> sample / NLL -> tokens to stage 0
 * and every rank counts the bytes it hands to MPI.
 *
 * Micro-batching depends only on the options (never on the rank count), so an N-rank run
 * computes every layer on exactly the rows a 1-rank run does: with the f32 wire the logits
 * are bit-identical.
 *   generate: sequences form `groups` groups (of at most micro_batch sequences); a group's
 *             prompts are cut into micro-batches of at most micro_batch rows (a prompt is
 *             never cut when the model has mindskip sequence-granularity or topk layers), then
 *             each decode step of the group is one micro-batch. Groups interleave so several
 *             micro-batches are in flight.
 *   eval:     the lines, cut the same way into micro-batches of at most micro_batch rows.
 *
 * Results: rank 0 gets generated tokens / NLL in `res`; the head writes --dump-logits; rank 0
 * writes --stats. Fatal errors during the run abort the job through COMM_FATAL.
 */
#ifndef CLUSTER_PIPELINE_H
#define CLUSTER_PIPELINE_H

#include <mpi.h>
#include <stdint.h>

#include "cluster/partition.h"
#include "comm/comm.h"
#include "stage/config.h"

typedef enum { CLUSTER_RUN_GENERATE = 0, CLUSTER_RUN_EVAL } cluster_run_kind;

typedef struct {
    cluster_run_kind kind;
    const char *model_dir;
    const stage_config *cfg;
    const cluster_plan *plan;   /* n_stages == ranks of comm */
    int n_seqs;
    int32_t *const *seq_tokens; /* [n_seqs][seq_len[s]]: prompts (generate) or lines (eval) */
    const int *seq_len;         /* [n_seqs] */
    int max_new;                /* generate: new tokens per sequence */
    float temperature, top_p;
    uint64_t seed;
    int micro_batch;            /* most rows per micro-batch (R) */
    int groups;                 /* generate: decode groups (micro-batches per decode round) */
    int max_in_flight;          /* micro-batches in flight (>= 1) */
    stage_dtype wire;
    int weights_dtype;          /* stage_dtype the weight matrices are held in; -1: as stored */
    int dense_transport;        /* baseline: every row on every chain link (same compute) */
    double timeout_s;           /* longest wait for a peer before aborting */
    int progress;               /* rank 0 prints progress lines on stderr */
    const char *dump_path;      /* --dump-logits (NULL: none) */
    const char *stats_path;     /* --stats (NULL: none) */
    const char *command;        /* "generate" / "eval", for the stats file */
} cluster_run_opts;

typedef struct {
    int32_t *generated;         /* rank 0, generate: [n_seqs][max_new] */
    double nll_sum;             /* rank 0, eval */
    long nll_count;
    double seconds;
    double wire_bytes, dense_bytes, payload_bytes, header_bytes;
} cluster_run_result;

/* Returns 0 on success; startup problems (load errors etc.) are agreed on by all ranks and
 * reported by the lowest failing rank in err (other ranks get a short err), non-zero return. */
int cluster_run(MPI_Comm comm, const cluster_run_opts *o, cluster_run_result *res, char *err,
                size_t errlen);
void cluster_run_result_free(cluster_run_result *res);

#endif
