/* engine/batch.c — the batch job and its scheduler (generate / eval). See batch.h. */
#include "engine/batch.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int seq, start, len;
} piece; /* rows start..start+len-1 of one sequence */

typedef struct {
    int seq0, seq1;     /* sequences [seq0, seq1) */
    int chunk0, chunk1; /* its prefill chunks [chunk0, chunk1) */
    int next_chunk;
    int outstanding; /* its micro-batches in flight */
    int live;        /* sequences not finished */
    int admitted;    /* its sequences hold slots */
    int done;
} group;

struct engine_batch {
    const engine_run_opts *o;
    int R, slots, ctx, max_rows, gs;
    group *g; /* [n_groups] */
    int n_groups, next_admit, groups_done, rr;
    piece *pc;        /* [n_pieces] */
    int *chunk_first; /* [n_chunks + 1] index into pc */
    int n_chunks;
    int *count;       /* [n_seqs] tokens generated so far */
    int *slot;        /* [n_seqs] its KV slot while admitted */
    uint8_t *stopped; /* [n_seqs] */
    int32_t *gen;     /* [n_seqs][max_new] */
    engine_slot_pool pool;
};

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
 * prompt longer than R is then a chunk of its own). */
static void cut(engine_batch *b, int s0, int s1, int can_split)
{
    const int R = b->R;
    int np = b->chunk_first[b->n_chunks], cur = 0;
#define CLOSE_CHUNK()                                                                              \
    do {                                                                                           \
        b->chunk_first[++b->n_chunks] = np;                                                        \
        cur = 0;                                                                                   \
    } while (0)
    for (int s = s0; s < s1; s++) {
        int len = b->o->seq_len[s], start = 0;
        if (!can_split && cur > 0 && cur + len > R) CLOSE_CHUNK();
        while (start < len) {
            int take = len - start;
            if (can_split && take > R - cur) take = R - cur;
            b->pc[np++] = (piece){s, start, take};
            start += take;
            cur += take;
            if (cur > b->max_rows) b->max_rows = cur;
            if (cur >= R) CLOSE_CHUNK();
        }
    }
    if (cur > 0) CLOSE_CHUNK();
#undef CLOSE_CHUNK
}

void engine_batch_free(engine_batch *b)
{
    if (!b) return;
    free(b->g);
    free(b->pc);
    free(b->chunk_first);
    free(b->count);
    free(b->slot);
    free(b->stopped);
    free(b->gen);
    engine_slot_pool_free(&b->pool);
    free(b);
}

int engine_batch_new(const engine_run_opts *o, engine_batch **out, char *err, size_t errlen)
{
    /* sampling state travels on the wire, where unpack refuses it (docs/SPEC.md §4.9):
     * refuse it here, before any rank starts, with the option's name */
    if (o->kind == ENGINE_RUN_GENERATE &&
        (!(o->top_p > 0.0f && o->top_p <= 1.0f) || !(o->temperature >= 0.0f) ||
         !isfinite(o->temperature))) {
        snprintf(err, errlen,
                 "--top-p must be in (0, 1] and --temperature a finite number >= 0 "
                 "(got top-p %g, temperature %g)",
                 (double)o->top_p, (double)o->temperature);
        return -1;
    }
    *out = NULL;
    const int gen = o->kind == ENGINE_RUN_GENERATE, n = o->n_seqs;
    if (n < 1 || o->pipe.micro_batch < 1) {
        snprintf(err, errlen, "no sequences or micro-batch < 1");
        return -1;
    }
    engine_batch *b = calloc(1, sizeof *b);
    if (!b) {
        snprintf(err, errlen, "out of memory (scheduler)");
        return -1;
    }
    b->o = o;
    b->R = o->pipe.micro_batch;
    b->slots = o->slots > 0 ? o->slots : n;
    long total_rows = 0;
    int need = 0, need_seq = 0;
    for (int s = 0; s < n; s++) {
        total_rows += o->seq_len[s];
        /* the last new token is never fed back: prompt + max_new - 1 positions */
        int l = o->seq_len[s] + (gen ? o->max_new - 1 : 0);
        if (l > need) {
            need = l;
            need_seq = s;
        }
    }
    b->ctx = o->ctx > 0 ? o->ctx : need;
    if (need > b->ctx) {
        snprintf(err, errlen, "sequence %d needs %d positions (%s) but --ctx is %d", need_seq + 1,
                 need, gen ? "prompt + max-new - 1" : "its length", b->ctx);
        goto fail;
    }
    if (b->ctx > o->pipe.cfg->max_pos) {
        snprintf(err, errlen, "%s %d positions but max_position_embeddings is %d",
                 o->ctx > 0 ? "--ctx asks for" : "sequences reach", b->ctx, o->pipe.cfg->max_pos);
        goto fail;
    }
    /* group size: generate as documented in pipeline.h; eval: slots-many lines a group */
    if (gen) {
        int G = o->groups;
        if (G <= 0) {
            /* one stage: nothing for a second group to overlap with, so the fewest groups
             * the row cap allows (the weights are read once a decode step); several stages:
             * enough groups to give each stage a decode micro-batch (batch.h) */
            const int stages = o->pipe.plan ? o->pipe.plan->n_stages : 1;
            int by_rows = (n + b->R - 1) / b->R, by_pipe = n / 8 < 8 ? n / 8 : 8;
            if (stages <= 1) by_pipe = 1;
            G = by_rows > by_pipe ? by_rows : by_pipe;
            if (G < 1) G = 1;
        }
        b->gs = (n + G - 1) / G;
        if (b->gs > b->R) b->gs = b->R;
    } else {
        b->gs = b->slots < n ? b->slots : n;
    }
    if (b->gs < 1) b->gs = 1;
    if (b->slots < b->gs) {
        snprintf(err, errlen,
                 "--slots %d is smaller than a decode group (%d sequences): raise "
                 "--slots or --groups, or lower --micro-batch",
                 b->slots, b->gs);
        goto fail;
    }
    b->n_groups = (n + b->gs - 1) / b->gs;
    b->g = calloc((size_t)b->n_groups, sizeof *b->g);
    b->pc = calloc((size_t)total_rows + (size_t)n + 1, sizeof *b->pc);
    b->chunk_first = calloc((size_t)total_rows + (size_t)n + 2, sizeof *b->chunk_first);
    b->count = calloc((size_t)n, sizeof *b->count);
    b->slot = calloc((size_t)n, sizeof *b->slot);
    b->stopped = calloc((size_t)n, 1);
    b->gen = calloc((size_t)n * (size_t)(o->max_new > 0 ? o->max_new : 1), sizeof *b->gen);
    if (!b->g || !b->pc || !b->chunk_first || !b->count || !b->slot || !b->stopped || !b->gen ||
        engine_slot_pool_init(&b->pool, b->slots)) {
        snprintf(err, errlen, "out of memory (scheduler)");
        goto fail;
    }
    int can_split = !model_needs_whole_prompts(o->pipe.cfg);
    for (int gi = 0; gi < b->n_groups; gi++) {
        group *g = &b->g[gi];
        g->seq0 = gi * b->gs;
        g->seq1 = g->seq0 + b->gs < n ? g->seq0 + b->gs : n;
        g->live = g->seq1 - g->seq0;
        g->chunk0 = g->next_chunk = b->n_chunks;
        cut(b, g->seq0, g->seq1, can_split);
        g->chunk1 = b->n_chunks;
        if (gen && g->live > b->max_rows) b->max_rows = g->live; /* its decode micro-batch */
    }
    *out = b;
    return 0;
fail:
    engine_batch_free(b);
    return -1;
}

int engine_batch_max_rows(const engine_batch *b) { return b->max_rows; }
int engine_batch_slots(const engine_batch *b) { return b->slots; }
int engine_batch_ctx(const engine_batch *b) { return b->ctx; }
int engine_batch_groups(const engine_batch *b) { return b->n_groups; }
int engine_batch_prefill_micro_batches(const engine_batch *b) { return b->n_chunks; }

void engine_batch_take_generated(engine_batch *b, int32_t **gen, int **n_gen)
{
    *gen = b->gen;
    *n_gen = b->count;
    b->gen = NULL;
    b->count = NULL;
}

/* ---- ops ------------------------------------------------------------------------------------- */

static void finish_seq(engine_batch *b, group *g, int s)
{
    b->stopped[s] = 1;
    g->live--;
    engine_slot_release(&b->pool, b->slot[s]);
}

static void set_sampling(const engine_batch *b, stage_batch *mb, int i)
{
    mb->temperature[i] = b->o->temperature;
    mb->top_p[i] = b->o->top_p;
    mb->seed[i] = b->o->seed;
}

static int batch_next(void *self, stage_batch *mb)
{
    engine_batch *b = self;
    const engine_run_opts *o = b->o;
    const int gen = o->kind == ENGINE_RUN_GENERATE;
    /* groups start in order, each when every one of its sequences can have a slot */
    while (b->next_admit < b->n_groups &&
           b->pool.n_free >= b->g[b->next_admit].seq1 - b->g[b->next_admit].seq0) {
        group *g = &b->g[b->next_admit++];
        for (int s = g->seq0; s < g->seq1; s++) b->slot[s] = engine_slot_acquire(&b->pool);
        g->admitted = 1;
    }
    for (int k = 0; k < b->next_admit; k++) {
        int gi = (b->rr + k) % b->next_admit;
        group *g = &b->g[gi];
        mb->n = 0;
        if (g->done) continue;
        if (g->next_chunk < g->chunk1) {
            int c = g->next_chunk++;
            for (int p = b->chunk_first[c]; p < b->chunk_first[c + 1]; p++) {
                const piece *pc = &b->pc[p];
                const int s = pc->seq, len = o->seq_len[s];
                for (int t = pc->start; t < pc->start + pc->len; t++) {
                    uint8_t fl = STAGE_ROW_PROMPT;
                    if (!gen)
                        fl |= STAGE_ROW_NEED_LOGITS;
                    else if (t == len - 1)
                        fl |= STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE;
                    int i =
                        stage_batch_add(mb, b->slot[s], t, o->seq_tokens[s][t], fl, (uint64_t)s, 0);
                    if (gen && t == len - 1) set_sampling(b, mb, i);
                    if (!gen && t + 1 < len) mb->target[i] = o->seq_tokens[s][t + 1];
                }
            }
        } else if (gen && g->outstanding == 0 && g->live > 0) {
            for (int s = g->seq0; s < g->seq1; s++) {
                if (b->stopped[s]) continue;
                int j = b->count[s];
                int i = stage_batch_add(
                    mb, b->slot[s], o->seq_len[s] + j - 1, b->gen[(size_t)s * o->max_new + j - 1],
                    STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE, (uint64_t)s, (uint32_t)j);
                set_sampling(b, mb, i);
            }
        }
        if (mb->n == 0) continue;
        g->outstanding++;
        b->rr = gi + 1;
        engine_slot_announce(&b->pool, mb);
        return 1;
    }
    mb->n = 0;
    return 0;
}

static group *group_of(engine_batch *b, int s) { return &b->g[s / b->gs]; }

static void batch_done(void *self, const stage_batch *mb, const int32_t *tok)
{
    engine_batch *b = self;
    const engine_run_opts *o = b->o;
    const int gen = o->kind == ENGINE_RUN_GENERATE;
    group *g = group_of(b, (int)mb->seq[0]);
    for (int i = 0; i < mb->n; i++) {
        int s = (int)mb->seq[i];
        if (gen && (mb->flags[i] & STAGE_ROW_SAMPLE)) {
            b->gen[(size_t)s * o->max_new + b->count[s]++] = tok[i];
            if (b->count[s] >= o->max_new || (!o->ignore_eos && o->eos >= 0 && tok[i] == o->eos))
                finish_seq(b, g, s);
        }
        if (!gen && mb->pos[i] == o->seq_len[s] - 1) finish_seq(b, g, s);
    }
    g->outstanding--;
    if (g->outstanding == 0 && g->next_chunk == g->chunk1 && g->live == 0) {
        g->done = 1;
        b->groups_done++;
    }
}

static int batch_finished(void *self)
{
    engine_batch *b = self;
    return b->groups_done == b->n_groups;
}

const engine_sched_ops engine_batch_ops = {
    .next = batch_next,
    .done = batch_done,
    .finished = batch_finished,
    .wait = NULL,
    .links = NULL,
};

/* ---- The batch job --------------------------------------------------------------------------- */

int engine_run(MPI_Comm comm, const engine_run_opts *o, engine_run_result *res, char *err,
               size_t errlen)
{
    memset(res, 0, sizeof *res);
    int rank;
    MPI_Comm_rank(comm, &rank);
    engine_batch *b = NULL;
    /* every rank plans the same run from the same options: the errors agree */
    if (engine_batch_new(o, &b, err, errlen)) return rank == 0 ? -1 : -2;
    const int gen = o->kind == ENGINE_RUN_GENERATE;
    int tmax = 0;
    for (int s = 0; s < o->n_seqs; s++)
        if (o->seq_len[s] > tmax) tmax = o->seq_len[s];
    engine_loop_opts lo = {
        .pipe = o->pipe,
        .slots = engine_batch_slots(b),
        .ctx = engine_batch_ctx(b),
        .max_rows = engine_batch_max_rows(b) > o->pipe.micro_batch ? engine_batch_max_rows(b)
                                                                   : o->pipe.micro_batch,
        .serve = 0,
        .dump_path = o->dump_path,
        .dump_index = gen ? ENGINE_DUMP_BY_STEP : ENGINE_DUMP_BY_POS,
        .dump_seqs = o->n_seqs,
        .dump_len = gen ? o->max_new : tmax,
        .progress_total =
            gen ? (long)o->n_seqs * o->max_new : engine_batch_prefill_micro_batches(b),
        .progress_tokens = gen,
        .stats_path = o->stats_path,
        .command = o->command,
        .report_nll = !gen,
    };
    engine_loop *L = NULL;
    int rc = engine_loop_open(comm, &lo, &engine_batch_ops, b, &L, err, errlen);
    if (rc) {
        engine_batch_free(b);
        return rc;
    }
    while (engine_loop_step(L)) {}
    engine_loop_result lr;
    rc = engine_loop_close(L, &lr, err, errlen);
    if (rank == 0) {
        res->nll_sum = lr.nll_sum;
        res->nll_count = lr.nll_count;
        res->seconds = lr.seconds;
        res->wire_bytes = lr.wire_bytes;
        res->dense_bytes = lr.dense_bytes;
        res->payload_bytes = lr.payload_bytes;
        res->header_bytes = lr.header_bytes;
        if (gen) engine_batch_take_generated(b, &res->generated, &res->n_generated);
    }
    engine_batch_free(b);
    return rc;
}

void engine_run_result_free(engine_run_result *res)
{
    if (!res) return;
    free(res->generated);
    free(res->n_generated);
    res->generated = NULL;
    res->n_generated = NULL;
}
