/* stage/kv.c — the paged KV pool (docs/SPEC.md §11). See kv.h. */
#include "stage/kv.h"

#include <stdlib.h>
#include <string.h>

size_t kv_page_bytes(int page, size_t kvd)
{
    return (size_t)page * (2 * kvd * sizeof(float) + sizeof(int32_t));
}

int kv_pool_init(kv_pool *p, int page, int n_pages, size_t kvd)
{
    memset(p, 0, sizeof *p);
    p->page = page;
    p->n_pages = n_pages;
    p->kvd = kvd;
    const size_t ent = (size_t)n_pages * page;
    /* calloc: the OS backs a page of the pool on its first write, so pages never taken cost
     * address space only */
    p->k = calloc(ent * kvd + 1, sizeof(float));
    p->v = calloc(ent * kvd + 1, sizeof(float));
    p->pos = calloc(ent + 1, sizeof(int32_t));
    p->free_ids = malloc(((size_t)n_pages + 1) * sizeof(int32_t));
    if (!p->k || !p->v || !p->pos || !p->free_ids) {
        kv_pool_free(p);
        return -1;
    }
    for (int i = 0; i < n_pages; i++) p->free_ids[i] = n_pages - 1 - i; /* page 0 on top */
    p->n_free = p->n_free_min = n_pages;
    return 0;
}

void kv_pool_free(kv_pool *p)
{
    free(p->k);
    free(p->v);
    free(p->pos);
    free(p->free_ids);
    memset(p, 0, sizeof *p);
}

int kv_append(kv_pool *p, kv_seq *c, int max_pages, int32_t pos, const float *k, const float *v)
{
    const int e = c->n, pi = e / p->page, off = e % p->page;
    if (pi >= max_pages) return KV_FULL;
    if (off == 0) {
        if (p->n_free == 0) return KV_EXHAUSTED;
        c->pt[pi] = p->free_ids[--p->n_free];
        if (p->n_free < p->n_free_min) p->n_free_min = p->n_free;
    }
    const size_t slot = (size_t)c->pt[pi] * p->page + off;
    p->pos[slot] = pos;
    memcpy(p->k + slot * p->kvd, k, p->kvd * sizeof(float));
    memcpy(p->v + slot * p->kvd, v, p->kvd * sizeof(float));
    c->n = e + 1;
    return e;
}

static void page_back(kv_pool *p, kv_seq *c, int pi)
{
    p->free_ids[p->n_free++] = c->pt[pi];
    c->pt[pi] = -1;
}

void kv_seq_clear(kv_pool *p, kv_seq *c)
{
    const int hi = (c->n + p->page - 1) / p->page;
    for (int pi = c->lo / p->page; pi < hi; pi++) page_back(p, c, pi);
    c->n = c->lo = 0;
}

int kv_drop_before(kv_pool *p, kv_seq *c, int32_t pos)
{
    int freed = 0;
    /* a page is dropped only when full (the next entry goes to a later page) and its last
     * position is before pos */
    while (c->lo + p->page <= c->n && kv_pos_at(p, c, c->lo + p->page - 1) < pos) {
        page_back(p, c, c->lo / p->page);
        c->lo += p->page;
        freed++;
    }
    return freed;
}
