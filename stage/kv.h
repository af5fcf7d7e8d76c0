/* stage/kv.h — the paged KV cache of one stage (docs/SPEC.md §11). Internal to stage/.
 *
 * A pool holds n_pages pages; a page holds `page` consecutive entries of one (layer, sequence)
 * cache: the roped key, the value and the position of each. A sequence's cache on one layer
 * (kv_seq) is a page table: entry e lives in page pt[e / page] at offset e % page. Entries are
 * appended in position order; a page is taken from the pool when an entry starts a page, so
 * a layer that keeps few rows (a routed layer, a skipping MindSkip layer) takes few pages.
 * Clearing a sequence gives its pages back; kv_drop_before gives back the leading pages whose
 * positions all lie before a bound (a sliding window recycling its pages).
 *
 * Pages are refcounted so that sequences can share them (prefix reuse, docs/SPEC.md §11):
 * kv_share gives a sequence the first entries of another — the full pages by reference, the
 * partial last one as a copy, since both will append after it — and a page goes back to the
 * pool when its last holder lets go. Entries are never written in place once appended, so a
 * shared page reads the same for every holder.
 *
 * Page ids are handed out lowest-first from a stack, so a run is deterministic; where a page
 * lives never changes a result (attention reads entries in entry order, stage_attend_paged).
 * Ownership: the pool owns k / v / pos / the free stack; a kv_seq's pt array is owned by
 * whoever allocated it (stage_state: one array for every (layer, slot)). No allocation after
 * kv_pool_init. Errors: kv_append returns KV_FULL / KV_EXHAUSTED, nothing else fails. Not
 * thread-safe (a stage's state belongs to one thread).
 */
#ifndef STAGE_KV_H
#define STAGE_KV_H

#include <stddef.h>
#include <stdint.h>

#define KV_PAGE_DEFAULT 16 /* positions per page unless --kv-page says otherwise */

typedef struct {
    int page;          /* entries per page */
    int n_pages;       /* pages in the pool */
    size_t kvd;        /* floats of one K (or V) entry */
    float *k, *v;      /* [n_pages][page][kvd] roped keys, values */
    int32_t *pos;      /* [n_pages][page] positions */
    int32_t *free_ids; /* [n_pages] stack of free page ids, the next one on top */
    int32_t *ref;      /* [n_pages] holders of each page (0: free) */
    int n_free;
    int n_free_min; /* low-water mark of n_free since init (peak use) */
} kv_pool;

typedef struct {
    int n;       /* entries appended, in position order (dropped ones included) */
    int lo;      /* entries [0, lo) were dropped (a multiple of page) */
    int32_t *pt; /* [max_pages] page of entries [i*page, (i+1)*page); -1 none */
} kv_seq;

enum { KV_FULL = -1, KV_EXHAUSTED = -2 };

/* Bytes of one page: page x (K + V of kvd floats + an int32 position). */
size_t kv_page_bytes(int page, size_t kvd);
/* n_pages may be 0 (a stage without attention layers). Returns 0 or -1 (out of memory). */
int kv_pool_init(kv_pool *p, int page, int n_pages, size_t kvd);
void kv_pool_free(kv_pool *p);
static inline int kv_pool_used(const kv_pool *p) { return p->n_pages - p->n_free; }

/* Append (pos, k [kvd], v [kvd]) to c, whose page table has max_pages entries. Returns the
 * entry index, KV_FULL when c already holds max_pages * page entries, or KV_EXHAUSTED when
 * the entry needs a new page and the pool has none (c unchanged either way). */
int kv_append(kv_pool *p, kv_seq *c, int max_pages, int32_t pos, const float *k, const float *v);
/* Empty dst (its pages let go) and give it the entries [src->lo, n_entries) of src (src->lo
 * <= n_entries <= src->n; dst->lo = src->lo: what src dropped, dst has not either): the
 * full pages are shared (one more holder each), the partial last page (n_entries not a
 * multiple of page) is a new page with those entries copied. Returns 0, or KV_EXHAUSTED when
 * the copy needs a page the pool has none of (dst is then empty). */
int kv_share(kv_pool *p, const kv_seq *src, int n_entries, kv_seq *dst);
/* Entries of c whose positions are < pos (c's positions increase with the entry). */
int kv_entries_before(const kv_pool *p, const kv_seq *c, int32_t pos);
/* Let go of every page of c (back to the pool when c was its last holder) and empty it. */
void kv_seq_clear(kv_pool *p, kv_seq *c);
/* Give back the leading pages of c whose entries all have positions < pos (never the page the
 * next entry goes to). Returns the pages freed. Entries from c->lo on stay readable. */
int kv_drop_before(kv_pool *p, kv_seq *c, int32_t pos);
/* Pages c holds. */
static inline int kv_seq_pages(const kv_seq *c, int page)
{
    return (c->n + page - 1) / page - c->lo / page;
}

static inline int32_t kv_pos_at(const kv_pool *p, const kv_seq *c, int e)
{
    return p->pos[(size_t)c->pt[e / p->page] * p->page + e % p->page];
}

#endif
