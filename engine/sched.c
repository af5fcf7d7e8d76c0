/* engine/sched.c — micro-batch buffers and the rank-0 slot pool. See sched.h. */
#include "engine/sched.h"

#include <stdlib.h>
#include <string.h>

int engine_mb_init(engine_mb *mb, int cap)
{
    memset(mb, 0, sizeof *mb);
    size_t c = (size_t)(cap > 0 ? cap : 1);
    mb->cap = (int)c;
    mb->slot = malloc(c * sizeof *mb->slot);
    mb->pos = malloc(c * sizeof *mb->pos);
    mb->token = malloc(c * sizeof *mb->token);
    mb->flags = malloc(c);
    mb->temperature = malloc(c * sizeof *mb->temperature);
    mb->top_p = malloc(c * sizeof *mb->top_p);
    mb->seed = malloc(c * sizeof *mb->seed);
    mb->seq = malloc(c * sizeof *mb->seq);
    mb->step = malloc(c * sizeof *mb->step);
    mb->target = malloc(c * sizeof *mb->target);
    mb->tag = malloc(c * sizeof *mb->tag);
    mb->release = malloc(COMM_MAX_RELEASE * sizeof *mb->release);
    if (!mb->slot || !mb->pos || !mb->token || !mb->flags || !mb->temperature || !mb->top_p ||
        !mb->seed || !mb->seq || !mb->step || !mb->target || !mb->tag || !mb->release) {
        engine_mb_free(mb);
        return -1;
    }
    return 0;
}

void engine_mb_free(engine_mb *mb)
{
    if (!mb) return;
    free(mb->slot);
    free(mb->pos);
    free(mb->token);
    free(mb->flags);
    free(mb->temperature);
    free(mb->top_p);
    free(mb->seed);
    free(mb->seq);
    free(mb->step);
    free(mb->target);
    free(mb->tag);
    free(mb->release);
    memset(mb, 0, sizeof *mb);
}

void engine_mb_copy(engine_mb *d, const engine_mb *s)
{
    size_t n = (size_t)s->n;
    d->n = s->n;
    d->id = s->id;
    memcpy(d->slot, s->slot, n * sizeof *d->slot);
    memcpy(d->pos, s->pos, n * sizeof *d->pos);
    memcpy(d->token, s->token, n * sizeof *d->token);
    memcpy(d->flags, s->flags, n);
    memcpy(d->temperature, s->temperature, n * sizeof *d->temperature);
    memcpy(d->top_p, s->top_p, n * sizeof *d->top_p);
    memcpy(d->seed, s->seed, n * sizeof *d->seed);
    memcpy(d->seq, s->seq, n * sizeof *d->seq);
    memcpy(d->step, s->step, n * sizeof *d->step);
    memcpy(d->target, s->target, n * sizeof *d->target);
    memcpy(d->tag, s->tag, n * sizeof *d->tag);
    d->n_release = s->n_release;
    memcpy(d->release, s->release, (size_t)s->n_release * sizeof *d->release);
}

int engine_mb_add(engine_mb *mb, int32_t slot, int32_t pos, int32_t token, uint8_t flags,
                  uint64_t seq, uint32_t step)
{
    int i = mb->n++;
    mb->slot[i] = slot;
    mb->pos[i] = pos;
    mb->token[i] = token;
    mb->flags[i] = flags;
    mb->temperature[i] = 0.0f;
    mb->top_p[i] = 1.0f;
    mb->seed[i] = 0;
    mb->seq[i] = seq;
    mb->step[i] = step;
    mb->target[i] = -1;
    mb->tag[i] = seq;
    return i;
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

void engine_slot_announce(engine_slot_pool *p, engine_mb *mb)
{
    int k = p->n_pending < COMM_MAX_RELEASE ? p->n_pending : COMM_MAX_RELEASE;
    mb->n_release = k;
    for (int i = 0; i < k; i++) mb->release[i] = p->pending[p->n_pending - 1 - i];
    p->n_pending -= k;
}
