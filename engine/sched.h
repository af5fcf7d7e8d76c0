/* engine/sched.h — what the pipeline loop asks a scheduler for.
 *
 * The loop (engine/pipeline.h: engine_loop_open / _step / _close) owns the ranks, the
 * stages and the links; a scheduler owns the work. On rank 0, between micro-batches, the loop
 * calls the scheduler's ops (like an event loop calls its handlers):
 *
 *   next(self, mb)      fill mb with the next micro-batch (1), or say nothing is ready (0);
 *                       a micro-batch of no rows carrying slot releases or prefix
 *                       shares only is fine
 *   done(self, mb, tok) the micro-batch came back from the head: tok[i] is the token sampled
 *                       for row i when mb->flags[i] has STAGE_ROW_SAMPLE, or
 *                       STAGE_TOKEN_KV_LOST when a stage's KV pool ran out under the row's
 *                       sequence (servers only, stage.h soft mode: the sequence's KV is gone
 *                       on that stage; recompute it from position 0). Called once per
 *                       issued micro-batch, in issue order, with the rows as issued.
 *   finished(self)      1 once nothing more will ever come (the loop then ends); checked
 *                       only when nothing is in flight
 *   wait(self, s)       nothing in flight and nothing ready: block up to s seconds for new
 *                       work (a condvar); NULL: the loop does not wait
 *   ready(self)         may be NULL: 1 when new work may have come since next last said 0
 *                       (bytes from an outside scheduler, e.g. the front's channel), so the
 *                       loop, waiting for tokens with room for another micro-batch in
 *                       flight, asks next at once instead of after its 1 ms wait; a
 *                       scheduler whose done() queues the next rows itself needs none
 *   links(self, l, n)   per-link byte counters of every rank, at least once a second while
 *                       work runs (NULL: not wanted)
 *
 * All ops run on the loop's thread (rank 0's). A micro-batch (stage_batch, stage/batch.h:
 * the one row descriptor of scheduler, loop, packets and stage) carries everything a stage and
 * the head need: rows (slot, position, input token, flags) plus each row's sampling / scoring
 * state (temperature, top_p, seed, sequence id, step, NLL target) — so the head keeps no
 * table of sequences — and the slots released since the previous micro-batch. Each draw is
 * stage_rng_seed_draw(seed, seq, step): independent of batching and rank count.
 *
 * KV slots: engine_slot_pool is the bookkeeping a scheduler uses on rank 0 (which slot is
 * free; which releases the stages have not been told yet). A slot is reset on every stage by
 * its sequence's position-0 prompt row; a release travels in the next micro-batch's
 * descriptor (at most STAGE_MAX_RELEASE a micro-batch; re-acquiring a slot whose release was
 * not sent yet drops it: the new sequence's reset supersedes it).
 */
#ifndef ENGINE_SCHED_H
#define ENGINE_SCHED_H

#include <stdint.h>

#include "stage/batch.h"

typedef struct {
    int from, to;
    uint64_t bytes;       /* header + payload handed to MPI */
    uint64_t dense_bytes; /* chain links: what a dense pipeline would send; else 0 */
} engine_link_bytes;

/* One stage's KV page pool now (stage_kv_stats, docs/SPEC.md §11), reported with the links. */
typedef struct {
    int stage;
    uint64_t page, kv_layers; /* positions per page; layers holding a KV cache (each pages) */
    uint64_t pages_total, pages_used, pages_peak, page_bytes;
    uint64_t pages_cached; /* of pages_used, held only by parked sequences (prefix cache) */
    /* entries the running sequences hold on every layer, and what they would hold had every
     * layer kept every row: the share of rows kept, both counted at the same moment */
    uint64_t entries_live, positions_live;
    uint64_t bytes_dense; /* a contiguous dense cache for the same sequences */
    uint64_t pages_routed, pages_skip, pages_full; /* by layer kind: mod / mode_staged,
                                                     * mindskip, dense / mode_integrated */
} engine_kv_report;

/* One stage's progress as rank 0 knows it (serve: with the links, every 0.25 s, also while
 * rank 0 waits for a micro-batch to come back), so a supervisor can say which stage holds a
 * stalled pipeline up (engine_stuck_stage). */
typedef struct {
    int stage;
    int rank;         /* the job's rank leading the stage (MPI rank of the caller's comm) */
    uint64_t mb_done; /* micro-batches it finished and handed on, as of its last report
                       * (stage 0: issued) */
    uint64_t mb_want; /* what it must have finished for the oldest micro-batch in flight to
                       * come back (its id + 1); 0: nothing in flight */
    double age_s;     /* seconds since rank 0 last heard from it (stage 0: 0) */
} engine_stage_progress;

/* The stage a stalled pipeline waits for: the first stage in chain order that has not
 * finished the oldest micro-batch in flight. A live stage reports within 0.25 s of finishing
 * one, so after a stall timeout of seconds this is the stopped (or stuck) one. -1: nothing
 * in flight, or every stage finished it (the tokens are on their way). */
int engine_stuck_stage(const engine_stage_progress *p, int n);

typedef struct {
    int (*next)(void *self, stage_batch *mb);
    void (*done)(void *self, const stage_batch *mb, const int32_t *tok);
    int (*finished)(void *self);
    void (*wait)(void *self, double timeout_s);
    int (*ready)(void *self); /* may be NULL */
    void (*links)(void *self, const engine_link_bytes *l, int n);
    void (*kv)(void *self, const engine_kv_report *k, int n_stages); /* with links; may be NULL */
    void (*progress)(void *self, const engine_stage_progress *p, int n_stages); /* may be NULL */
} engine_sched_ops;

/* ---- slot pool (rank 0 bookkeeping) ---------------------------------------------------------- */
typedef struct {
    int n;          /* slots */
    int *free_list; /* [n] free slots, lowest first out */
    int n_free;
    int32_t *pending; /* [n] released, not yet announced to the stages */
    int n_pending;
} engine_slot_pool;

int engine_slot_pool_init(engine_slot_pool *p, int n); /* 0 or -1 */
void engine_slot_pool_free(engine_slot_pool *p);
int engine_slot_acquire(engine_slot_pool *p); /* a free slot, or -1 */
void engine_slot_release(engine_slot_pool *p, int slot);
/* Move up to STAGE_MAX_RELEASE pending releases into mb->release. */
void engine_slot_announce(engine_slot_pool *p, stage_batch *mb);

#endif
