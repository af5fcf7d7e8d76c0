/* serve/queue_sched.c — the server queue's scheduler side (the pipeline thread). See
 * serve/queue_sched.h; the locking is described in serve/queue_impl.h. */
#include "serve/queue_sched.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "serve/queue_impl.h"

/* ---- scheduler side (pipeline thread) ------------------------------------------------- */

int srvq_sched_config(srvq *q, int micro_batch, int whole_prompts, int max_rows)
{
    pthread_mutex_lock(&q->mu);
    q->R = micro_batch > 0 ? micro_batch : 1;
    q->whole = whole_prompts;
    q->max_rows = max_rows > q->R ? max_rows : q->R;
    /* per call at most one token event per row, and one end per request */
    q->ev_cap = q->max_rows + q->slots + q->queue_cap + 16;
    free(q->ev);
    q->ev = malloc((size_t)q->ev_cap * sizeof *q->ev);
    int rc = q->ev ? 0 : -1;
    pthread_mutex_unlock(&q->mu);
    return rc;
}

static void push_ev(srvq *q, rq *r, int done, int32_t tok, srvq_finish why, const char *msg)
{
    if (q->n_ev >= q->ev_cap) { /* cannot happen with ev_cap above; never drop an end */
        event *e = realloc(q->ev, (size_t)(q->ev_cap * 2) * sizeof *e);
        if (!e) abort();
        q->ev = e;
        q->ev_cap *= 2;
    }
    q->ev[q->n_ev++] = (event){r, done, tok, why, msg};
}

/* Run the collected callbacks (lock released); ended requests are freed after theirs. */
static void flush_ev(event *ev, int n)
{
    for (int i = 0; i < n; i++) {
        rq *r = ev[i].r;
        if (!ev[i].done) {
            if (r->r.on_token) r->r.on_token(r->r.arg, ev[i].tok);
        } else {
            r->r.on_done(r->r.arg, ev[i].why, r->r.n_prompt, r->n_gen, ev[i].msg);
            srvq_rq_free(r);
        }
    }
}

/* Unlink r from the running list and free its slot now. Its rows still in flight are
 * skipped when they come back (their tag is not the slot's request id any more). */
static void end_running(srvq *q, rq *r, srvq_finish why, const char *msg)
{
    rq **pp = &q->run_head, *prev = NULL;
    while (*pp && *pp != r) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (*pp) {
        *pp = r->next;
        if (q->run_tail == r) q->run_tail = prev;
    }
    q->n_running--;
    q->by_slot[r->slot] = NULL;
    engine_slot_release(&q->pool, r->slot);
    r->state = RQ_DONE;
    push_ev(q, r, 1, 0, why, msg);
}

static void sweep(srvq *q)
{
    /* cancelled: queued ones leave the queue, running ones their slot */
    for (rq **pp = &q->qhead, *prev = NULL; *pp;) {
        rq *r = *pp;
        if (!r->cancelled) {
            prev = r;
            pp = &r->next;
            continue;
        }
        *pp = r->next;
        if (q->qtail == r) q->qtail = prev;
        q->n_queued--;
        r->state = RQ_DONE;
        push_ev(q, r, 1, 0, SRVQ_FINISH_CANCELLED, "cancelled");
    }
    for (rq *r = q->run_head, *n; r; r = n) {
        n = r->next;
        if (r->cancelled) end_running(q, r, SRVQ_FINISH_CANCELLED, "cancelled");
    }
    /* admission in arrival order */
    while (q->qhead && q->pool.n_free > 0) {
        rq *r = q->qhead;
        q->qhead = r->next;
        if (!q->qhead) q->qtail = NULL;
        q->n_queued--;
        r->next = NULL;
        r->slot = engine_slot_acquire(&q->pool);
        r->state = RQ_RUNNING;
        q->by_slot[r->slot] = r;
        if (q->run_tail)
            q->run_tail->next = r;
        else
            q->run_head = r;
        q->run_tail = r;
        q->n_running++;
    }
}

static void add_row(stage_batch *mb, const rq *r, int32_t pos, int32_t tok, uint8_t fl,
                    uint32_t step)
{
    int i = stage_batch_add(mb, r->slot, pos, tok, fl, 0, step);
    mb->tag[i] = (uint64_t)r->id;
    if (fl & STAGE_ROW_SAMPLE) {
        mb->temperature[i] = r->r.temperature;
        mb->top_p[i] = r->r.top_p;
        mb->seed[i] = r->r.seed;
    }
}

static int sched_next(void *self, stage_batch *mb)
{
    srvq *q = self;
    pthread_mutex_lock(&q->mu);
    q->n_ev = 0;
    sweep(q);
    mb->n = 0;
    const int R = q->R;
    for (rq *r = q->run_head; r && mb->n < R; r = r->next)
        if (r->n_prefilled == r->n_fill && r->inflight == 0) {
            add_row(mb, r, r->r.n_prompt + r->n_gen - 1, r->last,
                    STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE, (uint32_t)r->n_gen);
            r->inflight++;
        }
    for (rq *r = q->run_head; r && mb->n < (q->whole ? q->max_rows : R); r = r->next) {
        int left = r->n_fill - r->n_prefilled;
        if (left == 0) continue;
        int room = R - mb->n;
        if (q->whole) {
            if (mb->n > 0 && left > room) continue; /* whole prompts: wait for an emptier one */
            room = q->max_rows - mb->n;
            if (left > room) continue;
        }
        int take = left < room ? left : room;
        for (int k = 0; k < take; k++) {
            int t = r->n_prefilled++;
            uint8_t fl = STAGE_ROW_PROMPT;
            /* a replayed request's next token comes from its decode row, not the prefill */
            if (t == r->n_fill - 1 && r->n_gen == 0) fl |= STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE;
            add_row(mb, r, t, r->prompt[t], fl, 0);
            r->inflight++;
        }
        if (q->whole) break; /* one whole prompt a micro-batch keeps mindskip's mean per prompt */
    }
    if (mb->n > 0) engine_slot_announce(&q->pool, mb);
    int n_ev = q->n_ev;
    event *ev = NULL;
    event local[64];
    if (n_ev) {
        ev = n_ev <= 64 ? local : malloc((size_t)n_ev * sizeof *ev);
        if (!ev) abort();
        memcpy(ev, q->ev, (size_t)n_ev * sizeof *ev);
    }
    q->n_ev = 0;
    pthread_mutex_unlock(&q->mu);
    flush_ev(ev, n_ev);
    if (ev != local) free(ev);
    return mb->n > 0;
}

static void sched_done(void *self, const stage_batch *mb, const int32_t *tok)
{
    srvq *q = self;
    pthread_mutex_lock(&q->mu);
    q->n_ev = 0;
    for (int i = 0; i < mb->n; i++) {
        int slot = mb->slot[i];
        rq *r = q->by_slot[slot];
        if (!r || (uint64_t)r->id != mb->tag[i]) continue; /* its request ended: skip */
        r->inflight--;
        if (!(mb->flags[i] & STAGE_ROW_SAMPLE) || r->state != RQ_RUNNING) continue;
        int32_t t = tok[i];
        if (q->eos >= 0 && t == q->eos && !r->r.ignore_eos) {
            end_running(q, r, SRVQ_FINISH_STOP, "stop");
            continue;
        }
        if (r->n_gen < r->gen_cap) r->prompt[r->r.n_prompt + r->n_gen] = t;
        r->n_gen++;
        r->last = t;
        q->st.generated_tokens++;
        push_ev(q, r, 0, t, 0, NULL);
        if (r->n_gen >= r->r.max_tokens)
            end_running(q, r, SRVQ_FINISH_LENGTH, "length");
        else if (r->r.n_prompt + r->n_gen > q->ctx) /* the next input would not fit */
            end_running(q, r, SRVQ_FINISH_LENGTH, "context full");
    }
    int n_ev = q->n_ev;
    event local[64];
    event *ev = n_ev <= 64 ? local : malloc((size_t)n_ev * sizeof *ev);
    if (!ev) abort();
    memcpy(ev, q->ev, (size_t)n_ev * sizeof *ev);
    q->n_ev = 0;
    pthread_mutex_unlock(&q->mu);
    flush_ev(ev, n_ev);
    if (ev != local) free(ev);
}

static int sched_finished(void *self)
{
    srvq *q = self;
    pthread_mutex_lock(&q->mu);
    int f = q->closed && q->n_queued == 0 && q->n_running == 0;
    pthread_mutex_unlock(&q->mu);
    return f;
}

static void sched_wait(void *self, double timeout_s)
{
    srvq *q = self;
    pthread_mutex_lock(&q->mu);
    if (!q->kick) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        long ns = ts.tv_nsec + (long)(timeout_s * 1e9);
        ts.tv_sec += ns / 1000000000L;
        ts.tv_nsec = ns % 1000000000L;
        while (!q->kick) {
            if (pthread_cond_timedwait(&q->cv, &q->mu, &ts) == ETIMEDOUT) break;
        }
    }
    q->kick = 0;
    pthread_mutex_unlock(&q->mu);
}

static void sched_links(void *self, const engine_link_bytes *l, int n)
{
    srvq *q = self;
    pthread_mutex_lock(&q->mu);
    if (n > SRVQ_MAX_LINKS) n = SRVQ_MAX_LINKS;
    q->st.n_links = n;
    for (int i = 0; i < n; i++) {
        q->st.link[i].from = l[i].from;
        q->st.link[i].to = l[i].to;
        q->st.link[i].bytes = l[i].bytes;
        q->st.link[i].dense_bytes = l[i].dense_bytes;
    }
    pthread_mutex_unlock(&q->mu);
}

static void sched_kv(void *self, const engine_kv_report *k, int n)
{
    srvq *q = self;
    pthread_mutex_lock(&q->mu);
    if (n > SRVQ_MAX_LINKS) n = SRVQ_MAX_LINKS;
    q->st.n_kv = n;
    memcpy(q->st.kv, k, (size_t)n * sizeof *k);
    pthread_mutex_unlock(&q->mu);
}

const engine_sched_ops srvq_sched_ops = {
    .next = sched_next,
    .done = sched_done,
    .finished = sched_finished,
    .wait = sched_wait,
    .links = sched_links,
    .kv = sched_kv,
};

void srvq_set_notify(srvq *q, void (*fn)(void *arg), void *arg)
{
    pthread_mutex_lock(&q->mu);
    q->notify = fn;
    q->notify_arg = arg;
    pthread_mutex_unlock(&q->mu);
}

void srvq_rewind(srvq *q)
{
    pthread_mutex_lock(&q->mu);
    q->st.restarts++;
    for (rq *r = q->run_head; r; r = r->next) {
        /* the input of the next decode row (the last token) is not prefilled */
        r->n_fill = r->n_gen > 0 ? r->r.n_prompt + r->n_gen - 1 : r->r.n_prompt;
        if (r->n_prefilled > 0) {
            q->st.replayed_requests++;
            q->st.replayed_tokens += (uint64_t)r->n_fill;
        }
        r->n_prefilled = 0;
        r->inflight = 0;
    }
    srvq_kick(q);
    pthread_mutex_unlock(&q->mu);
}

void srvq_fail_all(srvq *q, const char *msg)
{
    pthread_mutex_lock(&q->mu);
    snprintf(q->fail_msg, sizeof q->fail_msg, "%s", msg ? msg : "the pipeline failed");
    q->closed = 1;
    /* callbacks after unlocking, like the pipeline's */
    rq *list = NULL, **tail = &list;
    for (rq *r = q->qhead, *n; r; r = n) {
        n = r->next;
        r->next = NULL;
        *tail = r;
        tail = &r->next;
    }
    for (rq *r = q->run_head, *n; r; r = n) {
        n = r->next;
        r->next = NULL;
        *tail = r;
        tail = &r->next;
    }
    q->qhead = q->qtail = q->run_head = q->run_tail = NULL;
    q->n_queued = q->n_running = 0;
    for (int s = 0; s < q->slots; s++) q->by_slot[s] = NULL;
    pthread_mutex_unlock(&q->mu);
    for (rq *r = list, *n; r; r = n) {
        n = r->next;
        r->r.on_done(r->r.arg, SRVQ_FINISH_ERROR, r->r.n_prompt, r->n_gen, q->fail_msg);
        srvq_rq_free(r);
    }
}
