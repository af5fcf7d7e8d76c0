/* engine/sched.c — the rank-0 slot pool. See engine/sched.h. */
#include "engine/sched.h"

#include <stdlib.h>
#include <string.h>

int engine_stuck_stage(const engine_stage_progress *p, int n)
{
    for (int s = 0; s < n; s++)
        if (p[s].mb_want > 0 && p[s].mb_done < p[s].mb_want) return s;
    return -1;
}

int engine_slot_pool_init(engine_slot_pool *p, int n)
{
    memset(p, 0, sizeof *p);
    p->n = n;
    p->free_list = malloc((size_t)(n > 0 ? n : 1) * sizeof *p->free_list);
    p->pending = malloc((size_t)(n > 0 ? n : 1) * sizeof *p->pending);
    if (!p->free_list || !p->pending) {
        engine_slot_pool_free(p);
        return -1;
    }
    for (int i = 0; i < n; i++) p->free_list[i] = n - 1 - i; /* pop from the end: 0 first */
    p->n_free = n;
    return 0;
}

void engine_slot_pool_free(engine_slot_pool *p)
{
    if (!p) return;
    free(p->free_list);
    free(p->pending);
    memset(p, 0, sizeof *p);
}

int engine_slot_acquire(engine_slot_pool *p)
{
    if (p->n_free == 0) return -1;
    int s = p->free_list[--p->n_free];
    for (int k = 0; k < p->n_pending; k++) /* the new sequence's reset supersedes the release */
        if (p->pending[k] == s) {
            p->pending[k] = p->pending[--p->n_pending];
            break;
        }
    return s;
}

void engine_slot_release(engine_slot_pool *p, int slot)
{
    if (slot < 0 || slot >= p->n || p->n_free >= p->n) return;
    p->free_list[p->n_free++] = slot;
    p->pending[p->n_pending++] = slot;
}

void engine_slot_announce(engine_slot_pool *p, stage_batch *mb)
{
    int k = p->n_pending < STAGE_MAX_RELEASE ? p->n_pending : STAGE_MAX_RELEASE;
    mb->n_release = k;
    for (int i = 0; i < k; i++) mb->release[i] = p->pending[p->n_pending - 1 - i];
    p->n_pending -= k;
}
