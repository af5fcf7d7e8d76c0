/* engine/topo.c — stage -> rank group map. See topo.h. */
#include "engine/topo.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int engine_topo_init(engine_topo *t, const engine_plan *plan, int world_size,
                     const stage_config *cfg, char *err, size_t errlen)
{
    memset(t, 0, sizeof *t);
    const int S = plan->n_stages;
    t->n_stages = S;
    t->ranks = malloc((size_t)(S > 0 ? S : 1) * sizeof(int));
    t->leader = malloc((size_t)(S > 0 ? S : 1) * sizeof(int));
    if (!t->ranks || !t->leader) {
        engine_topo_free(t);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    int total = 0, uniform = 1;
    for (int s = 0; s < S; s++) {
        int K = engine_stage_ranks(&plan->st[s]);
        if (K > ENGINE_TOPO_MAX_K) {
            snprintf(err, errlen, "stage %d: %d ranks, at most %d per stage", s, K,
                     ENGINE_TOPO_MAX_K);
            engine_topo_free(t);
            return -1;
        }
        if (K > 1 && (cfg->n_heads % K || cfg->n_kv_heads % K)) {
            snprintf(err, errlen,
                     "stage %d: %d ranks cannot split num_attention_heads %d and "
                     "num_key_value_heads %d (both must be multiples of %d)",
                     s, K, cfg->n_heads, cfg->n_kv_heads, K);
            engine_topo_free(t);
            return -1;
        }
        t->ranks[s] = K;
        t->leader[s] = total;
        total += K;
        t->tp |= K > 1;
        uniform &= K == engine_stage_ranks(&plan->st[0]);
    }
    t->n_ranks = total;
    if (total != world_size) {
        if (uniform && S > 0 && t->tp && world_size % t->ranks[0])
            snprintf(err, errlen, "-np %d is not a multiple of the %d ranks per stage (--tp %d)",
                     world_size, t->ranks[0], t->ranks[0]);
        else if (!t->tp)
            snprintf(err, errlen, "the plan has %d stages but the job has %d ranks", S, world_size);
        else
            snprintf(err, errlen, "the plan's stages need %d ranks in all but the job has %d",
                     total, world_size);
        engine_topo_free(t);
        return -1;
    }
    return 0;
}

void engine_topo_free(engine_topo *t)
{
    if (!t) return;
    free(t->ranks);
    free(t->leader);
    t->ranks = t->leader = NULL;
}

int engine_topo_stage_of(const engine_topo *t, int world_rank, int *group_rank)
{
    for (int s = 0; s < t->n_stages; s++)
        if (world_rank >= t->leader[s] && world_rank < t->leader[s] + t->ranks[s]) {
            if (group_rank) *group_rank = world_rank - t->leader[s];
            return s;
        }
    if (group_rank) *group_rank = -1;
    return -1;
}
