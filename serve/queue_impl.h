/* serve/queue_impl.h — the inside of the server queue (serve/queue.h), shared by its two
 * sides: serve/queue.c (the HTTP threads: submit, cancel, stats) and serve/queue_sched.c
 * (the pipeline thread: the scheduler). Not for other modules.
 *
 * One mutex (srvq.mu) guards everything; HTTP threads hold it for O(prompt) in submit and O(1)
 * elsewhere. The pipeline thread collects callback events under the lock and runs them
 * after unlocking, so a callback may call srvq_cancel / srvq_get_stats.
 */
#ifndef SERVE_QUEUE_IMPL_H
#define SERVE_QUEUE_IMPL_H

#include <pthread.h>

#include "engine/sched.h"
#include "serve/queue.h"

/* Prefix reuse (srvq_set_prefix_reuse): shares of SRVQ_PREFIX_BLOCK positions at a time, the
 * unit of the block hash (docs/SPEC.md §11). */
#define SRVQ_PREFIX_BLOCK 16

enum { RQ_QUEUED = 0, RQ_RUNNING, RQ_DONE };

typedef struct rq {
    long id;
    srvq_request r;  /* r.prompt points at prompt below */
    int32_t *prompt; /* [n_prompt + gen_cap] own copy, then the tokens generated so far */
    int gen_cap;     /* tokens it can generate at most (max_tokens, or what the context holds) */
    int n_fill;      /* positions to prefill: n_prompt; replayed (a preemption, srvq_rewind):
                      * prompt + tokens - 1 */
    int state;
    int cancelled;
    int slot;
    int n_prefilled; /* of the n_fill, rows issued */
    int n_issued;    /* rows issued at this admission (prefill and decode) */
    int n_gen;       /* tokens generated (EOS excluded) */
    int32_t last;    /* last generated token: the next decode row's input */
    int inflight;    /* rows issued, not back */
    int group;       /* decode group + 1 (0: none yet; serve/queue_sched.c) */
    uint32_t epoch;  /* admissions so far; the rows' tag names it (srvq_rq_tag) */
    int solo;        /* admitted with nothing running or parked and nothing admitted since:
                      * the pools hold its pages only */
    int no_share;    /* lost once: recomputed without a shared prefix */
    struct rq *next; /* queue / running list order */
} rq;

typedef struct {
    rq *r;
    int done; /* 0: token, 1: on_done */
    int32_t tok;
    srvq_finish why;
    const char *msg;
} event;

struct srvq {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int slots, ctx, queue_cap, vocab, eos;
    int R, whole, max_rows;
    int groups, rr; /* decode groups wanted (srvq_sched_groups), the next one to try */
    int dec_out;    /* micro-batches with decode rows in flight */
    int closed;
    int kick; /* something happened since the last wait */
    long next_id;
    rq *qhead, *qtail; /* waiting for a slot, arrival order */
    long n_queued;
    rq *run_head, *run_tail; /* holding a slot, admission order */
    long n_running;
    rq **by_slot; /* [slots] running request of each slot, NULL: free */
    engine_slot_pool pool;
    event *ev; /* [ev_cap] */
    int n_ev, ev_cap;
    char fail_msg[256];
    srvq_stats st;                 /* st.kv: the stages' pools, the basis of admission by memory */
    double keep[SRVQ_MAX_LINKS];   /* per stage: share of rows the layers keep (measured) */
    double margin[SRVQ_MAX_LINKS]; /* per stage: admission's factor on keep (grows on a loss) */
    int prefix_off;                /* srvq_set_prefix_reuse(q, 0) */
    int n_share;                   /* prefix shares for the next micro-batch */
    int32_t share[3 * STAGE_MAX_SHARE];
    /* the cache of finished prefixes (serve/queue_sched.c, docs/SPEC.md §11): a finished
     * request's pages move to a prefix holder (stage sequence slots + h) and stay there,
     * found by block hash, until evicted least recently used first */
    int n_hold;       /* holders: engine_prefix_holders(slots) */
    int32_t *c_tok;   /* [n_hold][ctx] tokens at positions 0.. of each holder */
    int *c_pos;       /* [n_hold] positions a holder holds (0: empty) */
    uint64_t *c_use;  /* [n_hold] tick of its parking or its last hit */
    uint64_t *c_hash; /* [n_hold][ctx / SRVQ_PREFIX_BLOCK] chained hash of blocks 0..j */
    uint64_t *ht_key; /* [ht_cap] block hash table: chained hash (0: empty) ... */
    int32_t *ht_val;  /* [ht_cap] ... -> a holder holding that block */
    int ht_cap;       /* a power of two, >= 2 x every block of every holder */
    int32_t *h_rel;   /* [n_hold] holders evicted, their release not yet announced */
    int n_h_rel;
    int32_t *defer; /* [slots] slots parked into a holder by the next micro-batch's share: */
    int n_defer;    /* released after it (stages apply releases before shares) */
    uint64_t tick;
    int n_cached;              /* holders in use */
    void (*notify)(void *arg); /* srvq_set_notify: called with mu held on every kick */
    void *notify_arg;
};

/* The tag of r's rows at this admission: rows of an earlier one (before a preemption) that come
 * back later are skipped. */
static inline uint64_t srvq_rq_tag(const rq *r)
{
    return (uint64_t)r->id << 20 | (r->epoch & 0xfffff);
}

/* Frees a request and its prompt copy (NULL: no-op). */
void srvq_rq_free(rq *r);
/* Wakes the scheduler's wait (q->mu held). */
void srvq_kick(srvq *q);

#endif
