/* engine/pipeline.c — the pipeline loop (every rank). See pipeline.h; the loop's state is in
 * pipeline_impl.h, the stats it gathers and writes in pipeline_stats.c. */
#include "engine/pipeline.h"
#include "engine/pipeline_impl.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "base/backoff.h"
#include "base/clock.h"
#include "engine/stats.h"
#include "engine/topo.h"
#include "engine/tp.h"
#include "comm/link.h"
#include "stage/kernels.h"
#include "stage/npy.h"
#include "stage/stage.h"

enum { TAG_CHAIN = 1, TAG_BYPASS = 2, TAG_TOKENS = 3, TAG_REPORT = 4 };

static void progress_cb(void *arg) { comm_links_progress(arg); }
int engine_loop_rank(const engine_loop *L) { return L->follower ? -1 : L->rank; }

/* ---- Sending --------------------------------------------------------------------------------- */

static void send_packet(engine_loop *c, const comm_packet *h, const int32_t *tokens, int dest_rank,
                        int tag)
{
    size_t cap, hb = 0, pb = 0;
    char err[256];
    uint8_t *buf = comm_links_acquire(c->links, &cap);
    size_t len = comm_pack(h, c->x, c->D, tokens, buf, cap, &hb, &pb, err, sizeof err);
    if (!len)
        COMM_FATAL("packing micro-batch %llu for stage %d: %s", (unsigned long long)h->mb,
                   dest_rank, err);
    comm_links_send(c->links, buf, len, dest_rank, tag, hb, pb, h->n_rows);
}

/* Sampling arrays equal to the wire default are left off (comm.h). */
static int all_f(const float *a, int n, float v)
{
    for (int i = 0; i < n; i++)
        if (a[i] != v) return 0;
    return 1;
}
static int all_u64(const uint64_t *a, int n, uint64_t v)
{
    for (int i = 0; i < n; i++)
        if (a[i] != v) return 0;
    return 1;
}
static int all_u32(const uint32_t *a, int n, uint32_t v)
{
    for (int i = 0; i < n; i++)
        if (a[i] != v) return 0;
    return 1;
}
static int all_i32(const int32_t *a, int n, int32_t v)
{
    for (int i = 0; i < n; i++)
        if (a[i] != v) return 0;
    return 1;
}

/* After the stage's layers: every held row goes to the next stage that needs it, to the head
 * when only its logits are still needed, or nowhere. One chain packet to rank+1 always. */
static void route_and_send(engine_loop *c)
{
    const int n = c->d.n, s = c->rank, S = c->S;
    const uint64_t mb = c->d.id;
    const engine_plan *pl = c->o.pipe.plan;
    int rows_to[64] = {0};
    memset(c->masks, 0, (size_t)S * comm_mask_bytes(c->R));
    for (int i = 0; i < n; i++) {
        c->dest[i] = -1;
        if (!c->present[i]) continue;
        const float *xi = c->x + (size_t)i * c->D;
        if (c->o.pipe.dense_transport) c->dest[i] = s + 1;
        for (int t = s + 1; t < S && c->dest[i] < 0; t++)
            if (stage_range_needs_row(c->m, pl->st[t].first, pl->st[t].last, xi)) c->dest[i] = t;
        if (c->dest[i] < 0 && (c->d.flags[i] & STAGE_ROW_NEED_LOGITS)) c->dest[i] = S - 1;
        if (c->dest[i] >= 0) {
            comm_mask_set(c->masks + (size_t)c->dest[i] * comm_mask_bytes(c->R), i);
            rows_to[c->dest[i]]++;
        }
    }
    int nb = 0;
    for (int k = 0; k < c->n_byp_in; k++)
        c->byp_out[nb++] = c->byp_in[k]; /* still ahead: tell the next stage */
    comm_packet h = {
        .kind = COMM_PKT_ROWS, .mb = mb, .sender = s, .mb_rows = n, .dtype = c->o.pipe.wire};
    for (int t = s + 2; t < S; t++) {
        if (!rows_to[t]) continue;
        h.receiver = t;
        h.n_rows = rows_to[t];
        h.present = c->masks + (size_t)t * comm_mask_bytes(c->R);
        send_packet(c, &h, NULL, t, TAG_BYPASS);
        c->byp_out[nb++] = (comm_bypass){s, t};
    }
    const stage_batch *d = &c->d;
    h.receiver = s + 1;
    h.n_rows = rows_to[s + 1];
    h.present = c->masks + (size_t)(s + 1) * comm_mask_bytes(c->R);
    h.has_desc = 1;
    h.rows = *d; /* a view of the micro-batch; an all-default column stays off the wire */
    h.rows.tag = NULL;
    if (all_f(d->temperature, n, 0.0f)) h.rows.temperature = NULL;
    if (all_f(d->top_p, n, 1.0f)) h.rows.top_p = NULL;
    if (all_u64(d->seed, n, 0)) h.rows.seed = NULL;
    if (all_u64(d->seq, n, 0)) h.rows.seq = NULL;
    if (all_u32(d->step, n, 0)) h.rows.step = NULL;
    if (all_i32(d->target, n, -1)) h.rows.target = NULL;
    h.n_bypass = nb;
    h.bypass = c->byp_out;
    send_packet(c, &h, NULL, s + 1, TAG_CHAIN);
    c->dense_rows += n;
}

/* ---- Head: logits of the rows that need them, then NLL of their targets, sampling of the SAMPLE
 * rows (each from its own (seed, seq, step) generator) and --dump-logits. Returns how many
 * rows it sampled (rows in srows, tokens in ltok). */

static int head_step(engine_loop *c)
{
    const stage_batch *d = &c->d;
    char err[256];
    int nl = 0, ns = 0;
    for (int i = 0; i < d->n; i++) {
        if (!(d->flags[i] & STAGE_ROW_NEED_LOGITS)) continue;
        if (!c->present[i])
            COMM_FATAL("row %d (slot %d, position %d) needs logits but never reached the head", i,
                       d->slot[i], d->pos[i]);
        c->lrows[nl++] = i;
    }
    if (stage_head_logits(c->st, c->x, c->lrows, nl, c->logits, err, sizeof err))
        COMM_FATAL("head: %s", err);
    for (int k = 0; k < nl; k++) {
        const int i = c->lrows[k];
        const float *lg = c->logits + (size_t)k * c->V;
        if (d->target[i] >= c->V)
            COMM_FATAL("row %d: target token %d out of range [0, %d)", i, d->target[i], c->V);
        if (d->target[i] >= 0) {
            c->nll_sum += stage_nll(lg, c->V, d->target[i]);
            c->nll_count++;
        }
        if ((d->flags[i] & STAGE_ROW_SAMPLE) && (d->flags[i] & STAGE_ROW_KV_LOST)) {
            c->srows[ns] = i; /* no token: the scheduler recomputes the sequence */
            c->ltok[ns++] = STAGE_TOKEN_KV_LOST;
        } else if (d->flags[i] & STAGE_ROW_SAMPLE) {
            stage_rng r;
            stage_rng_seed_draw(&r, d->seed[i], d->seq[i], d->step[i]);
            c->srows[ns] = i;
            c->ltok[ns++] = stage_sample(lg, c->V, d->temperature[i], d->top_p[i], &r, c->scratch);
        }
        if (c->dump) {
            uint64_t col =
                c->o.dump_index == ENGINE_DUMP_BY_STEP ? d->step[i] : (uint64_t)d->pos[i];
            if (d->seq[i] >= (uint64_t)c->o.dump_seqs || col >= (uint64_t)c->o.dump_len)
                COMM_FATAL(
                    "row %d: sequence %llu step/position %llu outside --dump-logits [%d, %d]", i,
                    (unsigned long long)d->seq[i], (unsigned long long)col, c->o.dump_seqs,
                    c->o.dump_len);
            memcpy(c->dump + ((size_t)d->seq[i] * c->o.dump_len + col) * c->V, lg,
                   (size_t)c->V * 4);
        }
    }
    return ns;
}

/* Stage 0: micro-batch `mb` is back (FIFO order) with tokens tok_by_row at mask. */
static void complete(engine_loop *c, uint64_t mb, const int32_t *tok_by_row, const uint8_t *mask)
{
    stage_batch *f = &c->fl[c->fl_head];
    if (c->fl_n == 0 || f->id != mb)
        COMM_FATAL("tokens for micro-batch %llu arrived out of order", (unsigned long long)mb);
    for (int i = 0; i < f->n; i++) {
        if (!(f->flags[i] & STAGE_ROW_SAMPLE)) continue;
        if (!comm_mask_get(mask, i))
            COMM_FATAL("micro-batch %llu: no token for row %d", (unsigned long long)mb, i);
        if ((tok_by_row[i] < 0 && tok_by_row[i] != STAGE_TOKEN_KV_LOST) || tok_by_row[i] >= c->V)
            COMM_FATAL("micro-batch %llu: token %d out of range", (unsigned long long)mb,
                       tok_by_row[i]);
        c->tokens_done++;
    }
    c->ops->done(c->self, f, tok_by_row);
    c->fl_head = (c->fl_head + 1) % c->o.pipe.max_in_flight;
    c->fl_n--;
    c->mb_done++;
    c->t_tokens = base_now_s();
}

/* Run this stage's layers on the current micro-batch, then pass it on. */
static void process_mb(engine_loop *c)
{
    char err[512];
    stage_batch *d = &c->d;
    const uint64_t mb = d->id;
    double t0 = base_now_s();
    for (int k = 0; k < d->n_release; k++) {
        if (d->release[k] < 0 || d->release[k] >= c->o.slots)
            COMM_FATAL("micro-batch %llu releases slot %d of %d", (unsigned long long)mb,
                       d->release[k], c->o.slots);
        stage_state_slot_release(c->st, d->release[k]);
    }
    for (int k = 0; k < d->n_share; k++) { /* prefix reuse (docs/SPEC.md §11) */
        const int32_t *t = d->share + 3 * k;
        if (t[0] >= c->o.slots || t[1] >= c->o.slots)
            COMM_FATAL("micro-batch %llu shares slot %d into %d of %d", (unsigned long long)mb,
                       t[0], t[1], c->o.slots);
        /* on failure (the source lost here, no page for a copy) dst is lost: recomputed */
        stage_state_slot_share(c->st, t[0], t[1], t[2]);
    }
    /* a micro-batch of releases only (a server's idle pool gets its pages back at once) */
    if (d->n > 0 && stage_forward(c->st, d, c->x, c->present, err, sizeof err))
        COMM_FATAL("micro-batch %llu: %s", (unsigned long long)mb, err);
    for (int i = 0; i < d->n; i++) /* soft mode: later stages and the head drop them too */
        if (stage_state_slot_lost(c->st, d->slot[i])) d->flags[i] |= STAGE_ROW_KV_LOST;
    if (c->rank != c->head) {
        route_and_send(c);
        c->busy_s += base_now_s() - t0;
        return;
    }
    int ns = head_step(c);
    c->busy_s += base_now_s() - t0;
    uint8_t *mask = c->masks;
    memset(mask, 0, comm_mask_bytes(d->n));
    for (int k = 0; k < ns; k++) comm_mask_set(mask, c->srows[k]);
    if (c->rank == 0) { /* single stage: stage 0 is the head */
        for (int k = 0; k < ns; k++) c->tok_by_row[c->srows[k]] = c->ltok[k];
        complete(c, mb, c->tok_by_row, mask);
        return;
    }
    comm_packet h = {.kind = COMM_PKT_TOKENS,
                     .mb = mb,
                     .sender = c->rank,
                     .receiver = 0,
                     .mb_rows = d->n,
                     .n_rows = ns,
                     .dtype = c->o.pipe.wire,
                     .present = mask};
    send_packet(c, &h, c->ltok, 0, TAG_TOKENS);
}

/* ---- Link reports (serve): ranks > 0 send their outgoing counters to rank 0 ------------------ */

static uint64_t packets_sent(const engine_loop *c)
{
    uint64_t n = 0;
    for (int t = 0; t < c->S; t++) n += comm_links_stats(c->links, t)->packets;
    return n;
}

/* A link report (engine/stats.h): engine_link_report [S], then engine_report_tail; v holds
 * rep_len uint64s. */
static void report_fill(const engine_loop *c, uint64_t *v, int final)
{
    for (int t = 0; t < c->S; t++) {
        const comm_link_stats *ls = comm_links_stats(c->links, t);
        engine_link_report r = {.packets = ls->packets,
                                .rows = ls->rows,
                                .header_bytes = ls->header_bytes,
                                .payload_bytes = ls->payload_bytes};
        memcpy(v + (size_t)t * ENGINE_LINK_STAT_N, &r, sizeof r);
    }
    stage_kv_stats k;
    stage_state_kv_stats(c->st, &k);
    engine_report_tail tail = {.dense_rows = (uint64_t)c->dense_rows,
                               .final = (uint64_t) final,
                               .kv_pages_total = (uint64_t)k.pages_total,
                               .kv_pages_used = (uint64_t)k.pages_used,
                               .kv_pages_peak = (uint64_t)k.pages_peak,
                               .kv_page_bytes = k.page_bytes,
                               .kv_bytes_dense = k.bytes_dense,
                               .kv_pages_routed = (uint64_t)k.pages_routed,
                               .kv_pages_skip = (uint64_t)k.pages_skip,
                               .kv_pages_full = (uint64_t)k.pages_full,
                               .kv_page = (uint64_t)k.page,
                               .kv_layers = (uint64_t)k.kv_layers,
                               .kv_pages_cached = (uint64_t)k.pages_cached,
                               .kv_entries_live = (uint64_t)k.entries_live,
                               .kv_positions_live = (uint64_t)k.positions_live,
                               .mb_done = c->rank == 0 ? c->next_mb : c->mb_passed};
    memcpy(v + (size_t)c->S * ENGINE_LINK_STAT_N, &tail, sizeof tail);
}

static engine_link_report report_link(const engine_loop *c, int s, int t)
{
    engine_link_report r;
    memcpy(&r, c->rep_tab + (size_t)s * c->rep_len + (size_t)t * ENGINE_LINK_STAT_N, sizeof r);
    return r;
}

static engine_report_tail report_tail(const engine_loop *c, int s)
{
    engine_report_tail r;
    memcpy(&r, c->rep_tab + (size_t)s * c->rep_len + (size_t)c->S * ENGINE_LINK_STAT_N, sizeof r);
    return r;
}

/* Rank > 0: at most every 0.25 s when counters moved (or final). The report itself goes on
 * link rank -> 0 and is counted there as payload. */
static void report_send(engine_loop *c, int final)
{
    if (!c->o.serve || c->rank == 0) return;
    double t = base_now_s();
    uint64_t p = packets_sent(c);
    if (!final && (p == c->rep_packets || t - c->rep_t < 0.25)) return;
    size_t cap;
    uint8_t *buf = comm_links_acquire(c->links, &cap);
    size_t len = (size_t)c->rep_len * sizeof(uint64_t);
    if (len > cap) COMM_FATAL("link report of %zu bytes exceeds the send buffer", len);
    uint64_t v[64 * ENGINE_LINK_STAT_N + ENGINE_REPORT_STAT_N];
    report_fill(c, v, final);
    memcpy(buf, v, len);
    comm_links_send(c->links, buf, len, 0, TAG_REPORT, 0, len, 0);
    c->rep_packets = packets_sent(c);
    c->rep_t = t;
}

static void report_post(engine_loop *c, int s)
{
    MPI_Irecv(c->rep_in + (size_t)s * c->rep_len, c->rep_len * 8, MPI_BYTE, s, TAG_REPORT, c->comm,
              &c->rep_req[s]);
}

/* Rank 0: take the reports that arrived; every 0.25 s hand all links to the scheduler. */
static void report_poll(engine_loop *c, int force)
{
    if (!c->o.serve || c->rank != 0) return;
    for (int s = 1; s < c->S; s++) {
        int done = 0;
        if (c->rep_req[s] == MPI_REQUEST_NULL) continue;
        MPI_Test(&c->rep_req[s], &done, MPI_STATUS_IGNORE);
        if (!done) continue;
        memcpy(c->rep_tab + (size_t)s * c->rep_len, c->rep_in + (size_t)s * c->rep_len,
               (size_t)c->rep_len * 8);
        c->rep_at[s] = base_now_s();
        if (!report_tail(c, s).final) report_post(c, s);
    }
    double t = base_now_s();
    if (!c->ops->links || (!force && t - c->rep_t < 0.25)) return;
    c->rep_t = t;
    report_fill(c, c->rep_tab, 0); /* rank 0's own counters */
    const double ws = (double)stage_dtype_size(c->o.pipe.wire);
    int n = 0;
    for (int s = 0; s < c->S; s++) {
        const engine_report_tail tail = report_tail(c, s);
        for (int t2 = 0; t2 < c->S; t2++) {
            const engine_link_report lr = report_link(c, s, t2);
            if (t2 == s || (lr.packets == 0 && t2 != s + 1)) continue;
            engine_link_bytes *e = &c->lb[n++];
            e->from = s;
            e->to = t2;
            e->bytes = lr.header_bytes + lr.payload_bytes;
            e->dense_bytes = t2 == s + 1 ? (uint64_t)((double)tail.dense_rows * c->D * ws) : 0;
        }
    }
    c->ops->links(c->self, c->lb, n);
    if (c->ops->progress) {
        const uint64_t want = c->fl_n > 0 ? c->fl[c->fl_head].id + 1 : 0;
        for (int s = 0; s < c->S; s++)
            c->prog[s] = (engine_stage_progress){
                .stage = s,
                .rank = c->leader[s],
                .mb_done = s == 0 ? c->next_mb : report_tail(c, s).mb_done,
                .mb_want = want,
                .age_s = s == 0 ? 0.0 : t - (c->rep_at[s] > 0 ? c->rep_at[s] : c->t_start)};
        c->ops->progress(c->self, c->prog, c->S);
    }
    if (!c->ops->kv) return;
    for (int s = 0; s < c->S; s++) {
        const engine_report_tail k = report_tail(c, s);
        c->kvr[s] = (engine_kv_report){.stage = s,
                                       .pages_total = k.kv_pages_total,
                                       .pages_used = k.kv_pages_used,
                                       .pages_peak = k.kv_pages_peak,
                                       .page_bytes = k.kv_page_bytes,
                                       .bytes_dense = k.kv_bytes_dense,
                                       .pages_routed = k.kv_pages_routed,
                                       .pages_skip = k.kv_pages_skip,
                                       .pages_full = k.kv_pages_full,
                                       .page = k.kv_page,
                                       .kv_layers = k.kv_layers,
                                       .pages_cached = k.kv_pages_cached,
                                       .entries_live = k.kv_entries_live,
                                       .positions_live = k.kv_positions_live};
    }
    c->ops->kv(c->self, c->kvr, c->S);
}

/* ---- Stage 0 --------------------------------------------------------------------------------- */

static void print_progress(engine_loop *c, int force)
{
    double t = base_now_s();
    if (!c->o.pipe.progress || (!force && t - c->t_last_progress < 2.0)) return;
    c->t_last_progress = t;
    double el = t - c->t_start;
    if (c->o.progress_tokens)
        fprintf(stderr, "[modpipe] %ld/%ld tokens, %ld micro-batches, %.1f s, %.1f tok/s\n",
                c->tokens_done, c->o.progress_total, c->mb_done, el,
                el > 0 ? c->tokens_done / el : 0.0);
    else
        fprintf(stderr, "[modpipe] %ld/%ld micro-batches, %.1f s\n", c->mb_done,
                c->o.progress_total, el);
}

static void recv_tokens(engine_loop *c, size_t len)
{
    char err[256];
    comm_packet p;
    if (comm_unpack(c->unp, c->tbuf, len, c->D, &p, err, sizeof err))
        COMM_FATAL("tokens packet from rank %d (%zu bytes): %s", c->head, len, err);
    if (p.kind != COMM_PKT_TOKENS || p.sender != c->head)
        COMM_FATAL("expected a tokens packet from rank %d, got kind %d from stage %d", c->head,
                   (int)p.kind, p.sender);
    comm_scatter_tokens(&p, c->tok_by_row);
    /* copy the mask: the unpacker's storage is reused by the next unpack */
    memcpy(c->masks, p.present, comm_mask_bytes(p.mb_rows));
    complete(c, p.mb, c->tok_by_row, c->masks);
}

/* Issue the micro-batch the scheduler just wrote into fl slot f. */
static void issue(engine_loop *c, stage_batch *f)
{
    char err[256];
    if (f->n < 0 || f->n > c->R || f->n_release < 0 || f->n_release > STAGE_MAX_RELEASE ||
        f->n_share < 0 || f->n_share > STAGE_MAX_SHARE ||
        (f->n == 0 && f->n_release == 0 && f->n_share == 0))
        COMM_FATAL("the scheduler made a micro-batch of %d rows (0..%d), %d releases", f->n, c->R,
                   f->n_release);
    f->id = c->next_mb++;
    c->fl_n++;
    if (c->S > 1 && c->treq == MPI_REQUEST_NULL) {
        MPI_Irecv(c->tbuf, (int)c->pkt_max, MPI_BYTE, c->head, TAG_TOKENS, c->comm, &c->treq);
        if (c->fl_n == 1) c->t_tokens = base_now_s();
    }
    stage_batch_copy(&c->d, f);
    double t0 = base_now_s();
    if (c->d.n > 0 && stage_embed(c->m, c->d.token, c->d.n, c->x, err, sizeof err))
        COMM_FATAL("micro-batch %llu: %s", (unsigned long long)f->id, err);
    memset(c->present, 1, (size_t)c->d.n);
    c->n_byp_in = 0;
    c->busy_s += base_now_s() - t0;
    process_mb(c);
}

/* Wait for the head's tokens packet for at most max_s seconds (forever: max_s < 0), with
 * the peer timeout. Returns 1 when one arrived (and was applied). */
static int wait_tokens(engine_loop *c, double max_s)
{
    double t0 = base_now_s();
    MPI_Status st;
    base_backoff bo;
    base_backoff_init(&bo, BASE_BACKOFF_FIXED, 65, 20000);
    for (;;) {
        int done = 0;
        MPI_Test(&c->treq, &done, &st);
        if (done) {
            int n = 0;
            MPI_Get_count(&st, MPI_BYTE, &n);
            c->treq = MPI_REQUEST_NULL;
            recv_tokens(c, (size_t)n);
            if (c->fl_n > 0)
                MPI_Irecv(c->tbuf, (int)c->pkt_max, MPI_BYTE, c->head, TAG_TOKENS, c->comm,
                          &c->treq);
            return 1;
        }
        comm_links_progress(c->links);
        /* a server's supervisor hears from us (and of each stage) while we wait */
        report_poll(c, 0);
        double t = base_now_s();
        if (t - c->t_tokens > c->o.pipe.timeout_s)
            COMM_FATAL("no tokens packet from rank %d for %.0f s: that rank is gone or stuck",
                       c->head, c->o.pipe.timeout_s);
        if (max_s >= 0 && t - t0 >= max_s) return 0;
        /* an outside scheduler's next micro-batch is here: issue it now (a relay's round
         * trip would otherwise leave stage 0 idle for up to max_s each decode step) */
        if (max_s >= 0 && c->ops->ready && c->ops->ready(c->self)) return 0;
        base_backoff_wait(&bo);
    }
}

static int step0(engine_loop *c)
{
    if (c->finished) return 0;
    int issued = 0;
    while (c->fl_n < c->o.pipe.max_in_flight) {
        stage_batch *f = &c->fl[(c->fl_head + c->fl_n) % c->o.pipe.max_in_flight];
        f->n = 0;
        f->n_release = 0;
        f->n_share = 0;
        if (!c->ops->next(c->self, f)) break;
        issue(c, f);
        issued++;
        print_progress(c, 0);
        /* one stage: issue completed the micro-batch, so this loop runs for as long as work
         * comes; the scheduler still gets its KV and link reports every 0.25 s */
        report_poll(c, 0);
    }
    report_poll(c, 0);
    if (c->fl_n == 0) {
        if (c->ops->finished(c->self)) {
            c->finished = 1;
            return 0;
        }
        if (!issued && c->ops->wait) c->ops->wait(c->self, 0.05);
        return 1;
    }
    /* A server looks for new work every millisecond while it may issue more. */
    int may_issue = c->ops->wait && c->fl_n < c->o.pipe.max_in_flight;
    wait_tokens(c, may_issue ? 0.001 : -1.0);
    print_progress(c, 0);
    return 1;
}

/* ---- Stage s > 0 ----------------------------------------------------------------------------- */

/* Wait for the next chain packet. Batch runs: the peer timeout applies. A server may idle
 * for ever: no timeout (a dead rank ends the job through mpirun), sleeps growing to 1 ms so
 * an idle rank does not spin a core, and link reports go out meanwhile. */
static size_t wait_chain(engine_loop *c, MPI_Request *req)
{
    if (!c->o.serve) return comm_links_wait_recv(c->links, req, c->rank - 1, "chain packet");
    MPI_Status st;
    base_backoff bo;
    base_backoff_init(&bo, BASE_BACKOFF_IDLE, 65, 20000);
    for (;;) {
        int done = 0;
        MPI_Test(req, &done, &st);
        if (done) break;
        comm_links_progress(c->links);
        report_send(c, 0);
        base_backoff_wait(&bo);
    }
    int n = 0;
    MPI_Get_count(&st, MPI_BYTE, &n);
    return (size_t)n;
}

static void stageN_loop(engine_loop *c)
{
    char err[256];
    const int s = c->rank;
    int cur = 0;
    MPI_Irecv(c->rbuf[0], (int)c->pkt_max, MPI_BYTE, s - 1, TAG_CHAIN, c->comm, &c->rreq[0]);
    for (;;) {
        size_t len = wait_chain(c, &c->rreq[cur]);
        comm_packet p;
        if (comm_unpack(c->unp, c->rbuf[cur], len, c->D, &p, err, sizeof err))
            COMM_FATAL("chain packet from rank %d (%zu bytes): %s", s - 1, len, err);
        if (p.sender != s - 1 || p.receiver != s)
            COMM_FATAL("chain packet from rank %d says %d -> %d", s - 1, p.sender, p.receiver);
        if (p.kind == COMM_PKT_END) {
            if (c->rank != c->head) {
                comm_packet h = p;
                h.sender = s;
                h.receiver = s + 1;
                send_packet(c, &h, NULL, s + 1, TAG_CHAIN);
            }
            break;
        }
        if (p.kind != COMM_PKT_ROWS || !p.has_desc)
            COMM_FATAL("chain packet from rank %d: not a rows packet with a descriptor", s - 1);
        if (p.mb_rows > c->R)
            COMM_FATAL("micro-batch %llu has %d rows, more than this run's %d",
                       (unsigned long long)p.mb, p.mb_rows, c->R);
        MPI_Irecv(c->rbuf[cur ^ 1], (int)c->pkt_max, MPI_BYTE, s - 1, TAG_CHAIN, c->comm,
                  &c->rreq[cur ^ 1]);
        double t0 = base_now_s();
        const uint64_t mb = p.mb;
        const int n = p.mb_rows;
        stage_batch_copy(&c->d, &p.rows); /* p lives until the next unpack (bypass) */
        for (int i = 0; i < n; i++) c->present[i] = (uint8_t)comm_mask_get(p.present, i);
        comm_scatter_rows(&p, c->D, c->x);
        int n_from = 0, from[64];
        c->n_byp_in = 0;
        for (int k = 0; k < p.n_bypass; k++) {
            if (p.bypass[k].to == s)
                from[n_from++] = p.bypass[k].from;
            else if (p.bypass[k].to > s)
                c->byp_in[c->n_byp_in++] = p.bypass[k];
            else
                COMM_FATAL("chain packet lists a bypass packet %d -> %d behind stage %d",
                           p.bypass[k].from, p.bypass[k].to, s);
        }
        c->busy_s += base_now_s() - t0;
        for (int k = 0; k < n_from; k++) {
            MPI_Request rq;
            MPI_Irecv(c->bbuf, (int)c->pkt_max, MPI_BYTE, from[k], TAG_BYPASS, c->comm, &rq);
            size_t bl = comm_links_wait_recv(c->links, &rq, from[k], "bypass packet");
            comm_packet q;
            if (comm_unpack(c->unp, c->bbuf, bl, c->D, &q, err, sizeof err))
                COMM_FATAL("bypass packet from rank %d (%zu bytes): %s", from[k], bl, err);
            if (q.kind != COMM_PKT_ROWS || q.mb != mb || q.mb_rows != n || q.receiver != s)
                COMM_FATAL("bypass packet from rank %d is for micro-batch %llu (%d rows), "
                           "expected %llu (%d rows)",
                           from[k], (unsigned long long)q.mb, q.mb_rows, (unsigned long long)mb, n);
            for (int i = 0; i < n; i++) {
                if (!comm_mask_get(q.present, i)) continue;
                if (c->present[i])
                    COMM_FATAL("micro-batch %llu: row %d delivered twice", (unsigned long long)mb,
                               i);
                c->present[i] = 1;
            }
            comm_scatter_rows(&q, c->D, c->x);
        }
        process_mb(c);
        c->mb_passed++;
        report_send(c, 0);
        cur ^= 1;
    }
    report_send(c, 1);
}

int engine_loop_step(engine_loop *L)
{
    if (L->follower) {
        char err[512];
        if (!L->finished && stage_state_tp_follow(L->st, err, sizeof err))
            COMM_FATAL("stage %d follower: %s", L->rank, err);
        L->finished = 1;
        return 0;
    }
    if (L->rank == 0) return step0(L);
    if (!L->finished) {
        stageN_loop(L);
        L->finished = 1;
    }
    return 0;
}

/* ---- Set-up and the run ---------------------------------------------------------------------- */

/* ---- Open / close ---------------------------------------------------------------------------- */

static void loop_free(engine_loop *c)
{
    if (!c) return;
    stage_state_free(c->st);
    stage_model_free(c->m);
    comm_links_free(c->links);
    comm_unpacker_free(c->unp);
    stage_batch_free(&c->d);
    free(c->x);
    free(c->present);
    free(c->dest);
    free(c->masks);
    free(c->byp_in);
    free(c->byp_out);
    free(c->rbuf[0]);
    free(c->rbuf[1]);
    free(c->bbuf);
    free(c->tbuf);
    free(c->lrows);
    free(c->srows);
    free(c->ltok);
    free(c->logits);
    free(c->scratch);
    free(c->dump);
    free(c->tok_by_row);
    if (c->fl) {
        for (int i = 0; i < c->o.pipe.max_in_flight; i++) stage_batch_free(&c->fl[i]);
        free(c->fl);
    }
    free(c->rep_in);
    free(c->rep_tab);
    free(c->rep_req);
    free(c->lb);
    free(c->kvr);
    free(c->prog);
    free(c->rep_at);
    free(c->leader);
    engine_tp_free(c->tp);
    if (c->group != MPI_COMM_NULL) MPI_Comm_free(&c->group);
    if (c->leaders != MPI_COMM_NULL) MPI_Comm_free(&c->leaders);
    free(c);
}

/* Everything that can fail before the first packet. Returns 0 or -1 with err. */
static int loop_init(engine_loop *c, char *err, size_t errlen)
{
    const engine_loop_opts *o = &c->o;
    const stage_config *cfg = o->pipe.cfg;
    const engine_stage_plan *me = &o->pipe.plan->st[c->rank];
    c->D = cfg->hidden;
    c->V = cfg->vocab;
    c->head = c->S - 1;
    c->R = o->max_rows > 0 ? o->max_rows : 1;
    if (c->S > 64) {
        snprintf(err, errlen, "at most 64 stages are supported");
        return -1;
    }
    if (o->slots < 1 || o->ctx < 1 || o->pipe.max_in_flight < 1) {
        snprintf(err, errlen, "slots %d, ctx %d, max_in_flight %d: each must be >= 1", o->slots,
                 o->ctx, o->pipe.max_in_flight);
        return -1;
    }
    if (o->ctx > cfg->max_pos) {
        snprintf(err, errlen, "--ctx %d exceeds max_position_embeddings %d", o->ctx, cfg->max_pos);
        return -1;
    }
    /* the embedding lookup is the leader's; every rank of a tensor-parallel head holds its
     * slice of lm_head */
    stage_range r = {me->first, me->last, c->rank == 0 && !c->follower, c->rank == c->S - 1};
    if (stage_model_load_tp(o->pipe.model_dir, cfg, r, o->pipe.weights_dtype, c->tp, &c->m, err,
                            errlen))
        return -1;
    /* KV pool budget (docs/SPEC.md §11): --kv-mem, else what --mem-per-rank leaves after the
     * planner's weights and workspace of this stage (one rank per stage), else every position */
    stage_kv_opts kv = o->pipe.kv;
    if (!kv.mem_bytes && o->pipe.plan->have_mem && o->pipe.plan->mem.mem_per_rank &&
        me->ranks <= 1) {
        size_t used = me->weight_bytes + me->work_bytes;
        if (o->pipe.plan->mem.mem_per_rank > used)
            kv.mem_bytes = o->pipe.plan->mem.mem_per_rank - used;
    }
    c->st = stage_state_init_kv(c->m, o->slots, c->R, o->ctx, &kv, err, errlen);
    if (!c->st) return -1;
    /* a server recomputes a sequence the pool ran out under (docs/SPEC.md §11); a batch job
     * stops with the error */
    stage_state_kv_soft(c->st, o->serve);
    if (c->follower) return 0; /* no pipeline links, no scheduler: the leader's */
    c->pkt_max = comm_packet_max_bytes(c->R, c->D, c->S);
    int n_bufs = o->pipe.max_in_flight * c->S + 4;
    c->links = comm_links_init(c->comm, c->S, c->pkt_max, n_bufs, o->pipe.timeout_s);
    c->unp = comm_unpacker_init(c->R, c->S);
    if (c->links) stage_state_set_progress(c->st, progress_cb, c->links);
    const size_t R = (size_t)c->R, D = (size_t)c->D, V = (size_t)c->V, S = (size_t)c->S;
    int ok = c->links && c->unp && !stage_batch_init(&c->d, c->R);
    c->x = malloc(R * D * sizeof(float));
    c->present = malloc(R);
    c->dest = malloc(R * sizeof(int));
    c->masks = calloc(S, comm_mask_bytes(c->R) + 1);
    c->byp_in = malloc(S * S * sizeof *c->byp_in);
    c->byp_out = malloc(S * S * sizeof *c->byp_out);
    c->rep_len = (int)S * ENGINE_LINK_STAT_N + ENGINE_REPORT_STAT_N;
    ok = ok && c->x && c->present && c->dest && c->masks && c->byp_in && c->byp_out;
    if (ok && c->rank > 0) {
        c->rbuf[0] = malloc(c->pkt_max);
        c->rbuf[1] = malloc(c->pkt_max);
        c->bbuf = malloc(c->pkt_max);
        ok = c->rbuf[0] && c->rbuf[1] && c->bbuf;
    }
    c->rreq[0] = c->rreq[1] = c->treq = MPI_REQUEST_NULL;
    if (ok && c->rank == c->head) {
        c->lrows = malloc(R * sizeof(int));
        c->srows = malloc(R * sizeof(int));
        c->ltok = malloc(R * 4);
        c->logits = malloc(R * V * sizeof(float));
        c->scratch = malloc(2 * V * sizeof(float) + 16);
        ok = c->lrows && c->srows && c->ltok && c->logits && c->scratch;
        if (ok && o->dump_path) {
            FILE *f = fopen(o->dump_path, "wb"); /* fail now, not after the run */
            if (!f) {
                snprintf(err, errlen, "--dump-logits %s: cannot write: %s", o->dump_path,
                         strerror(errno));
                return -1;
            }
            fclose(f);
            size_t n = (size_t)o->dump_seqs * (size_t)o->dump_len * V;
            c->dump = malloc(n * sizeof(float));
            if (!c->dump) {
                snprintf(err, errlen, "cannot allocate %.1f MiB for --dump-logits",
                         (double)n * 4 / 1048576.0);
                return -1;
            }
            for (size_t i = 0; i < n; i++) c->dump[i] = NAN; /* never computed */
        }
    }
    if (ok && c->rank == 0 && o->stats_path) {
        FILE *f = fopen(o->stats_path, "w"); /* fail now, not after the run */
        if (!f) {
            snprintf(err, errlen, "--stats %s: cannot write: %s", o->stats_path, strerror(errno));
            return -1;
        }
        fclose(f);
    }
    if (ok && c->rank == 0) {
        c->tbuf = malloc(c->pkt_max);
        c->tok_by_row = calloc(R, sizeof *c->tok_by_row);
        c->fl = calloc((size_t)o->pipe.max_in_flight, sizeof *c->fl);
        ok = c->tbuf && c->tok_by_row && c->fl;
        for (int i = 0; ok && i < o->pipe.max_in_flight; i++)
            ok = !stage_batch_init(&c->fl[i], c->R);
        c->rep_in = calloc(S * (size_t)c->rep_len, 8);
        c->rep_tab = calloc(S * (size_t)c->rep_len, 8);
        c->rep_req = malloc(S * sizeof *c->rep_req);
        c->lb = calloc(S * S, sizeof *c->lb);
        c->kvr = calloc(S, sizeof *c->kvr);
        c->prog = calloc(S, sizeof *c->prog);
        c->rep_at = calloc(S, sizeof *c->rep_at);
        c->leader = malloc(S * sizeof *c->leader);
        ok = ok && c->rep_in && c->rep_tab && c->rep_req && c->lb && c->kvr && c->prog &&
             c->rep_at && c->leader;
        for (size_t s = 0; ok && s < S; s++) c->leader[s] = (int)s; /* without tensor parallel */
        for (size_t s = 0; ok && s < S; s++) c->rep_req[s] = MPI_REQUEST_NULL;
    }
    if (!ok) {
        snprintf(err, errlen, "out of memory sizing the run buffers");
        return -1;
    }
    return 0;
}

int engine_loop_open(MPI_Comm comm, const engine_loop_opts *o, const engine_sched_ops *ops,
                     void *self, engine_loop **out, char *err, size_t errlen)
{
    *out = NULL;
    engine_loop *c = calloc(1, sizeof *c);
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    char myerr[1024] = "";
    int rc = 0;
    engine_topo topo;
    memset(&topo, 0, sizeof topo);
    if (!c) {
        snprintf(myerr, sizeof myerr, "out of memory");
        rc = -1;
    } else {
        c->o = *o;
        c->ops = ops;
        c->self = self;
        c->comm = comm;
        c->world = comm;
        c->group = c->leaders = MPI_COMM_NULL;
        c->rank = rank;
        c->S = size;
        /* identical inputs on every rank: a topology error is the same everywhere */
        rc = engine_topo_init(&topo, o->pipe.plan, size, o->pipe.cfg, myerr, sizeof myerr);
        if (!rc && topo.tp) {
            int g, s = engine_topo_stage_of(&topo, rank, &g);
            MPI_Comm_split(comm, s, rank, &c->group);
            MPI_Comm_split(comm, g == 0 ? 0 : MPI_UNDEFINED, rank, &c->leaders);
            c->follower = g != 0;
            c->comm = c->leaders;
            c->rank = s;
            c->S = topo.n_stages;
            if (topo.ranks[s] > 1) rc = engine_tp_new(c->group, &c->tp, myerr, sizeof myerr);
        }
        if (!rc && rank == 0 && (!ops || !ops->next || !ops->done || !ops->finished)) {
            snprintf(myerr, sizeof myerr, "no scheduler");
            rc = -1;
        } else if (!rc) {
            rc = loop_init(c, myerr, sizeof myerr);
        }
        if (!rc && topo.tp && c->leader) /* each stage's leader, for the progress reports */
            for (int r = 0; r < size; r++) {
                int g, st = engine_topo_stage_of(&topo, r, &g);
                if (st >= 0 && st < c->S && g == 0) c->leader[st] = r;
            }
    }
    engine_topo_free(&topo);
    /* All ranks agree on start-up failures; the lowest failing rank tells. */
    int first_bad = comm_first_failed(comm, rc != 0);
    if (first_bad >= 0) {
        if (rank == first_bad)
            snprintf(err, errlen, "rank %d: %s", rank, myerr);
        else
            snprintf(err, errlen, "rank %d failed to start", first_bad);
        loop_free(c);
        return first_bad == rank ? -1 : -2;
    }
    if (c->o.serve && rank == 0)
        for (int s = 1; s < c->S; s++) report_post(c, s);
    MPI_Barrier(comm);
    c->t_start = c->t_last_progress = c->t_tokens = base_now_s();
    *out = c;
    return 0;
}

int engine_loop_close(engine_loop *c, engine_loop_result *res, char *err, size_t errlen)
{
    if (res) memset(res, 0, sizeof *res);
    if (c->follower) { /* until the leader's STOP; its stats are the leader's to report */
        engine_loop_step(c);
        loop_free(c);
        return 0;
    }
    if (c->rank == 0) {
        while (c->fl_n > 0) wait_tokens(c, -1.0); /* a caller that stops early: drain */
        if (c->S > 1) {
            comm_packet h = {.kind = COMM_PKT_END,
                             .mb = c->next_mb,
                             .sender = 0,
                             .receiver = 1,
                             .mb_rows = 0,
                             .n_rows = 0,
                             .dtype = c->o.pipe.wire,
                             .present = c->masks};
            send_packet(c, &h, NULL, 1, TAG_CHAIN);
        }
        /* every rank's final report (serve), so no receive is left posted */
        for (int s = 1; c->o.serve && s < c->S; s++)
            while (c->rep_req[s] != MPI_REQUEST_NULL) {
                comm_links_wait_recv(c->links, &c->rep_req[s], s, "final link report");
                c->rep_req[s] = MPI_REQUEST_NULL;
                memcpy(c->rep_tab + (size_t)s * c->rep_len, c->rep_in + (size_t)s * c->rep_len,
                       (size_t)c->rep_len * 8);
                if (!report_tail(c, s).final) report_post(c, s);
            }
        report_poll(c, 1);
        print_progress(c, 1);
    } else if (!c->finished) {
        stageN_loop(c);
        c->finished = 1;
    }
    stage_state_tp_stop(c->st); /* this stage's followers leave their loop */
    /* the run is over: every sequence has ended, so every slot gives its pages back (the
     * stats then show any page the accounting lost, docs/SPEC.md §11) */
    for (int s = 0; s < c->o.slots; s++) stage_state_slot_release(c->st, s);
    comm_links_drain(c->links);
    double seconds = base_now_s() - c->t_start;
    MPI_Barrier(c->comm);

    /* --dump-logits from the head */
    int dump_ok = 1;
    char dump_err[512] = "";
    if (c->rank == c->head && c->dump) {
        int64_t shape[3] = {c->o.dump_seqs, c->o.dump_len, c->V};
        dump_ok = !npy_write_f32(c->o.dump_path, c->dump, 3, shape, dump_err, sizeof dump_err);
    }
    MPI_Bcast(&dump_ok, 1, MPI_INT, c->head, c->comm);

    const int L = c->o.pipe.cfg->n_layers;
    engine_rank_stat mine;
    engine_link_stat *links = malloc((size_t)c->S * sizeof *links);
    engine_layer_stat *layers = malloc((size_t)L * sizeof *layers);
    if (!links || !layers) COMM_FATAL("out of memory");
    engine_loop_stats_fill(c, &mine, links, layers);
    engine_stats all;
    if (engine_stats_gather(c->comm, &mine, links, layers, L, &all))
        COMM_FATAL("out of memory (gathering the stats)");
    if (c->rank == 0) {
        engine_loop_result r;
        memset(&r, 0, sizeof r);
        engine_loop_report(c, &all, seconds, &r);
        r.seconds = seconds;
        r.tokens = c->tokens_done;
        if (res) *res = r;
    }
    engine_stats_free(&all);
    free(links);
    free(layers);
    int rank = c->rank, head = c->head;
    loop_free(c);
    if (!dump_ok) {
        snprintf(err, errlen, "rank %d: %s", head, dump_err);
        return rank == head ? -1 : -2;
    }
    return 0;
}
