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
    p->ref = calloc((size_t)n_pages + 1, sizeof(int32_t));
    if (!p->k || !p->v || !p->pos || !p->free_ids || !p->ref) {
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
    free(p->ref);
    memset(p, 0, sizeof *p);
}

static int take_page(kv_pool *p)
{
    if (p->n_free == 0) return -1;
    int id = p->free_ids[--p->n_free];
    p->ref[id] = 1;
    if (p->n_free < p->n_free_min) p->n_free_min = p->n_free;
    return id;
}

int kv_append(kv_pool *p, kv_seq *c, int max_pages, int32_t pos, const float *k, const float *v)
{
    const int e = c->n, pi = e / p->page, off = e % p->page;
    if (pi >= max_pages) return KV_FULL;
    if (off == 0) {
        int id = take_page(p);
        if (id < 0) return KV_EXHAUSTED;
        c->pt[pi] = id;
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
    int id = c->pt[pi];
    if (--p->ref[id] == 0) p->free_ids[p->n_free++] = id;
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

int kv_share(kv_pool *p, const kv_seq *src, int n_entries, kv_seq *dst)
{
    kv_seq_clear(p, dst);
    const int lo = src->lo / p->page, full = n_entries / p->page, part = n_entries % p->page;
    if (part) { /* the copy first: on failure nothing is shared */
        int id = take_page(p);
        if (id < 0) return KV_EXHAUSTED;
        const size_t from = (size_t)src->pt[full] * p->page, to = (size_t)id * p->page;
        memcpy(p->pos + to, p->pos + from, (size_t)part * sizeof *p->pos);
        memcpy(p->k + to * p->kvd, p->k + from * p->kvd, (size_t)part * p->kvd * sizeof(float));
        memcpy(p->v + to * p->kvd, p->v + from * p->kvd, (size_t)part * p->kvd * sizeof(float));
        dst->pt[full] = id;
    }
    for (int pi = lo; pi < full; pi++) {
        dst->pt[pi] = src->pt[pi];
        p->ref[src->pt[pi]]++;
    }
    dst->n = n_entries;
    dst->lo = src->lo;
    return 0;
}

int kv_entries_before(const kv_pool *p, const kv_seq *c, int32_t pos)
{
    int lo = c->lo, hi = c->n; /* first entry with position >= pos, by bisection */
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (kv_pos_at(p, c, mid) < pos)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}
