/* stage/batch.c — the micro-batch row descriptor's buffers. See stage/batch.h. */
#include "stage/batch.h"

#include <stdlib.h>
#include <string.h>

int stage_batch_init(stage_batch *b, int cap)
{
    memset(b, 0, sizeof *b);
    size_t c = (size_t)(cap > 0 ? cap : 1);
    b->cap = (int)c;
    int ok = 1;
#define ALLOC(T, name, def, what)                                                                  \
    b->name = malloc(c * sizeof(T));                                                               \
    ok = ok && b->name;
    STAGE_BATCH_ROWS(ALLOC)
#undef ALLOC
    b->release = malloc(STAGE_MAX_RELEASE * sizeof *b->release);
    b->share = malloc(3 * STAGE_MAX_SHARE * sizeof *b->share);
    if (!ok || !b->release || !b->share) {
        stage_batch_free(b);
        return -1;
    }
    return 0;
}

void stage_batch_free(stage_batch *b)
{
    if (!b) return;
#define FREE(T, name, def, what) free(b->name);
    STAGE_BATCH_ROWS(FREE)
#undef FREE
    free(b->release);
    free(b->share);
    memset(b, 0, sizeof *b);
}

void stage_batch_copy(stage_batch *d, const stage_batch *s)
{
    const size_t n = (size_t)s->n;
    d->n = s->n;
    d->id = s->id;
#define COPY(T, name, def, what)                                                                   \
    if (s->name) memcpy(d->name, s->name, n * sizeof(T));
    STAGE_BATCH_ROWS(COPY)
#undef COPY
    d->n_release = s->n_release;
    if (s->n_release) memcpy(d->release, s->release, (size_t)s->n_release * sizeof *d->release);
    d->n_share = s->n_share;
    if (s->n_share) memcpy(d->share, s->share, (size_t)s->n_share * 3 * sizeof *d->share);
}

int stage_batch_add(stage_batch *b, int32_t slot, int32_t pos, int32_t token, uint8_t flags,
                    uint64_t seq, uint32_t step)
{
    const int i = b->n++;
#define DEFAULT(T, name, def, what) b->name[i] = (T)(def);
    STAGE_BATCH_ROWS(DEFAULT)
#undef DEFAULT
    b->slot[i] = slot;
    b->pos[i] = pos;
    b->token[i] = token;
    b->flags[i] = flags;
    b->seq[i] = seq;
    b->step[i] = step;
    b->tag[i] = seq;
    return i;
}
