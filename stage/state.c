/* stage/state.c — a stage's state: KV slot pool, workspace, stats, slots, and the
 * tensor-parallel group protocol around the layer math (docs/SPEC.md §2, §5). See stage.h. */
#include "stage/stage_impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/err.h"
#include "stage/arch.h"
#include "stage/kernels.h"

/* ---- State: KV caches, workspace, stats ------------------------------------------------------ */

stage_state *stage_state_init(const stage_model *m, int n_slots, int max_rows, int max_seq,
                              char *err, size_t errlen)
{
    return stage_state_init_kv(m, n_slots, max_rows, max_seq, NULL, err, errlen);
}

/* Pages one (layer, slot) cache can hold at once: ceil(max_seq / page); on a windowed layer
 * (docs/SPEC.md §10.4) the W - 1 entries still visible plus a micro-batch's rows, over at
 * most one more page than they fill (the window starts inside a page). */
static int kv_layer_max_pages(const stage_state *s, int layer, int page)
{
    long w = stage_layer_window(&s->m->cfg, layer);
    long win = w > 0 ? (w - 1 + s->max_rows + page - 1) / page + 1 : s->kv_max_pages;
    return win < s->kv_max_pages ? (int)win : s->kv_max_pages;
}

stage_state *stage_state_init_kv(const stage_model *m, int n_slots, int max_rows, int max_seq,
                                 const stage_kv_opts *kvo, char *err, size_t errlen)
{
    const stage_config *c = &m->cfg;
    const int page = kvo && kvo->page > 0 ? kvo->page : KV_PAGE_DEFAULT;
    if (n_slots < 1 || max_seq < 1) {
        snprintf(err, errlen, "stage state: %d slots, %d positions: each must be >= 1", n_slots,
                 max_seq);
        return NULL;
    }
    stage_state *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->m = m;
    s->n_layers = m->range.last >= m->range.first ? m->range.last - m->range.first + 1 : 0;
    s->n_slots = n_slots;
    s->max_rows = max_rows < 1 ? 1 : max_rows;
    s->max_seq = max_seq;
    const size_t R = (size_t)s->max_rows, D = (size_t)c->hidden;
    const size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t ff = (size_t)(c->inter > c->expert_inter ? c->inter : c->expert_inter);
    size_t ng = (size_t)(c->n_experts + c->n_noop_experts + 1);
    size_t ept = (size_t)(c->experts_per_token > 0 ? c->experts_per_token : 1);

    s->tp = m->tp;
    const int K = s->tp ? stage_tp_size(s->tp) : 1;
    s->nh_l = c->n_heads / K;
    s->nkv_l = c->n_kv_heads / K;
    s->ff_l = c->inter;
    s->fe_l = c->expert_inter;
    if (s->tp) {
        int off;
        s->ff_l = stage_tp_split(s->tp, c->inter, &s->ff_off);
        s->fe_l = stage_tp_split(s->tp, c->expert_inter, &off);
        stage_tp_split(s->tp, (int)qd, &s->q_off); /* head-aligned: K divides the heads */
        stage_tp_split(s->tp, (int)kvd, &s->kv_off);
    }
    const size_t kvd_l = (size_t)s->nkv_l * c->head_dim;        /* this rank's K/V width */
    const size_t n_seq = (size_t)s->n_layers * (size_t)n_slots; /* (layer, slot) caches */
    /* The pool: by default every position of every slot on every layer (the most the cache
     * can hold; a windowed layer recycles its pages and holds at most the window's, §10.4);
     * a byte budget gives fewer pages (docs/SPEC.md §11). */
    s->kv_max_pages = (max_seq + page - 1) / page;
    const size_t pb = kv_page_bytes(page, kvd_l);
    double full = 0;
    for (int li = 0; li < s->n_layers; li++)
        full += (double)n_slots * kv_layer_max_pages(s, m->range.first + li, page);
    double n_pages = full;
    if (kvo && kvo->mem_bytes) {
        n_pages = floor((double)kvo->mem_bytes / (double)pb);
        if (n_pages > full) n_pages = full;
        if (n_pages < 1 && n_seq > 0) {
            char a[32], b2[32];
            base_human_bytes((double)kvo->mem_bytes, a, sizeof a);
            base_human_bytes((double)pb, b2, sizeof b2);
            snprintf(err, errlen, "--kv-mem %s holds no KV page (a page of %d positions is %s)", a,
                     page, b2);
            free(s);
            return NULL;
        }
    }
    if (n_pages > 2147483647.0) n_pages = 2147483647.0;
    s->kv = calloc(n_seq + 1, sizeof *s->kv);
    s->kv_pt = malloc((n_seq * (size_t)s->kv_max_pages + 1) * sizeof(int32_t));
    s->kv_seen = calloc((size_t)n_slots + 1, sizeof(int32_t));
    int pool_ok = !kv_pool_init(&s->pool, page, (int)n_pages, kvd_l);
    s->released = calloc((size_t)n_slots + 1, 1);
    s->lost = calloc((size_t)n_slots + 1, 1);
    s->parked = calloc((size_t)n_slots + 1, 1);
    s->pg_mark = malloc((size_t)s->pool.n_pages + 1);
    s->ms_keep = malloc((size_t)s->n_layers * n_slots + 1);
    s->stats = calloc((size_t)s->n_layers + 1, sizeof *s->stats);
    s->act = malloc(R * sizeof(int));
    s->act2 = malloc(R * sizeof(int));
    s->ent = malloc(R * sizeof(int));
    s->erow = malloc(R * sizeof(int));
    s->sel_e = malloc(R * ept * sizeof(int));
    s->sel_w = malloc(R * ept * sizeof(float));
    s->score = malloc(R * sizeof(float));
    s->xin = malloc(R * D * sizeof(float));
    s->h = malloc(R * D * sizeof(float));
    s->q = malloc(R * qd * sizeof(float));
    s->k = malloc(R * kvd * sizeof(float));
    s->v = malloc(R * kvd * sizeof(float));
    s->att = malloc(R * qd * sizeof(float));
    s->ajob = malloc(R * (size_t)c->n_kv_heads * sizeof *s->ajob);
    s->a = malloc(R * D * sizeof(float));
    s->x2 = malloc(R * D * sizeof(float));
    s->h2 = malloc(R * D * sizeof(float));
    s->f1 = malloc(R * ff * sizeof(float));
    s->f3 = malloc(R * ff * sizeof(float));
    s->mo = malloc(R * D * sizeof(float));
    s->ex = malloc(R * D * sizeof(float));
    s->eo = malloc(R * D * sizeof(float));
    s->gate = malloc(R * ng * sizeof(float));
    s->probs = malloc((size_t)(max_seq + 1) * (c->n_heads / c->n_kv_heads) * sizeof(float));
    s->mean = malloc(D * sizeof(float));
    int ok = pool_ok && s->kv && s->kv_pt && s->kv_seen && s->released && s->lost && s->parked &&
             s->pg_mark && s->ms_keep && s->stats && s->act && s->act2 && s->ent && s->erow &&
             s->sel_e && s->sel_w && s->score && s->xin && s->h && s->q && s->k && s->v && s->att &&
             s->ajob && s->a && s->x2 && s->h2 && s->f1 && s->f3 && s->mo && s->ex && s->eo &&
             s->gate && s->probs && s->mean;
    memset(s->ms_keep, -1, (size_t)s->n_layers * n_slots + 1);
    for (size_t i = 0; ok && i < n_seq; i++) {
        s->kv[i].pt = s->kv_pt + i * (size_t)s->kv_max_pages;
        for (int j = 0; j < s->kv_max_pages; j++) s->kv[i].pt[j] = -1;
    }
    if (ok && s->tp) {
        size_t V = (size_t)c->vocab, w = D > ff ? D : ff;
        if (w < qd) w = qd;
        if (w < V) w = V;
        s->op_bytes = R * (3 * sizeof(int32_t) + 2) + R * D * sizeof(float);
        s->f_i32 = malloc(3 * R * sizeof(int32_t));
        s->f_u8 = malloc(2 * R);
        s->f_x = malloc(R * D * sizeof(float));
        s->f_buf = malloc(s->op_bytes);
        s->f_logits = m->has_head ? malloc(R * V * sizeof(float)) : NULL;
        ok = s->f_i32 && s->f_u8 && s->f_x && s->f_buf && (s->f_logits || !m->has_head) &&
             !stage_tp_reserve(s->tp, (int)R, (int)w, err, errlen);
    }
    if (!ok) {
        snprintf(err, errlen,
                 "out of memory sizing the stage state (%d slots, %d rows, %d positions)", n_slots,
                 max_rows, max_seq);
        stage_state_free(s);
        return NULL;
    }
    return s;
}

void stage_state_free(stage_state *s)
{
    if (!s) return;
    kv_pool_free(&s->pool);
    free(s->kv);
    free(s->kv_pt);
    free(s->kv_seen);
    free(s->released);
    free(s->lost);
    free(s->parked);
    free(s->pg_mark);
    free(s->ms_keep);
    free(s->stats);
    free(s->act);
    free(s->act2);
    free(s->ent);
    free(s->erow);
    free(s->sel_e);
    free(s->sel_w);
    free(s->score);
    free(s->xin);
    free(s->h);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->att);
    free(s->a);
    free(s->x2);
    free(s->h2);
    free(s->f1);
    free(s->f3);
    free(s->mo);
    free(s->ex);
    free(s->eo);
    free(s->gate);
    free(s->probs);
    free(s->ajob);
    free(s->mean);
    free(s->f_i32);
    free(s->f_u8);
    free(s->f_x);
    free(s->f_buf);
    free(s->f_logits);
    free(s);
}

const stage_layer_stats *stage_state_layer_stats(const stage_state *s, int layer)
{
    int li = layer - s->m->range.first;
    if (li < 0 || li >= s->n_layers) return NULL;
    return &s->stats[li];
}

int stage_state_slots(const stage_state *s) { return s->n_slots; }
int stage_state_ctx(const stage_state *s) { return s->max_seq; }

void stage_slot_reset_impl(stage_state *s, int slot)
{
    if (slot < 0 || slot >= s->n_slots) return;
    for (int li = 0; li < s->n_layers; li++) {
        kv_seq_clear(&s->pool, kv_at(s, li, slot));
        s->ms_keep[(size_t)li * s->n_slots + slot] = -1;
    }
    s->kv_seen[slot] = 0;
    s->released[slot] = 0;
    s->lost[slot] = 0;
    s->parked[slot] = 0;
}

void stage_slot_lose_impl(stage_state *s, int slot)
{
    if (slot < 0 || slot >= s->n_slots || s->lost[slot]) return;
    for (int li = 0; li < s->n_layers; li++) kv_seq_clear(&s->pool, kv_at(s, li, slot));
    s->lost[slot] = 1;
}

void stage_state_kv_soft(stage_state *s, int on) { s->kv_soft = on; }

int stage_state_slot_lost(const stage_state *s, int slot)
{
    return slot >= 0 && slot < s->n_slots && s->lost[slot];
}

static void slot_release_impl(stage_state *s, int slot)
{
    if (slot < 0 || slot >= s->n_slots) return;
    stage_slot_reset_impl(s, slot);
    s->released[slot] = 1;
}

/* ---- tensor-parallel group protocol: the leader (group rank 0) runs the pipeline and
 * broadcasts each operation on the stage state; the other ranks (followers) repeat it. ---- */
enum {
    TP_OP_STOP = 0,
    TP_OP_FORWARD,
    TP_OP_HEAD,
    TP_OP_RESET,
    TP_OP_RELEASE,
    TP_OP_DROP,
    TP_OP_SHARE
};
enum { TP_HDR = 8 }; /* op, n, first, last, slot, n_present, 0, 0 */
/* A FORWARD carries per row: slot, pos, token (4 bytes each), flags, present (1 each). */
enum { TP_ROW_BYTES = 14 };
_Static_assert(sizeof *((stage_batch *)0)->slot == 4 && sizeof *((stage_batch *)0)->pos == 4 &&
                   sizeof *((stage_batch *)0)->token == 4 && sizeof *((stage_batch *)0)->flags == 1,
               "TP_ROW_BYTES: the FORWARD encoding of a row");

static int tp_leader(const stage_state *s)
{
    return s->tp && !s->tp_stopped && stage_tp_rank(s->tp) == 0;
}

static void tp_count_io(stage_state *s, size_t bytes)
{
    s->tp_io_bytes += (double)bytes * (stage_tp_size(s->tp) - 1);
}

/* The header goes by the group's idle broadcast: a waiting follower sleeps between polls. */
static void tp_send_hdr(stage_state *s, int op, int n, int first, int last, int slot, int np)
{
    int32_t hdr[TP_HDR] = {op, n, first, last, slot, np, 0, 0};
    s->tp->bcast_idle(s->tp, hdr, TP_HDR);
    tp_count_io(s, sizeof hdr);
}

void stage_state_slot_reset(stage_state *s, int slot)
{
    if (tp_leader(s)) tp_send_hdr(s, TP_OP_RESET, 0, 0, 0, slot, 0);
    stage_slot_reset_impl(s, slot);
}

void stage_state_slot_release(stage_state *s, int slot)
{
    if (tp_leader(s)) tp_send_hdr(s, TP_OP_RELEASE, 0, 0, 0, slot, 0);
    slot_release_impl(s, slot);
}

int stage_state_slot_len(const stage_state *s, int slot)
{
    if (slot < 0 || slot >= s->n_slots) return -1;
    int n = 0;
    for (int li = 0; li < s->n_layers; li++) {
        const kv_seq *c = &s->kv[(size_t)li * s->n_slots + slot];
        if (c->n > c->lo) {
            int p = kv_pos_at(&s->pool, c, c->n - 1) + 1;
            if (p > n) n = p;
        }
    }
    return n;
}

static int drop_before_impl(stage_state *s, int layer, int slot, int pos)
{
    const int li = layer - s->m->range.first;
    if (li < 0 || li >= s->n_layers || slot < 0 || slot >= s->n_slots) return 0;
    return kv_drop_before(&s->pool, kv_at(s, li, slot), pos);
}

int stage_state_slot_drop_before(stage_state *s, int layer, int slot, int pos)
{
    if (tp_leader(s)) tp_send_hdr(s, TP_OP_DROP, pos, layer, 0, slot, 0);
    return drop_before_impl(s, layer, slot, pos);
}

static int share_impl(stage_state *s, int src, int dst, int pos)
{
    if (src < 0 || src >= s->n_slots || dst < 0 || dst >= s->n_slots) return -1;
    if (src == dst) { /* a park: the sequence is over, its pages stay for later shares */
        if (s->released[src] || s->lost[src]) return -1;
        s->parked[src] = 1;
        return 0;
    }
    stage_slot_reset_impl(s, dst);
    int ok = !s->released[src] && !s->lost[src];
    for (int li = 0; ok && li < s->n_layers; li++) {
        const kv_seq *a = kv_at(s, li, src);
        /* a sliding window may have dropped src's first pages: fine while everything a row at
         * pos sees (positions > pos - W) is still held */
        const int w = stage_layer_window(&s->m->cfg, s->m->range.first + li);
        const int n = kv_entries_before(&s->pool, a, pos);
        ok = (a->lo == 0 || (n > a->lo && w > 0 && kv_pos_at(&s->pool, a, a->lo) <= pos - w + 1)) &&
             !kv_share(&s->pool, a, n, kv_at(s, li, dst));
        s->ms_keep[(size_t)li * s->n_slots + dst] = s->ms_keep[(size_t)li * s->n_slots + src];
    }
    if (!ok) { /* no source here, a dropped prefix, or no page for the copy */
        stage_slot_reset_impl(s, dst);
        if (s->kv_soft) stage_slot_lose_impl(s, dst); /* its rows must not run on nothing */
        return -1;
    }
    s->kv_seen[dst] = pos < s->kv_seen[src] ? pos : s->kv_seen[src];
    return 0;
}

int stage_state_slot_share(stage_state *s, int src, int dst, int pos)
{
    if (tp_leader(s)) tp_send_hdr(s, TP_OP_SHARE, pos, src, 0, dst, 0);
    return share_impl(s, src, dst, pos);
}

size_t stage_state_kv_alloc_bytes(const stage_state *s)
{
    return (size_t)s->pool.n_pages * kv_page_bytes(s->pool.page, s->pool.kvd);
}

int64_t stage_state_kv_layer_pages(const stage_state *s, int layer)
{
    const int li = layer - s->m->range.first;
    if (li < 0 || li >= s->n_layers) return -1;
    int64_t n = 0;
    for (int slot = 0; slot < s->n_slots; slot++)
        n += kv_seq_pages(&s->kv[(size_t)li * s->n_slots + slot], s->pool.page);
    return n;
}

void stage_state_kv_stats(const stage_state *s, stage_kv_stats *o)
{
    memset(o, 0, sizeof *o);
    o->page = s->pool.page;
    o->kv_layers = s->n_layers;
    o->pages_total = s->pool.n_pages;
    o->pages_used = kv_pool_used(&s->pool);
    /* cached: pages held, none of whose holders is a running (not parked) sequence */
    memset(s->pg_mark, 0, (size_t)s->pool.n_pages);
    for (int slot = 0; slot < s->n_slots; slot++) {
        if (s->parked[slot]) continue;
        o->positions_live += (int64_t)s->kv_seen[slot] * s->n_layers;
        for (int li = 0; li < s->n_layers; li++) {
            const kv_seq *c = &s->kv[(size_t)li * s->n_slots + slot];
            o->entries_live += c->n;
            const int hi = (c->n + s->pool.page - 1) / s->pool.page;
            for (int pi = c->lo / s->pool.page; pi < hi; pi++) s->pg_mark[c->pt[pi]] = 1;
        }
    }
    for (int p = 0; p < s->pool.n_pages; p++)
        o->pages_cached += s->pool.ref[p] > 0 && !s->pg_mark[p];
    o->pages_peak = s->pool.n_pages - s->pool.n_free_min;
    o->page_bytes = kv_page_bytes(s->pool.page, s->pool.kvd);
    o->bytes_used = (size_t)o->pages_used * o->page_bytes;
    const size_t ent = o->page_bytes / (size_t)s->pool.page; /* bytes of one entry */
    for (int slot = 0; slot < s->n_slots; slot++)            /* the live sequences' (not parked) */
        if (!s->parked[slot])
            o->bytes_dense += (size_t)s->kv_seen[slot] * (size_t)s->n_layers * ent;
    for (int li = 0; li < s->n_layers; li++) {
        int layer = s->m->range.first + li;
        int64_t n = stage_state_kv_layer_pages(s, layer);
        stage_kind k = s->m->layers[layer].kind;
        if (stage_kind_is_routed(k))
            o->pages_routed += n;
        else if (k == STAGE_KIND_MINDSKIP)
            o->pages_skip += n;
        else
            o->pages_full += n;
    }
}

void stage_state_set_progress(stage_state *s, void (*fn)(void *), void *arg)
{
    s->progress = fn;
    s->progress_arg = arg;
}

int stage_forward(stage_state *s, const stage_batch *b, float *x, const uint8_t *present, char *err,
                  size_t errlen)
{
    return stage_forward_range(s, b, x, present, s->m->range.first, s->m->range.last, err, errlen);
}

/* Leader: the micro-batch's descriptor, present mask and present rows to the group. */
static int tp_send_forward(stage_state *s, const stage_batch *b, const float *x,
                           const uint8_t *present, int first, int last, char *err, size_t errlen)
{
    const int D = s->m->cfg.hidden, n = b->n;
    if (n > s->max_rows) {
        snprintf(err, errlen, "micro-batch of %d rows exceeds the workspace (%d rows)", n,
                 s->max_rows);
        return -1;
    }
    uint8_t *p = s->f_buf;
    memcpy(p, b->slot, (size_t)n * 4);
    p += (size_t)n * 4;
    memcpy(p, b->pos, (size_t)n * 4);
    p += (size_t)n * 4;
    memcpy(p, b->token, (size_t)n * 4);
    p += (size_t)n * 4;
    memcpy(p, b->flags, (size_t)n);
    p += n;
    memcpy(p, present, (size_t)n);
    p += n;
    int np = 0;
    for (int i = 0; i < n; i++)
        if (present[i]) {
            memcpy(p, x + (size_t)i * D, (size_t)D * sizeof(float));
            p += (size_t)D * sizeof(float);
            np++;
        }
    size_t len = (size_t)(p - s->f_buf);
    tp_send_hdr(s, TP_OP_FORWARD, n, first, last, 0, np);
    s->tp->bcast(s->tp, s->f_buf, len);
    tp_count_io(s, len);
    return 0;
}

int stage_forward_range(stage_state *s, const stage_batch *b, float *x, const uint8_t *present,
                        int first, int last, char *err, size_t errlen)
{
    if (tp_leader(s) && tp_send_forward(s, b, x, present, first, last, err, errlen)) return -1;
    return stage_forward_impl(s, b, x, present, first, last, err, errlen);
}

int stage_head_logits(stage_state *s, const float *x, const int *rows, int n_rows, float *logits,
                      char *err, size_t errlen)
{
    if (tp_leader(s) && s->m->has_head && n_rows > 0 && n_rows <= s->max_rows) {
        const int D = s->m->cfg.hidden;
        float *p = (float *)(void *)s->f_buf;
        for (int j = 0; j < n_rows; j++)
            memcpy(p + (size_t)j * D, x + (size_t)rows[j] * D, (size_t)D * sizeof(float));
        tp_send_hdr(s, TP_OP_HEAD, n_rows, 0, 0, 0, 0);
        s->tp->bcast(s->tp, s->f_buf, (size_t)n_rows * D * sizeof(float));
        tp_count_io(s, (size_t)n_rows * D * sizeof(float));
    }
    double tb0 = s->tp ? stage_tp_bytes(s->tp) : 0.0;
    int rc = stage_head_impl(s, x, rows, n_rows, logits, err, errlen);
    if (s->tp) s->tp_io_bytes += stage_tp_bytes(s->tp) - tb0;
    return rc;
}

void stage_state_tp_stop(stage_state *s)
{
    if (!tp_leader(s)) return;
    tp_send_hdr(s, TP_OP_STOP, 0, 0, 0, 0, 0);
    s->tp_stopped = 1;
}

double stage_state_tp_io_bytes(const stage_state *s) { return s->tp_io_bytes; }

int stage_state_tp_follow(stage_state *s, char *err, size_t errlen)
{
    if (!s->tp || stage_tp_rank(s->tp) == 0) {
        snprintf(err, errlen, "stage_state_tp_follow: not a follower of a tensor-parallel stage");
        return -1;
    }
    const int D = s->m->cfg.hidden, R = s->max_rows;
    for (;;) {
        int32_t h[TP_HDR];
        s->tp->bcast_idle(s->tp, h, TP_HDR);
        const int op = h[0], n = h[1], np = h[5];
        if (op == TP_OP_STOP) return 0;
        if (op == TP_OP_DROP) {
            drop_before_impl(s, h[2], h[4], n);
            continue;
        }
        if (op == TP_OP_SHARE) { /* the same pool state as the leader's: the same outcome */
            share_impl(s, h[2], h[4], n);
            continue;
        }
        if (op == TP_OP_RESET || op == TP_OP_RELEASE) {
            if (op == TP_OP_RESET)
                stage_slot_reset_impl(s, h[4]);
            else
                slot_release_impl(s, h[4]);
            continue;
        }
        if (n < 0 || n > R || np < 0 || np > n || (op != TP_OP_FORWARD && op != TP_OP_HEAD)) {
            snprintf(err, errlen, "tensor-parallel op %d with %d rows (%d present) from the leader",
                     op, n, np);
            return -1;
        }
        int32_t *slot = s->f_i32, *pos = slot + R, *tok = pos + R;
        uint8_t *flags = s->f_u8, *present = flags + R;
        if (op == TP_OP_HEAD) {
            s->tp->bcast(s->tp, s->f_buf, (size_t)n * D * sizeof(float));
            for (int j = 0; j < n; j++) slot[j] = j; /* the rows come packed */
            if (stage_head_impl(s, (const float *)(void *)s->f_buf, slot, n, s->f_logits, err,
                                errlen))
                return -1;
            continue;
        }
        size_t len = (size_t)n * TP_ROW_BYTES + (size_t)np * D * sizeof(float);
        s->tp->bcast(s->tp, s->f_buf, len);
        const uint8_t *p = s->f_buf;
        memcpy(slot, p, (size_t)n * 4);
        p += (size_t)n * 4;
        memcpy(pos, p, (size_t)n * 4);
        p += (size_t)n * 4;
        memcpy(tok, p, (size_t)n * 4);
        p += (size_t)n * 4;
        memcpy(flags, p, (size_t)n);
        p += n;
        memcpy(present, p, (size_t)n);
        p += n;
        for (int i = 0; i < n; i++)
            if (present[i]) {
                memcpy(s->f_x + (size_t)i * D, p, (size_t)D * sizeof(float));
                p += (size_t)D * sizeof(float);
            }
        stage_batch b = {.n = n, .slot = slot, .pos = pos, .token = tok, .flags = flags};
        if (stage_forward_impl(s, &b, s->f_x, present, h[2], h[3], err, errlen)) return -1;
    }
}
