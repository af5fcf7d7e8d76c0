/* tests/serve/double_srvq.c — TEST DOUBLE of serve/queue.h for the HTTP layer's unit tests.
 * Not the product: `modpipe serve` links the real queue (serve/queue.c). A thread plays the
 * pipeline: every SRVQ_DOUBLE_STEP_US microseconds (default 2000) it admits queued requests
 * into free slots and gives each running request one token. Token j of a request is its
 * prompt's (j mod n)-th id after a leading BOS (256), i.e. it echoes the prompt over and
 * over; an echoed EOS (257) ends it with STOP unless ignore_eos. Links: one fake link 0->1
 * with 100 bytes per token against 200 dense. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <unistd.h>

#include "serve/queue.h"

typedef struct dreq {
    srvq_request r;
    int32_t *prompt; /* [n_prompt] */
    long id;
    int n_gen, running, cancel;
    struct dreq *next;
} dreq;

struct srvq {
    pthread_mutex_t mu;
    pthread_t th;
    int slots, ctx, cap, vocab, eos, used, stop, closed;
    long next_id, queued, running;
    unsigned step_us;
    dreq *list; /* FIFO: queued and running */
    srvq_stats st;
};

static void finish(srvq *q, dreq *d, srvq_finish why, const char *msg)
{
    /* callbacks outside the lock, like a real pipeline thread */
    pthread_mutex_unlock(&q->mu);
    d->r.on_done(d->r.arg, why, d->r.n_prompt, d->n_gen, msg);
    pthread_mutex_lock(&q->mu);
}

static void *loop(void *arg)
{
    srvq *q = arg;
    pthread_mutex_lock(&q->mu);
    while (!q->stop) {
        /* admit */
        for (dreq *d = q->list; d && q->used < q->slots; d = d->next)
            if (!d->running && !d->cancel) {
                d->running = 1;
                q->used++;
                q->queued--;
                q->running++;
            }
        /* one step */
        dreq **pp = &q->list;
        while (*pp) {
            dreq *d = *pp;
            srvq_finish why = SRVQ_FINISH_LENGTH;
            int end = 0;
            if (d->cancel) {
                why = SRVQ_FINISH_CANCELLED;
                end = 1;
            } else if (d->running) {
                int base = d->r.n_prompt > 1 && d->prompt[0] == 256 ? 1 : 0;
                int32_t t = d->prompt[base + d->n_gen % (d->r.n_prompt - base)];
                d->n_gen++;
                q->st.generated_tokens++;
                q->st.link[0].bytes += 100;
                q->st.link[0].dense_bytes += 200;
                pthread_mutex_unlock(&q->mu);
                d->r.on_token(d->r.arg, t);
                pthread_mutex_lock(&q->mu);
                if (t == q->eos && !d->r.ignore_eos) {
                    why = SRVQ_FINISH_STOP;
                    end = 1;
                } else if (d->n_gen >= d->r.max_tokens || d->r.n_prompt + d->n_gen >= q->ctx)
                    end = 1;
            }
            if (end) {
                *pp = d->next;
                if (d->running) {
                    q->used--;
                    q->running--;
                } else
                    q->queued--;
                finish(q, d, why, why == SRVQ_FINISH_CANCELLED ? "cancelled" : "");
                free(d->prompt);
                free(d);
                continue;
            }
            pp = &d->next;
        }
        q->st.slots_used = q->used;
        pthread_mutex_unlock(&q->mu);
        usleep(q->step_us);
        pthread_mutex_lock(&q->mu);
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

srvq *srvq_new(int slots, int ctx, int queue_cap, int vocab, int eos)
{
    srvq *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    pthread_mutex_init(&q->mu, NULL);
    q->slots = slots;
    q->ctx = ctx;
    q->cap = queue_cap;
    q->vocab = vocab;
    q->eos = eos;
    const char *e = getenv("SRVQ_DOUBLE_STEP_US");
    q->step_us = e ? (unsigned)atoi(e) : 2000;
    q->st.n_links = 1;
    q->st.link[0].from = 0;
    q->st.link[0].to = 1;
    q->st.slots = slots;
    pthread_create(&q->th, NULL, loop, q);
    return q;
}

void srvq_double_set_step(srvq *q, unsigned us)
{
    pthread_mutex_lock(&q->mu);
    q->step_us = us;
    pthread_mutex_unlock(&q->mu);
}

void srvq_free(srvq *q)
{
    if (!q) return;
    pthread_mutex_lock(&q->mu);
    q->stop = 1;
    pthread_mutex_unlock(&q->mu);
    pthread_join(q->th, NULL);
    pthread_mutex_lock(&q->mu);
    while (q->list) {
        dreq *d = q->list;
        q->list = d->next;
        finish(q, d, SRVQ_FINISH_CANCELLED, "queue freed");
        free(d->prompt);
        free(d);
    }
    pthread_mutex_unlock(&q->mu);
    pthread_mutex_destroy(&q->mu);
    free(q);
}

long srvq_submit(srvq *q, const srvq_request *r, char *err, size_t errlen)
{
    if (r->n_prompt < 1) {
        snprintf(err, errlen, "empty prompt");
        return SRVQ_ERR_BAD;
    }
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= q->vocab) {
            snprintf(err, errlen, "token id %d out of range", r->prompt[i]);
            return SRVQ_ERR_BAD;
        }
    if (r->n_prompt + 1 > q->ctx) {
        snprintf(err, errlen, "prompt too long");
        return SRVQ_ERR_TOO_LONG;
    }
    pthread_mutex_lock(&q->mu);
    if (q->closed) {
        pthread_mutex_unlock(&q->mu);
        snprintf(err, errlen, "shutting down");
        return SRVQ_ERR_CLOSED;
    }
    long free_slots = q->slots - q->used;
    if (q->queued >= q->cap + (free_slots > 0 ? free_slots : 0)) {
        pthread_mutex_unlock(&q->mu);
        snprintf(err, errlen, "the queue is full (%d waiting)", q->cap);
        return SRVQ_ERR_FULL;
    }
    dreq *d = calloc(1, sizeof *d);
    d->r = *r;
    d->prompt = malloc((size_t)r->n_prompt * sizeof *d->prompt);
    memcpy(d->prompt, r->prompt, (size_t)r->n_prompt * sizeof *d->prompt);
    d->r.prompt = d->prompt;
    d->id = q->next_id++;
    dreq **pp = &q->list;
    while (*pp) pp = &(*pp)->next;
    *pp = d;
    q->queued++;
    q->st.requests_total++;
    q->st.prompt_tokens += (uint64_t)r->n_prompt;
    long id = d->id;
    pthread_mutex_unlock(&q->mu);
    return id;
}

void srvq_cancel(srvq *q, long id)
{
    pthread_mutex_lock(&q->mu);
    for (dreq *d = q->list; d; d = d->next)
        if (d->id == id) d->cancel = 1;
    pthread_mutex_unlock(&q->mu);
}

void srvq_close(srvq *q)
{
    pthread_mutex_lock(&q->mu);
    q->closed = 1;
    pthread_mutex_unlock(&q->mu);
}

int srvq_idle(srvq *q)
{
    pthread_mutex_lock(&q->mu);
    int idle = q->list == NULL;
    pthread_mutex_unlock(&q->mu);
    return idle;
}

void srvq_get_stats(srvq *q, srvq_stats *out)
{
    pthread_mutex_lock(&q->mu);
    *out = q->st;
    out->queued = q->queued;
    out->running = q->running;
    out->slots = q->slots;
    out->slots_used = q->used;
    pthread_mutex_unlock(&q->mu);
}
