/* engine/pipeline.h — the distributed program: the pipeline loop + the batch job (SPEC §4).
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
 * for each micro-batch and gets the sampled tokens back; it exists on rank 0 only.
 *
 * The batch job (engine_run: generate / eval) is one scheduler. Its micro-batching depends
 * only on the options (never on the rank count), so an N-rank run computes every layer on
 * exactly the rows a 1-rank run does: with the f32 wire the logits are bit-identical.
 *   generate: sequences form decode groups (--groups G, default below); a group's prompts
 *             are cut into micro-batches of at most micro_batch rows (a prompt is never cut
 *             when the model has mindskip sequence-granularity or topk layers), then each
 *             decode step of the group (its sequences not yet stopped) is one micro-batch.
 *             Groups interleave so several micro-batches are in flight. A group starts when
 *             --slots has a free slot for each of its sequences. Default G =
 *             max(ceil(n / R), min(8, floor(n / 8))), at least 1: decode micro-batches keep
 *             >= 8 rows when there are >= 8 sequences (no 2-row GEMMs), at most 8 groups
 *             unless more are needed to keep a group <= R rows.
 *             A sequence stops at max_new tokens or at EOS (config eos_token_id; not with
 *             ignore_eos); its slot is released at once.
 *   eval:     the lines (any lengths), cut the same way into micro-batches of at most
 *             micro_batch rows, slots-many sequences at a time.
 *
 * Sampling: the draw for new token j of sequence i is stage_rng_seed_draw(seed, i, j), on
 * whichever rank is the head: independent of batching and rank count.
 *
 * Results: rank 0 gets generated tokens / NLL in `res`; the head writes --dump-logits; rank 0
 * writes --stats. Fatal errors during the run abort the job through COMM_FATAL.
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

/* ---- the loop -------------------------------------------------------------------------- */

typedef enum { ENGINE_DUMP_BY_STEP = 0, ENGINE_DUMP_BY_POS } engine_dump_index;

typedef struct {
    const char *model_dir;
    const stage_config *cfg;
    const engine_plan *plan; /* its stages' ranks add up to the ranks of comm */
    int slots, ctx;          /* KV slots x positions per slot */
    stage_kv_opts kv;        /* the paged pool: page size, byte budget (0: defaults, stage.h) */
    int max_rows;            /* the most rows a micro-batch will have (workspace) */
    int max_in_flight;       /* micro-batches in flight (>= 1) */
    stage_dtype wire;
    int weights_dtype;   /* stage_dtype the weight matrices are held in; -1: as stored */
    int dense_transport; /* baseline: every row on every chain link (same compute) */
    double timeout_s;    /* longest wait for a peer while work is in flight */
    int serve;           /* server: ranks may idle without the timeout; ranks > 0
                                 * report their link counters to rank 0 (at most twice a
                                 * second, on link s -> 0, counted there) */
    /* --dump-logits (head): [dump_seqs][dump_len][vocab] float32, NaN where nothing was
     * computed; row seq, column step or pos (dump_index). NULL: none. */
    const char *dump_path;
    engine_dump_index dump_index;
    int dump_seqs, dump_len;
    int progress;           /* rank 0 prints progress lines on stderr */
    long progress_total;    /* tokens (or micro-batches) expected, for those lines */
    int progress_tokens;    /* 1: count sampled tokens, 0: micro-batches */
    const char *stats_path; /* --stats (rank 0; NULL: none) */
    const char *command;    /* for the stats file */
    int micro_batch;        /* for the stats file */
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

/* ---- the batch job --------------------------------------------------------------------- */

typedef enum { ENGINE_RUN_GENERATE = 0, ENGINE_RUN_EVAL } engine_run_kind;

typedef struct {
    engine_run_kind kind;
    const char *model_dir;
    const stage_config *cfg;
    const engine_plan *plan; /* n_stages == ranks of comm */
    int n_seqs;
    int32_t *const *seq_tokens; /* [n_seqs][seq_len[s]]: prompts (generate) or lines (eval) */
    const int *seq_len;         /* [n_seqs] */
    int max_new;                /* generate: new tokens per sequence at most */
    float temperature, top_p;
    uint64_t seed;
    int eos;           /* generate: stop token (-1 none) */
    int ignore_eos;    /* generate: keep going past EOS */
    int slots;         /* KV slots (0: n_seqs) */
    int ctx;           /* positions per slot (0: the longest need) */
    stage_kv_opts kv;  /* --kv-page / --kv-mem (0: defaults) */
    int micro_batch;   /* most rows per micro-batch (R) */
    int groups;        /* generate: decode groups (0: the default above) */
    int max_in_flight; /* micro-batches in flight (>= 1) */
    stage_dtype wire;
    int weights_dtype;      /* stage_dtype the weight matrices are held in; -1: as stored */
    int dense_transport;    /* baseline: every row on every chain link (same compute) */
    double timeout_s;       /* longest wait for a peer before aborting */
    int progress;           /* rank 0 prints progress lines on stderr */
    const char *dump_path;  /* --dump-logits (NULL: none) */
    const char *stats_path; /* --stats (NULL: none) */
    const char *command;    /* "generate" / "eval", for the stats file */
} engine_run_opts;

typedef struct {
    int32_t *generated; /* rank 0, generate: [n_seqs][max_new] */
    int *n_generated;   /* rank 0, generate: [n_seqs] tokens made (EOS included) */
    double nll_sum;     /* rank 0, eval */
    long nll_count;
    double seconds;
    double wire_bytes, dense_bytes, payload_bytes, header_bytes;
} engine_run_result;

/* Returns 0 on success; startup problems (load errors etc.) are agreed on by all ranks and
 * reported by the lowest failing rank in err (other ranks get a short err), non-zero return. */
int engine_run(MPI_Comm comm, const engine_run_opts *o, engine_run_result *res, char *err,
               size_t errlen);
void engine_run_result_free(engine_run_result *res);

#endif
