/* stage/layers.c — the layer math of one stage on a micro-batch: attention, SwiGLU MLP,
 * mixture of experts, MoD / MoDE / MindSkip routing, the head (docs/SPEC.md §2). See stage.h. */
#include "base/clock.h"
#include "stage/stage_impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stage/arch.h"
#include "stage/kernels.h"
#include "stage/matmul.h"

/* ---- Layer pieces. All work on a compact set of m rows (act[0..m) micro-batch indices, in
 * micro-batch order). */

/* y [m][n] = x W^T: stage_matmul_w on one rank; on a tensor-parallel group the distributed
 * t, with x / y as this rank's feature slices when x_local / y_local (stage/tp.h). */
static void mm(const stage_state *s, const float *x, int m, const stage_weight *w,
               const stage_tp_weight *t, int x_local, int y_local, float *y)
{
    if (s->tp)
        stage_tp_matmul(s->tp, x, x_local, m, t, y, y_local);
    else
        stage_matmul_w(x, m, w, y);
}

/* y [m][n] += b [n] (b NULL: no bias). */
static void add_bias(float *y, int m, int n, const float *b)
{
    if (!b) return;
    for (int j = 0; j < m; j++)
        for (int i = 0; i < n; i++) y[(size_t)j * n + i] += b[i];
}

/* First cache entry a row at position p sees under window w (entries [lo, own] in position
 * order; w 0: all of them): the first with pos > p - w (docs/SPEC.md §10.4). */
static int window_start(const kv_pool *pool, const kv_seq *cs, int own, int p, int w)
{
    int lo = cs->lo, hi = own; /* pos[own] = p > p - w: the answer is in [lo, own] */
    if (w <= 0 || p - w < kv_pos_at(pool, cs, lo)) return lo;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (kv_pos_at(pool, cs, mid) > p - w)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

static void gather(const float *x, const int *idx, int m, int D, float *dst)
{
    for (int j = 0; j < m; j++)
        memcpy(dst + (size_t)j * D, x + (size_t)idx[j] * D, (size_t)D * sizeof(float));
}

/* Self-attention of the m rows whose normed inputs are h [m][D]; rows idx[] of batch b.
 * Appends their K/V to layer li's caches, then each row attends causally over its slot's
 * cached positions up to its own. Output: s->a [m][D]. Returns the attended entries summed
 * over rows (for FLOP counts) or -1 on error. */
static double attention(stage_state *s, int li, const layer_w *L, const stage_batch *b,
                        const int *idx, int m, const float *h, char *err, size_t errlen)
{
    const stage_config *c = &s->m->cfg;
    /* this rank's heads: all of them on one rank; a tensor-parallel rank holds q/k/v, the
     * KV cache and the attention of its own n_heads/K (and n_kv_heads/K) heads */
    const int hd = c->head_dim, nh = s->nh_l, nkv = s->nkv_l;
    const int qd = nh * hd, kvd = nkv * hd, grp = nh / nkv;
    const float scale = 1.0f / sqrtf((float)hd);
    const int win = stage_layer_window(c, s->m->range.first + li);

    mm(s, h, m, &L->wq, &L->tq, 0, 1, s->q);
    mm(s, h, m, &L->wk, &L->tk, 0, 1, s->k);
    mm(s, h, m, &L->wv, &L->tv, 0, 1, s->v);
    /* biases of this rank's features (all of them on one rank), then Qwen3's per-head norms */
    add_bias(s->q, m, qd, L->bq ? L->bq + s->q_off : NULL);
    add_bias(s->k, m, kvd, L->bk ? L->bk + s->kv_off : NULL);
    add_bias(s->v, m, kvd, L->bv ? L->bv + s->kv_off : NULL);
    if (L->qnorm) {
        stage_rmsnorm(s->q, m * nh, hd, L->qnorm, c->eps, s->q);
        stage_rmsnorm(s->k, m * nkv, hd, L->knorm, c->eps, s->k);
    }
    for (int j = 0; j < m; j++) {
        int r = idx[j];
        stage_rope(s->q + (size_t)j * qd, nh, hd, b->pos[r], s->m->inv_freq);
        stage_rope(s->k + (size_t)j * kvd, nkv, hd, b->pos[r], s->m->inv_freq);
        s->ent[j] = -1;
        if (s->lost[b->slot[r]]) continue; /* soft mode: no attention, nothing cached */
        kv_seq *cs = kv_at(s, li, b->slot[r]);
        if (win) { /* the slot's first row here: its pages no row now or later sees go back */
            int first = 1;
            for (int u = 0; u < j && first; u++) first = b->slot[idx[u]] != b->slot[r];
            if (first) kv_drop_before(&s->pool, cs, b->pos[r] - win + 1);
        }
        if (cs->n > cs->lo && kv_pos_at(&s->pool, cs, cs->n - 1) >= b->pos[r]) {
            snprintf(err, errlen, "layer %d: slot %d position %d arrives after position %d",
                     s->m->range.first + li, b->slot[r], b->pos[r],
                     kv_pos_at(&s->pool, cs, cs->n - 1));
            return -1;
        }
        int e = kv_append(&s->pool, cs, s->kv_max_pages, b->pos[r], s->k + (size_t)j * kvd,
                          s->v + (size_t)j * kvd);
        if (e == KV_FULL) {
            snprintf(err, errlen, "layer %d: slot %d KV cache full (%d positions)",
                     s->m->range.first + li, b->slot[r], s->max_seq);
            return -1;
        }
        if (e == KV_EXHAUSTED && s->kv_soft) { /* the scheduler recomputes the sequence */
            stage_slot_lose_impl(s, b->slot[r]);
            continue;
        }
        if (e == KV_EXHAUSTED) {
            snprintf(err, errlen,
                     "layer %d: slot %d position %d: KV pool exhausted (all %d pages of %d "
                     "positions, %zu bytes, in use; raise --kv-mem or lower --slots)",
                     s->m->range.first + li, b->slot[r], b->pos[r], s->pool.n_pages, s->pool.page,
                     stage_state_kv_alloc_bytes(s));
            return -1;
        }
        s->ent[j] = e;
    }
    double ctx_total = 0.0;
    const size_t ps = (size_t)s->pool.page * kvd; /* floats from one page to the next */
    int nj = 0; /* jobs in s->ajob: every row x KV head, run at once on the pool */
    for (int j = 0; j < m; j++) {
        if (s->lost[b->slot[idx[j]]]) { /* lost in this layer or before: its pages are gone */
            memset(s->att + (size_t)j * qd, 0, (size_t)qd * sizeof(float));
            continue;
        }
        const kv_seq *cs = kv_at(s, li, b->slot[idx[j]]);
        /* entries are in position order: a causal prefix, from the first one still held
         * (a window: from the first one within it) */
        const int e0 = window_start(&s->pool, cs, s->ent[j], b->pos[idx[j]], win);
        int n_ctx = s->ent[j] + 1 - e0;
        ctx_total += n_ctx;
        /* the grp query heads sharing KV head kh are contiguous in q: one pass over K/V */
        for (int kh = 0; kh < nkv; kh++)
            s->ajob[nj++] =
                (stage_attend_job){.q = s->q + (size_t)j * qd + (size_t)kh * grp * hd,
                                   .kv = {.k = s->pool.k + (size_t)kh * hd,
                                          .v = s->pool.v + (size_t)kh * hd,
                                          .pages = cs->pt,
                                          .page = s->pool.page,
                                          .t0 = e0,
                                          .page_stride = ps,
                                          .stride = (size_t)kvd},
                                   .n_ctx = n_ctx,
                                   .out = s->att + (size_t)j * qd + (size_t)kh * grp * hd};
    }
    stage_attend_batch(s->ajob, nj, grp, hd, scale, s->probs);
    mm(s, s->att, m, &L->wo, &L->to, 1, 0, s->a);
    add_bias(s->a, m, c->hidden, L->bo);
    return ctx_total;
}

/* Dense SwiGLU MLP of h2 [m][D] into s->mo [m][D]. */
static void mlp(stage_state *s, const layer_w *L, int m)
{
    const int I = s->ff_l; /* this rank's intermediate features (all on one rank) */
    mm(s, s->h2, m, &L->w_gate, &L->tgate, 0, 1, s->f1);
    mm(s, s->h2, m, &L->w_up, &L->tup, 0, 1, s->f3);
    add_bias(s->f1, m, I, L->bgate ? L->bgate + s->ff_off : NULL);
    add_bias(s->f3, m, I, L->bup ? L->bup + s->ff_off : NULL);
    stage_swiglu(s->f1, s->f3, (long)m * I);
    mm(s, s->f1, m, &L->w_down, &L->tdown, 1, 0, s->mo);
    add_bias(s->mo, m, s->m->cfg.hidden, L->bdown);
}

/* Mixture of experts on h2 [m][D] into s->mo. staged: softmax over E, top experts_per_token,
 * renormalised. integrated: softmax over E + N_noop, top-1; a no-op winner gives 0, a real
 * one p_winner * expert. Rows are grouped per expert (in row order) so each expert runs one
 * GEMM. Returns the number of (row, expert) evaluations. */
static long moe(stage_state *s, const layer_w *L, int m)
{
    const stage_config *c = &s->m->cfg;
    const int D = c->hidden, Ie = s->fe_l, E = c->n_experts, G = L->n_gate;
    const int integrated = L->kind == STAGE_KIND_MODE_INTEGRATED;
    const int k = integrated ? 1 : c->experts_per_token;
    stage_matmul_w(s->h2, m, &L->moe_gate, s->gate);
    for (int j = 0; j < m; j++) {
        float *g = s->gate + (size_t)j * G;
        stage_softmax(g, G);
        int *se = s->sel_e + (size_t)j * k;
        float *sw = s->sel_w + (size_t)j * k;
        float wsum = 0.0f;
        for (int t = 0; t < k; t++) { /* top-k, ties to the lower index */
            int best = -1;
            for (int e = 0; e < G; e++) {
                int taken = 0;
                for (int u = 0; u < t; u++) taken |= se[u] == e;
                if (!taken && (best < 0 || g[e] > g[best])) best = e;
            }
            se[t] = best;
            sw[t] = g[best];
            wsum += g[best];
        }
        if (!integrated)
            for (int t = 0; t < k; t++) sw[t] /= wsum;
    }
    memset(s->mo, 0, (size_t)m * D * sizeof(float));
    long evals = 0;
    for (int e = 0; e < E; e++) {
        int ne = 0;
        for (int j = 0; j < m; j++)
            for (int t = 0; t < k; t++)
                if (s->sel_e[(size_t)j * k + t] == e) s->erow[ne++] = j;
        if (!ne) continue;
        evals += ne;
        gather(s->h2, s->erow, ne, D, s->ex);
        mm(s, s->ex, ne, &L->ew1[e], L->tew1 ? &L->tew1[e] : NULL, 0, 1, s->f1);
        mm(s, s->ex, ne, &L->ew3[e], L->tew3 ? &L->tew3[e] : NULL, 0, 1, s->f3);
        stage_swiglu(s->f1, s->f3, (long)ne * Ie);
        mm(s, s->f1, ne, &L->ew2[e], L->tew2 ? &L->tew2[e] : NULL, 1, 0, s->eo);
        for (int u = 0; u < ne; u++) {
            int j = s->erow[u];
            float w = 0.0f;
            for (int t = 0; t < k; t++)
                if (s->sel_e[(size_t)j * k + t] == e) w = s->sel_w[(size_t)j * k + t];
            float *dst = s->mo + (size_t)j * D;
            const float *src = s->eo + (size_t)u * D;
            for (int i = 0; i < D; i++) dst[i] += w * src[i];
        }
    }
    return evals;
}

/* ---- Blocks ---------------------------------------------------------------------------------- */

/* Which present rows does routed layer l select? Fills act[] (micro-batch order) and
 * score[] (their r). */
static int route_rows(stage_state *s, int l, const stage_batch *b, const float *x,
                      const uint8_t *present, char *err, size_t errlen)
{
    const stage_model *M = s->m;
    const stage_config *c = &M->cfg;
    const int D = c->hidden;
    int m = 0;
    if (c->mod_routing != STAGE_ROUTING_TOPK) {
        for (int i = 0; i < b->n; i++) {
            if (!present[i]) continue;
            const float *xi = x + (size_t)i * D;
            if (stage_router_selects(M, l, xi)) {
                s->act[m] = i;
                s->score[m++] = stage_router_score(M, l, xi);
            }
        }
        return m;
    }
    /* top-k (expert choice) per sequence over the rows it has in this forward. Every row
     * of the micro-batch must be here: top-k is non-causal. */
    for (int i = 0; i < b->n; i++) {
        if (!present[i]) {
            snprintf(err, errlen, "layer %d: topk routing needs every row of the micro-batch", l);
            return -1;
        }
        if (!(b->flags[i] & STAGE_ROW_PROMPT)) { /* stage.h: a top-k model asked to decode */
            snprintf(err, errlen,
                     "layer %d: topk routing is non-causal and cannot decode (row %d: "
                     "slot %d position %d is not a prompt row)",
                     l, i, b->slot[i], b->pos[i]);
            return -1;
        }
        s->xin[i] = stage_router_score(M, l, x + (size_t)i * D); /* scratch: r per row */
    }
    for (int i = 0; i < b->n; i++) {
        int T = 0, rank = 0;
        for (int u = 0; u < b->n; u++) {
            if (b->slot[u] != b->slot[i]) continue;
            T++;
            /* u outranks i: larger r, or equal r at a lower position */
            if (s->xin[u] > s->xin[i] || (s->xin[u] == s->xin[i] && b->pos[u] < b->pos[i])) rank++;
        }
        int k = (int)floor(c->mod_capacity * T);
        if (k < 1) k = 1;
        if (rank < k) s->act[m++] = i;
    }
    for (int j = 0; j < m; j++) s->score[j] = s->xin[s->act[j]];
    return m;
}

/* win: the layer's sliding window (0: none) — a dense layer would attend min(pos + 1, win) */
static void count_attn(stage_layer_stats *st, const stage_config *c, const stage_batch *b, int win,
                       double rows_done, double ctx_done)
{
    double dense_ctx = 0.0;
    for (int i = 0; i < b->n; i++) dense_ctx += win > 0 && b->pos[i] >= win ? win : b->pos[i] + 1;
    st->flops += rows_done * stage_flops_attn_proj(c) + stage_flops_attn_ctx(c, ctx_done);
    st->flops_dense += b->n * stage_flops_attn_proj(c) + stage_flops_attn_ctx(c, dense_ctx);
}

/* MoD / staged MoDE: y = x + g(r) (a + m) for selected rows, attention among them only. */
static int block_routed(stage_state *s, int li, int l, const layer_w *L, const stage_batch *b,
                        float *x, const uint8_t *present, char *err, size_t errlen)
{
    const stage_config *c = &s->m->cfg;
    const int D = c->hidden;
    stage_layer_stats *st = &s->stats[li];
    int m = route_rows(s, l, b, x, present, err, errlen);
    if (m < 0) return -1;
    st->active += m;
    double ctx = 0.0;
    if (m > 0) {
        gather(x, s->act, m, D, s->xin);
        stage_rmsnorm(s->xin, m, D, L->ln1, c->eps, s->h);
        ctx = attention(s, li, L, b, s->act, m, s->h, err, errlen);
        if (ctx < 0) return -1;
        for (size_t i = 0; i < (size_t)m * D; i++) s->x2[i] = s->xin[i] + s->a[i];
        stage_rmsnorm(s->x2, m, D, L->ln2, c->eps, s->h2);
    }
    long evals = 0;
    if (L->kind == STAGE_KIND_MODE_STAGED)
        evals = m ? moe(s, L, m) : 0;
    else if (m)
        mlp(s, L, m);
    for (int j = 0; j < m; j++) {
        float r = s->score[j];
        float g = c->mod_scale == STAGE_SCALE_SIGMOID ? stage_sigmoid(r) : r;
        float *xo = x + (size_t)s->act[j] * D;
        const float *xi = s->xin + (size_t)j * D, *a = s->a + (size_t)j * D,
                    *mo = s->mo + (size_t)j * D;
        for (int i = 0; i < D; i++) xo[i] = xi[i] + g * (a[i] + mo[i]);
    }
    st->kv_entries += m;
    count_attn(st, c, b, stage_layer_window(c, l), m, ctx);
    if (L->kind == STAGE_KIND_MODE_STAGED) {
        double per_row = stage_flops_gate(c, L->n_gate);
        st->flops += m * per_row + evals * stage_flops_expert(c);
        st->flops_dense += b->n * (per_row + c->experts_per_token * stage_flops_expert(c));
    } else {
        st->flops += m * stage_flops_mlp(c);
        st->flops_dense += b->n * stage_flops_mlp(c);
    }
    return 0;
}

/* dense, mode_integrated, mindskip: every present row runs the MLP; attention runs for all of
 * them except rows a mindskip router skips. */
static int block_full(stage_state *s, int li, int l, const layer_w *L, const stage_batch *b,
                      float *x, const uint8_t *present, char *err, size_t errlen)
{
    const stage_config *c = &s->m->cfg;
    const int D = c->hidden;
    stage_layer_stats *st = &s->stats[li];
    int m = 0;
    for (int i = 0; i < b->n; i++)
        if (present[i]) s->act[m++] = i;
    if (m == 0) return 0;
    gather(x, s->act, m, D, s->xin);
    stage_rmsnorm(s->xin, m, D, L->ln1, c->eps, s->h);

    /* kept[j]: does compact row j run attention? act2 = compact indices of kept rows. */
    int nk = 0;
    if (L->kind != STAGE_KIND_MINDSKIP) {
        for (int j = 0; j < m; j++) s->act2[nk++] = j;
    } else if (c->ms_granularity == STAGE_GRAN_TOKEN) {
        for (int j = 0; j < m; j++) {
            float p = stage_sigmoid(stage_dot(L->router_w, s->h + (size_t)j * D, D) + L->router_b);
            if ((double)p > c->ms_threshold) s->act2[nk++] = j;
        }
    } else {
        int8_t *keep = s->ms_keep + (size_t)li * s->n_slots;
        /* Decide once per sequence, on the mean of h over all its prompt rows in this
         * forward (the scheduler keeps such a prompt in one micro-batch). */
        for (int j = 0; j < m; j++) {
            int r = s->act[j], slot = b->slot[r];
            if (!(b->flags[r] & STAGE_ROW_PROMPT)) continue;
            int first = 1;
            for (int u = 0; u < j; u++)
                if (b->slot[s->act[u]] == slot && (b->flags[s->act[u]] & STAGE_ROW_PROMPT))
                    first = 0;
            if (!first) continue;
            if (keep[slot] >= 0) {
                snprintf(err, errlen,
                         "layer %d: slot %d prompt split across micro-batches "
                         "(mindskip sequence granularity needs the whole prompt at once)",
                         l, slot);
                return -1;
            }
            memset(s->mean, 0, (size_t)D * sizeof(float));
            int cnt = 0;
            for (int u = j; u < m; u++) {
                int ru = s->act[u];
                if (b->slot[ru] != slot || !(b->flags[ru] & STAGE_ROW_PROMPT)) continue;
                const float *hu = s->h + (size_t)u * D;
                for (int i = 0; i < D; i++) s->mean[i] += hu[i];
                cnt++;
            }
            for (int i = 0; i < D; i++) s->mean[i] /= (float)cnt;
            float p = stage_sigmoid(stage_dot(L->router_w, s->mean, D) + L->router_b);
            keep[slot] = (double)p > c->ms_threshold;
        }
        for (int j = 0; j < m; j++) {
            int slot = b->slot[s->act[j]];
            if (keep[slot] < 0) {
                snprintf(err, errlen, "layer %d: slot %d decodes before its prompt was seen", l,
                         slot);
                return -1;
            }
            if (keep[slot]) s->act2[nk++] = j;
        }
    }

    /* Attention on kept rows: compact their h into xin-sized scratch (x2 as staging). */
    double ctx = 0.0;
    memcpy(s->x2, s->xin, (size_t)m * D * sizeof(float));
    if (nk > 0) {
        int *rows = s->erow; /* micro-batch indices of kept rows */
        for (int u = 0; u < nk; u++) rows[u] = s->act[s->act2[u]];
        const float *hk = s->h;
        if (nk != m) {
            gather(s->h, s->act2, nk, D, s->ex);
            hk = s->ex;
        }
        ctx = attention(s, li, L, b, rows, nk, hk, err, errlen);
        if (ctx < 0) return -1;
        for (int u = 0; u < nk; u++) {
            float *dst = s->x2 + (size_t)s->act2[u] * D;
            const float *a = s->a + (size_t)u * D;
            for (int i = 0; i < D; i++) dst[i] += a[i];
        }
    }
    stage_rmsnorm(s->x2, m, D, L->ln2, c->eps, s->h2);
    long evals = 0;
    if (L->kind == STAGE_KIND_MODE_INTEGRATED)
        evals = moe(s, L, m);
    else
        mlp(s, L, m);
    for (int j = 0; j < m; j++) {
        float *xo = x + (size_t)s->act[j] * D;
        const float *x2 = s->x2 + (size_t)j * D, *mo = s->mo + (size_t)j * D;
        for (int i = 0; i < D; i++) xo[i] = x2[i] + mo[i];
    }
    st->active += nk;
    st->kv_entries += nk;
    count_attn(st, c, b, stage_layer_window(c, l), nk, ctx);
    if (L->kind == STAGE_KIND_MODE_INTEGRATED) {
        double per_row = stage_flops_gate(c, L->n_gate);
        st->flops += m * per_row + evals * stage_flops_expert(c);
        st->flops_dense += b->n * (per_row + stage_flops_expert(c));
    } else {
        st->flops += m * stage_flops_mlp(c);
        st->flops_dense += b->n * stage_flops_mlp(c);
    }
    return 0;
}

int stage_forward_impl(stage_state *s, const stage_batch *b, float *x, const uint8_t *present,
                       int first, int last, char *err, size_t errlen)
{
    const stage_model *M = s->m;
    if (first < M->range.first || last > M->range.last) {
        snprintf(err, errlen, "layers %d-%d outside this stage's %d-%d", first, last,
                 M->range.first, M->range.last);
        return -1;
    }
    if (b->n > s->max_rows) {
        snprintf(err, errlen, "micro-batch of %d rows exceeds the workspace (%d rows)", b->n,
                 s->max_rows);
        return -1;
    }
    for (int i = 0; i < b->n; i++) {
        if (b->slot[i] < 0 || b->slot[i] >= s->n_rows_slots || b->pos[i] < 0 ||
            b->pos[i] >= s->max_seq) {
            snprintf(err, errlen,
                     "row %d: slot %d / position %d outside this stage's state "
                     "(%d slots, %d positions)",
                     i, b->slot[i], b->pos[i], s->n_rows_slots, s->max_seq);
            return -1;
        }
    }
    /* A prompt row at position 0 starts a new sequence in its slot, on every stage, whether
     * or not this stage holds the row (the descriptor reaches every stage). */
    for (int i = 0; i < b->n && first == M->range.first; i++)
        if (b->pos[i] == 0 && (b->flags[i] & STAGE_ROW_PROMPT))
            stage_slot_reset_impl(s, b->slot[i]);
    for (int i = 0; i < b->n && first == M->range.first; i++)
        if (b->pos[i] + 1 > s->kv_seen[b->slot[i]]) s->kv_seen[b->slot[i]] = b->pos[i] + 1;
    for (int i = 0; i < b->n && first == M->range.first; i++)
        if (b->flags[i] & STAGE_ROW_KV_LOST) stage_slot_lose_impl(s, b->slot[i]);
    for (int i = 0; i < b->n; i++)
        if (s->released[b->slot[i]]) {
            snprintf(err, errlen,
                     "row %d: slot %d was released and holds no sequence (position "
                     "%d is not a new prompt)",
                     i, b->slot[i], b->pos[i]);
            return -1;
        }
    for (int l = first; l <= last; l++) {
        int li = l - M->range.first;
        const layer_w *L = &M->layers[l];
        if (s->progress && l > first) s->progress(s->progress_arg);
        double t0 = base_now_s(), tb0 = s->tp ? stage_tp_bytes(s->tp) : 0.0;
        int rc = stage_kind_is_routed(L->kind)
                     ? block_routed(s, li, l, L, b, x, present, err, errlen)
                     : block_full(s, li, l, L, b, x, present, err, errlen);
        if (rc) return rc;
        s->stats[li].rows += b->n;
        s->stats[li].seconds += base_now_s() - t0;
        if (s->tp) s->stats[li].tp_bytes += stage_tp_bytes(s->tp) - tb0;
    }
    return 0;
}

int stage_head_impl(stage_state *s, const float *x, const int *rows, int n_rows, float *logits,
                    char *err, size_t errlen)
{
    const stage_model *M = s->m;
    const int D = M->cfg.hidden;
    if (!M->has_head) {
        snprintf(err, errlen, "this stage is not the head");
        return -1;
    }
    if (n_rows > s->max_rows) {
        snprintf(err, errlen, "%d logits rows exceed the workspace (%d)", n_rows, s->max_rows);
        return -1;
    }
    if (n_rows == 0) return 0;
    gather(x, rows, n_rows, D, s->xin);
    stage_rmsnorm(s->xin, n_rows, D, M->norm, M->cfg.eps, s->h);
    mm(s, s->h, n_rows, &M->lm_head, &M->tlm, 0, 0, logits);
    return 0;
}