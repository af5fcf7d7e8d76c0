/* cluster/batch.h — the batch scheduler behind generate / eval (see pipeline.h for the
 * micro-batching it makes; it depends only on the options, never on the rank count).
 *
 * cluster_batch_new plans the run from cluster_run_opts (which it keeps a pointer to: they
 * must outlive the scheduler) and checks it: --slots smaller than a decode group, --ctx
 * shorter than a sequence needs, positions past max_position_embeddings are one-line errors.
 * Every rank may build one (the plan sizes every rank's state); only rank 0's is driven
 * through cluster_batch_ops. Results: cluster_batch_generated after the run.
 */
#ifndef CLUSTER_BATCH_H
#define CLUSTER_BATCH_H

#include <stddef.h>
#include <stdint.h>

#include "cluster/pipeline.h"
#include "cluster/sched.h"

typedef struct cluster_batch cluster_batch;

int cluster_batch_new(const cluster_run_opts *o, cluster_batch **out, char *err, size_t errlen);
void cluster_batch_free(cluster_batch *b);
extern const cluster_sched_ops cluster_batch_ops;

int cluster_batch_max_rows(const cluster_batch *b); /* largest micro-batch of the plan */
int cluster_batch_slots(const cluster_batch *b);
int cluster_batch_ctx(const cluster_batch *b);
int cluster_batch_groups(const cluster_batch *b);
int cluster_batch_prefill_micro_batches(const cluster_batch *b);
/* generate: the tokens [n_seqs][max_new] and how many each sequence made ([n_seqs]); the
 * caller owns them afterwards. */
void cluster_batch_take_generated(cluster_batch *b, int32_t **gen, int **n_gen);

#endif
