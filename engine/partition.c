/* engine/partition.c — layers -> pipeline stages: cost model, exact DP, explicit ranges. */
#include "engine/partition.h"
#include "base/err.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "stage/arch.h"
#include "stage/safetensors.h"
#include "stage/stage.h"

/* ---- cost model ------------------------------------------------------------------------------ */

double engine_layer_cost(const stage_config *c, int layer)
{
    if (!c || !c->layer_kind || layer < 0 || layer >= c->n_layers) return 0.0;
    double e = c->n_experts, nn = c->n_noop_experts;
    double attn = stage_flops_attn_proj(c); /* the FLOP model of --stats (stage/config.h) */
    double mlp = stage_flops_mlp(c);
    switch (c->layer_kind[layer]) {
    case STAGE_KIND_MOD: return c->mod_capacity * (attn + mlp);
    case STAGE_KIND_MODE_STAGED:
        return c->mod_capacity * (attn + stage_flops_gate(c, c->n_experts) +
                                  c->experts_per_token * stage_flops_expert(c));
    case STAGE_KIND_MODE_INTEGRATED:
        /* top-1 over E real + N no-op experts: a real expert runs with share E/(E+N) */
        if (e + nn <= 0) return attn;
        return attn + stage_flops_gate(c, c->n_experts + c->n_noop_experts) +
               (e / (e + nn)) * stage_flops_expert(c);
    case STAGE_KIND_MINDSKIP: /* skip rate unknown ahead: full cost */
    case STAGE_KIND_DENSE:
    default: return attn + mlp;
    }
}

/* f32 vectors of a routed layer, which the loader keeps as f32 and every stage loads:
 * router.weight + bias, and with predictor routing fc1 / fc2 (+ biases) at the default
 * predictor width of init-model (16; the real width is in the file). */
static size_t router_elems(const stage_config *c, int layer)
{
    if (!stage_kind_is_routed(c->layer_kind[layer])) return 0;
    size_t d = (size_t)c->hidden, n = d + 1;
    if (c->mod_routing == STAGE_ROUTING_PREDICTOR) n += 16 * d + 16 + 16 + 1;
    return n;
}

/* Matrices in weight dtype wd (those q8_0 does not quantize, the MoE gate, in kd), the 1-D
 * tensors (norms, routers) as f32: as the loader holds them (stage_model_weight_bytes). */
/* The projections a Q8_0 directory keeps in their dtype (stage_config.q8_keep: its
 * quantization_config.ignore): bytes in kd instead of wd, for layer `layer` (-1: lm_head). */
static size_t kept_delta(const stage_config *c, int layer, stage_dtype wd, stage_dtype kd)
{
    if (!c->q8_keep || wd == kd) return 0;
    size_t d = (size_t)c->hidden, qd = (size_t)c->n_heads * c->head_dim;
    size_t kvd = (size_t)c->n_kv_heads * c->head_dim, ff = (size_t)c->inter;
    size_t ie = (size_t)c->expert_inter;
    size_t add = 0, sub = 0;
    for (const char *p = c->q8_keep; p < c->q8_keep + c->q8_keep_len; p += strlen(p) + 1) {
        size_t r = 0, k = 0;
        int l = -1, e = -1, at = 0;
        if (!strcmp(p, "lm_head")) {
            r = (size_t)c->vocab, k = d;
        } else if (sscanf(p, "model.layers.%d.%n", &l, &at) == 1 && at > 0) {
            const char *t = p + at;
            if (!strcmp(t, "self_attn.q_proj"))
                r = qd, k = d;
            else if (!strcmp(t, "self_attn.k_proj") || !strcmp(t, "self_attn.v_proj"))
                r = kvd, k = d;
            else if (!strcmp(t, "self_attn.o_proj"))
                r = d, k = qd;
            else if (!strcmp(t, "mlp.gate_proj") || !strcmp(t, "mlp.up_proj"))
                r = ff, k = d;
            else if (!strcmp(t, "mlp.down_proj"))
                r = d, k = ff;
            else if (sscanf(t, "block_sparse_moe.experts.%d.w%n", &e, &at) == 1 && at > 0) {
                const char *w = t + at;
                if (!strcmp(w, "1") || !strcmp(w, "3"))
                    r = ie, k = d;
                else if (!strcmp(w, "2"))
                    r = d, k = ie;
            }
        }
        if (!r || l != layer) continue;
        add += stage_matrix_bytes(kd, r, k);
        sub += stage_matrix_bytes(wd, r, k);
    }
    return add - sub; /* unsigned wrap-around cancels when added to the layer's total */
}

size_t engine_layer_weight_bytes(const stage_config *c, int layer, stage_dtype wd, stage_dtype kd)
{
    if (!c || !c->layer_kind || layer < 0 || layer >= c->n_layers) return 0;
    size_t d = (size_t)c->hidden, qd = (size_t)c->n_heads * c->head_dim;
    size_t kvd = (size_t)c->n_kv_heads * c->head_dim, ff = (size_t)c->inter;
    size_t ie = (size_t)c->expert_inter, ne = (size_t)c->n_experts;
    size_t mat = stage_matrix_bytes(wd, qd, d) + 2 * stage_matrix_bytes(wd, kvd, d) +
                 stage_matrix_bytes(wd, d, qd);
    size_t mlp = 2 * stage_matrix_bytes(wd, ff, d) + stage_matrix_bytes(wd, d, ff);
    size_t experts = ne * (2 * stage_matrix_bytes(wd, ie, d) + stage_matrix_bytes(wd, d, ie));
    size_t vec = 2 * d; /* the two norms */
    switch (c->layer_kind[layer]) {
    case STAGE_KIND_MOD: mat += mlp; break;
    case STAGE_KIND_MODE_STAGED: mat += experts + stage_matrix_bytes(kd, ne, d); break;
    case STAGE_KIND_MODE_INTEGRATED:
        mat += experts + stage_matrix_bytes(kd, ne + (size_t)c->n_noop_experts, d);
        break;
    case STAGE_KIND_MINDSKIP:
        mat += mlp;
        vec += d; /* its attention router */
        break;
    case STAGE_KIND_DENSE:
    default: mat += mlp; break;
    }
    /* the block variant's vectors (docs/SPEC.md §10), f32 as the loader holds them */
    if (c->qkv_bias) vec += qd + 2 * kvd;
    if (c->o_bias) vec += d;
    if (c->qk_norm) vec += 2 * (size_t)c->head_dim;
    int mlp_kind = c->layer_kind[layer] != STAGE_KIND_MODE_STAGED &&
                   c->layer_kind[layer] != STAGE_KIND_MODE_INTEGRATED;
    if (c->mlp_bias && mlp_kind) vec += 2 * (size_t)c->inter + d;
    return mat + kept_delta(c, layer, wd, kd) + (vec + router_elems(c, layer)) * 4;
}

static double head_cost(const stage_config *c) { return 2.0 * c->hidden * c->vocab; }

static size_t embed_bytes(const stage_config *c, stage_dtype kd)
{
    return stage_matrix_bytes(kd, (size_t)c->vocab, (size_t)c->hidden);
}

/* model.norm + lm_head (with tied embeddings the head still holds a copy of the matrix,
 * unless it is also stage 0). */
static size_t head_bytes(const stage_config *c, int n_stages, stage_dtype wd, stage_dtype kd)
{
    size_t b = (size_t)c->hidden * 4; /* model.norm: f32 */
    if (!c->tie_embeddings)           /* lm_head (kept as stored when a Q8_0 directory says so) */
        b +=
            stage_matrix_bytes(wd, (size_t)c->vocab, (size_t)c->hidden) + kept_delta(c, -1, wd, kd);
    else if (n_stages > 1)
        b += embed_bytes(c, kd); /* the tied embedding, as the embedding is held */
    return b;
}

/* K/V bytes one attention layer is expected to hold for one sequence in the paged cache
 * (docs/SPEC.md §11): every position on non-routed layers, about 1.25 x capacity (+ 8) on
 * routed ones (threshold routing may keep more); K and V in STAGE_KV_DTYPE plus an int32
 * position per entry. */
static double kv_layer_bytes(const stage_config *c, int layer, int ctx, int rows)
{
    int cap = ctx;
    if (stage_kind_is_routed(c->layer_kind[layer])) {
        cap = (int)ceil(c->mod_capacity * ctx * 1.25) + 8;
        if (cap > ctx) cap = ctx;
    }
    /* a windowed layer gives its pages back: it holds the W - 1 entries still visible and a
     * micro-batch's rows (docs/SPEC.md §10.4; its partly used pages aside) */
    long w = stage_layer_window(c, layer);
    if (w > 0 && w - 1 + rows < cap) cap = (int)(w - 1 + rows);
    double kvd = (double)c->n_kv_heads * c->head_dim;
    return (double)cap * (2.0 * kvd * (double)stage_dtype_size(STAGE_KV_DTYPE) + 4.0);
}

/* Per-micro-batch buffers of a stage (stage_state_init's workspace, the pipeline's residual /
 * receive buffers) for R rows; the head adds logits and sampling scratch. */
static double work_bytes(const stage_config *c, int R, int ctx, int head)
{
    double D = c->hidden, qd = (double)c->n_heads * c->head_dim;
    double kvd = (double)c->n_kv_heads * c->head_dim;
    double ff = c->inter > c->expert_inter ? c->inter : c->expert_inter;
    double ng = c->n_experts + c->n_noop_experts + 1.0;
    double ept = c->experts_per_token > 0 ? c->experts_per_token : 1;
    double per_row = 8 * D + 2 * qd + 2 * kvd + 2 * ff + ng + 2 * ept + 5 /* stage_state */
                     + 4 * D + 8;                                         /* pipeline */
    double b = 4.0 * R * per_row + 4.0 * (ctx + 1.0 + D);
    if (head) b += 4.0 * R * c->vocab + 8.0 * c->vocab;
    return b;
}

/* Prefix sums over layers, so a stage's totals are O(1). */
typedef struct {
    const stage_config *cfg;
    int n_layers, n_stages;
    stage_dtype wd, kd;         /* weight matrices' dtype; the embedding / MoE gate's */
    const engine_mem_opts *mem; /* NULL: no memory planning */
    double *pc;                 /* [L+1] prefix cost */
    double *pw;                 /* [L+1] prefix weight bytes */
    double *pkv;                /* [L+1] prefix KV bytes (mem only) */
    double *pr;                 /* [L+1] prefix router bytes */
    int *pdense;                /* [L+1] prefix count of layers that need every row */
} costs;

static int costs_init(costs *k, const stage_config *c, int n_stages, const engine_mem_opts *mem)
{
    int L = c->n_layers;
    k->cfg = c;
    k->n_layers = L;
    k->n_stages = n_stages;
    k->mem = mem;
    k->wd = mem ? mem->weight_dtype : STAGE_F32;
    k->kd = k->wd == STAGE_Q8_0 ? mem->keep_dtype : k->wd;
    k->pc = calloc((size_t)L + 1, sizeof *k->pc);
    k->pw = calloc((size_t)L + 1, sizeof *k->pw);
    k->pkv = calloc((size_t)L + 1, sizeof *k->pkv);
    k->pr = calloc((size_t)L + 1, sizeof *k->pr);
    k->pdense = calloc((size_t)L + 1, sizeof *k->pdense);
    if (!k->pc || !k->pw || !k->pkv || !k->pr || !k->pdense) return -1;
    for (int l = 0; l < L; l++) {
        k->pc[l + 1] = k->pc[l] + engine_layer_cost(c, l);
        k->pw[l + 1] = k->pw[l] + (double)engine_layer_weight_bytes(c, l, k->wd, k->kd);
        k->pkv[l + 1] =
            k->pkv[l] +
            (mem ? (double)mem->slots * kv_layer_bytes(c, l, mem->ctx, mem->micro_batch) : 0);
        k->pr[l + 1] = k->pr[l] + 4.0 * (double)router_elems(c, l);
        k->pdense[l + 1] = k->pdense[l] + !stage_kind_is_routed(c->layer_kind[l]);
    }
    return 0;
}

static void costs_free(costs *k)
{
    free(k->pc);
    free(k->pw);
    free(k->pkv);
    free(k->pr);
    free(k->pdense);
}

/* Stage of layers a..b (inclusive). */
static double seg_cost(const costs *k, int a, int b)
{
    return k->pc[b + 1] - k->pc[a] + (b == k->n_layers - 1 ? head_cost(k->cfg) : 0.0);
}

static double seg_weight(const costs *k, int a, int b)
{
    /* the routers of routed layers outside a..b: every stage loads them (SPEC 4) */
    double w = k->pw[b + 1] - k->pw[a] + k->pr[k->n_layers] - (k->pr[b + 1] - k->pr[a]);
    if (a == 0) w += (double)embed_bytes(k->cfg, k->kd);
    if (b == k->n_layers - 1) w += (double)head_bytes(k->cfg, k->n_stages, k->wd, k->kd);
    return w;
}

static double seg_kv(const costs *k, int a, int b) { return k->pkv[b + 1] - k->pkv[a]; }

static double seg_work(const costs *k, int a, int b)
{
    (void)a;
    if (!k->mem) return 0.0;
    return work_bytes(k->cfg, k->mem->micro_batch, k->mem->ctx, b == k->n_layers - 1) +
           (double)ENGINE_RUNTIME_BYTES;
}

static double seg_mem(const costs *k, int a, int b)
{
    return seg_weight(k, a, b) + seg_kv(k, a, b) + seg_work(k, a, b);
}

/* Does a stage of layers a..b fit the memory limit (no limit: always)? */
static int seg_fits(const costs *k, int a, int b)
{
    return !k->mem || k->mem->mem_per_rank == 0 || seg_mem(k, a, b) <= (double)k->mem->mem_per_rank;
}

/* Can the boundary into stage `t` (layers a..b) carry fewer rows than dense? */
static int seg_sparse(const costs *k, int t, int a, int b)
{
    return t > 0 && k->pdense[b + 1] - k->pdense[a] == 0 &&
           k->cfg->mod_routing != STAGE_ROUTING_TOPK;
}

/* ---- plan filling (shared by auto and explicit) ---------------------------------------------- */

/* "4, 5" or "3-9, 12": runs of three or more collapse; long lists end in "...". */
static void append_layers(char *buf, size_t cap, const int *ls, int n)
{
    size_t start = strlen(buf);
    for (int i = 0; i < n;) {
        int j = i;
        while (j + 1 < n && ls[j + 1] == ls[j] + 1) j++;
        size_t len = strlen(buf);
        if (len - start > 40) {
            snprintf(buf + len, cap - len, ", ...");
            return;
        }
        const char *sep = i ? ", " : "";
        if (j - i >= 2)
            snprintf(buf + len, cap - len, "%s%d-%d", sep, ls[i], ls[j]);
        else if (j > i)
            snprintf(buf + len, cap - len, "%s%d, %d", sep, ls[i], ls[j]);
        else
            snprintf(buf + len, cap - len, "%s%d", sep, ls[i]);
        i = j + 1;
    }
}

static void why_not_sparse(const stage_config *c, int t, int a, int b, char *why, size_t cap)
{
    if (t == 0) {
        snprintf(why, cap, "stage 0 embeds every row");
        return;
    }
    static const stage_kind needy[] = {STAGE_KIND_DENSE, STAGE_KIND_MINDSKIP,
                                       STAGE_KIND_MODE_INTEGRATED};
    int n_groups = 0, groups[3] = {0};
    for (int g = 0; g < 3; g++)
        for (int l = a; l <= b; l++)
            if (c->layer_kind[l] == needy[g]) {
                groups[n_groups++] = g;
                break;
            }
    if (n_groups == 0) {
        /* only routed layers: the one remaining reason is top-k routing */
        snprintf(why, cap, "topk routing is non-causal: every boundary carries every row");
        return;
    }
    char buf[512];
    snprintf(buf, sizeof buf, "stage %d has ", t);
    int *ls = malloc(sizeof *ls * (size_t)(b - a + 1));
    for (int gi = 0; gi < n_groups; gi++) {
        int n = 0;
        for (int l = a; l <= b; l++)
            if (c->layer_kind[l] == needy[groups[gi]] && ls) ls[n++] = l;
        size_t len = strlen(buf);
        const char *sep = gi == 0 ? "" : (gi == n_groups - 1 ? " and " : ", ");
        snprintf(buf + len, sizeof buf - len, "%s%s layers (", sep,
                 stage_kind_name(needy[groups[gi]]));
        if (ls) append_layers(buf, sizeof buf, ls, n);
        len = strlen(buf);
        snprintf(buf + len, sizeof buf - len, ")");
    }
    free(ls);
    size_t len = strlen(buf);
    snprintf(buf + len, sizeof buf - len, ": every row must reach it");
    snprintf(why, cap, "%s", buf);
}

static int fill_plan(const costs *k, const int *first, int n_stages, engine_plan *plan, char *err,
                     size_t errlen)
{
    plan->st = calloc((size_t)n_stages, sizeof *plan->st);
    if (!plan->st) {
        base_set_err(err, errlen, "partition: out of memory");
        return -1;
    }
    plan->n_stages = n_stages;
    plan->have_mem = k->mem != NULL;
    if (k->mem)
        plan->mem = *k->mem;
    else
        plan->mem.weight_dtype = STAGE_F32;
    double total = seg_cost(k, 0, k->n_layers - 1);
    for (int t = 0; t < n_stages; t++) {
        engine_stage_plan *s = &plan->st[t];
        s->first = first[t];
        s->last = t + 1 < n_stages ? first[t + 1] - 1 : k->n_layers - 1;
        s->cost = seg_cost(k, s->first, s->last);
        s->compute_share = total > 0 ? s->cost / total : 0.0;
        s->weight_bytes = (size_t)llround(seg_weight(k, s->first, s->last));
        s->kv_bytes = (size_t)llround(seg_kv(k, s->first, s->last));
        s->work_bytes = (size_t)llround(seg_work(k, s->first, s->last));
        s->mem_bytes = s->weight_bytes + s->kv_bytes + s->work_bytes;
        s->sparse_in = seg_sparse(k, t, s->first, s->last);
        if (!s->sparse_in) why_not_sparse(k->cfg, t, s->first, s->last, s->why, sizeof s->why);
    }
    return 0;
}

static int check_cfg(const stage_config *c, char *err, size_t errlen)
{
    if (!c || !c->layer_kind || c->n_layers < 1) {
        base_set_err(err, errlen, "partition: the model has no layers");
        return -1;
    }
    return 0;
}

/* ---- automatic partition --------------------------------------------------------------------- */

/* Lexicographic DP state: most sparse boundaries, then least memory variance, then the
 * cheapest bottleneck. All three combine monotonically, so the DP is exact. */
typedef struct {
    int ok;
    int sparse;
    double var;
    double maxc;
    int prev; /* first layer of the last stage */
} dp_cell;

static int cell_better(const dp_cell *a, const dp_cell *b, double var_tol, double cost_tol)
{
    if (!b->ok) return a->ok;
    if (!a->ok) return 0;
    if (a->sparse != b->sparse) return a->sparse > b->sparse;
    if (fabs(a->var - b->var) > var_tol) return a->var < b->var;
    return a->maxc < b->maxc - cost_tol;
}

static void mem_text(double b, char *out, size_t n)
{
    if (b >= 1024.0 * 1024 * 1024)
        snprintf(out, n, "%.2f GiB", b / (1024.0 * 1024 * 1024));
    else
        snprintf(out, n, "%.1f MiB", b / (1024.0 * 1024));
}

/* "layers 8-15 need 5.21 GiB (weights 4.90 GiB bf16, KV 200.0 MiB, workspace 110.0 MiB)" */
static void seg_mem_text(const costs *k, int a, int b, char *out, size_t n)
{
    char t[32], w[32], kv[32], wk[32], lr[32];
    mem_text(seg_mem(k, a, b), t, sizeof t);
    mem_text(seg_weight(k, a, b), w, sizeof w);
    mem_text(seg_kv(k, a, b), kv, sizeof kv);
    mem_text(seg_work(k, a, b), wk, sizeof wk);
    if (a == b)
        snprintf(lr, sizeof lr, "layer %d needs", a);
    else
        snprintf(lr, sizeof lr, "layers %d-%d need", a, b);
    snprintf(out, n, "%s %s (weights %s %s, KV %s, workspace %s)", lr, t, w,
             stage_wdtype_name(k->mem->weight_dtype), kv, wk);
}

/* No plan fits: find the split with the smallest largest stage memory, for the message. */
static void explain_no_fit(const costs *k, int S, char *err, size_t errlen)
{
    int L = k->n_layers;
    size_t W = (size_t)L + 1;
    double *bm = malloc(sizeof *bm * (size_t)(S + 1) * W);
    int *arg = malloc(sizeof *arg * (size_t)(S + 1) * W);
    char lim[32];
    mem_text((double)k->mem->mem_per_rank, lim, sizeof lim);
    if (!bm || !arg) {
        base_set_err(err, errlen, "no split of %d layers into %d stages fits --mem-per-rank %s", L,
                     S, lim);
        free(bm);
        free(arg);
        return;
    }
    for (size_t i = 0; i < (size_t)(S + 1) * W; i++) bm[i] = INFINITY;
    bm[0] = 0.0;
    for (int t = 1; t <= S; t++)
        for (int j = t; j <= L - (S - t); j++)
            for (int i = t - 1; i < j; i++) {
                double v = fmax(bm[(size_t)(t - 1) * W + (size_t)i], seg_mem(k, i, j - 1));
                if (v < bm[(size_t)t * W + (size_t)j]) {
                    bm[(size_t)t * W + (size_t)j] = v;
                    arg[(size_t)t * W + (size_t)j] = i;
                }
            }
    /* walk back to the stage that sets the maximum */
    double worst = bm[(size_t)S * W + (size_t)L];
    int wa = 0, wb = L - 1;
    for (int t = S, j = L; t >= 1; t--) {
        int i = arg[(size_t)t * W + (size_t)j];
        if (seg_mem(k, i, j - 1) >= worst) {
            wa = i;
            wb = j - 1;
            break;
        }
        j = i;
    }
    char need[200];
    seg_mem_text(k, wa, wb, need, sizeof need);
    base_set_err(err, errlen,
                 "no split of %d layers into %d stage%s fits --mem-per-rank %s: "
                 "in the best one, %s; use more ranks or a larger limit",
                 L, S, S == 1 ? "" : "s", lim, need);
    free(bm);
    free(arg);
}

int engine_partition_auto(const stage_config *cfg, int n_stages, engine_plan *plan, char *err,
                          size_t errlen)
{
    return engine_partition_auto_mem(cfg, n_stages, NULL, plan, err, errlen);
}

int engine_partition_auto_mem(const stage_config *cfg, int n_stages, const engine_mem_opts *mem,
                              engine_plan *plan, char *err, size_t errlen)
{
    if (!plan) return -1;
    memset(plan, 0, sizeof *plan);
    if (check_cfg(cfg, err, errlen)) return -1;
    int L = cfg->n_layers, S = n_stages;
    if (S < 1) {
        base_set_err(err, errlen, "partition: need at least one stage, got %d", S);
        return -1;
    }
    if (S > L) {
        base_set_err(err, errlen,
                     "cannot split %d layers into %d stages: a stage needs at least one layer", L,
                     S);
        return -1;
    }
    costs k;
    int rc = -1;
    double *best = NULL;
    dp_cell *cell = NULL;
    int *first = NULL;
    if (costs_init(&k, cfg, S, mem)) goto oom;
    size_t W = (size_t)L + 1;
    best = malloc(sizeof *best * (size_t)(S + 1) * W);
    cell = calloc((size_t)(S + 1) * W, sizeof *cell);
    first = malloc(sizeof *first * (size_t)S);
    if (!best || !cell || !first) goto oom;

    /* Phase 1: best[t][j] = least bottleneck of layers 0..j-1 in t stages. */
    for (size_t i = 0; i < (size_t)(S + 1) * W; i++) best[i] = INFINITY;
    best[0] = 0.0;
    for (int t = 1; t <= S; t++)
        for (int j = t; j <= L - (S - t); j++)
            for (int i = t - 1; i < j; i++) {
                if (!seg_fits(&k, i, j - 1)) continue;
                double v = fmax(best[(size_t)(t - 1) * W + (size_t)i], seg_cost(&k, i, j - 1));
                if (v < best[(size_t)t * W + (size_t)j]) best[(size_t)t * W + (size_t)j] = v;
            }
    double opt = best[(size_t)S * W + (size_t)L];
    if (isinf(opt)) { /* only with a memory limit */
        explain_no_fit(&k, S, err, errlen);
        goto out;
    }

    /* Phase 2: among plans within 10% of that, the preferences of the header. */
    double bound = opt * 1.10 * (1.0 + 1e-12);
    double mean = seg_weight(&k, 0, L - 1) / S; /* total weight is the same for every plan */
    double var_tol = 1e-9 * (mean * mean * S + 1.0);
    double cost_tol = 1e-12 * (opt + 1.0);
    cell[0].ok = 1;
    for (int t = 1; t <= S; t++)
        for (int j = t; j <= L - (S - t); j++) {
            dp_cell *dst = &cell[(size_t)t * W + (size_t)j];
            for (int i = t - 1; i < j; i++) {
                const dp_cell *src = &cell[(size_t)(t - 1) * W + (size_t)i];
                if (!src->ok) continue;
                double c = seg_cost(&k, i, j - 1);
                if (c > bound || !seg_fits(&k, i, j - 1)) continue;
                double dw = seg_weight(&k, i, j - 1) - mean;
                dp_cell cand = {1, src->sparse + seg_sparse(&k, t - 1, i, j - 1),
                                src->var + dw * dw, fmax(src->maxc, c), i};
                if (cell_better(&cand, dst, var_tol, cost_tol)) *dst = cand;
            }
        }
    if (!cell[(size_t)S * W + (size_t)L].ok) { /* cannot happen: the optimum is feasible */
        base_set_err(err, errlen, "partition: no plan found");
        goto out;
    }
    for (int t = S, j = L; t >= 1; t--) {
        first[t - 1] = cell[(size_t)t * W + (size_t)j].prev;
        j = first[t - 1];
    }
    rc = fill_plan(&k, first, S, plan, err, errlen);
    goto out;
oom:
    base_set_err(err, errlen, "partition: out of memory");
out:
    costs_free(&k);
    free(best);
    free(cell);
    free(first);
    return rc;
}

/* ---- explicit ranges ------------------------------------------------------------------------- */

static int parse_uint(const char **p, int *out)
{
    const char *s = *p;
    if (!isdigit((unsigned char)*s)) return -1;
    long v = 0;
    while (isdigit((unsigned char)*s)) {
        v = v * 10 + (*s - '0');
        if (v > 1000000) return -1;
        s++;
    }
    *out = (int)v;
    *p = s;
    return 0;
}

/* "a-b" or "a", blanks allowed around the numbers. */
static int parse_range(const char *s, int *a, int *b)
{
    if (!s) return -1;
    while (isspace((unsigned char)*s)) s++;
    if (parse_uint(&s, a)) return -1;
    while (isspace((unsigned char)*s)) s++;
    if (*s == '-') {
        s++;
        while (isspace((unsigned char)*s)) s++;
        if (parse_uint(&s, b)) return -1;
        while (isspace((unsigned char)*s)) s++;
    } else {
        *b = *a;
    }
    return *s ? -1 : 0;
}

static void range_text(char *buf, size_t cap, int a, int b)
{
    if (a == b)
        snprintf(buf, cap, "%d", a);
    else
        snprintf(buf, cap, "%d-%d", a, b);
}

int engine_partition_explicit(const stage_config *cfg, const char *const *ranges, int n_ranges,
                              int n_stages, engine_plan *plan, char *err, size_t errlen)
{
    return engine_partition_explicit_mem(cfg, ranges, n_ranges, n_stages, NULL, plan, err, errlen);
}

int engine_partition_explicit_mem(const stage_config *cfg, const char *const *ranges, int n_ranges,
                                  int n_stages, const engine_mem_opts *mem, engine_plan *plan,
                                  char *err, size_t errlen)
{
    if (!plan) return -1;
    memset(plan, 0, sizeof *plan);
    if (check_cfg(cfg, err, errlen)) return -1;
    int L = cfg->n_layers;
    if (n_ranges != n_stages) {
        base_set_err(err, errlen, "stages: %d range%s given but the job has %d rank%s", n_ranges,
                     n_ranges == 1 ? "" : "s", n_stages, n_stages == 1 ? "" : "s");
        return -1;
    }
    if (n_ranges < 1 || !ranges) {
        base_set_err(err, errlen, "stages: no layer ranges given");
        return -1;
    }
    int *first = malloc(sizeof *first * (size_t)n_ranges);
    if (!first) {
        base_set_err(err, errlen, "partition: out of memory");
        return -1;
    }
    int *last = malloc(sizeof *last * (size_t)n_ranges);
    int rc = -1, prev_b = -1;
    char t1[32], t2[32];
    if (!last) {
        base_set_err(err, errlen, "partition: out of memory");
        goto out;
    }
    /* each range on its own, then their order, then how they fit together */
    for (int r = 0; r < n_ranges; r++) {
        const char *s = ranges[r];
        int a, b;
        if (parse_range(s, &a, &b)) {
            base_set_err(err, errlen,
                         "stages: range %d '%s' is not a layer range like 0-3 or 4 (layers are "
                         "numbered from 0)",
                         r + 1, s ? s : "(null)");
            goto out;
        }
        if (a > b) {
            base_set_err(err, errlen, "stages: range %d '%s' is empty (%d comes after %d)", r + 1,
                         s, a, b);
            goto out;
        }
        if (b >= L) {
            base_set_err(err, errlen,
                         "stages: range %d '%s' is out of range: the model has %d "
                         "layers (0-%d)",
                         r + 1, s, L, L - 1);
            goto out;
        }
        first[r] = a;
        last[r] = b;
    }
    for (int r = 1; r < n_ranges; r++) {
        if (first[r] < first[r - 1]) {
            base_set_err(err, errlen,
                         "stages: range %d '%s' comes before range %d '%s': give the "
                         "ranges in layer order",
                         r + 1, ranges[r], r, ranges[r - 1]);
            goto out;
        }
    }
    for (int r = 0; r < n_ranges; r++) {
        int a = first[r], b = last[r];
        if (a <= prev_b) {
            range_text(t1, sizeof t1, a, b < prev_b ? b : prev_b);
            base_set_err(err, errlen, "stages: ranges '%s' and '%s' overlap (layer%s %s)",
                         ranges[r - 1], ranges[r], strchr(t1, '-') ? "s" : "", t1);
            goto out;
        }
        if (a > prev_b + 1) {
            range_text(t2, sizeof t2, prev_b + 1, a - 1);
            base_set_err(err, errlen, "stages: layer%s %s %s in no stage (gap before '%s')",
                         strchr(t2, '-') ? "s" : "", t2, strchr(t2, '-') ? "are" : "is", ranges[r]);
            goto out;
        }
        prev_b = b;
    }
    if (prev_b != L - 1) {
        range_text(t2, sizeof t2, prev_b + 1, L - 1);
        base_set_err(err, errlen, "stages: layer%s %s %s in no stage (the model has %d layers)",
                     strchr(t2, '-') ? "s" : "", t2, strchr(t2, '-') ? "are" : "is", L);
        goto out;
    }
    costs k;
    if (costs_init(&k, cfg, n_stages, mem))
        base_set_err(err, errlen, "partition: out of memory");
    else
        rc = fill_plan(&k, first, n_stages, plan, err, errlen);
    for (int t = 0; !rc && t < n_stages; t++) {
        if (seg_fits(&k, first[t], last[t])) continue;
        char need[200], lim[32];
        seg_mem_text(&k, first[t], last[t], need, sizeof need);
        mem_text((double)mem->mem_per_rank, lim, sizeof lim);
        base_set_err(err, errlen, "stages: stage %d does not fit --mem-per-rank %s: its %s", t, lim,
                     need);
        engine_plan_free(plan);
        rc = -1;
    }
    costs_free(&k);
out:
    free(first);
    free(last);
    return rc;
}

/* The dtype of the first of names[0..n) the model in dir has. */
static int first_dtype(const char *dir, const char *const *names, int n, stage_dtype *out,
                       char *err, size_t errlen)
{
    st_model *m = NULL;
    if (st_open(dir, &m, err, errlen)) return -1;
    int r = 0;
    st_tensor t;
    for (int i = 0; i < n && r == 0; i++) r = st_find(m, names[i], &t, err, errlen);
    if (r == 0)
        base_set_err(err, errlen, "%s: no %s%s%s to read the weight dtype from", dir, names[0],
                     n > 1 ? " or " : "", n > 1 ? names[1] : "");
    if (r > 0) *out = t.dtype;
    st_close(m);
    return r > 0 ? 0 : -1;
}

int engine_weight_dtype(const char *dir, stage_dtype *out, char *err, size_t errlen)
{
    static const char *const names[] = {"model.layers.0.self_attn.q_proj.weight",
                                        "model.embed_tokens.weight"};
    return first_dtype(dir, names, 2, out, err, errlen);
}

int engine_keep_dtype(const char *dir, stage_dtype *out, char *err, size_t errlen)
{
    static const char *const names[] = {"model.embed_tokens.weight"};
    return first_dtype(dir, names, 1, out, err, errlen);
}

int engine_parse_size(const char *s, size_t *out)
{
    if (!s) return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0)) return -1;
    while (isspace((unsigned char)*end)) end++;
    double mul = 1;
    switch (toupper((unsigned char)*end)) {
    case 'K': mul = 1024.0; break;
    case 'M': mul = 1024.0 * 1024; break;
    case 'G': mul = 1024.0 * 1024 * 1024; break;
    case 'T': mul = 1024.0 * 1024 * 1024 * 1024; break;
    case '\0': break;
    case 'B': break;
    default: return -1;
    }
    if (*end && toupper((unsigned char)*end) != 'B') {
        end++;
        if (*end == 'i') end++;
    }
    if (*end == 'B' || *end == 'b') end++;
    if (*end) return -1;
    double b = v * mul;
    if (b >= 1.8e19) return -1;
    *out = (size_t)llround(b);
    return 0;
}

void engine_plan_free(engine_plan *plan)
{
    if (!plan) return;
    free(plan->st);
    plan->st = NULL;
    plan->n_stages = 0;
}

/* ---- printing -------------------------------------------------------------------------------- */

/* "dense, mod x3, mindskip"; when that is long, counts per kind: "6 dense + 6 mod". */
static void kinds_text(const stage_config *c, int a, int b, char *buf, size_t cap)
{
    buf[0] = '\0';
    for (int l = a; l <= b;) {
        int j = l;
        while (j + 1 <= b && c->layer_kind[j + 1] == c->layer_kind[l]) j++;
        size_t len = strlen(buf);
        if (j > l)
            snprintf(buf + len, cap - len, "%s%s x%d", len ? ", " : "",
                     stage_kind_name(c->layer_kind[l]), j - l + 1);
        else
            snprintf(buf + len, cap - len, "%s%s", len ? ", " : "",
                     stage_kind_name(c->layer_kind[l]));
        l = j + 1;
    }
    if (strlen(buf) <= 32) return;
    buf[0] = '\0';
    for (int k = STAGE_KIND_DENSE; k <= STAGE_KIND_MINDSKIP; k++) {
        int n = 0;
        for (int l = a; l <= b; l++) n += c->layer_kind[l] == (stage_kind)k;
        if (!n) continue;
        size_t len = strlen(buf);
        snprintf(buf + len, cap - len, "%s%d %s", len ? " + " : "", n,
                 stage_kind_name((stage_kind)k));
    }
}

/* Tensor-parallel stages: which ranks form each stage, and the weights per rank
 * (the big matrices are split K ways; norms and routers, small, are whole on every rank). */
static void print_rank_groups(const engine_plan *plan, FILE *out)
{
    const int S = plan->n_stages;
    int total = 0, uniform = 1, any = 0;
    for (int t = 0; t < S; t++) {
        int K = plan->st[t].ranks > 0 ? plan->st[t].ranks : 1;
        total += K;
        any |= K > 1;
        uniform &= K == (plan->st[0].ranks > 0 ? plan->st[0].ranks : 1);
    }
    if (!any) return;
    if (uniform)
        fprintf(out, "tensor parallel: %d stage%s x %d ranks = mpirun -np %d\n", S,
                S == 1 ? "" : "s", plan->st[0].ranks, total);
    else
        fprintf(out, "tensor parallel: %d stages of their own rank counts = mpirun -np %d\n", S,
                total);
    int r = 0;
    for (int t = 0; t < S; t++) {
        int K = plan->st[t].ranks > 0 ? plan->st[t].ranks : 1;
        /* a K-rank stage holds its 1/K of the checkpoint as f32 (psgemm) */
        size_t es = stage_dtype_size(plan->mem.weight_dtype); /* 0: q8_0, never split */
        double f32 = es ? 4.0 / (double)es : 1.0;
        fprintf(out, "  stage %d: ranks %d-%d (leader %d), ~%.2f MiB of weights per rank%s\n", t, r,
                r + K - 1, r,
                (double)plan->st[t].weight_bytes * (K > 1 ? f32 : 1.0) / K / (1024.0 * 1024.0),
                K > 1 ? " (as f32)" : "");
        r += K;
    }
}

void engine_plan_print(const stage_config *cfg, const engine_plan *plan, FILE *out)
{
    if (!cfg || !plan || !out || plan->n_stages < 1 || !plan->st) return;
    int S = plan->n_stages;
    int n_routed = 0;
    for (int l = 0; l < cfg->n_layers; l++) n_routed += stage_kind_is_routed(cfg->layer_kind[l]);
    static const char *const routing[] = {"threshold", "predictor", "topk"};
    fprintf(out, "%d layers on %d stage%s (hidden %d, vocab %d", cfg->n_layers, S,
            S == 1 ? "" : "s", cfg->hidden, cfg->vocab);
    if (n_routed)
        fprintf(out, "; %s routing, capacity %g", routing[cfg->mod_routing],
                (double)cfg->mod_capacity);
    fprintf(out, ")\n");

    char kinds[256], lr[32];
    int kw = 5;
    for (int t = 0; t < S; t++) {
        kinds_text(cfg, plan->st[t].first, plan->st[t].last, kinds, sizeof kinds);
        int w = (int)strlen(kinds);
        if (w > kw) kw = w;
    }
    fprintf(out, "stage  layers   %-*s  compute  weights MiB  %srows in\n", kw, "kinds",
            plan->have_mem ? "    KV MiB  work MiB  total MiB  " : "");
    double total_mib = 0;
    int n_sparse = 0, n_mixed = 0;
    char mixed[128] = "";
    for (int t = 0; t < S; t++) {
        const engine_stage_plan *s = &plan->st[t];
        kinds_text(cfg, s->first, s->last, kinds, sizeof kinds);
        range_text(lr, sizeof lr, s->first, s->last);
        double mib = (double)s->weight_bytes / (1024.0 * 1024.0);
        total_mib += mib;
        n_sparse += s->sparse_in;
        const char *role = t == 0 ? (S == 1 ? "[embedding, head] " : "[embedding] ")
                                  : (t == S - 1 ? "[head] " : "");
        fprintf(out, "%5d  %-7s  %-*s  %6.1f%%  %11.2f  ", t, lr, kw, kinds,
                100.0 * s->compute_share, mib);
        if (plan->have_mem)
            fprintf(out, "%10.2f  %8.2f  %9.2f  ", (double)s->kv_bytes / (1024.0 * 1024.0),
                    (double)s->work_bytes / (1024.0 * 1024.0),
                    (double)s->mem_bytes / (1024.0 * 1024.0));
        fprintf(out, "%s", role);
        if (t == 0)
            fprintf(out, "all (%s)\n", s->why);
        else if (s->sparse_in)
            fprintf(out, "sparse: only the rows its routers select\n");
        else
            fprintf(out, "all: %s\n", s->why);
        /* a stage > 0 with routed layers that still needs every row */
        int routed = 0;
        for (int l = s->first; l <= s->last; l++)
            routed += stage_kind_is_routed(cfg->layer_kind[l]);
        if (t > 0 && !s->sparse_in && routed && cfg->mod_routing != STAGE_ROUTING_TOPK) {
            size_t len = strlen(mixed);
            if (len < sizeof mixed - 16)
                snprintf(mixed + len, sizeof mixed - len, "%s%d", n_mixed ? ", " : "", t);
            n_mixed++;
        }
    }
    fprintf(out, "total weights %.2f MiB (%s, as in the checkpoint)\n", total_mib,
            stage_wdtype_name(plan->mem.weight_dtype));
    if (plan->have_mem) {
        const engine_mem_opts *m = &plan->mem;
        size_t worst = 0;
        int wt = 0;
        for (int t = 0; t < S; t++)
            if (plan->st[t].mem_bytes > worst) {
                worst = plan->st[t].mem_bytes;
                wt = t;
            }
        char lim[32], w[32];
        mem_text((double)worst, w, sizeof w);
        fprintf(out,
                "memory per rank: weights + KV for %d sequence%s of %d positions (%s K/V, "
                "routed layers as reserved at start) + workspace for %d-row micro-batches "
                "(incl. %.0f MiB runtime); largest: stage %d, %s",
                m->slots, m->slots == 1 ? "" : "s", m->ctx, stage_dtype_name(STAGE_KV_DTYPE),
                m->micro_batch, (double)ENGINE_RUNTIME_BYTES / (1024.0 * 1024.0), wt, w);
        if (m->mem_per_rank) {
            mem_text((double)m->mem_per_rank, lim, sizeof lim);
            fprintf(out, " of --mem-per-rank %s", lim);
        }
        fprintf(out, "\n");
    }
    print_rank_groups(plan, out);

    fprintf(out, "notes:\n");
    fprintf(out,
            "  - compute = expected FLOPs per token: routed layers (mod, mode_staged) at "
            "capacity %g, mindskip attention at full cost, the LM head at 2*hidden*vocab\n",
            (double)cfg->mod_capacity);
    if (S == 1) {
        fprintf(out, "  - one stage: nothing crosses the wire\n");
        return;
    }
    fprintf(out,
            "  - the head (stage %d) must receive every decode row and each prompt's last "
            "row for logits, whatever the routers decide (SPEC 4)\n",
            S - 1);
    if (n_mixed)
        fprintf(out,
                "  - stage%s %s mix%s routed layers with layers that need every row: they "
                "save compute, not wire bytes (interleaved dense/routed layouts save "
                "nothing at stage boundaries)\n",
                n_mixed == 1 ? "" : "s", mixed, n_mixed == 1 ? "es" : "");
    fprintf(out, "  - %d of %d boundaries can carry fewer rows than dense\n", n_sparse, S - 1);
    if (n_sparse == 0) {
        fprintf(out, "  - expected wire bytes: the same as a dense pipeline (prefill ~100%%, "
                     "decode ~100%%)\n");
        return;
    }
    /* SPEC 4 with a stage's p = the chance that any of its k routed layers selects a row,
     * 1 - (1 - capacity)^k if routers chose independently, and p = 1 on dense boundaries;
     * decode rows always reach the head, so its boundary counts 1 there. */
    double p = cfg->mod_capacity, pre = 0, dec = 1;
    for (int t = 1; t < S; t++) {
        int k = plan->st[t].last - plan->st[t].first + 1;
        double pt = plan->st[t].sparse_in ? 1.0 - pow(1.0 - p, k) : 1.0;
        pre += pt;
        if (t < S - 1) dec += pt;
    }
    pre /= S - 1;
    dec /= S - 1;
    fprintf(out,
            "  - expected wire bytes vs a dense pipeline, from the capacity setting (a stage of "
            "k layers at capacity %g needs ~1-(1-%g)^k of the rows), not a measurement: "
            "prefill ~%.1f%%, decode ~%.1f%%%s\n",
            p, p, 100.0 * pre, 100.0 * dec,
            n_sparse == S - 1 ? " [docs/SPEC.md §4: p and (1 + p(S-2))/(S-1), averaged over stages]"
                              : "");
}
