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

/* ---- scheduler side (pipeline thread) -------------------------------------------------------- */

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

/* ---- the cache of finished prefixes (docs/SPEC.md §11) ----
 * A request that ends (STOP / LENGTH) with reuse on keeps its slot: the slot is parked on the
 * stages (a share triple src == dst) with its pages, and its tokens stay here (c_tok), so a
 * later request with the same first blocks shares from it as from a running one. A parked
 * slot is evicted — released, its pages go back on every stage — least recently used first,
 * when a request needs a slot or the pools need pages (before any preemption), on a lost
 * sequence, and when reuse is turned off. A parked slot that is the source of a share in the
 * next micro-batch stays until then: the stages apply releases before shares. */
static int share_source(const srvq *q, int slot)
{
    for (int k = 0; k < q->n_share; k++)
        if (q->share[3 * k] == slot && q->share[3 * k + 1] != slot) return 1;
    return 0;
}

static void uncache(srvq *q, int slot)
{
    q->c_pos[slot] = 0;
    q->n_cached--;
    q->st.prefix_evictions++;
    engine_slot_release(&q->pool, slot);
}

/* Evicts the least recently used parked slot but `keep` (-1: any). 1, or 0: none to evict. */
static int evict_lru(srvq *q, int keep)
{
    int b = -1;
    for (int s = 0; s < q->slots; s++)
        if (q->c_pos[s] && s != keep && !share_source(q, s) && (b < 0 || q->c_use[s] < q->c_use[b]))
            b = s;
    if (b < 0) return 0;
    uncache(q, b);
    return 1;
}

static void evict_all(srvq *q)
{
    while (evict_lru(q, -1)) {}
}

/* The longest whole-block prefix of r's fill (at most all but its last row) that parked slot
 * s holds. */
static int cached_match(const srvq *q, int s, const rq *r)
{
    const int32_t *t = q->c_tok + (size_t)s * q->ctx;
    int lim = q->c_pos[s] < r->n_fill - 1 ? q->c_pos[s] : r->n_fill - 1, n = 0;
    while (n < lim && t[n] == r->prompt[n]) n++;
    return n - n % SRVQ_PREFIX_BLOCK;
}

/* The parked slot r would share from (-1: none). */
static int best_cached(const srvq *q, const rq *r)
{
    int b = -1, bn = 0;
    for (int s = 0; s < q->slots; s++) {
        int n = q->c_pos[s] ? cached_match(q, s, r) : 0;
        if (n > bn) {
            b = s;
            bn = n;
        }
    }
    return b;
}

/* Evicts a parked slot, the one r would share from last. 1, or 0: none. */
static int make_room(srvq *q, const rq *r)
{
    return evict_lru(q, r ? best_cached(q, r) : -1) || evict_lru(q, -1);
}

/* r ended with STOP / LENGTH: positions it computed whose KV a later request may share (its
 * last sampled token was never fed), or 0 when it is not kept (reuse off, whole prompts,
 * less than a block, no room for the park in the next micro-batch). */
static int cacheable(const srvq *q, const rq *r)
{
    if (q->prefix_off || q->whole || q->n_share >= STAGE_MAX_SHARE) return 0;
    int held = r->n_gen > 0 ? r->r.n_prompt + r->n_gen - 1 : r->r.n_prompt;
    return held >= SRVQ_PREFIX_BLOCK && held <= q->ctx ? held : 0;
}

/* Park r's slot with its first `held` positions; a parked slot whose tokens begin these is
 * superseded (this one holds the same pages) and evicted. */
static void park(srvq *q, const rq *r, int held)
{
    for (int s = 0; s < q->slots; s++)
        if (q->c_pos[s] && q->c_pos[s] <= held && !share_source(q, s) &&
            !memcmp(q->c_tok + (size_t)s * q->ctx, r->prompt,
                    (size_t)q->c_pos[s] * sizeof *r->prompt))
            uncache(q, s);
    memcpy(q->c_tok + (size_t)r->slot * q->ctx, r->prompt, (size_t)held * sizeof *r->prompt);
    q->c_pos[r->slot] = held;
    q->c_use[r->slot] = ++q->tick;
    q->n_cached++;
    int32_t *t = q->share + 3 * q->n_share++;
    t[0] = t[1] = r->slot;
    t[2] = held;
}

/* Unlink r from the running list and free its slot now (release 0: the caller parks it). Its
 * rows still in flight are skipped when they come back (their tag is not the slot's request
 * id any more). */
static void unlink_running(srvq *q, rq *r, int release)
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
    r->next = NULL;
    q->n_running--;
    q->by_slot[r->slot] = NULL;
    if (release) engine_slot_release(&q->pool, r->slot);
    r->slot = -1;
}

static void end_running(srvq *q, rq *r, srvq_finish why, const char *msg)
{
    int held = why == SRVQ_FINISH_STOP || why == SRVQ_FINISH_LENGTH ? cacheable(q, r) : 0;
    if (held) park(q, r, held);
    unlink_running(q, r, !held);
    r->state = RQ_DONE;
    push_ev(q, r, 1, 0, why, msg);
}

/* Start r's sequence over (its KV is gone: a preemption, or the pipeline restarted): prefill
 * its prompt and the tokens it made so far but the last — the same tokens at the same
 * positions, so its KV comes out as it was — and the next token comes from the usual decode
 * row (the last token as input, step n_gen). */
static void srvq_rq_replay(rq *r)
{
    r->n_fill = r->n_gen > 0 ? r->r.n_prompt + r->n_gen - 1 : r->r.n_prompt;
    r->n_prefilled = r->n_issued = r->inflight = 0;
    r->group = 0; /* joins a decode group again once its replay is in */
}

/* Preemption (docs/SPEC.md §11): r gives its slot and pages up and waits at the head of the
 * queue; readmitted, it is replayed (srvq_rq_replay), then decodes on. Its rows still in
 * flight are skipped (the tag names the admission). */
static void preempt(srvq *q, rq *r)
{
    unlink_running(q, r, 1);
    r->state = RQ_QUEUED;
    srvq_rq_replay(r);
    r->epoch++;
    r->next = q->qhead;
    q->qhead = r;
    if (!q->qtail) q->qtail = r;
    q->n_queued++;
    q->st.preemptions++;
}

/* ---- admission by memory (docs/SPEC.md §11) ----
 * Each stage reports its pool (pages, page size P, layers with a KV cache L, pages held) and
 * the share of rows its layers keep, counted at one moment (entries the running sequences
 * hold over what they would hold had every layer kept every row: no lag between the two). A
 * layer keeping k_l of a sequence's n rows holds ceil(k_l n / P) <= k_l n / P + 1 pages, so
 * with k the share kept a sequence takes at most L (k n / P + 1) pages: the estimate, with k
 * = keep x margin (at most 1; 1 until measured), which cannot fall short unless a sequence
 * keeps more than margin times the stage's share. A request is admitted when every stage can
 * hold what the running ones will hold after their next row plus its own rows and a page of
 * growth on each layer, with the margin (1.25, growing by a quarter on every loss); the
 * newest running request is preempted only when the running ones no longer fit without it
 * (k = keep: admission's margin is slack that a noisy measure does not turn into
 * preemptions). A stage that runs out anyway loses the sequence that needed the page, which
 * is recomputed too. */
static double est_pages(const srvq *q, int s, long positions, int with_margin)
{
    const engine_kv_report *k = &q->st.kv[s];
    if (!k->page || positions <= 0) return 0.0;
    double kp = q->keep[s] * (with_margin ? q->margin[s] : 1.0);
    if (kp > 1.0) kp = 1.0;
    return (double)k->kv_layers * (kp * (double)positions / (double)k->page + 1.0);
}

/* 1 when the running requests (each one row on) plus `extra` positions of a new one fit. */
static int kv_fits(const srvq *q, long extra, int with_margin)
{
    for (int s = 0; s < q->st.n_kv; s++) {
        const engine_kv_report *k = &q->st.kv[s];
        if (!k->page || !k->kv_layers) continue;
        double need = est_pages(q, s, extra, with_margin);
        for (const rq *r = q->run_head; r; r = r->next)
            need += est_pages(q, s, (long)r->r.n_prompt + r->n_gen + 1, with_margin);
        for (int c = 0; c < q->slots; c++) /* parked: pages shared with a running one twice */
            if (q->c_pos[c]) need += est_pages(q, s, q->c_pos[c], with_margin);
        if (need > (double)k->pages_total) return 0;
    }
    return 1;
}

static long reserve_positions(const srvq *q)
{
    long p = 0;
    for (int s = 0; s < q->st.n_kv; s++)
        if ((long)q->st.kv[s].page > p) p = (long)q->st.kv[s].page;
    return p;
}

/* Prefix reuse at r's admission: the running request whose issued positions, or the parked
 * slot whose positions, share the most whole blocks with r's (at least one, at most r's fill
 * less one row) gives them to r. A running source's rows at those positions were issued
 * before this micro-batch, so every stage has them when the share (applied before this
 * micro-batch's rows) arrives. */
static void prefix_reuse(srvq *q, rq *r)
{
    if (q->prefix_off || q->whole || r->no_share || q->n_share >= STAGE_MAX_SHARE) return;
    int best = -1, best_n = 0, parked = 0;
    for (const rq *s = q->run_head; s; s = s->next) {
        if (s == r || s->state != RQ_RUNNING) continue;
        int avail = s->n_prefilled < s->n_fill ? s->n_prefilled : s->n_fill;
        int lim = avail < r->n_fill - 1 ? avail : r->n_fill - 1, n = 0;
        while (n < lim && s->prompt[n] == r->prompt[n]) n++;
        n -= n % SRVQ_PREFIX_BLOCK;
        if (n > best_n) {
            best = s->slot;
            best_n = n;
        }
    }
    int c = best_cached(q, r), cn = c >= 0 ? cached_match(q, c, r) : 0;
    if (cn > best_n) {
        best = c;
        best_n = cn;
        parked = 1;
    }
    if (best < 0) return;
    if (parked) {
        q->c_use[best] = ++q->tick;
        q->st.prefix_cached_hits++;
    }
    int32_t *t = q->share + 3 * q->n_share++;
    t[0] = best;
    t[1] = r->slot;
    t[2] = best_n;
    r->n_prefilled = best_n;
    q->st.prefix_hits++;
    q->st.prefix_tokens += (uint64_t)best_n;
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
    /* under pressure parked slots go first, then the newest running request makes room
     * (never the last one) */
    while (!kv_fits(q, 0, 1) && evict_lru(q, -1)) {}
    while (q->n_running > 1 && !kv_fits(q, 0, 0)) preempt(q, q->run_tail);
    /* admission in arrival order, by slots and by memory (parked slots evicted for either,
     * the one the request would share from last); with nothing running the oldest one always
     * goes (a request the pool cannot hold ends with an error, sched_done) */
    const long reserve = reserve_positions(q);
    while (q->qhead) {
        if (!kv_fits(q, (long)q->qhead->n_fill + reserve, 1)) {
            if (make_room(q, q->qhead)) continue;
            if (q->n_running > 0) break;
        }
        if (q->pool.n_free == 0 && !make_room(q, q->qhead)) break;
        rq *r = q->qhead;
        q->qhead = r->next;
        if (!q->qhead) q->qtail = NULL;
        q->n_queued--;
        r->next = NULL;
        r->slot = engine_slot_acquire(&q->pool);
        r->state = RQ_RUNNING;
        r->solo = q->n_running == 0 && q->n_cached == 0;
        for (rq *o = q->run_head; o; o = o->next) o->solo = 0;
        q->by_slot[r->slot] = r;
        if (q->run_tail)
            q->run_tail->next = r;
        else
            q->run_head = r;
        q->run_tail = r;
        q->n_running++;
        prefix_reuse(q, r);
    }
}

static void add_row(stage_batch *mb, rq *r, int32_t pos, int32_t tok, uint8_t fl, uint32_t step)
{
    int i = stage_batch_add(mb, r->slot, pos, tok, fl, 0, step);
    mb->tag[i] = srvq_rq_tag(r);
    r->n_issued++;
    r->inflight++;
    if (fl & STAGE_ROW_SAMPLE) {
        mb->temperature[i] = r->r.temperature;
        mb->top_p[i] = r->r.top_p;
        mb->seed[i] = r->r.seed;
    }
}

/* ---- decode groups (policy step 2, serve/queue_sched.h) -------------------------------------- */
#define MAX_GROUPS 64

static int decoding(const rq *r) { return r->n_prefilled == r->n_fill; }

static void decode_row(stage_batch *mb, rq *r)
{
    add_row(mb, r, r->r.n_prompt + r->n_gen - 1, r->last, STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE,
            (uint32_t)r->n_gen);
}

/* The smallest group (ties: one with nothing in flight, then the lowest). */
static int smallest(const int *size, const int *busy, int G)
{
    int b = 0;
    for (int g = 1; g < G; g++)
        if (size[g] < size[b] || (size[g] == size[b] && busy[b] && !busy[g])) b = g;
    return b;
}

static void decode_rows(srvq *q, stage_batch *mb)
{
    int n = 0;
    for (const rq *r = q->run_head; r; r = r->next) n += decoding(r);
    if (n == 0) return;
    const int R = q->R;
    int G = q->groups < 1 ? 1 : q->groups;
    if (G > n) G = n;
    if (G < (n + R - 1) / R) G = (n + R - 1) / R; /* a group's rows fit one micro-batch */
    if (G > MAX_GROUPS) G = MAX_GROUPS;
    int size[MAX_GROUPS] = {0}, busy[MAX_GROUPS] = {0}, ready[MAX_GROUPS] = {0};
    for (rq *r = q->run_head; r; r = r->next) {
        if (!decoding(r)) continue;
        if (r->group > G) r->group = 0; /* fewer groups now: join again */
        if (!r->group) continue;
        int g = r->group - 1;
        size[g]++;
        if (r->inflight)
            busy[g] = 1;
        else
            ready[g]++;
    }
    /* newcomers (their last prompt row is back) join the smallest group */
    for (rq *r = q->run_head; r; r = r->next)
        if (decoding(r) && !r->group && !r->inflight) {
            int g = smallest(size, busy, G);
            r->group = g + 1;
            size[g]++;
            ready[g]++;
        }
    int g = -1;
    for (int k = 0; k < G && g < 0; k++) {
        int c = (q->rr + k) % G;
        if (!busy[c] && ready[c]) g = c;
    }
    if (g < 0) return;
    q->rr = (g + 1) % G;
    int cap = (n + G - 1) / G;
    if (cap > R) cap = R;
    for (rq *r = q->run_head; r; r = r->next) {
        if (r->group != g + 1 || r->inflight || !decoding(r)) continue;
        if (mb->n < cap) {
            decode_row(mb, r);
            continue;
        }
        /* more than its share: to a smaller group, whose next micro-batch takes it */
        size[g]--;
        int h = smallest(size, busy, G);
        size[h]++;
        r->group = h + 1;
    }
}

/* decode rows: sampled, not a prompt's */
static int decode_rows_in(const stage_batch *mb)
{
    int n = 0;
    for (int i = 0; i < mb->n; i++)
        n += (mb->flags[i] & STAGE_ROW_SAMPLE) && !(mb->flags[i] & STAGE_ROW_PROMPT);
    return n;
}

static int sched_next(void *self, stage_batch *mb)
{
    srvq *q = self;
    pthread_mutex_lock(&q->mu);
    q->n_ev = 0;
    sweep(q);
    mb->n = 0;
    const int R = q->R;
    decode_rows(q, mb);
    for (rq *r = q->run_head; r && mb->n < (q->whole ? q->max_rows : R); r = r->next) {
        const int np = r->r.n_prompt;
        int left = r->n_fill - r->n_prefilled;
        if (left == 0) continue;
        int room = R - mb->n, whole = q->whole && r->n_prefilled < np;
        if (whole) {
            /* a recomputed request's generated tokens follow its prompt as decode rows */
            left = np - r->n_prefilled;
            if (mb->n > 0 && left > room) continue; /* whole prompts: wait for an emptier one */
            room = q->max_rows - mb->n;
            if (left > room) continue;
        }
        int take = left < room ? left : room;
        for (int k = 0; k < take; k++) {
            int t = r->n_prefilled++;
            /* a replayed request's generated tokens are decode rows (no PROMPT flag), and
             * its next token comes from its decode row, not the prefill */
            uint8_t fl = t < np ? STAGE_ROW_PROMPT : 0;
            if (t == r->n_fill - 1 && r->n_gen == 0) fl |= STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE;
            add_row(mb, r, t, r->prompt[t], fl, 0);
        }
        if (whole) break; /* one whole prompt a micro-batch keeps mindskip's mean per prompt */
    }
    /* releases go out at once, in a micro-batch of their own when no row is ready: the
     * stages' pages come back before the next admission needs them */
    engine_slot_announce(&q->pool, mb);
    mb->n_share = q->n_share; /* after the releases, before the rows (stage/batch.h) */
    memcpy(mb->share, q->share, (size_t)q->n_share * 3 * sizeof *q->share);
    q->n_share = 0;
    if (mb->n > 0) {
        int nd = decode_rows_in(mb);
        q->st.micro_batches++;
        if (nd) {
            q->dec_out++;
            q->st.decode_micro_batches++;
            q->st.decode_rows += (uint64_t)nd;
            q->st.decode_in_flight += (uint64_t)q->dec_out;
        }
    }
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
    return mb->n > 0 || mb->n_release > 0 || mb->n_share > 0;
}

static void sched_done(void *self, const stage_batch *mb, const int32_t *tok)
{
    srvq *q = self;
    pthread_mutex_lock(&q->mu);
    q->n_ev = 0;
    if (decode_rows_in(mb) && q->dec_out > 0) q->dec_out--;
    for (int i = 0; i < mb->n; i++) {
        int slot = mb->slot[i];
        rq *r = q->by_slot[slot];
        if (!r || srvq_rq_tag(r) != mb->tag[i]) continue; /* ended or preempted: skip */
        r->inflight--;
        if (!(mb->flags[i] & STAGE_ROW_SAMPLE) || r->state != RQ_RUNNING) continue;
        int32_t t = tok[i];
        if (t == STAGE_TOKEN_KV_LOST) { /* a stage's pool ran out under it: recompute */
            r->no_share = 1;            /* (or a shared prefix was not there) */
            evict_all(q);               /* the pages are short: the cache goes first */
            if (!r->solo) {
                preempt(q, r);
                for (int s = 0; s < q->st.n_kv; s++) /* the estimate was low */
                    if (q->keep[s] * q->margin[s] < 1.0) q->margin[s] *= 1.25;
                continue;
            }
            /* every page of every pool was free for it: it cannot fit */
            end_running(q, r, SRVQ_FINISH_ERROR, "KV pool too small for it (raise --kv-mem)");
            continue;
        }
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
    /* measure keep: the running sequences' entries over their positions x layers, both
     * counted by the stage at the same moment; only once there is something to measure
     * (4 pages' worth a layer) */
    for (int s = 0; s < n; s++) {
        const engine_kv_report *e = &k[s];
        if (!e->page || !e->kv_layers || e->positions_live < 4 * e->page * e->kv_layers) continue;
        double kp = (double)e->entries_live / (double)e->positions_live;
        q->keep[s] = kp < 1.0 / 64 ? 1.0 / 64 : kp > 1.0 ? 1.0 : kp;
    }
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

void srvq_sched_groups(srvq *q, int groups)
{
    pthread_mutex_lock(&q->mu);
    q->groups = groups < 1 ? 1 : groups;
    pthread_mutex_unlock(&q->mu);
}

void srvq_set_prefix_reuse(srvq *q, int on)
{
    pthread_mutex_lock(&q->mu);
    q->prefix_off = !on;
    if (!on) {
        evict_all(q);
        srvq_kick(q); /* the releases go out */
    }
    pthread_mutex_unlock(&q->mu);
}

void srvq_prefix_cache_clear(srvq *q)
{
    pthread_mutex_lock(&q->mu);
    evict_all(q);
    srvq_kick(q);
    pthread_mutex_unlock(&q->mu);
}

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
    q->dec_out = 0; /* what was in flight is forgotten */
    q->n_share = 0;
    for (int s = 0; s < q->slots; s++) /* the new stages hold no parked slot */
        if (q->c_pos[s]) uncache(q, s);
    for (rq *r = q->run_head; r; r = r->next) {
        int replayed = r->n_prefilled > 0;
        srvq_rq_replay(r);
        if (replayed) {
            q->st.replayed_requests++;
            q->st.replayed_tokens += (uint64_t)r->n_fill;
        }
    }
    srvq_kick(q);
    pthread_mutex_unlock(&q->mu);
}

void srvq_note_stall(srvq *q, int stage, int rank, const char *host)
{
    pthread_mutex_lock(&q->mu);
    q->st.stalls++;
    q->st.stall_stage = stage;
    q->st.stall_rank = rank;
    snprintf(q->st.stall_host, sizeof q->st.stall_host, "%s", host ? host : "");
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
