/* serve/queue.c — the server's request queue, the HTTP threads' side (submit, cancel, stats).
 * See serve/queue.h; the locking is described in serve/queue_impl.h, the scheduler side is
 * serve/queue_sched.c. */
#include "serve/queue_impl.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void srvq_cache_free(srvq *q)
{
    free(q->c_tok);
    free(q->c_pos);
    free(q->c_use);
    free(q->c_hash);
    free(q->ht_key);
    free(q->ht_val);
    free(q->h_rel);
    free(q->defer);
}

srvq *srvq_new(int slots, int ctx, int queue_cap, int vocab, int eos)
{
    if (slots < 1 || ctx < 2 || queue_cap < 0 || vocab < 1) return NULL;
    srvq *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->slots = slots;
    q->ctx = ctx;
    q->queue_cap = queue_cap;
    q->vocab = vocab;
    q->eos = eos;
    q->R = 1;
    q->max_rows = 1;
    q->by_slot = calloc((size_t)slots, sizeof *q->by_slot);
    /* the prefix holders the stages keep after the slots (engine_prefix_holders) */
    const int H = q->n_hold = engine_prefix_holders(slots), nb = ctx / SRVQ_PREFIX_BLOCK + 1;
    q->ht_cap = 16;
    while ((long)q->ht_cap < 2L * H * nb + 2) q->ht_cap *= 2;
    q->c_tok = malloc((size_t)H * (size_t)ctx * sizeof *q->c_tok);
    q->c_pos = calloc((size_t)H, sizeof *q->c_pos);
    q->c_use = calloc((size_t)H, sizeof *q->c_use);
    q->c_hash = calloc((size_t)H * (size_t)nb, sizeof *q->c_hash);
    q->ht_key = calloc((size_t)q->ht_cap, sizeof *q->ht_key);
    q->ht_val = calloc((size_t)q->ht_cap, sizeof *q->ht_val);
    q->h_rel = calloc((size_t)H, sizeof *q->h_rel);
    q->defer = calloc((size_t)slots, sizeof *q->defer);
    if (!q->by_slot || !q->c_tok || !q->c_pos || !q->c_use || !q->c_hash || !q->ht_key ||
        !q->ht_val || !q->h_rel || !q->defer || engine_slot_pool_init(&q->pool, slots)) {
        srvq_cache_free(q);
        free(q->by_slot);
        engine_slot_pool_free(&q->pool);
        free(q);
        return NULL;
    }
    pthread_mutex_init(&q->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&q->cv, &ca);
    pthread_condattr_destroy(&ca);
    q->st.slots = slots;
    for (int i = 0; i < SRVQ_MAX_LINKS; i++) { /* every row kept until measured */
        q->keep[i] = 1.0;
        q->margin[i] = 1.25;
    }
    return q;
}

void srvq_rq_free(rq *r)
{
    if (!r) return;
    free(r->prompt);
    free(r);
}

void srvq_free(srvq *q)
{
    if (!q) return;
    for (rq *r = q->qhead, *n; r; r = n) {
        n = r->next;
        srvq_rq_free(r);
    }
    for (rq *r = q->run_head, *n; r; r = n) {
        n = r->next;
        srvq_rq_free(r);
    }
    free(q->by_slot);
    srvq_cache_free(q);
    free(q->ev);
    engine_slot_pool_free(&q->pool);
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
    free(q);
}

void srvq_kick(srvq *q)
{
    q->kick = 1;
    pthread_cond_signal(&q->cv);
    if (q->notify) q->notify(q->notify_arg);
}

long srvq_submit(srvq *q, const srvq_request *r, char *err, size_t errlen)
{
    if (!r->prompt || r->n_prompt < 1) {
        snprintf(err, errlen, "prompt: empty");
        return SRVQ_ERR_BAD;
    }
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= q->vocab) {
            snprintf(err, errlen, "prompt: token id %d out of range [0, %d)", (int)r->prompt[i],
                     q->vocab);
            return SRVQ_ERR_BAD;
        }
    if (r->max_tokens < 1) {
        snprintf(err, errlen, "max_tokens: must be >= 1, got %d", r->max_tokens);
        return SRVQ_ERR_BAD;
    }
    if (!isfinite(r->temperature)) {
        snprintf(err, errlen, "temperature: not a finite number");
        return SRVQ_ERR_BAD;
    }
    if (!(r->top_p > 0.0f && r->top_p <= 1.0f)) {
        snprintf(err, errlen, "top_p: must be in (0, 1], got %g", (double)r->top_p);
        return SRVQ_ERR_BAD;
    }
    if (!r->on_done) {
        snprintf(err, errlen, "on_done: missing");
        return SRVQ_ERR_BAD;
    }
    if (r->n_prompt + 1 > q->ctx) {
        snprintf(err, errlen,
                 "prompt: %d tokens leave no room for a new one in the %d-position "
                 "context",
                 r->n_prompt, q->ctx);
        return SRVQ_ERR_TOO_LONG;
    }
    rq *n = calloc(1, sizeof *n);
    /* the context ends a request after ctx + 1 - n_prompt tokens at most */
    int gen_cap =
        r->max_tokens < q->ctx + 1 - r->n_prompt ? r->max_tokens : q->ctx + 1 - r->n_prompt;
    int32_t *p = n ? malloc((size_t)(r->n_prompt + gen_cap) * sizeof *p) : NULL;
    if (!p) {
        free(n);
        snprintf(err, errlen, "out of memory");
        return SRVQ_ERR_FULL;
    }
    memcpy(p, r->prompt, (size_t)r->n_prompt * sizeof *p);
    n->r = *r;
    n->r.prompt = p;
    n->prompt = p;
    n->gen_cap = gen_cap;
    n->n_fill = r->n_prompt;
    n->slot = -1;
    pthread_mutex_lock(&q->mu);
    long rc;
    long free_slots = q->slots - q->n_running;
    if (q->closed) {
        snprintf(err, errlen, "the server is shutting down");
        rc = SRVQ_ERR_CLOSED;
    } else if (q->n_queued - free_slots >= q->queue_cap) {
        /* queued requests that a free slot will take are not waiting */
        snprintf(err, errlen,
                 "queue full: %ld request(s) waiting for a slot (at most %d), all %d slots "
                 "taken",
                 q->n_queued - free_slots, q->queue_cap, q->slots);
        rc = SRVQ_ERR_FULL;
    } else {
        rc = n->id = q->next_id++;
        if (q->qtail)
            q->qtail->next = n;
        else
            q->qhead = n;
        q->qtail = n;
        q->n_queued++;
        q->st.requests_total++;
        q->st.prompt_tokens += (uint64_t)r->n_prompt;
        srvq_kick(q);
    }
    pthread_mutex_unlock(&q->mu);
    if (rc < 0) srvq_rq_free(n);
    return rc;
}

void srvq_cancel(srvq *q, long id)
{
    pthread_mutex_lock(&q->mu);
    for (rq *r = q->qhead; r; r = r->next)
        if (r->id == id) r->cancelled = 1;
    for (rq *r = q->run_head; r; r = r->next)
        if (r->id == id) r->cancelled = 1;
    srvq_kick(q);
    pthread_mutex_unlock(&q->mu);
}

void srvq_close(srvq *q)
{
    pthread_mutex_lock(&q->mu);
    q->closed = 1;
    srvq_kick(q);
    pthread_mutex_unlock(&q->mu);
}

int srvq_idle(srvq *q)
{
    pthread_mutex_lock(&q->mu);
    int idle = q->n_queued == 0 && q->n_running == 0;
    pthread_mutex_unlock(&q->mu);
    return idle;
}

void srvq_get_stats(srvq *q, srvq_stats *out)
{
    pthread_mutex_lock(&q->mu);
    *out = q->st;
    out->queued = q->n_queued;
    out->running = q->n_running;
    out->slots_used = (int)q->n_running;
    out->prefix_holders_used = q->n_cached;
    pthread_mutex_unlock(&q->mu);
}
