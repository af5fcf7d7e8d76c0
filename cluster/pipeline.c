/* cluster/pipeline.c — scheduler and per-stage loop. See pipeline.h. */
#include "cluster/pipeline.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "comm/link.h"
#include "stage/kernels.h"
#include "stage/npy.h"
#include "stage/stage.h"

enum { TAG_CHAIN = 1, TAG_BYPASS = 2, TAG_TOKENS = 3 };

/* ========================================================================================
 * Scheduler (stage 0): micro-batch composition depends only on the options.
 * ===================================================================================== */

typedef struct { int seq, start, len; } piece;   /* rows start..start+len-1 of one sequence */

typedef struct {
    int seq0, seq1;          /* sequences [seq0, seq1) */
    int chunk0, chunk1;      /* its prefill chunks [chunk0, chunk1) */
    int next_chunk;
    int pending;             /* token rows outstanding */
} group;

typedef struct {
    group *g;                /* [n_groups] */
    int n_groups;
    piece *pc;               /* [n_pieces] */
    int *chunk_first;        /* [n_chunks + 1] index into pc */
    int n_chunks;
    int rr;                  /* round-robin cursor */
    int *count;              /* [n_seqs] tokens generated so far */
    int max_rows;            /* largest micro-batch the plan makes */
} sched;

static int model_needs_whole_prompts(const stage_config *c)
{
    for (int l = 0; l < c->n_layers; l++) {
        stage_kind k = c->layer_kind[l];
        if (k == STAGE_KIND_MINDSKIP && c->ms_granularity == STAGE_GRAN_SEQUENCE) return 1;
        if (stage_kind_is_routed(k) && c->mod_routing == STAGE_ROUTING_TOPK) return 1;
    }
    return 0;
}

/* Cut sequences [s0, s1) into chunks of at most R rows (whole prompts when !can_split; a
 * prompt longer than R is then a chunk of its own). chunk_first[n_chunks] is where the open
 * chunk starts. */
static void sched_cut(sched *sc, const cluster_run_opts *o, int s0, int s1, int R, int can_split)
{
    int np = sc->chunk_first[sc->n_chunks], cur = 0;
#define CLOSE_CHUNK() do { sc->chunk_first[++sc->n_chunks] = np; cur = 0; } while (0)
    for (int s = s0; s < s1; s++) {
        int len = o->seq_len[s], start = 0;
        if (!can_split && cur > 0 && cur + len > R) CLOSE_CHUNK();
        while (start < len) {
            int take = len - start;
            if (can_split && take > R - cur) take = R - cur;
            sc->pc[np++] = (piece){s, start, take};
            start += take;
            cur += take;
            if (cur > sc->max_rows) sc->max_rows = cur;
            if (cur >= R) CLOSE_CHUNK();
        }
    }
    if (cur > 0) CLOSE_CHUNK();
#undef CLOSE_CHUNK
}

static void sched_free(sched *sc)
{
    free(sc->g);
    free(sc->pc);
    free(sc->chunk_first);
    free(sc->count);
}

static int sched_init(sched *sc, const cluster_run_opts *o)
{
    memset(sc, 0, sizeof *sc);
    const int R = o->micro_batch;
    long total_rows = 0;
    for (int s = 0; s < o->n_seqs; s++) total_rows += o->seq_len[s];
    int can_split = !model_needs_whole_prompts(o->cfg);
    /* generate: decode groups of gs sequences (one decode micro-batch each) */
    int gs = o->n_seqs;
    if (o->kind == CLUSTER_RUN_GENERATE) {
        int groups = o->groups > 0 ? o->groups : 1;
        gs = (o->n_seqs + groups - 1) / groups;
        if (gs > R) gs = R;
        if (gs < 1) gs = 1;
    }
    sc->n_groups = (o->n_seqs + gs - 1) / gs;
    sc->g = calloc((size_t)sc->n_groups, sizeof *sc->g);
    sc->pc = calloc((size_t)total_rows + (size_t)o->n_seqs + 1, sizeof *sc->pc);
    sc->chunk_first = calloc((size_t)total_rows + (size_t)o->n_seqs + 2, sizeof *sc->chunk_first);
    sc->count = calloc((size_t)o->n_seqs + 1, sizeof *sc->count);
    if (!sc->g || !sc->pc || !sc->chunk_first || !sc->count) return -1;
    for (int gi = 0; gi < sc->n_groups; gi++) {
        group *g = &sc->g[gi];
        g->seq0 = gi * gs;
        g->seq1 = (gi + 1) * gs;
        if (g->seq1 > o->n_seqs) g->seq1 = o->n_seqs;
        g->chunk0 = g->next_chunk = sc->n_chunks;
        sched_cut(sc, o, g->seq0, g->seq1, R, can_split);
        g->chunk1 = sc->n_chunks;
    }
    if (o->kind == CLUSTER_RUN_GENERATE && R > sc->max_rows) {
        int gmax = 0;
        for (int gi = 0; gi < sc->n_groups; gi++)
            if (sc->g[gi].seq1 - sc->g[gi].seq0 > gmax) gmax = sc->g[gi].seq1 - sc->g[gi].seq0;
        if (gmax > sc->max_rows) sc->max_rows = gmax;
    }
    return 0;
}

typedef struct {
    int n;
    int32_t *slot, *pos, *tok; /* [max_rows] */
    uint8_t *flags;            /* [max_rows] */
} desc_buf;

/* Next micro-batch of the plan into d; returns its group, or -1 when none is ready now. */
static int sched_next(sched *sc, const cluster_run_opts *o, const int32_t *gen, desc_buf *d)
{
    for (int k = 0; k < sc->n_groups; k++) {
        int gi = (sc->rr + k) % sc->n_groups;
        group *g = &sc->g[gi];
        d->n = 0;
        if (g->next_chunk < g->chunk1) {
            int c = g->next_chunk++;
            for (int p = sc->chunk_first[c]; p < sc->chunk_first[c + 1]; p++) {
                const piece *pc = &sc->pc[p];
                for (int t = pc->start; t < pc->start + pc->len; t++) {
                    int i = d->n++;
                    d->slot[i] = pc->seq;
                    d->pos[i] = t;
                    d->tok[i] = o->seq_tokens[pc->seq][t];
                    d->flags[i] = STAGE_ROW_PROMPT;
                    if (o->kind == CLUSTER_RUN_EVAL || t == o->seq_len[pc->seq] - 1)
                        d->flags[i] |= STAGE_ROW_NEED_LOGITS;
                }
            }
        } else if (o->kind == CLUSTER_RUN_GENERATE && g->pending == 0) {
            for (int s = g->seq0; s < g->seq1; s++) {
                if (sc->count[s] >= o->max_new) continue;
                int i = d->n++;
                d->slot[i] = s;
                d->pos[i] = o->seq_len[s] + sc->count[s] - 1;
                d->tok[i] = gen[(size_t)s * o->max_new + sc->count[s] - 1];
                d->flags[i] = STAGE_ROW_NEED_LOGITS;
            }
        }
        if (d->n == 0) continue;
        if (o->kind == CLUSTER_RUN_GENERATE)
            for (int i = 0; i < d->n; i++)
                g->pending += (d->flags[i] & STAGE_ROW_NEED_LOGITS) != 0;
        sc->rr = gi + 1;
        return gi;
    }
    return -1;
}

/* ========================================================================================
 * Rank context
 * ===================================================================================== */

typedef struct {
    uint64_t mb;
    int group, n;
    int32_t *slot;   /* [max_rows] */
    uint8_t *flags;  /* [max_rows] */
} inflight;

typedef struct {
    const cluster_run_opts *o;
    MPI_Comm comm;
    int rank, S, head;          /* head: rank S-1 */
    int D, V, R;                /* width, vocab, max rows of a micro-batch */
    stage_model *m;
    stage_state *st;
    comm_links *links;
    comm_unpacker *unp;
    size_t pkt_max;

    desc_buf d;                 /* current micro-batch descriptor */
    float *x;                   /* [R][D] residual rows of the micro-batch */
    uint8_t *present;           /* [R] rows this stage holds */
    int *dest;                  /* [R] next stage of each row, -1: journey ends */
    uint8_t *masks;             /* [S][mask_bytes(R)] per-destination present masks */
    comm_bypass *byp_in;        /* [S*S] announced bypass packets (to >= this stage) */
    int n_byp_in;
    comm_bypass *byp_out;       /* [S*S] */

    uint8_t *rbuf[2];           /* [pkt_max] chain receive, double-buffered */
    MPI_Request rreq[2];
    uint8_t *bbuf;              /* [pkt_max] bypass receive */
    uint8_t *tbuf;              /* [pkt_max] tokens receive (stage 0) */
    MPI_Request treq;

    /* head */
    int *lrows;                 /* [R] rows needing logits */
    int32_t *ltok;              /* [R] sampled tokens */
    float *logits;              /* [R][V] */
    void *scratch;              /* [2V] sampling */
    stage_rng *rng;             /* [n_seqs] */
    float *dump;                /* [n_seqs][max_new or T][V] */
    double nll_sum;
    long nll_count;

    /* stage 0 */
    sched sc;
    int32_t *gen;               /* [n_seqs][max_new] */
    inflight *fl;               /* [max_in_flight] FIFO */
    int fl_head, fl_n;
    uint64_t next_mb;
    long tokens_done, mb_done, mb_total;

    /* accounting */
    double dense_rows;          /* rows a dense pipeline sends on link rank -> rank+1 */
    double busy_s;
    double t_start, t_last_progress;
} ctx;

static void progress_cb(void *arg) { comm_links_progress(arg); }

/* ========================================================================================
 * Sending
 * ===================================================================================== */

static void send_packet(ctx *c, const comm_packet *h, const int32_t *tokens, int dest_rank, int tag)
{
    size_t cap, hb = 0, pb = 0;
    char err[256];
    uint8_t *buf = comm_links_acquire(c->links, &cap);
    size_t len = comm_pack(h, c->x, c->D, tokens, buf, cap, &hb, &pb, err, sizeof err);
    if (!len) COMM_FATAL("packing micro-batch %llu for stage %d: %s", (unsigned long long)h->mb,
                         dest_rank, err);
    comm_links_send(c->links, buf, len, dest_rank, tag, hb, pb, h->n_rows);
}

/* After the stage's layers: every held row goes to the next stage that needs it, to the head
 * when only its logits are still needed, or nowhere. One chain packet to rank+1 always. */
static void route_and_send(ctx *c, uint64_t mb)
{
    const int n = c->d.n, s = c->rank, S = c->S;
    const cluster_plan *pl = c->o->plan;
    int rows_to[64] = {0};
    memset(c->masks, 0, (size_t)S * comm_mask_bytes(c->R));
    for (int i = 0; i < n; i++) {
        c->dest[i] = -1;
        if (!c->present[i]) continue;
        const float *xi = c->x + (size_t)i * c->D;
        if (c->o->dense_transport) c->dest[i] = s + 1;
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
    comm_packet h = {.kind = COMM_PKT_ROWS, .mb = mb, .sender = s, .mb_rows = n, .dtype = c->o->wire};
    for (int t = s + 2; t < S; t++) {
        if (!rows_to[t]) continue;
        h.receiver = t;
        h.n_rows = rows_to[t];
        h.present = c->masks + (size_t)t * comm_mask_bytes(c->R);
        send_packet(c, &h, NULL, t, TAG_BYPASS);
        c->byp_out[nb++] = (comm_bypass){s, t};
    }
    h.receiver = s + 1;
    h.n_rows = rows_to[s + 1];
    h.present = c->masks + (size_t)(s + 1) * comm_mask_bytes(c->R);
    h.has_desc = 1;
    h.slot = c->d.slot;
    h.pos = c->d.pos;
    h.token = c->d.tok;
    h.flags = c->d.flags;
    h.n_bypass = nb;
    h.bypass = c->byp_out;
    send_packet(c, &h, NULL, s + 1, TAG_CHAIN);
    c->dense_rows += n;
}

/* ========================================================================================
 * Head: logits of the rows that need them, then sample (generate) or score (eval).
 * Returns how many token rows it produced (their rows in lrows, tokens in ltok).
 * ===================================================================================== */

static int head_step(ctx *c)
{
    const cluster_run_opts *o = c->o;
    char err[256];
    int nl = 0;
    for (int i = 0; i < c->d.n; i++) {
        if (!(c->d.flags[i] & STAGE_ROW_NEED_LOGITS)) continue;
        if (!c->present[i])
            COMM_FATAL("row %d (slot %d, position %d) needs logits but never reached the head", i,
                       c->d.slot[i], c->d.pos[i]);
        c->lrows[nl++] = i;
    }
    if (stage_head_logits(c->st, c->x, c->lrows, nl, c->logits, err, sizeof err))
        COMM_FATAL("head: %s", err);
    for (int k = 0; k < nl; k++) {
        int i = c->lrows[k], seq = c->d.slot[i], pos = c->d.pos[i];
        const float *lg = c->logits + (size_t)k * c->V;
        if (o->kind == CLUSTER_RUN_GENERATE) {
            int j = pos + 1 - o->seq_len[seq];
            c->ltok[k] = stage_sample(lg, c->V, o->temperature, o->top_p, &c->rng[seq], c->scratch);
            if (c->dump) memcpy(c->dump + ((size_t)seq * o->max_new + j) * c->V, lg, (size_t)c->V * 4);
        } else {
            if (pos + 1 < o->seq_len[seq]) {
                c->nll_sum += stage_nll(lg, c->V, o->seq_tokens[seq][pos + 1]);
                c->nll_count++;
            }
            if (c->dump) memcpy(c->dump + ((size_t)seq * o->seq_len[0] + pos) * c->V, lg, (size_t)c->V * 4);
        }
    }
    return o->kind == CLUSTER_RUN_GENERATE ? nl : 0;
}

/* Stage 0: the tokens of in-flight micro-batch `mb` are back (FIFO order). */
static void apply_tokens(ctx *c, uint64_t mb, const int32_t *tok_by_row, const uint8_t *mask)
{
    inflight *f = &c->fl[c->fl_head];
    if (c->fl_n == 0 || f->mb != mb)
        COMM_FATAL("tokens for micro-batch %llu arrived out of order", (unsigned long long)mb);
    for (int i = 0; i < f->n; i++) {
        if (!(f->flags[i] & STAGE_ROW_NEED_LOGITS)) continue;
        if (c->o->kind != CLUSTER_RUN_GENERATE) continue;
        if (!comm_mask_get(mask, i)) COMM_FATAL("micro-batch %llu: no token for row %d", (unsigned long long)mb, i);
        int seq = f->slot[i];
        c->gen[(size_t)seq * c->o->max_new + c->sc.count[seq]++] = tok_by_row[i];
        c->sc.g[f->group].pending--;
        c->tokens_done++;
    }
    c->fl_head = (c->fl_head + 1) % c->o->max_in_flight;
    c->fl_n--;
    c->mb_done++;
}

/* Run this stage's layers on the current micro-batch, then pass it on. */
static void process_mb(ctx *c, uint64_t mb)
{
    char err[512];
    stage_batch b = {c->d.n, c->d.slot, c->d.pos, c->d.tok, c->d.flags};
    double t0 = stage_now_s();
    if (stage_forward(c->st, &b, c->x, c->present, err, sizeof err))
        COMM_FATAL("micro-batch %llu: %s", (unsigned long long)mb, err);
    if (c->rank != c->head) {
        route_and_send(c, mb);
        c->busy_s += stage_now_s() - t0;
        return;
    }
    int nl = head_step(c);
    c->busy_s += stage_now_s() - t0;
    if (c->rank == 0) { /* single stage: stage 0 is the head */
        int32_t *by_row = (int32_t *)c->dest; /* scratch [R] */
        uint8_t *mask = c->masks;
        memset(mask, 0, comm_mask_bytes(c->d.n));
        for (int k = 0; k < nl; k++) {
            by_row[c->lrows[k]] = c->ltok[k];
            comm_mask_set(mask, c->lrows[k]);
        }
        apply_tokens(c, mb, by_row, mask);
        return;
    }
    memset(c->masks, 0, comm_mask_bytes(c->d.n));
    for (int k = 0; k < nl; k++) comm_mask_set(c->masks, c->lrows[k]);
    comm_packet h = {.kind = COMM_PKT_TOKENS, .mb = mb, .sender = c->rank, .receiver = 0,
                     .mb_rows = c->d.n, .n_rows = nl, .dtype = c->o->wire, .present = c->masks};
    send_packet(c, &h, c->ltok, 0, TAG_TOKENS);
}

/* ========================================================================================
 * Stage 0 loop
 * ===================================================================================== */

static void print_progress(ctx *c, int force)
{
    double t = stage_now_s();
    if (!c->o->progress || (!force && t - c->t_last_progress < 2.0)) return;
    c->t_last_progress = t;
    double el = t - c->t_start;
    if (c->o->kind == CLUSTER_RUN_GENERATE)
        fprintf(stderr, "[modpipe] %ld/%ld tokens, %ld micro-batches, %.1f s, %.1f tok/s\n",
                c->tokens_done, (long)c->o->n_seqs * c->o->max_new, c->mb_done, el,
                el > 0 ? c->tokens_done / el : 0.0);
    else
        fprintf(stderr, "[modpipe] %ld/%ld micro-batches, %.1f s\n", c->mb_done, c->mb_total, el);
}

static void recv_tokens(ctx *c)
{
    char err[256];
    size_t len = comm_links_wait_recv(c->links, &c->treq, c->head, "tokens packet");
    comm_packet p;
    if (comm_unpack(c->unp, c->tbuf, len, c->D, &p, err, sizeof err))
        COMM_FATAL("tokens packet from rank %d (%zu bytes): %s", c->head, len, err);
    if (p.kind != COMM_PKT_TOKENS || p.sender != c->head)
        COMM_FATAL("expected a tokens packet from rank %d, got kind %d from stage %d", c->head,
                   (int)p.kind, p.sender);
    int32_t *by_row = (int32_t *)c->dest;
    comm_scatter_tokens(&p, by_row);
    /* copy the mask: the unpacker's storage is reused by the next unpack */
    memcpy(c->masks, p.present, comm_mask_bytes(p.mb_rows));
    apply_tokens(c, p.mb, by_row, c->masks);
}

static void stage0_loop(ctx *c)
{
    const cluster_run_opts *o = c->o;
    char err[256];
    for (;;) {
        while (c->fl_n < o->max_in_flight) {
            int gi = sched_next(&c->sc, o, c->gen, &c->d);
            if (gi < 0) break;
            uint64_t mb = c->next_mb++;
            inflight *f = &c->fl[(c->fl_head + c->fl_n) % o->max_in_flight];
            f->mb = mb;
            f->group = gi;
            f->n = c->d.n;
            memcpy(f->slot, c->d.slot, (size_t)c->d.n * sizeof *f->slot);
            memcpy(f->flags, c->d.flags, (size_t)c->d.n);
            c->fl_n++;
            if (c->S > 1 && c->fl_n == 1 && c->treq == MPI_REQUEST_NULL)
                MPI_Irecv(c->tbuf, (int)c->pkt_max, MPI_BYTE, c->head, TAG_TOKENS, c->comm, &c->treq);
            double t0 = stage_now_s();
            if (stage_embed(c->m, c->d.tok, c->d.n, c->x, err, sizeof err))
                COMM_FATAL("micro-batch %llu: %s", (unsigned long long)mb, err);
            memset(c->present, 1, (size_t)c->d.n);
            c->n_byp_in = 0;
            c->busy_s += stage_now_s() - t0;
            process_mb(c, mb);
            print_progress(c, 0);
        }
        if (c->fl_n == 0) break; /* nothing in flight and nothing ready: done */
        recv_tokens(c);
        if (c->fl_n > 0)
            MPI_Irecv(c->tbuf, (int)c->pkt_max, MPI_BYTE, c->head, TAG_TOKENS, c->comm, &c->treq);
        print_progress(c, 0);
    }
    if (c->S > 1) {
        comm_packet h = {.kind = COMM_PKT_END, .mb = c->next_mb, .sender = 0, .receiver = 1,
                         .mb_rows = 0, .n_rows = 0, .dtype = o->wire, .present = c->masks};
        send_packet(c, &h, NULL, 1, TAG_CHAIN);
    }
}

/* ========================================================================================
 * Stage s > 0 loop
 * ===================================================================================== */

static void stageN_loop(ctx *c)
{
    char err[256];
    const int s = c->rank;
    int cur = 0;
    MPI_Irecv(c->rbuf[0], (int)c->pkt_max, MPI_BYTE, s - 1, TAG_CHAIN, c->comm, &c->rreq[0]);
    for (;;) {
        size_t len = comm_links_wait_recv(c->links, &c->rreq[cur], s - 1, "chain packet");
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
        double t0 = stage_now_s();
        const uint64_t mb = p.mb;
        const int n = p.mb_rows;
        c->d.n = n;
        memcpy(c->d.slot, p.slot, (size_t)n * 4);
        memcpy(c->d.pos, p.pos, (size_t)n * 4);
        memcpy(c->d.tok, p.token, (size_t)n * 4);
        memcpy(c->d.flags, p.flags, (size_t)n);
        for (int i = 0; i < n; i++) c->present[i] = (uint8_t)comm_mask_get(p.present, i);
        comm_scatter_rows(&p, c->D, c->x);
        int n_from = 0, from[64];
        c->n_byp_in = 0;
        for (int k = 0; k < p.n_bypass; k++) {
            if (p.bypass[k].to == s) from[n_from++] = p.bypass[k].from;
            else if (p.bypass[k].to > s) c->byp_in[c->n_byp_in++] = p.bypass[k];
            else COMM_FATAL("chain packet lists a bypass packet %d -> %d behind stage %d",
                            p.bypass[k].from, p.bypass[k].to, s);
        }
        c->busy_s += stage_now_s() - t0;
        for (int k = 0; k < n_from; k++) {
            MPI_Request rq;
            MPI_Irecv(c->bbuf, (int)c->pkt_max, MPI_BYTE, from[k], TAG_BYPASS, c->comm, &rq);
            size_t bl = comm_links_wait_recv(c->links, &rq, from[k], "bypass packet");
            comm_packet q;
            if (comm_unpack(c->unp, c->bbuf, bl, c->D, &q, err, sizeof err))
                COMM_FATAL("bypass packet from rank %d (%zu bytes): %s", from[k], bl, err);
            if (q.kind != COMM_PKT_ROWS || q.mb != mb || q.mb_rows != n || q.receiver != s)
                COMM_FATAL("bypass packet from rank %d is for micro-batch %llu (%d rows), "
                           "expected %llu (%d rows)", from[k], (unsigned long long)q.mb,
                           q.mb_rows, (unsigned long long)mb, n);
            for (int i = 0; i < n; i++) {
                if (!comm_mask_get(q.present, i)) continue;
                if (c->present[i]) COMM_FATAL("micro-batch %llu: row %d delivered twice", (unsigned long long)mb, i);
                c->present[i] = 1;
            }
            comm_scatter_rows(&q, c->D, c->x);
        }
        process_mb(c, mb);
        cur ^= 1;
    }
}

/* ========================================================================================
 * Stats: gathered on rank 0, written as JSON, one summary line.
 * ===================================================================================== */

enum { ST_LINK = 4, ST_FIXED = 8, ST_LAYER = 6 };

static double *stats_vector(ctx *c, int *len)
{
    const int S = c->S, L = c->o->cfg->n_layers;
    *len = S * ST_LINK + ST_FIXED + L * ST_LAYER;
    double *v = calloc((size_t)*len, sizeof *v);
    if (!v) COMM_FATAL("out of memory");
    for (int t = 0; t < S; t++) {
        const comm_link_stats *ls = comm_links_stats(c->links, t);
        v[t * ST_LINK + 0] = (double)ls->packets;
        v[t * ST_LINK + 1] = (double)ls->header_bytes;
        v[t * ST_LINK + 2] = (double)ls->payload_bytes;
        v[t * ST_LINK + 3] = (double)ls->rows;
    }
    double *f = v + S * ST_LINK;
    f[0] = c->dense_rows;
    f[1] = c->busy_s;
    f[2] = comm_links_wait_seconds(c->links);
    f[3] = (double)stage_model_weight_bytes(c->m);
    f[4] = (double)stage_state_kv_alloc_bytes(c->st);
    f[5] = c->nll_sum;
    f[6] = (double)c->nll_count;
    struct rusage ru; /* peak resident set of this rank (Linux: KiB), mmap'd weights included */
    f[7] = getrusage(RUSAGE_SELF, &ru) == 0 ? (double)ru.ru_maxrss * 1024.0 : 0.0;
    double *lv = f + ST_FIXED;
    stage_range r = stage_model_range(c->m);
    for (int l = r.first; l <= r.last; l++) {
        const stage_layer_stats *ls = stage_state_layer_stats(c->st, l);
        double *e = lv + l * ST_LAYER;
        e[0] = (double)ls->rows;
        e[1] = (double)ls->active;
        e[2] = (double)ls->kv_entries;
        e[3] = ls->flops;
        e[4] = ls->flops_dense;
        e[5] = ls->seconds;
    }
    return v;
}

static void report(ctx *c, const double *all, int len, double seconds, cluster_run_result *res)
{
    const cluster_run_opts *o = c->o;
    const stage_config *cfg = o->cfg;
    const int S = c->S, L = cfg->n_layers, D = c->D;
    const double ws = (double)stage_dtype_size(o->wire);
    const double kvd = (double)cfg->n_kv_heads * cfg->head_dim;
    const double kvs = (double)stage_dtype_size(STAGE_KV_DTYPE); /* bytes of a K or V value */
    double hdr = 0, pay = 0, tok_bytes = 0, dense = 0, rows_total = 0;

    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "command", o->command ? o->command : "");
    cJSON_AddStringToObject(j, "model", o->model_dir);
    cJSON_AddNumberToObject(j, "ranks", S);
    cJSON_AddStringToObject(j, "wire_dtype", stage_dtype_name(o->wire));
    cJSON_AddStringToObject(j, "weights_dtype", o->weights_dtype < 0 ? "checkpoint"
                                                : stage_dtype_name((stage_dtype)o->weights_dtype));
    cJSON_AddStringToObject(j, "transport", o->dense_transport ? "dense" : "sparse");
    cJSON_AddNumberToObject(j, "micro_batch", o->micro_batch);
    cJSON_AddNumberToObject(j, "max_in_flight", o->max_in_flight);
    cJSON_AddNumberToObject(j, "hidden_size", D);
    cJSON_AddNumberToObject(j, "micro_batches", (double)c->next_mb);

    cJSON *stages = cJSON_AddArrayToObject(j, "stages");
    for (int s = 0; s < S; s++) {
        const double *f = all + (size_t)s * len + S * ST_LINK;
        cJSON *e = cJSON_CreateObject();
        char r[32];
        snprintf(r, sizeof r, "%d-%d", o->plan->st[s].first, o->plan->st[s].last);
        cJSON_AddNumberToObject(e, "stage", s);
        cJSON_AddStringToObject(e, "layers", r);
        cJSON_AddNumberToObject(e, "busy_s", f[1]);
        cJSON_AddNumberToObject(e, "wait_s", f[2]);
        cJSON_AddNumberToObject(e, "busy_fraction", seconds > 0 ? f[1] / seconds : 0);
        cJSON_AddNumberToObject(e, "weight_bytes", f[3]);
        cJSON_AddNumberToObject(e, "kv_bytes_allocated", f[4]);
        cJSON_AddNumberToObject(e, "peak_rss_bytes", f[7]);
        cJSON_AddItemToArray(stages, e);
    }
    if (o->stats_path && o->progress) {
        fprintf(stderr, "[modpipe] peak RSS per stage:");
        for (int s = 0; s < S; s++) {
            const double *f = all + (size_t)s * len + S * ST_LINK;
            fprintf(stderr, "%s %d: %.1f MiB (weights %.1f MiB, KV %.1f MiB)", s ? "," : "", s,
                    f[7] / 1048576.0, f[3] / 1048576.0, f[4] / 1048576.0);
        }
        fprintf(stderr, "\n");
    }

    cJSON *links = cJSON_AddArrayToObject(j, "links");
    for (int s = 0; s < S; s++) {
        const double *v = all + (size_t)s * len;
        const double dense_rows = v[S * ST_LINK];
        for (int t = 0; t < S; t++) {
            const double *ls = v + t * ST_LINK;
            int chain = t == s + 1;
            if (ls[0] == 0 && !chain) continue;
            cJSON *e = cJSON_CreateObject();
            char name[32];
            snprintf(name, sizeof name, "%d->%d", s, t);
            const char *kind = chain ? "chain" : (t > s ? "bypass" : "tokens");
            cJSON_AddStringToObject(e, "link", name);
            cJSON_AddNumberToObject(e, "from", s);
            cJSON_AddNumberToObject(e, "to", t);
            cJSON_AddStringToObject(e, "kind", kind);
            cJSON_AddNumberToObject(e, "packets", ls[0]);
            cJSON_AddNumberToObject(e, "rows", ls[3]);
            cJSON_AddNumberToObject(e, "header_bytes", ls[1]);
            cJSON_AddNumberToObject(e, "payload_bytes", ls[2]);
            cJSON_AddNumberToObject(e, "dense_rows", chain ? dense_rows : 0);
            cJSON_AddNumberToObject(e, "dense_bytes", chain ? dense_rows * D * ws : 0);
            cJSON_AddItemToArray(links, e);
            hdr += ls[1];
            if (t > s) pay += ls[2];
            else tok_bytes += ls[2];
            if (chain) dense += dense_rows * D * ws;
        }
    }

    cJSON *layers = cJSON_AddArrayToObject(j, "layers");
    double kv = 0, kv_dense = 0, fl = 0, fl_dense = 0;
    for (int l = 0; l < L; l++) {
        int s = 0;
        while (s < S - 1 && l > o->plan->st[s].last) s++;
        const double *e = all + (size_t)s * len + S * ST_LINK + ST_FIXED + l * ST_LAYER;
        cJSON *x = cJSON_CreateObject();
        cJSON_AddNumberToObject(x, "layer", l);
        cJSON_AddStringToObject(x, "type", stage_kind_name(cfg->layer_kind[l]));
        cJSON_AddNumberToObject(x, "stage", s);
        cJSON_AddNumberToObject(x, "rows", e[0]);
        cJSON_AddNumberToObject(x, "active_rows", e[1]);
        cJSON_AddNumberToObject(x, "participation", e[0] > 0 ? e[1] / e[0] : 0);
        cJSON_AddNumberToObject(x, "kv_bytes", e[2] * kvd * 2 * kvs);
        cJSON_AddNumberToObject(x, "kv_bytes_dense", e[0] * kvd * 2 * kvs);
        cJSON_AddNumberToObject(x, "flops", e[3]);
        cJSON_AddNumberToObject(x, "flops_dense", e[4]);
        cJSON_AddNumberToObject(x, "seconds", e[5]);
        cJSON_AddItemToArray(layers, x);
        kv += e[2] * kvd * 2 * kvs;
        kv_dense += e[0] * kvd * 2 * kvs;
        fl += e[3];
        fl_dense += e[4];
        if (l == 0) rows_total = e[0];
    }
    double wire = hdr + pay + tok_bytes;
    cJSON *tot = cJSON_AddObjectToObject(j, "total");
    cJSON_AddNumberToObject(tot, "header_bytes", hdr);
    cJSON_AddNumberToObject(tot, "payload_bytes", pay);
    cJSON_AddNumberToObject(tot, "token_bytes", tok_bytes);
    cJSON_AddNumberToObject(tot, "wire_bytes", wire);
    cJSON_AddNumberToObject(tot, "dense_bytes", dense);
    cJSON_AddNumberToObject(tot, "payload_ratio", dense > 0 ? pay / dense : 0);
    cJSON_AddNumberToObject(tot, "ratio", dense > 0 ? wire / dense : 0);
    cJSON_AddNumberToObject(j, "kv_bytes", kv);
    cJSON_AddNumberToObject(j, "kv_bytes_dense", kv_dense);
    cJSON_AddNumberToObject(j, "flops", fl);
    cJSON_AddNumberToObject(j, "flops_dense", fl_dense);
    cJSON_AddNumberToObject(j, "rows", rows_total);
    double ntok = o->kind == CLUSTER_RUN_GENERATE ? (double)c->tokens_done : rows_total;
    cJSON_AddNumberToObject(j, "tokens", ntok);
    cJSON_AddNumberToObject(j, "seconds", seconds);
    cJSON_AddNumberToObject(j, "tokens_per_s", seconds > 0 ? ntok / seconds : 0);

    double nll = 0, nn = 0;
    for (int s = 0; s < S; s++) {
        nll += all[(size_t)s * len + S * ST_LINK + 5];
        nn += all[(size_t)s * len + S * ST_LINK + 6];
    }
    if (o->kind == CLUSTER_RUN_EVAL) {
        cJSON_AddNumberToObject(j, "mean_nll", nn > 0 ? nll / nn : 0);
        cJSON_AddNumberToObject(j, "perplexity", nn > 0 ? exp(nll / nn) : 0);
    }
    res->nll_sum = nll;
    res->nll_count = (long)nn;
    res->wire_bytes = wire;
    res->dense_bytes = dense;
    res->payload_bytes = pay;
    res->header_bytes = hdr;

    if (o->stats_path) {
        char *txt = cJSON_Print(j);
        FILE *f = fopen(o->stats_path, "w");
        if (!f || !txt || fputs(txt, f) < 0 || fputc('\n', f) == EOF)
            fprintf(stderr, "modpipe: cannot write stats file %s\n", o->stats_path);
        if (f) fclose(f);
        free(txt);
    }
    cJSON_Delete(j);
}

/* ========================================================================================
 * Set-up and the run
 * ===================================================================================== */

static void ctx_free(ctx *c)
{
    stage_state_free(c->st);
    stage_model_free(c->m);
    comm_links_free(c->links);
    comm_unpacker_free(c->unp);
    free(c->d.slot); free(c->d.pos); free(c->d.tok); free(c->d.flags);
    free(c->x); free(c->present); free(c->dest); free(c->masks); free(c->byp_in); free(c->byp_out);
    free(c->rbuf[0]); free(c->rbuf[1]); free(c->bbuf); free(c->tbuf);
    free(c->lrows); free(c->ltok); free(c->logits); free(c->scratch); free(c->rng); free(c->dump);
    free(c->gen);
    if (c->fl) {
        for (int i = 0; i < c->o->max_in_flight; i++) { free(c->fl[i].slot); free(c->fl[i].flags); }
        free(c->fl);
    }
    sched_free(&c->sc);
}

/* Everything that can fail before the first packet. Returns 0 or -1 with err. */
static int ctx_init(ctx *c, char *err, size_t errlen)
{
    const cluster_run_opts *o = c->o;
    const stage_config *cfg = o->cfg;
    const cluster_stage_plan *me = &o->plan->st[c->rank];
    c->D = cfg->hidden;
    c->V = cfg->vocab;
    c->head = c->S - 1;
    if (c->S > 64) { snprintf(err, errlen, "at most 64 stages are supported"); return -1; }
    if (sched_init(&c->sc, o)) { snprintf(err, errlen, "out of memory (scheduler)"); return -1; }
    c->R = c->sc.max_rows > o->micro_batch ? c->sc.max_rows : o->micro_batch;
    int max_seq = 0;
    for (int s = 0; s < o->n_seqs; s++) {
        int l = o->seq_len[s] + (o->kind == CLUSTER_RUN_GENERATE ? o->max_new : 0);
        if (l > max_seq) max_seq = l;
    }
    if (max_seq > cfg->max_pos) {
        snprintf(err, errlen, "sequences reach %d positions but max_position_embeddings is %d",
                 max_seq, cfg->max_pos);
        return -1;
    }
    stage_range r = {me->first, me->last, c->rank == 0, c->rank == c->S - 1};
    if (stage_model_load_dtype(o->model_dir, cfg, r, o->weights_dtype, &c->m, err, errlen)) return -1;
    c->st = stage_state_init(c->m, o->n_seqs, c->R, max_seq, err, errlen);
    if (!c->st) return -1;
    c->pkt_max = comm_packet_max_bytes(c->R, c->D, c->S);
    int n_bufs = o->max_in_flight * c->S + 4;
    c->links = comm_links_init(c->comm, c->S, c->pkt_max, n_bufs, o->timeout_s);
    c->unp = comm_unpacker_init(c->R, c->S);
    stage_state_set_progress(c->st, progress_cb, c->links);
    const size_t R = (size_t)c->R, D = (size_t)c->D, V = (size_t)c->V, S = (size_t)c->S;
    c->d.slot = malloc(R * 4); c->d.pos = malloc(R * 4); c->d.tok = malloc(R * 4);
    c->d.flags = malloc(R);
    c->x = malloc(R * D * sizeof(float));
    c->present = malloc(R);
    c->dest = malloc(R * sizeof(int));
    c->masks = calloc(S, comm_mask_bytes(c->R) + 1);
    c->byp_in = malloc(S * S * sizeof *c->byp_in);
    c->byp_out = malloc(S * S * sizeof *c->byp_out);
    int ok = c->links && c->unp && c->d.slot && c->d.pos && c->d.tok && c->d.flags && c->x &&
             c->present && c->dest && c->masks && c->byp_in && c->byp_out;
    if (ok && c->rank > 0) {
        c->rbuf[0] = malloc(c->pkt_max);
        c->rbuf[1] = malloc(c->pkt_max);
        c->bbuf = malloc(c->pkt_max);
        ok = c->rbuf[0] && c->rbuf[1] && c->bbuf;
    }
    c->rreq[0] = c->rreq[1] = c->treq = MPI_REQUEST_NULL;
    if (ok && c->rank == c->head) {
        c->lrows = malloc(R * sizeof(int));
        c->ltok = malloc(R * 4);
        c->logits = malloc(R * V * sizeof(float));
        c->scratch = malloc(2 * V * sizeof(float) + 16);
        c->rng = malloc((size_t)o->n_seqs * sizeof *c->rng);
        ok = c->lrows && c->ltok && c->logits && c->scratch && c->rng;
        for (int s = 0; ok && s < o->n_seqs; s++) stage_rng_seed(&c->rng[s], o->seed, (uint64_t)s);
        if (ok && o->dump_path) {
            FILE *f = fopen(o->dump_path, "wb"); /* fail now, not after the run */
            if (!f) {
                snprintf(err, errlen, "--dump-logits %s: cannot write: %s", o->dump_path, strerror(errno));
                return -1;
            }
            fclose(f);
            size_t per = o->kind == CLUSTER_RUN_GENERATE ? (size_t)o->max_new : (size_t)o->seq_len[0];
            c->dump = calloc((size_t)o->n_seqs * per * V, sizeof(float));
            if (!c->dump) {
                snprintf(err, errlen, "cannot allocate %.1f MiB for --dump-logits",
                         (double)o->n_seqs * per * V * 4 / 1048576.0);
                return -1;
            }
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
        c->gen = calloc((size_t)o->n_seqs * (o->max_new > 0 ? o->max_new : 1), 4);
        c->fl = calloc((size_t)o->max_in_flight, sizeof *c->fl);
        ok = c->tbuf && c->gen && c->fl;
        for (int i = 0; ok && i < o->max_in_flight; i++) {
            c->fl[i].slot = malloc(R * 4);
            c->fl[i].flags = malloc(R);
            ok = c->fl[i].slot && c->fl[i].flags;
        }
        c->mb_total = c->sc.n_chunks;
    }
    if (!ok) { snprintf(err, errlen, "out of memory sizing the run buffers"); return -1; }
    return 0;
}

int cluster_run(MPI_Comm comm, const cluster_run_opts *o, cluster_run_result *res, char *err,
                size_t errlen)
{
    memset(res, 0, sizeof *res);
    ctx c;
    memset(&c, 0, sizeof c);
    c.o = o;
    c.comm = comm;
    MPI_Comm_rank(comm, &c.rank);
    MPI_Comm_size(comm, &c.S);
    if (o->plan->n_stages != c.S) {
        snprintf(err, errlen, "the plan has %d stages but the job has %d ranks", o->plan->n_stages, c.S);
        return -1;
    }

    /* All ranks agree on start-up failures; the lowest failing rank tells. */
    char myerr[1024] = "";
    int rc = ctx_init(&c, myerr, sizeof myerr);
    int bad = rc ? c.rank : c.S, first_bad = c.S;
    MPI_Allreduce(&bad, &first_bad, 1, MPI_INT, MPI_MIN, comm);
    if (first_bad < c.S) {
        if (c.rank == first_bad) snprintf(err, errlen, "rank %d: %s", c.rank, myerr);
        else snprintf(err, errlen, "rank %d failed to start", first_bad);
        ctx_free(&c);
        return first_bad == c.rank ? -1 : -2;
    }

    MPI_Barrier(comm);
    c.t_start = c.t_last_progress = stage_now_s();
    if (c.rank == 0) stage0_loop(&c);
    else stageN_loop(&c);
    comm_links_drain(c.links);
    double seconds = stage_now_s() - c.t_start;
    MPI_Barrier(comm);

    /* --dump-logits from the head */
    int dump_ok = 1;
    char dump_err[512] = "";
    if (c.rank == c.head && c.dump) {
        int64_t shape[3] = {o->n_seqs,
                            o->kind == CLUSTER_RUN_GENERATE ? o->max_new : o->seq_len[0], c.V};
        dump_ok = !npy_write_f32(o->dump_path, c.dump, 3, shape, dump_err, sizeof dump_err);
    }
    MPI_Bcast(&dump_ok, 1, MPI_INT, c.head, comm);

    int len = 0;
    double *mine = stats_vector(&c, &len);
    double *all = c.rank == 0 ? malloc((size_t)len * c.S * sizeof(double)) : NULL;
    MPI_Gather(mine, len, MPI_DOUBLE, all, len, MPI_DOUBLE, 0, comm);
    if (c.rank == 0) {
        report(&c, all, len, seconds, res);
        res->seconds = seconds;
        if (o->kind == CLUSTER_RUN_GENERATE) {
            res->generated = c.gen;
            c.gen = NULL;
        }
    }
    free(all);
    free(mine);
    ctx_free(&c);
    if (!dump_ok) {
        snprintf(err, errlen, "rank %d: %s", c.head, dump_err);
        return c.rank == c.head ? -1 : -2;
    }
    return 0;
}

void cluster_run_result_free(cluster_run_result *res)
{
    if (!res) return;
    free(res->generated);
    res->generated = NULL;
}
