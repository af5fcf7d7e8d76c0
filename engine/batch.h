/* engine/batch.h — the batch scheduler behind generate / eval (see pipeline.h for the
 * micro-batching it makes; it depends only on the options, never on the rank count).
 *
 * engine_batch_new plans the run from engine_run_opts (which it keeps a pointer to: they
 * must outlive the scheduler) and checks it: --slots smaller than a decode group, --ctx
 * shorter than a sequence needs, positions past max_position_embeddings are one-line errors.
 * Every rank may build one (the plan sizes every rank's state); only rank 0's is driven
 * through engine_batch_ops. Results: engine_batch_generated after the run.
 */
#ifndef ENGINE_BATCH_H
#define ENGINE_BATCH_H

#include <stddef.h>
#include <stdint.h>

#include "engine/pipeline.h"
#include "engine/sched.h"

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
