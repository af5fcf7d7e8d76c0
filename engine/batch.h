/* engine/batch.h — the batch job (engine_run: generate / eval) on the pipeline loop
 * (engine/pipeline.h), and the scheduler behind it.
 *
 * Its micro-batching depends only on the options and on whether the plan has one stage or
 * several (the default decode groups, below); with the same stage count an N-rank run
 * computes every layer on exactly the rows a 1-rank run does: with the f32 wire the logits
 * are bit-identical. Across stage counts the decode groups differ; the logits stay
 * bit-identical where every layer computes a row alone (stage/matmul.h: the small path, and
 * oneDNN's bf16 brgemm in practice), which tests/test_pipeline.c checks at 16 sequences.
 *   generate: sequences form decode groups (--groups G, default below); a group's prompts
 *             are cut into micro-batches of at most micro_batch rows (a prompt is never cut
 *             when the model has mindskip sequence-granularity or topk layers), then each
 *             decode step of the group (its sequences not yet stopped) is one micro-batch.
 *             Groups interleave so several micro-batches are in flight. A group starts when
 *             --slots has a free slot for each of its sequences. Default G: with one
 *             stage ceil(n / R) (one decode micro-batch of every sequence when they fit in
 *             R rows: the weights are read once per decode step, and a second group would
 *             have no other stage to overlap with); with several stages
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
 * Results: rank 0 gets generated tokens / NLL in `res`.
 *
 * engine_batch_new plans the run from engine_run_opts (which it keeps a pointer to: they
 * must outlive the scheduler) and checks it: --slots smaller than a decode group, --ctx
 * shorter than a sequence needs, positions past max_position_embeddings are one-line errors.
 * Every rank may build one (the plan sizes every rank's state); only rank 0's is driven
 * through engine_batch_ops. Results: engine_batch_take_generated after the run.
 */
#ifndef ENGINE_BATCH_H
#define ENGINE_BATCH_H

#include <stddef.h>
#include <stdint.h>

#include "engine/pipeline.h"
#include "engine/sched.h"

/* ---- the batch job --------------------------------------------------------------------------- */

typedef enum { ENGINE_RUN_GENERATE = 0, ENGINE_RUN_EVAL } engine_run_kind;

typedef struct {
    engine_run_kind kind;
    engine_pipe_opts pipe; /* model, plan, micro-batch (R), in flight, dtypes, ... */
    int n_seqs;
    int32_t *const *seq_tokens; /* [n_seqs][seq_len[s]]: prompts (generate) or lines (eval) */
    const int *seq_len;         /* [n_seqs] */
    int max_new;                /* generate: new tokens per sequence at most */
    float temperature, top_p;
    uint64_t seed;
    int eos;                /* generate: stop token (-1 none) */
    int ignore_eos;         /* generate: keep going past EOS */
    int slots;              /* KV slots (0: n_seqs) */
    int ctx;                /* positions per slot (0: the longest need) */
    int groups;             /* generate: decode groups (0: the default above) */
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

/* ---- the scheduler behind it ----------------------------------------------------------------- */

typedef struct engine_batch engine_batch;

int engine_batch_new(const engine_run_opts *o, engine_batch **out, char *err, size_t errlen);
void engine_batch_free(engine_batch *b);
extern const engine_sched_ops engine_batch_ops;

int engine_batch_max_rows(const engine_batch *b); /* largest micro-batch of the plan */
int engine_batch_slots(const engine_batch *b);
int engine_batch_ctx(const engine_batch *b);
int engine_batch_groups(const engine_batch *b);
int engine_batch_prefill_micro_batches(const engine_batch *b);
/* generate: the tokens [n_seqs][max_new] and how many each sequence made ([n_seqs]); the
 * caller owns them afterwards. */
void engine_batch_take_generated(engine_batch *b, int32_t **gen, int **n_gen);

#endif
