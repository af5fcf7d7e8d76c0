/* serve/queue.h — the server's scheduler: requests in, tokens out.
 *
 * The HTTP layer (serve/) talks to the pipeline only through this queue. HTTP threads call
 * srvq_submit / srvq_cancel / srvq_get_stats at any time (thread-safe); the pipeline loop on
 * rank 0 pulls admitted work from it between micro-batches (continuous batching: a request
 * takes a KV slot when one is free, its prompt is prefilled in chunks mixed with decode
 * steps, and its slot is released the moment it finishes or is cancelled).
 *
 * Callbacks run on the pipeline thread, in token order per request; they must not block
 * (copy the token into the connection's buffer and resume the connection); they may call
 * srvq_cancel / srvq_get_stats (the queue's lock is not held). on_done is called exactly once
 * per accepted request, last; after it returns the queue forgets `arg`. The EOS that stops a
 * request (SRVQ_FINISH_STOP) is not passed to on_token and not counted in n_generated.
 * Sampling: new token j of a request draws from stage_rng_seed_draw(seed, 0, j), so a seed
 * reproduces its tokens whatever else is running.
 *
 * Errors: srvq_submit returns a negative code with one line in err (see below); nothing else
 * fails once the queue exists.
 */
#ifndef SERVE_QUEUE_H
#define SERVE_QUEUE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/sched.h"

typedef enum {
    SRVQ_FINISH_STOP = 0,  /* EOS sampled (or the HTTP layer matched a stop string and cancelled) */
    SRVQ_FINISH_LENGTH,    /* max_tokens reached, or the slot's context is full */
    SRVQ_FINISH_CANCELLED, /* srvq_cancel (client gone) */
    SRVQ_FINISH_ERROR,     /* the pipeline failed; msg says why */
} srvq_finish;

typedef struct {
    const int32_t *prompt; /* [n_prompt] token ids, copied by srvq_submit */
    int n_prompt;
    int max_tokens;    /* new tokens at most (>= 1) */
    float temperature; /* <= 0: greedy */
    float top_p;       /* (0, 1] */
    uint64_t seed;     /* sampling stream of this request */
    int ignore_eos;    /* keep generating past EOS (benchmarks) */
    void (*on_token)(void *arg, int32_t token);
    void (*on_done)(void *arg, srvq_finish why, int n_prompt, int n_generated, const char *msg);
    void *arg;
} srvq_request;

enum {
    SRVQ_ERR_FULL = -1,     /* queue full: HTTP 503 + Retry-After */
    SRVQ_ERR_TOO_LONG = -2, /* n_prompt + 1 > ctx (no room for one new token): HTTP 400 */
    SRVQ_ERR_BAD = -3,      /* a bad field (empty prompt, token id out of range, ...): HTTP 400 */
    SRVQ_ERR_CLOSED = -4,   /* shutting down: HTTP 503 */
};

typedef struct srvq srvq;

/* slots: sequences decoded at once; ctx: positions per slot; queue_cap: requests waiting
 * for a slot at most; vocab: valid ids are [0, vocab); eos: -1 none. */
srvq *srvq_new(int slots, int ctx, int queue_cap, int vocab, int eos);
void srvq_free(srvq *q);

/* Returns a request id >= 0, or a SRVQ_ERR_* code with a message in err. */
long srvq_submit(srvq *q, const srvq_request *r, char *err, size_t errlen);
/* Cancel request `id` (no-op when already done); its on_done(CANCELLED) follows. */
void srvq_cancel(srvq *q, long id);
/* Stop accepting (submit answers SRVQ_ERR_CLOSED); running and queued requests go on.
 * srvq_idle() is 1 once nothing is queued or running. */
void srvq_close(srvq *q);
int srvq_idle(srvq *q);

#define SRVQ_MAX_LINKS 64
typedef struct {
    long queued, running; /* requests waiting / holding a slot */
    int slots, slots_used;
    uint64_t requests_total; /* accepted by srvq_submit */
    uint64_t prompt_tokens, generated_tokens;
    uint64_t preemptions; /* sequences whose KV was given up and recomputed (docs/SPEC.md §11) */
    uint64_t prefix_hits, prefix_tokens; /* admissions that reused a prefix; positions */
    uint64_t prefix_cached_hits;         /* of the hits, from a finished request's parked slot */
    uint64_t prefix_evictions;           /* parked slots evicted (their pages given back) */
    int cached_slots;                    /* slots parked now (the cache of finished prefixes) */
    /* srvq_rewind: pipeline restarts, requests replayed, positions prefilled again */
    uint64_t restarts, replayed_requests, replayed_tokens;
    /* srvq_note_stall: stalls the front detected; the last one's stage, rank (-1: none
     * named), host ("": unknown) */
    uint64_t stalls;
    int stall_stage, stall_rank;
    char stall_host[64];
    /* micro-batches issued; of them those with decode rows, their decode rows, and summed
     * over those the decode micro-batches in flight once it was issued (itself included):
     * decode_in_flight / decode_micro_batches is the pipeline depth decode ran at */
    uint64_t micro_batches, decode_micro_batches, decode_rows, decode_in_flight;
    /* pipeline links, refreshed by the pipeline at least once a second */
    int n_links;
    struct {
        int from, to;
        uint64_t bytes;       /* header + payload handed to MPI on this link */
        uint64_t dense_bytes; /* what a dense pipeline would have sent (chain links) */
    } link[SRVQ_MAX_LINKS];
    /* KV page pool of each stage (docs/SPEC.md §11), refreshed with the links */
    int n_kv;
    engine_kv_report kv[SRVQ_MAX_LINKS];
} srvq_stats;
void srvq_get_stats(srvq *q, srvq_stats *out);

/* Prefix reuse (docs/SPEC.md §11; on unless turned off here, never with whole prompts:
 * sequence-level MindSkip decides on the whole prompt): a request admitted while a running
 * one, or a finished one's parked slot, holds the same first k x 16 positions starts from a
 * share of their KV pages (the stages' stage_state_slot_share) and computes only the rest.
 * A request that ends (stop / length) parks its slot: its pages stay on the stages until
 * evicted, least recently used first, when slots or pages are needed (before any
 * preemption). Turning reuse off evicts every parked slot. (Implemented with the scheduler,
 * serve/queue_sched.c; thread-safe.) */
void srvq_set_prefix_reuse(srvq *q, int on);
/* Evicts every parked slot: their pages go back with the next micro-batch. Thread-safe. */
void srvq_prefix_cache_clear(srvq *q);

#endif
