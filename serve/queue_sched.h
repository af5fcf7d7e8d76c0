/* serve/queue_sched.h — the server queue (serve/queue.h) as a pipeline scheduler (engine/sched.h).
 *
 * Used by serve_loop_run (serve/loop.h) on rank 0, and by tests that drive the scheduler by
 * hand. The policy, per micro-batch of at most `micro_batch` rows:
 *   1. cancelled requests end (on_done CANCELLED) and free their slot at once; while the
 *      running requests no longer fit the stages' KV pools (the pools' reports, .kv) parked
 *      prefixes are evicted, then the newest is preempted; queued requests take free slots
 *      in arrival order when the pools can hold them too (admission by memory, docs/SPEC.md
 *      §11), parked prefixes evicted least recently used first for a slot or for pages;
 *   2. decode first (inter-token latency): the running requests whose prompt is in are
 *      split into G decode groups (G = srvq_sched_groups, at most one per such request, at
 *      least enough for R rows a group), as generate's groups are (engine/batch.h): a
 *      request joins the smallest group when its first decode row is ready and stays there;
 *      a micro-batch carries the rows of one group none of whose rows are in flight, taken
 *      in turn, at most ceil(n / G) of them (the rest move to a smaller group, so ends and
 *      joins even the groups out). With S stages and G = S, S decode micro-batches are in
 *      flight and no stage waits for the one micro-batch of every row;
 *   3. the rest of the rows: prompt chunks of running requests in arrival order (a request's
 *      prompt may span several micro-batches; whole_prompts: never cut, for mindskip
 *      sequence-granularity models, then a micro-batch may hold up to max_rows rows);
 *   4. slot releases not yet announced ride along (alone, in a micro-batch of no rows, when
 *      no row is ready).
 * A token STAGE_TOKEN_KV_LOST (a stage ran out of pages under the request) preempts it. A
 * preempted request waits at the head of the queue and, readmitted, prefills its prompt and
 * the tokens it made so far, then goes on: its tokens are those it would have made.
 * A request ends when it samples EOS (STOP; the EOS is not passed to on_token and not
 * counted), reaches max_tokens, or its slot's context is full (LENGTH); with prefix reuse on
 * it then parks its slot (the cache of finished prefixes, serve/queue.h). Sampling of request r:
 * stage_rng_seed_draw(r.seed, 0, j) for its new token j — the same seed gives the same
 * tokens whatever else runs. Callbacks run after the queue's lock is released.
 */
#ifndef SERVE_QUEUE_SCHED_H
#define SERVE_QUEUE_SCHED_H

#include "engine/sched.h"
#include "serve/queue.h"

/* Before the first next(): rows per micro-batch, whether prompts must stay whole, and the
 * most rows a micro-batch may have (>= micro_batch; whole_prompts: >= ctx). 0 or -1 (OOM). */
int srvq_sched_config(srvq *q, int micro_batch, int whole_prompts, int max_rows);
/* Decode groups (default 1): with S pipeline stages, S groups keep S decode micro-batches in
 * flight (policy step 2). Any time; values < 1 count as 1. */
void srvq_sched_groups(srvq *q, int groups);
extern const engine_sched_ops srvq_sched_ops;
/* Prefix reuse (srvq_set_prefix_reuse): shares of SRVQ_PREFIX_BLOCK positions at a time. */
#define SRVQ_PREFIX_BLOCK 16
/* The pipeline failed: every queued and running request ends with ERROR and msg; the queue
 * closes. */
void srvq_fail_all(srvq *q, const char *msg);
/* The pipeline was restarted with empty KV caches (docs/SERVE.md, the front): micro-batches
 * in flight are forgotten, and every running request prefills again its prompt plus the
 * tokens it has generated but the last (without sampling), then goes on decoding from its
 * last token with its own seed and step, so it continues exactly where it was. */
void srvq_rewind(srvq *q);
/* The front found the job stalled (serve/front.h): counted in srvq_stats.stalls, with the
 * stage, rank (-1: none named) and host ("" unknown) it named last. */
void srvq_note_stall(srvq *q, int stage, int rank, const char *host);
/* fn(arg) is called (with the queue's lock held: it must only signal, e.g. write to a pipe)
 * whenever there may be new work: a submit, a cancel, a close, a rewind. NULL: none. */
void srvq_set_notify(srvq *q, void (*fn)(void *arg), void *arg);

#endif
