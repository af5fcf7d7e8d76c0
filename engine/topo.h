/* engine/topo.h — which MPI ranks form which pipeline stage.
 *
 * A stage is a group of ranks (plan->st[s].ranks; 0 is read as 1). Ranks are assigned in
 * order: stage 0 gets world ranks 0 .. K0-1, stage 1 the next K1, ... The first rank of each
 * group is its leader: only leaders run the pipeline loop and send / receive pipeline
 * packets (on a communicator of the leaders, where leader of stage s has rank s — so the
 * sparse transport, its tags and its byte counts are exactly those of a one-rank-per-stage
 * run); the other ranks of a group follow their leader inside the stage (stage/tp.h).
 * With every stage of one rank (the default) the topology is the identity and nothing changes.
 *
 * engine_topo_init validates: the ranks add up to the job's size ("-np 3 does not match the
 * plan's 2 stages x 2 ranks = 4"), every K in 1..64, and K divides num_attention_heads and
 * num_key_value_heads (heads and their KV caches are split across the group). Errors: non-zero
 * with one line in err; every rank computes the same answer from the same inputs, so all
 * ranks fail together (no collective is needed to agree). Ownership: engine_topo_free
 * (NULL-safe) frees the arrays.
 */
#ifndef ENGINE_TOPO_H
#define ENGINE_TOPO_H

#include <stddef.h>

#include "engine/partition.h"
#include "stage/config.h"

#define ENGINE_TOPO_MAX_K 64

typedef struct {
    int n_stages, n_ranks;
    int tp;      /* 1 when some stage has more than one rank */
    int *ranks;  /* [n_stages] K of each stage */
    int *leader; /* [n_stages] world rank of each stage's leader */
} engine_topo;

int engine_topo_init(engine_topo *t, const engine_plan *plan, int world_size,
                     const stage_config *cfg, char *err, size_t errlen);
void engine_topo_free(engine_topo *t);
/* Stage of a world rank, and its rank inside the stage's group (0: the leader); -1 if none. */
int engine_topo_stage_of(const engine_topo *t, int world_rank, int *group_rank);
/* K of a stage's plan entry (0 read as 1). */
static inline int engine_stage_ranks(const engine_stage_plan *s)
{
    return s->ranks > 0 ? s->ranks : 1;
}

#endif
