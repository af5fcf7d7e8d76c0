/* tests/test_srvq.c — the server queue (serve/queue.h) and its scheduler side
 * (serve/queue_sched.h), driven by hand: a fake pipeline calls next / done with tokens it
 * chooses, so every admission, chunking, stop and cancel decision is checked exactly.
 */
#include <CUnit/Basic.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/sched.h"
#include "serve/queue_sched.h"

/* ---- a client: records what the callbacks saw ------------------------------------------------ */
typedef struct {
    int32_t tok[64];
    int n_tok;
    int n_done; /* on_done calls (must end at 1) */
    srvq_finish why;
    int n_prompt, n_gen;
    char msg[64];
} client;

static void on_token(void *arg, int32_t t)
{
    client *c = arg;
    if (c->n_tok < 64) c->tok[c->n_tok] = t;
    c->n_tok++;
}

static void on_done(void *arg, srvq_finish why, int n_prompt, int n_gen, const char *msg)
{
    client *c = arg;
    c->n_done++;
    c->why = why;
    c->n_prompt = n_prompt;
    c->n_gen = n_gen;
    snprintf(c->msg, sizeof c->msg, "%s", msg ? msg : "");
}

static long submit(srvq *q, client *c, const int32_t *p, int n, int max_tokens, char *err)
{
    srvq_request r = {.prompt = p,
                      .n_prompt = n,
                      .max_tokens = max_tokens,
                      .temperature = 0,
                      .top_p = 1,
                      .seed = 9,
                      .on_token = on_token,
                      .on_done = on_done,
                      .arg = c};
    return srvq_submit(q, &r, err, 256);
}

/* The fake head: token for row i = 100 + slot (or what `force` says for a slot). */
static void give_back(srvq *q, const stage_batch *mb, const int32_t *force_by_slot)
{
    int32_t tok[64];
    for (int i = 0; i < mb->n; i++)
        tok[i] = force_by_slot && force_by_slot[mb->slot[i]] >= 0 ? force_by_slot[mb->slot[i]]
                                                                  : 100 + mb->slot[i];
    srvq_sched_ops.done(q, mb, tok);
}

static const int32_t P5[5] = {1, 2, 3, 4, 5}, P3[3] = {7, 8, 9}, P7[7] = {1, 1, 1, 1, 1, 1, 1};

/* A queue of `slots` slots of ctx positions (vocab 120, no EOS, room for max(4, slots)
 * queued) that schedules micro-batches of R rows (whole: prompts never cut, up to max_rows
 * rows); mb: a batch of max_rows rows; the clients c[0..n) zeroed. */
static srvq *setup(int slots, int ctx, int R, int whole, int max_rows, stage_batch *mb, client *c,
                   int n)
{
    srvq *q = srvq_new(slots, ctx, slots > 4 ? slots : 4, 120, -1);
    CU_ASSERT_PTR_NOT_NULL_FATAL(q);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_config(q, R, whole, max_rows), 0);
    CU_ASSERT_EQUAL_FATAL(stage_batch_init(mb, max_rows), 0);
    memset(c, 0, (size_t)n * sizeof *c);
    return q;
}

/* setup's queue with R 8 whose one stage reports (*kr) a pool of `pages` pages of 4 positions
 * on `layers` layers (docs/SPEC.md §11). */
static srvq *kv_setup(int slots, int ctx, int layers, int pages, engine_kv_report *kr,
                      stage_batch *mb, client *c, int n)
{
    srvq *q = setup(slots, ctx, 8, 0, 8, mb, c, n);
    *kr = (engine_kv_report){.stage = 0, .page = 4, .kv_layers = layers, .pages_total = pages};
    srvq_sched_ops.kv(q, kr, 1);
    return q;
}

static void test_submit_errors(void)
{
    srvq *q = srvq_new(2, 8, 1, 50, 2);
    CU_ASSERT_PTR_NOT_NULL_FATAL(q);
    client c[8];
    memset(c, 0, sizeof c);
    char err[256];
    int32_t bad[2] = {3, 50};
    CU_ASSERT_EQUAL(submit(q, &c[0], P5, 0, 4, err), SRVQ_ERR_BAD);
    CU_ASSERT(strstr(err, "empty") != NULL);
    CU_ASSERT_EQUAL(submit(q, &c[0], bad, 2, 4, err), SRVQ_ERR_BAD);
    CU_ASSERT(strstr(err, "50 out of range") != NULL);
    CU_ASSERT_EQUAL(submit(q, &c[0], P5, 5, 0, err), SRVQ_ERR_BAD);
    CU_ASSERT(strstr(err, "max_tokens") != NULL);
    srvq_request r = {
        .prompt = P5, .n_prompt = 5, .max_tokens = 2, .top_p = 0, .on_done = on_done, .arg = &c[0]};
    CU_ASSERT_EQUAL(srvq_submit(q, &r, err, sizeof err), SRVQ_ERR_BAD);
    CU_ASSERT(strstr(err, "top_p") != NULL);
    /* ctx 8: a prompt of 8 leaves no room, 7 does */
    int32_t p8[8] = {0};
    CU_ASSERT_EQUAL(submit(q, &c[0], p8, 8, 4, err), SRVQ_ERR_TOO_LONG);
    CU_ASSERT(strstr(err, "8 tokens") != NULL);
    /* 2 slots + queue 1: three accepted, the fourth is full */
    CU_ASSERT_EQUAL(submit(q, &c[0], P7, 7, 4, err), 0);
    CU_ASSERT_EQUAL(submit(q, &c[1], P3, 3, 4, err), 1);
    CU_ASSERT_EQUAL(submit(q, &c[2], P3, 3, 4, err), 2);
    CU_ASSERT_EQUAL(submit(q, &c[3], P3, 3, 4, err), SRVQ_ERR_FULL);
    /* 3 queued, 2 of them about to take the free slots: 1 waits */
    CU_ASSERT_STRING_EQUAL(
        err, "queue full: 1 request(s) waiting for a slot (at most 1), all 2 slots taken");
    srvq_stats st;
    srvq_get_stats(q, &st);
    CU_ASSERT_EQUAL(st.queued, 3);
    CU_ASSERT_EQUAL(st.running, 0);
    CU_ASSERT_EQUAL(st.requests_total, 3);
    CU_ASSERT_EQUAL(st.prompt_tokens, 13);
    srvq_close(q);
    CU_ASSERT_EQUAL(submit(q, &c[4], P3, 3, 4, err), SRVQ_ERR_CLOSED);
    CU_ASSERT_EQUAL(srvq_idle(q), 0);
    for (int i = 0; i < 8; i++) CU_ASSERT_EQUAL(c[i].n_done, 0); /* refused: no callback */
    srvq_free(q); /* with requests inside: no callbacks, no leak */
}

/* Admission, chunked prefill mixed with decode, EOS / max_tokens / context stops, a
 * cancel that frees the slot at once, stale rows skipped, on_done exactly once. */
static void test_schedule(void)
{
    /* 2 slots, ctx 9, R 4, eos 2 */
    srvq *q = srvq_new(2, 9, 4, 50, 2);
    CU_ASSERT_PTR_NOT_NULL_FATAL(q);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_config(q, 4, 0, 4), 0);
    stage_batch mb, old;
    CU_ASSERT_EQUAL_FATAL(stage_batch_init(&mb, 4), 0);
    CU_ASSERT_EQUAL_FATAL(stage_batch_init(&old, 4), 0);
    client a, b, c, d;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    memset(&c, 0, sizeof c);
    memset(&d, 0, sizeof d);
    char err[256];
    CU_ASSERT_EQUAL(srvq_sched_ops.next(q, &mb), 0); /* nothing yet */
    long ia = submit(q, &a, P5, 5, 3, err);          /* slot 0 */
    long ib = submit(q, &b, P3, 3, 10, err);         /* slot 1 */
    long ic = submit(q, &c, P3, 3, 2, err);          /* waits */
    CU_ASSERT(ia == 0 && ib == 1 && ic == 2);

    /* mb 1: a's first 4 prompt rows (R = 4) */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT_EQUAL(mb.n, 4);
    for (int i = 0; i < 4; i++) {
        CU_ASSERT(mb.slot[i] == 0 && mb.pos[i] == i && mb.token[i] == P5[i]);
        CU_ASSERT_EQUAL(mb.flags[i], STAGE_ROW_PROMPT);
        CU_ASSERT_EQUAL(mb.tag[i], 0u);
    }
    srvq_stats st;
    srvq_get_stats(q, &st);
    CU_ASSERT(st.running == 2 && st.queued == 1 && st.slots_used == 2);
    give_back(q, &mb, NULL);
    /* mb 2: a's last prompt row (samples), then b's 3 rows */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT_EQUAL(mb.n, 4);
    CU_ASSERT(mb.slot[0] == 0 && mb.pos[0] == 4 &&
              mb.flags[0] == (STAGE_ROW_PROMPT | STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE));
    CU_ASSERT(mb.step[0] == 0 && mb.seed[0] == 9 && mb.seq[0] == 0 && mb.top_p[0] == 1.0f);
    for (int i = 1; i < 4; i++) CU_ASSERT(mb.slot[i] == 1 && mb.pos[i] == i - 1);
    CU_ASSERT_EQUAL(mb.flags[3], STAGE_ROW_PROMPT | STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE);
    /* while mb 2 is in flight nothing else is ready */
    stage_batch_copy(&old, &mb);
    CU_ASSERT_EQUAL(srvq_sched_ops.next(q, &mb), 0);
    give_back(q, &old, NULL); /* a gets 100, b gets 101 */
    CU_ASSERT(a.n_tok == 1 && a.tok[0] == 100 && b.n_tok == 1 && b.tok[0] == 101);
    /* mb 3: two decode rows */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT_EQUAL(mb.n, 2);
    CU_ASSERT(mb.slot[0] == 0 && mb.pos[0] == 5 && mb.token[0] == 100 && mb.step[0] == 1);
    CU_ASSERT(mb.slot[1] == 1 && mb.pos[1] == 3 && mb.token[1] == 101 && mb.step[1] == 1);
    CU_ASSERT_EQUAL(mb.flags[0], STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE);
    stage_batch_copy(&old, &mb);
    /* b is cancelled while its decode row is in flight: its slot goes to c at once */
    srvq_cancel(q, ib);
    CU_ASSERT_EQUAL(b.n_done, 0); /* callbacks run on the pipeline thread */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(b.n_done == 1 && b.why == SRVQ_FINISH_CANCELLED && b.n_gen == 1);
    CU_ASSERT_EQUAL(mb.n, 3); /* c's prompt in slot 1; a still has a row in flight */
    for (int i = 0; i < 3; i++)
        CU_ASSERT(mb.slot[i] == 1 && mb.pos[i] == i && mb.tag[i] == (uint64_t)2 << 20);
    CU_ASSERT_EQUAL(mb.n_release, 0); /* c's position-0 row resets slot 1: no release needed */
    stage_batch mb4;
    stage_batch_init(&mb4, 4);
    stage_batch_copy(&mb4, &mb);
    /* the stale mb 3 comes back: a gets its token, b's row is skipped */
    give_back(q, &old, NULL);
    CU_ASSERT(a.n_tok == 2 && b.n_tok == 1 && b.n_done == 1);
    give_back(q, &mb4, NULL); /* c's first token: 101 */
    CU_ASSERT(c.n_tok == 1 && c.tok[0] == 101);
    /* a: third token is its max_tokens (3) -> LENGTH; c samples EOS (2) -> STOP, not passed on */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT_EQUAL(mb.n, 2);
    int32_t force[2] = {-1, 2};
    give_back(q, &mb, force);
    CU_ASSERT(a.n_done == 1 && a.why == SRVQ_FINISH_LENGTH && a.n_gen == 3 && a.n_tok == 3);
    CU_ASSERT(c.n_done == 1 && c.why == SRVQ_FINISH_STOP && c.n_gen == 1 && c.n_tok == 1);
    CU_ASSERT(srvq_idle(q));
    /* both slots were released with nothing reusing them: the next micro-batch says so */
    CU_ASSERT_EQUAL(srvq_sched_ops.finished(q), 0); /* not closed */
    long id = submit(q, &d, P7, 7, 10, err); /* ctx 9: inputs at 7, 8 -> 3 new tokens at most */
    CU_ASSERT_EQUAL(id, 3);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT_EQUAL(mb.n_release,
                    1); /* d took one slot (its reset covers it), the other is announced */
    CU_ASSERT_EQUAL(mb.n, 4);
    give_back(q, &mb, NULL);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT_EQUAL(mb.n, 3);
    give_back(q, &mb, NULL);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n == 1 && mb.pos[0] == 7);
    give_back(q, &mb, NULL);
    CU_ASSERT_EQUAL(d.n_done, 0);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n == 1 && mb.pos[0] == 8);
    give_back(q, &mb, NULL);
    CU_ASSERT(d.n_done == 1 && d.why == SRVQ_FINISH_LENGTH && d.n_gen == 3 &&
              strstr(d.msg, "context"));
    /* d's slot: released at once, in a micro-batch of its own */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n == 0 && mb.n_release == 1);
    give_back(q, &mb, NULL);
    CU_ASSERT_EQUAL(srvq_sched_ops.next(q, &mb), 0);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.requests_total == 4 && st.generated_tokens == 3 + 1 + 1 + 3 && st.running == 0);
    /* close: finished once idle; further submits refused */
    srvq_close(q);
    CU_ASSERT_EQUAL(srvq_sched_ops.finished(q), 1);
    CU_ASSERT(a.n_done == 1 && b.n_done == 1 && c.n_done == 1 && d.n_done == 1);
    /* link counters land in the stats */
    engine_link_bytes lb[2] = {{0, 1, 1000, 4000}, {1, 0, 64, 0}};
    srvq_sched_ops.links(q, lb, 2);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.n_links == 2 && st.link[0].from == 0 && st.link[0].to == 1 &&
              st.link[0].bytes == 1000 && st.link[0].dense_bytes == 4000 && st.link[1].from == 1 &&
              st.link[1].dense_bytes == 0);
    stage_batch_free(&mb);
    stage_batch_free(&old);
    stage_batch_free(&mb4);
    srvq_free(q);
}

/* Cancel a queued request; fail_all ends the rest with ERROR, each exactly once. */
static void test_cancel_queued_and_fail(void)
{
    stage_batch mb;
    client c[3];
    srvq *q = setup(1, 16, 8, 0, 8, &mb, c, 3);
    char err[256];
    for (int i = 0; i < 3; i++) CU_ASSERT_EQUAL(submit(q, &c[i], P3, 3, 5, err), i);
    srvq_cancel(q, 1);
    srvq_cancel(q, 77); /* unknown: no-op */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(c[1].n_done == 1 && c[1].why == SRVQ_FINISH_CANCELLED && c[1].n_gen == 0);
    CU_ASSERT(mb.n == 3 && mb.tag[0] == 0u);
    srvq_cancel(q, 1); /* already done: no-op */
    srvq_fail_all(q, "rank 2 died");
    CU_ASSERT(c[0].n_done == 1 && c[0].why == SRVQ_FINISH_ERROR && strstr(c[0].msg, "rank 2"));
    CU_ASSERT(c[2].n_done == 1 && c[2].why == SRVQ_FINISH_ERROR);
    CU_ASSERT_EQUAL(c[1].n_done, 1);
    CU_ASSERT(srvq_idle(q));
    CU_ASSERT_EQUAL(submit(q, &c[0], P3, 3, 5, err), SRVQ_ERR_CLOSED);
    stage_batch_free(&mb);
    srvq_free(q);
}

/* Whole prompts (mindskip sequence granularity): a prompt is never cut; a long one gets a
 * micro-batch of its own up to max_rows. */
static void test_whole_prompts(void)
{
    stage_batch mb;
    client c[3];
    srvq *q = setup(3, 16, 4, 1, 16, &mb, c, 3);
    char err[256];
    submit(q, &c[0], P3, 3, 5, err);
    submit(q, &c[1], P7, 7, 5, err);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n == 3 && mb.slot[0] == 0);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n == 7 && mb.slot[0] == 1 && mb.pos[6] == 6);
    stage_batch_free(&mb);
    srvq_free(q);
}

/* Whole prompts (mindskip sequence granularity, top-k over the sequence): a row's routing
 * depends on the whole prompt, so no prefix is ever reused — not from a running request with
 * the same 30-token prompt, not from a finished one (it is not parked: its slot is released). */
static void test_whole_no_reuse(void)
{
    int32_t pa[30];
    for (int i = 0; i < 30; i++) pa[i] = 3 + i;
    stage_batch mb;
    client c[3];
    srvq *q = setup(2, 40, 8, 1, 32, &mb, c, 3);
    char err[256];
    int shares = 0, pos0 = 0;
    CU_ASSERT_EQUAL(submit(q, &c[0], pa, 30, 4, err), 0);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1); /* a's whole prompt */
    CU_ASSERT(mb.n == 30 && mb.n_share == 0);
    CU_ASSERT_EQUAL(submit(q, &c[1], pa, 30, 2, err), 1); /* b: the same prompt, a running */
    for (int k = 0; k < 64 && !(c[0].n_done && c[1].n_done); k++) {
        give_back(q, &mb, NULL);
        if (!srvq_sched_ops.next(q, &mb)) break;
        shares += mb.n_share;
        for (int i = 0; i < mb.n; i++) pos0 += mb.slot[i] == 1 && mb.pos[i] == 0;
    }
    CU_ASSERT(c[0].n_done == 1 && c[1].n_done == 1);
    CU_ASSERT_EQUAL(pos0, 1);                             /* b computed from position 0 */
    CU_ASSERT_EQUAL(submit(q, &c[2], pa, 30, 1, err), 2); /* c: after both ended */
    for (int k = 0; k < 64 && !c[2].n_done; k++) {
        if (!srvq_sched_ops.next(q, &mb)) break;
        shares += mb.n_share;
        give_back(q, &mb, NULL);
    }
    CU_ASSERT_EQUAL(c[2].n_done, 1);
    srvq_stats st;
    srvq_get_stats(q, &st);
    CU_ASSERT_EQUAL(shares, 0);
    CU_ASSERT(st.prefix_hits == 0 && st.prefix_cached_hits == 0 && st.prefix_holders_used == 0);
    stage_batch_free(&mb);
    srvq_free(q);
}

/* Admission by memory and preemption (docs/SPEC.md §11). One stage reports pages of 4
 * positions on 2 layers, 12 pages: a running request of n positions counts 2 * ceil((n+1)/4)
 * pages, a new one 2 * ceil((prompt + 4) / 4). */
static void done_tok(srvq *q, const stage_batch *mb, int32_t tok_all, int slot, int32_t tok_slot)
{
    int32_t tok[64];
    for (int i = 0; i < mb->n; i++) tok[i] = mb->slot[i] == slot ? tok_slot : tok_all;
    srvq_sched_ops.done(q, mb, tok);
}

/* A queue of `slots` slots (ctx 32, R 8) whose one stage has a pool of `pages` pages of 4
 * positions on 2 layers (reported in *kr), with n requests of 6 prompt + 4 tokens queued. */
static srvq *kv_queue(int slots, int pages, engine_kv_report *kr, stage_batch *mb, client *c, int n)
{
    static const int32_t P6[6] = {1, 2, 3, 4, 5, 6};
    srvq *q = kv_setup(slots, 32, 2, pages, kr, mb, c, n);
    char err[256];
    for (int i = 0; i < n; i++) CU_ASSERT_EQUAL(submit(q, &c[i], P6, 6, 4, err), i);
    return q;
}

static void test_preempt(void)
{
    engine_kv_report kr;
    stage_batch mb;
    client c[3];
    srvq *q = kv_queue(3, 14, &kr, &mb, c, 3);
    /* nothing measured (every row kept): n positions take at most 2 (n / 4 + 1) pages; a (7
     * positions once a row on: 5.5) + b (6 + a page of growth: 7) fit in 14; with them c (7
     * more) does not */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    srvq_stats st;
    srvq_get_stats(q, &st);
    CU_ASSERT(st.running == 2 && st.queued == 1);
    CU_ASSERT(mb.n == 8 && mb.slot[0] == 0 && mb.slot[6] == 1 && mb.slot[7] == 1);
    give_back(q, &mb, NULL); /* a: token 100 */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n == 5 && mb.slot[0] == 0 && mb.pos[0] == 6 && mb.slot[4] == 1);
    give_back(q, &mb, NULL); /* a: 100 100, b: 101 */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n == 2 && mb.slot[1] == 1 && mb.pos[1] == 6 && mb.token[1] == 101);
    done_tok(q, &mb, 7, -1, 0); /* a: 100 100 7, b: 101 7 */
    /* b's next row: a stage ran out of pages under it -> b is recomputed */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n == 2 && mb.slot[1] == 1 && mb.pos[1] == 7 && mb.token[1] == 7);
    done_tok(q, &mb, 9, 1, STAGE_TOKEN_KV_LOST); /* a: its 4th token, LENGTH */
    CU_ASSERT(c[0].n_done == 1 && c[0].why == SRVQ_FINISH_LENGTH && c[0].n_tok == 4);
    CU_ASSERT(c[1].n_done == 0 && c[1].n_tok == 2);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.preemptions == 1 && st.running == 0 && st.queued == 2);
    /* b first again (the queue's head), then c; b replays its prompt and its first token (a
     * decode row: no PROMPT flag), then its decode row (input: its 2nd token) samples its
     * 3rd token at step 2; b and c take the two slots just freed (their resets cover the
     * releases) */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT_EQUAL(mb.n, 8);
    CU_ASSERT_EQUAL(mb.n_release, 0);
    int b_slot = mb.slot[0];
    for (int i = 0; i < 7; i++) {
        CU_ASSERT(mb.slot[i] == b_slot && mb.pos[i] == i);
        CU_ASSERT_EQUAL(mb.tag[i], (uint64_t)1 << 20 | 1u); /* request 1, second admission */
        CU_ASSERT_EQUAL(mb.flags[i], i < 6 ? STAGE_ROW_PROMPT : 0);
    }
    CU_ASSERT(mb.token[5] == 6 && mb.token[6] == 101);
    CU_ASSERT(mb.slot[7] != b_slot && mb.pos[7] == 0); /* c's first prompt row */
    give_back(q, &mb, NULL);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.slot[0] == b_slot && mb.pos[0] == 7 && mb.token[0] == 7 && mb.step[0] == 2 &&
              mb.flags[0] == (STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE));
    give_back(q, &mb, NULL);
    CU_ASSERT(c[1].n_tok == 3 && c[1].tok[0] == 101 && c[1].tok[1] == 7);
    /* the pool shrinks (a report says so): the running ones no longer fit -> the newest (c)
     * gives way; the last one is never preempted */
    srvq_get_stats(q, &st);
    CU_ASSERT_EQUAL(st.running, 2);
    kr.pages_total = 6;
    kr.pages_used = 8; /* no share of rows kept measured: keep stays 1 */
    srvq_sched_ops.kv(q, &kr, 1);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.preemptions == 2 && st.running == 1 && st.queued == 1);
    CU_ASSERT(mb.n == 1 && mb.slot[0] == b_slot && mb.pos[0] == 8);
    give_back(q, &mb, NULL); /* b: 4 tokens, done */
    CU_ASSERT(c[1].n_done == 1 && c[1].why == SRVQ_FINISH_LENGTH && c[1].n_tok == 4);
    /* c, readmitted alone (nothing else since): lost -> it cannot fit: ERROR */
    for (int k = 0; k < 1; k++) { /* its prompt (it made 1 token), then its decode row */
        CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
        CU_ASSERT(mb.n == 6 && mb.pos[5] == 5 && mb.flags[5] == STAGE_ROW_PROMPT);
        give_back(q, &mb, NULL);
        CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
        CU_ASSERT(mb.n == 1 && mb.pos[0] == 6 && mb.step[0] == 1);
        done_tok(q, &mb, 0, mb.slot[0], STAGE_TOKEN_KV_LOST);
    }
    CU_ASSERT(c[2].n_done == 1 && c[2].why == SRVQ_FINISH_ERROR && strstr(c[2].msg, "--kv-mem"));
    srvq_get_stats(q, &st);
    CU_ASSERT(st.preemptions == 2 && st.running == 0 && st.queued == 0);
    CU_ASSERT(srvq_idle(q));
    stage_batch_free(&mb);
    srvq_free(q);
}

/* Prefix reuse: b's prompt starts with the 16 positions a has issued: b starts from a share
 * of them (applied by the stages before the micro-batch's rows) and computes the rest. */
static void test_prefix_reuse(void)
{
    int32_t p20[20], p18[18];
    for (int i = 0; i < 20; i++) p20[i] = 3 + i;
    memcpy(p18, p20, sizeof p18);
    p18[17] = 40; /* a different 18th token: still 16 (one block) in common */
    stage_batch mb;
    client c[3];
    srvq *q = setup(3, 32, 8, 0, 8, &mb, c, 3);
    char err[256];
    CU_ASSERT_EQUAL(submit(q, &c[0], p20, 20, 2, err), 0);
    for (int k = 0; k < 2; k++) { /* a's first 16 rows issued (not back yet) */
        CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
        CU_ASSERT(mb.n == 8 && mb.n_share == 0);
    }
    CU_ASSERT_EQUAL(submit(q, &c[1], p18, 18, 2, err), 1);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT_EQUAL(mb.n_share, 1);
    CU_ASSERT(mb.share[0] == 0 && mb.share[1] == 1 && mb.share[2] == 16);
    /* a's last 4 rows, then b's from position 16 */
    CU_ASSERT(mb.n == 6 && mb.slot[3] == 0 && mb.pos[3] == 19 && mb.slot[4] == 1 &&
              mb.pos[4] == 16 && mb.token[5] == 40 && (mb.flags[5] & STAGE_ROW_SAMPLE));
    srvq_stats st;
    srvq_get_stats(q, &st);
    CU_ASSERT(st.prefix_hits == 1 && st.prefix_tokens == 16);
    /* off: c (the same prompt) computes everything */
    srvq_set_prefix_reuse(q, 0);
    CU_ASSERT_EQUAL(submit(q, &c[2], p20, 20, 2, err), 2);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n_share == 0 && mb.slot[0] == 2 && mb.pos[0] == 0);
    stage_batch_free(&mb);
    srvq_free(q);
}

/* The share of rows kept, measured by a report (entries over positions x layers at one
 * moment), lets more requests in; admission keeps a margin over it that the preemption check
 * does not, so a pool that just holds the running ones preempts nothing. */
static void test_keep_estimate(void)
{
    engine_kv_report kr;
    stage_batch mb;
    client c[9];
    srvq *q = kv_queue(9, 40, &kr, &mb, c, 9);
    /* every row kept: 5.5 pages a running one, 7 a new one: 7 fit in 40 */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    srvq_stats st;
    srvq_get_stats(q, &st);
    CU_ASSERT(st.running == 7 && st.queued == 2);
    /* an eighth of the rows kept (x 1.25 margin): 2 (0.156 x 7 / 4 + 1) = 2.55 pages each */
    kr.entries_live = 16;
    kr.positions_live = 128;
    srvq_sched_ops.kv(q, &kr, 1);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.running == 9 && st.queued == 0);
    /* 22 pages: 9 x 2.55 (margin) > 22 >= 9 x 2.44 (the measure itself): nothing preempted */
    kr.pages_total = 22;
    srvq_sched_ops.kv(q, &kr, 1);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.running == 9 && st.preemptions == 0);
    /* 21: the newest one gives way */
    kr.pages_total = 21;
    srvq_sched_ops.kv(q, &kr, 1);
    srvq_sched_ops.next(q, &mb);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.running == 8 && st.preemptions == 1);
    stage_batch_free(&mb);
    srvq_free(q);
}

/* Run micro-batches until client c is done (the fake head answers every row). */
static void run_until_done(srvq *q, stage_batch *mb, const client *c)
{
    for (int k = 0; k < 64 && !c->n_done; k++) {
        CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, mb), 1);
        give_back(q, mb, NULL);
    }
    CU_ASSERT_EQUAL(c->n_done, 1);
}

/* More finished prefixes than slots stay findable: with 2 slots, 10 requests of different
 * prompts end one after the other; the 8 holders (engine_prefix_holders) keep the last 8,
 * the least recently used going first; a prompt that begins like the third one's finds its
 * holder by block hash, one like the first one's finds nothing. */
static void test_prefix_holders(void)
{
    enum { N = 10, LEN = 20 };
    int32_t p[N + 2][LEN + 4];
    for (int i = 0; i < N; i++)
        for (int j = 0; j < LEN + 4; j++) p[i][j] = 3 + (i * 7 + j) % 90;
    engine_kv_report kr;
    stage_batch mb;
    client c[N + 2];
    srvq *q = kv_setup(2, 40, 1, 1000, &kr, &mb, c, N + 2);
    CU_ASSERT_EQUAL(engine_prefix_holders(2), 8);
    char err[256];
    srvq_stats st;
    for (int i = 0; i < N; i++) {
        CU_ASSERT_EQUAL(submit(q, &c[i], p[i], LEN, 1, err), i);
        run_until_done(q, &mb, &c[i]);
    }
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1); /* the last one's move + park */
    srvq_get_stats(q, &st);
    CU_ASSERT(st.prefix_holders_used == 8 && st.prefix_evictions == 2 && st.prefix_hits == 0);
    /* the third prompt + 4 tokens: its first block (16 positions) from a holder */
    CU_ASSERT_EQUAL(submit(q, &c[N], p[2], LEN + 4, 1, err), N);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n_share == 1 && mb.share[0] >= 2 && mb.share[0] < 10 && mb.share[2] == 16);
    CU_ASSERT(mb.n > 0 && mb.pos[0] == 16);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.prefix_hits == 1 && st.prefix_cached_hits == 1);
    give_back(q, &mb, NULL);
    CU_ASSERT_EQUAL(c[N].n_done, 1);
    /* the first prompt's holder was evicted: computed from position 0 */
    CU_ASSERT_EQUAL(submit(q, &c[N + 1], p[0], LEN + 4, 1, err), N + 1);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    int shared = 0;
    for (int k = 0; k < mb.n_share; k++) shared |= mb.share[3 * k + 1] < 2; /* into a slot */
    CU_ASSERT(!shared && mb.n > 0 && mb.pos[0] == 0);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.prefix_hits == 1);
    stage_batch_free(&mb);
    srvq_free(q);
}

/* The cache of finished prefixes: a finished request moves its KV to a prefix holder (a
 * share slot -> holder, then a park triple src == dst; the slot is released after them), a
 * later request shares from it (its generated tokens included), a longer prefix supersedes
 * a shorter one, holders are evicted for pages (before any preemption) and by
 * srvq_prefix_cache_clear but never for a slot; cancelled requests are not parked. */
static void test_prefix_cache(void)
{
    int32_t pa[30], pb[34], pc[20];
    for (int i = 0; i < 30; i++) pa[i] = 3 + i;
    memcpy(pb, pa, sizeof pa);
    for (int i = 30; i < 33; i++) pb[i] = 100; /* a's tokens (slot 0: 100 each) */
    pb[33] = 40;
    for (int i = 0; i < 20; i++) pc[i] = 20 + i;
    engine_kv_report kr;
    stage_batch mb;
    client c[5];
    srvq *q = kv_setup(2, 40, 1, 100, &kr, &mb, c, 5);
    char err[256];
    srvq_stats st;
    /* a: 30 + 4 tokens; its KV holds positions 0..32 (the last token is never fed) */
    CU_ASSERT_EQUAL(submit(q, &c[0], pa, 30, 4, err), 0);
    run_until_done(q, &mb, &c[0]);
    CU_ASSERT(c[0].why == SRVQ_FINISH_LENGTH && c[0].n_tok == 4);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1); /* the move and the park alone */
    CU_ASSERT(mb.n == 0 && mb.n_release == 0 && mb.n_share == 2);
    CU_ASSERT(mb.share[0] == 0 && mb.share[1] == 2 && mb.share[2] == 33); /* holder 0: id 2 */
    CU_ASSERT(mb.share[3] == 2 && mb.share[4] == 2 && mb.share[5] == 33);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.prefix_holders_used == 1 && st.running == 0);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1); /* then slot 0's release */
    CU_ASSERT(mb.n == 0 && mb.n_release == 1 && mb.release[0] == 0 && mb.n_share == 0);
    CU_ASSERT_EQUAL(srvq_sched_ops.next(q, &mb), 0); /* nothing else to do */
    /* b = a's prompt and 3 of its tokens + 1: shares 32 positions (whole blocks) from the
     * holder, into slot 0 (free again) */
    CU_ASSERT_EQUAL(submit(q, &c[1], pb, 34, 1, err), 1);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n_share == 1 && mb.share[0] == 2 && mb.share[1] == 0 && mb.share[2] == 32);
    CU_ASSERT(mb.n == 2 && mb.slot[0] == 0 && mb.pos[0] == 32 && mb.token[0] == 100 &&
              mb.token[1] == 40);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.prefix_hits == 1 && st.prefix_cached_hits == 1 && st.prefix_tokens == 32);
    give_back(q, &mb, NULL); /* b: 1 token, done: parked with 34 positions, a's superseded */
    CU_ASSERT(c[1].n_done == 1 && c[1].why == SRVQ_FINISH_LENGTH);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    /* the superseded holder is the free one b moves to: no release, its share empties it */
    CU_ASSERT(mb.n == 0 && mb.n_release == 0 && mb.n_share == 2 && mb.share[0] == 0 &&
              mb.share[1] == 2 && mb.share[2] == 34 && mb.share[3] == 2 && mb.share[5] == 34);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.prefix_holders_used == 1 && st.prefix_evictions == 1);
    /* c (other tokens) and d take both slots: the holder stays (it is not a slot) */
    CU_ASSERT_EQUAL(submit(q, &c[2], pc, 20, 8, err), 2);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n_share == 0 && mb.n_release == 0 && mb.slot[0] == 0 && mb.pos[0] == 0);
    CU_ASSERT_EQUAL(submit(q, &c[3], pc, 20, 1, err), 3);
    give_back(q, &mb, NULL);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.prefix_holders_used == 1 && st.prefix_evictions == 1 && st.running == 2);
    CU_ASSERT(mb.n_release == 0 && mb.n_share == 0); /* c had issued 8 positions: no share */
    /* c is cancelled: not parked (its slot is released); d ends and parks */
    srvq_cancel(q, 2);
    give_back(q, &mb, NULL);
    run_until_done(q, &mb, &c[3]);
    CU_ASSERT(c[2].why == SRVQ_FINISH_CANCELLED);
    srvq_get_stats(q, &st);
    CU_ASSERT_EQUAL(st.prefix_holders_used, 2);
    /* pages: the pool shrinks so that the holders and a new request do not all fit: d's
     * holder goes, then b's (e would share from it: last), nothing is preempted */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1); /* c's release, d's move + park */
    kr.pages_total = 9;
    srvq_sched_ops.kv(q, &kr, 1);
    CU_ASSERT_EQUAL(submit(q, &c[4], pa, 30, 1, err), 4);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    srvq_get_stats(q, &st);
    CU_ASSERT(st.prefix_holders_used == 0 && st.prefix_evictions == 3 && st.preemptions == 0 &&
              st.running == 1);
    CU_ASSERT(mb.n_release ==
              2); /* both holders (e took d's slot: its reset supersedes the release) */
    run_until_done(q, &mb, &c[4]);
    /* clear: every parked slot is released with the next micro-batch */
    kr.pages_total = 100;
    srvq_sched_ops.kv(q, &kr, 1);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1); /* e's park */
    srvq_get_stats(q, &st);
    CU_ASSERT_EQUAL(st.prefix_holders_used, 1);
    srvq_prefix_cache_clear(q);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n == 0 && mb.n_release == 2); /* e's slot, its holder */
    srvq_get_stats(q, &st);
    CU_ASSERT(st.prefix_holders_used == 0 && st.running == 0);
    stage_batch_free(&mb);
    srvq_free(q);
}

/* A holder evicted before the micro-batch that carries its move and park went out: the stages
 * apply a micro-batch's releases before its shares, so the move and park must go with the
 * eviction (else the stage rebuilds the holder after its release and keeps its pages with no
 * holder on the queue's side: the pool fills up for good and every admission preempts). */
static void test_prefix_evict_unsent(void)
{
    int32_t pa[30];
    for (int i = 0; i < 30; i++) pa[i] = 3 + i;
    engine_kv_report kr;
    stage_batch mb;
    client c;
    srvq *q = kv_setup(2, 40, 1, 100, &kr, &mb, &c, 1);
    char err[256];
    CU_ASSERT_EQUAL(submit(q, &c, pa, 30, 4, err), 0);
    run_until_done(q, &mb, &c); /* a parked into holder 0 (sequence 2): not sent yet */
    srvq_stats st;
    srvq_get_stats(q, &st);
    CU_ASSERT_EQUAL(st.prefix_holders_used, 1);
    kr.pages_total = 4; /* the holder (33 positions: 10 pages) no longer fits */
    srvq_sched_ops.kv(q, &kr, 1);
    int rel_holder = 0, rel_slot = 0, shares_to_holder = 0;
    for (int k = 0; k < 3 && srvq_sched_ops.next(q, &mb); k++) {
        for (int i = 0; i < mb.n_release; i++) {
            rel_holder += mb.release[i] == 2;
            rel_slot += mb.release[i] == 0;
        }
        for (int i = 0; i < mb.n_share; i++) shares_to_holder += mb.share[3 * i + 1] == 2;
    }
    srvq_get_stats(q, &st);
    CU_ASSERT(st.prefix_holders_used == 0 && st.prefix_evictions == 1);
    CU_ASSERT_EQUAL(shares_to_holder, 0);
    CU_ASSERT_EQUAL(rel_holder, 1);
    CU_ASSERT_EQUAL(rel_slot, 1); /* a's slot still comes back */
    CU_ASSERT_EQUAL(srvq_sched_ops.next(q, &mb), 0);
    stage_batch_free(&mb);
    srvq_free(q);
}

/* Many threads submit at once while the "pipeline" runs: ids unique, every request done once. */
typedef struct {
    srvq *q;
    client *c;
    int n;
    long *ids;
} sub_arg;
static void *submitter(void *p)
{
    sub_arg *a = p;
    char err[256];
    for (int i = 0; i < a->n; i++) a->ids[i] = submit(a->q, &a->c[i], P3, 3, 3, err);
    return NULL;
}

/* A restart: rows in flight are forgotten, the request prefills its prompt + tokens so far
 * (but the last) without sampling, then decodes from its last token at the same step. */
static void test_rewind(void)
{
    srvq *q = srvq_new(1, 16, 4, 50, -1);
    CU_ASSERT_PTR_NOT_NULL_FATAL(q);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_config(q, 4, 0, 4), 0);
    stage_batch mb;
    CU_ASSERT_EQUAL_FATAL(stage_batch_init(&mb, 4), 0);
    client a;
    memset(&a, 0, sizeof a);
    char err[256];
    CU_ASSERT_EQUAL(submit(q, &a, P3, 3, 6, err), 0);
    /* prompt (3 rows, samples 100), then 2 decode steps: 100, 100, 100 generated */
    for (int k = 0; k < 3; k++) {
        CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
        give_back(q, &mb, NULL);
    }
    CU_ASSERT_EQUAL(a.n_tok, 3);
    /* a decode row is in flight when the pipeline dies */
    int32_t force[1] = {7};
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n == 1 && mb.pos[0] == 5 && mb.step[0] == 3);
    srvq_rewind(q);
    /* re-prefill: P3 + 100, 100 at positions 0..4, no sampling (4 + 1 rows, R = 4) */
    int32_t want[5] = {7, 8, 9, 100, 100};
    int at = 0;
    for (int k = 0; k < 2; k++) {
        CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
        for (int i = 0; i < mb.n; i++, at++) {
            CU_ASSERT(mb.pos[i] == at && mb.token[i] == want[at]);
            CU_ASSERT_EQUAL(mb.flags[i], at < 3 ? STAGE_ROW_PROMPT : 0); /* made: decode rows */
        }
        give_back(q, &mb, NULL);
    }
    CU_ASSERT_EQUAL(at, 5);
    CU_ASSERT_EQUAL(a.n_tok, 3); /* no token from the re-prefill */
    /* then the decode row that was lost: last token 100 at position 5, step 3 */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &mb), 1);
    CU_ASSERT(mb.n == 1 && mb.pos[0] == 5 && mb.token[0] == 100 && mb.step[0] == 3);
    CU_ASSERT_EQUAL(mb.flags[0], STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE);
    give_back(q, &mb, force);
    CU_ASSERT(a.n_tok == 4 && a.tok[3] == 7);
    srvq_stats st;
    srvq_get_stats(q, &st);
    CU_ASSERT(st.restarts == 1 && st.replayed_requests == 1 && st.replayed_tokens == 5);
    stage_batch_free(&mb);
    srvq_free(q);
}

/* Decode groups (serve/queue_sched.h step 2): with 2 groups, 4 decoding requests go as two
 * micro-batches of 2 rows that are in flight together, each request staying in its group;
 * a group left with more than its share gives the rest to a smaller one. */
static void test_decode_groups(void)
{
    stage_batch a, b;
    client c[4];
    srvq *q = setup(4, 16, 8, 0, 8, &a, c, 4);
    srvq_sched_groups(q, 2);
    CU_ASSERT_EQUAL_FATAL(stage_batch_init(&b, 8), 0);
    char err[256];
    for (int i = 0; i < 4; i++) CU_ASSERT_EQUAL(submit(q, &c[i], P3, 3, 12, err), i);
    /* prompts: 8 rows (slots 0, 1 and 2 rows of 2), then 4 (the rest of 2, 3) */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &a), 1);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &b), 1);
    CU_ASSERT(a.n == 8 && b.n == 4);
    give_back(q, &a, NULL);
    /* slots 0 and 1 are ready and join groups 0 and 1: one micro-batch each */
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &a), 1);
    CU_ASSERT(a.n == 1 && a.slot[0] == 0);
    /* slot 2 joins group 1 (as small as group 0, and not in flight): it goes with slot 1;
     * slot 3 joins group 0, in flight: it waits */
    give_back(q, &b, NULL);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &b), 1);
    CU_ASSERT(b.n == 2 && b.slot[0] == 1 && b.slot[1] == 2);
    stage_batch extra;
    CU_ASSERT_EQUAL_FATAL(stage_batch_init(&extra, 8), 0);
    CU_ASSERT_EQUAL(srvq_sched_ops.next(q, &extra), 0);
    /* steady state: {0, 3} and {1, 2}, two micro-batches in flight */
    for (int k = 0; k < 4; k++) {
        give_back(q, &a, NULL);
        CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &a), 1);
        CU_ASSERT(a.n == 2 && a.slot[0] == 0 && a.slot[1] == 3);
        CU_ASSERT_EQUAL(srvq_sched_ops.next(q, &extra), 0);
        give_back(q, &b, NULL);
        CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &b), 1);
        CU_ASSERT(b.n == 2 && b.slot[0] == 1 && b.slot[1] == 2);
    }
    /* the counters: 10 decode micro-batches of 19 rows, the first alone in flight, the rest
     * with the other group's */
    srvq_stats st;
    srvq_get_stats(q, &st);
    CU_ASSERT(st.micro_batches == 12 && st.decode_micro_batches == 10);
    CU_ASSERT(st.decode_rows == 19 && st.decode_in_flight == 19);
    /* slots 1 and 2 end: group 0 {0, 3} is over its share (1 of 2): 3 moves to group 1 */
    srvq_cancel(q, 1);
    srvq_cancel(q, 2);
    give_back(q, &b, NULL);
    give_back(q, &a, NULL);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &a), 1);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_ops.next(q, &b), 1);
    CU_ASSERT(a.n == 1 && a.slot[0] == 0 && b.n == 1 && b.slot[0] == 3);
    give_back(q, &a, NULL);
    give_back(q, &b, NULL);
    /* every token is the one the head gave, the same as without groups */
    CU_ASSERT(c[0].n_tok == 7 && c[3].n_tok == 6);
    for (int i = 0; i < 4; i += 3) {
        for (int j = 0; j < c[i].n_tok && j < 64; j++) CU_ASSERT_EQUAL(c[i].tok[j], 100 + i);
    }
    CU_ASSERT(c[1].n_done == 1 && c[1].why == SRVQ_FINISH_CANCELLED);
    stage_batch_free(&a);
    stage_batch_free(&b);
    stage_batch_free(&extra);
    srvq_free(q);
}

/* Chunked prefill under the token budget (policy steps 2 and 3): with decode rows running and
 * long prompts arriving, every micro-batch holds at most R rows, its decode rows come before
 * its prompt rows, and while prompt rows wait it is filled to R (decode rows + a chunk);
 * prompts longer than R span micro-batches mixed with decode rows. A pipeline of 4
 * micro-batches in flight, as a 2-stage job's. */
static void test_prefill_budget(void)
{
    enum { R = 8, K = 4, SHORT = 3, LONG = 3, LP = 30 };
    srvq *q = srvq_new(SHORT + LONG, 64, 8, 50, -1);
    CU_ASSERT_PTR_NOT_NULL_FATAL(q);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_config(q, R, 0, R), 0);
    srvq_sched_groups(q, 2);
    stage_batch fl[K];
    for (int i = 0; i < K; i++) CU_ASSERT_EQUAL_FATAL(stage_batch_init(&fl[i], 64), 0);
    client c[SHORT + LONG];
    memset(c, 0, sizeof c);
    char err[256];
    int32_t lp[LP];
    for (int i = 0; i < LP; i++) lp[i] = 1 + i % 40;
    for (int i = 0; i < SHORT; i++) CU_ASSERT_EQUAL(submit(q, &c[i], P3, 3, 24, err), i);
    int head = 0, n_fl = 0, rounds = 0, mixed = 0, full = 0, budget_ok = 1, order_ok = 1;
    int prompt_mbs[SHORT + LONG] = {0}; /* micro-batches that carried a long prompt's rows */
    long pending = SHORT * 3, submitted = 0;
    while (rounds++ < 1000) {
        /* the long prompts arrive once the short requests decode */
        if (rounds == 6)
            for (int i = SHORT; i < SHORT + LONG; i++) {
                CU_ASSERT_EQUAL(submit(q, &c[i], lp, LP, 8, err), i);
                pending += LP;
                submitted++;
            }
        while (n_fl < K) {
            stage_batch *mb = &fl[(head + n_fl) % K];
            mb->n = mb->n_release = mb->n_share = 0;
            long before = pending;
            if (!srvq_sched_ops.next(q, mb)) break;
            int nd = 0, np = 0, seen_prompt = 0, carried[SHORT + LONG] = {0};
            for (int i = 0; i < mb->n; i++) {
                if (mb->flags[i] & STAGE_ROW_PROMPT) {
                    np++;
                    seen_prompt = 1;
                    carried[mb->slot[i]] = 1;
                } else {
                    nd++;
                    if (seen_prompt) order_ok = 0; /* a decode row behind a prompt chunk */
                }
            }
            pending -= np;
            if (mb->n > R) budget_ok = 0;
            /* waiting prompt rows fill the budget */
            int want = nd + before < R ? nd + (int)before : R;
            if (before > 0) {
                CU_ASSERT_EQUAL(mb->n, want);
                full += mb->n == want;
            }
            mixed += nd > 0 && np > 0;
            for (int i = SHORT; i < SHORT + LONG; i++) prompt_mbs[i] += carried[i];
            if (mb->n > 0) n_fl++;
        }
        if (n_fl == 0) break;
        give_back(q, &fl[head], NULL);
        head = (head + 1) % K;
        n_fl--;
    }
    CU_ASSERT(budget_ok);
    CU_ASSERT(order_ok);
    CU_ASSERT_EQUAL(submitted, LONG);
    CU_ASSERT_EQUAL(pending, 0);
    CU_ASSERT(full > 0);
    CU_ASSERT(mixed > 0); /* prompt chunks rode with decode rows */
    for (int i = SHORT; i < SHORT + LONG; i++) CU_ASSERT(prompt_mbs[i] >= (LP + R - 1) / R);
    for (int i = 0; i < SHORT + LONG; i++) {
        CU_ASSERT_EQUAL(c[i].n_done, 1);
        CU_ASSERT_EQUAL(c[i].n_tok, i < SHORT ? 24 : 8);
        for (int j = 0; j < c[i].n_tok && j < 64; j++) CU_ASSERT_EQUAL(c[i].tok[j], 100 + i);
    }
    for (int i = 0; i < K; i++) stage_batch_free(&fl[i]);
    srvq_free(q);
}

static void test_threads(void)
{
    enum { T = 4, N = 50 };
    srvq *q = srvq_new(8, 16, T * N, 50, -1);
    CU_ASSERT_EQUAL_FATAL(srvq_sched_config(q, 16, 0, 16), 0);
    static client c[T][N];
    static long ids[T][N];
    memset(c, 0, sizeof c);
    pthread_t th[T];
    sub_arg a[T];
    for (int t = 0; t < T; t++) {
        a[t] = (sub_arg){q, c[t], N, ids[t]};
        pthread_create(&th[t], NULL, submitter, &a[t]);
    }
    stage_batch mb;
    stage_batch_init(&mb, 16);
    int joined = 0;
    for (int it = 0; it < 100000; it++) {
        if (srvq_sched_ops.next(q, &mb))
            give_back(q, &mb, NULL);
        else if (joined)
            break;
        else {
            for (int t = 0; t < T; t++) pthread_join(th[t], NULL);
            joined = 1;
        }
    }
    CU_ASSERT(srvq_idle(q));
    static char seen[T * N];
    memset(seen, 0, sizeof seen);
    int ok = 1;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < N; i++) {
            ok &= ids[t][i] >= 0 && ids[t][i] < T * N && !seen[ids[t][i]];
            if (ids[t][i] >= 0 && ids[t][i] < T * N) seen[ids[t][i]] = 1;
            ok &= c[t][i].n_done == 1 && c[t][i].why == SRVQ_FINISH_LENGTH && c[t][i].n_tok == 3;
        }
    CU_ASSERT(ok);
    stage_batch_free(&mb);
    srvq_free(q);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("srvq", NULL, NULL);
    CU_add_test(s, "submit: bad, too long, full, closed", test_submit_errors);
    CU_add_test(s, "schedule: chunks, decode, stops, cancel frees the slot", test_schedule);
    CU_add_test(s, "cancel queued; fail_all", test_cancel_queued_and_fail);
    CU_add_test(s, "whole prompts", test_whole_prompts);
    CU_add_test(s, "whole prompts: no prefix reuse, running or finished", test_whole_no_reuse);
    CU_add_test(s, "admission by memory, preemption, recompute", test_preempt);
    CU_add_test(s, "prefix reuse from a running request", test_prefix_reuse);
    CU_add_test(s, "the cache of finished prefixes: park, share, evict", test_prefix_cache);
    CU_add_test(s, "prefix holders: more prefixes than slots, by block hash, LRU",
                test_prefix_holders);
    CU_add_test(s, "prefix holder evicted before its move went out: no page kept on a stage",
                test_prefix_evict_unsent);
    CU_add_test(s, "admission: the share of rows kept, the margin", test_keep_estimate);
    CU_add_test(s, "concurrent submits", test_threads);
    CU_add_test(s, "rewind after a restart", test_rewind);
    CU_add_test(s, "decode groups", test_decode_groups);
    CU_add_test(s, "chunked prefill under the token budget", test_prefill_budget);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    return fails != 0;
}
