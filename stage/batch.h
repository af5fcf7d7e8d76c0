/* stage/batch.h — the one row descriptor of a micro-batch (docs/SPEC.md §4): what the scheduler
 * fills, the loop carries, the packets put on the wire (comm/comm.h) and the stage computes
 * on (stage/stage.h). One type, one flag set; nothing copies it field by field.
 *
 * A micro-batch is n rows; row i is (slot, pos, token, flags) for the layers plus the
 * sampling / scoring state the head reads on NEED_LOGITS rows (temperature, top_p, seed,
 * seq, step, target), so the head keeps no table of sequences. The rows are columns of
 * STAGE_BATCH_ROWS (struct of arrays, each [cap]); the list is the single declaration of
 * them: the struct, stage_batch_init / _free / _copy are generated from it.
 *
 * Ownership: stage_batch_init allocates every array for cap rows (cap > 0),
 * STAGE_MAX_RELEASE releases and STAGE_MAX_SHARE shares; stage_batch_free frees them. A stage_batch may also be a view
 * (cap 0) whose arrays point at someone else's memory (comm_unpack: into its arena, read
 * only). Errors: init returns -1 on out of memory (everything freed). Threads: none shared.
 */
#ifndef STAGE_BATCH_H
#define STAGE_BATCH_H

#include <stddef.h>
#include <stdint.h>

/* Per-row flags: the bits of the wire descriptor's flags byte (proto/modpipe.proto). */
#define STAGE_ROW_NEED_LOGITS 1u /* the head must compute this row's logits */
#define STAGE_ROW_PROMPT 2u      /* a prompt (prefill / eval) row, not a decode row */
#define STAGE_ROW_SAMPLE 4u      /* the head samples a token for it (needs NEED_LOGITS) */
#define STAGE_ROW_KV_LOST 8u     /* its sequence's KV was lost on an earlier stage (stage.h) */
#define STAGE_ROW_ALL                                                                              \
    (STAGE_ROW_NEED_LOGITS | STAGE_ROW_PROMPT | STAGE_ROW_SAMPLE | STAGE_ROW_KV_LOST)

/* The head's answer for a SAMPLE row of a STAGE_ROW_KV_LOST sequence: no token (stage.h soft
 * mode; the scheduler recomputes the sequence). The one negative id a TOKENS packet carries. */
#define STAGE_TOKEN_KV_LOST (-1)

/* Most slot releases one micro-batch may carry (the scheduler sends the rest in later ones). */
#define STAGE_MAX_RELEASE 256
/* Most prefix shares one micro-batch may carry (stage_state_slot_share, docs/SPEC.md §11). */
#define STAGE_MAX_SHARE 64

/* X(type, name, default, what): the row columns, each type name[cap]. `default` is the value
 * of a row nobody set (stage_batch_add; the wire leaves an all-default column off). */
#define STAGE_BATCH_ROWS(X)                                                                        \
    X(int32_t, slot, 0, "KV slot of the row's sequence")                                           \
    X(int32_t, pos, 0, "absolute position")                                                        \
    X(int32_t, token, 0, "input token id")                                                         \
    X(uint8_t, flags, 0, "STAGE_ROW_* bits")                                                       \
    X(float, temperature, 0.0f, "<= 0: greedy")                                                    \
    X(float, top_p, 1.0f, "(0, 1] on SAMPLE rows")                                                 \
    X(uint64_t, seed, 0, "sampling seed")                                                          \
    X(uint64_t, seq, 0, "sequence id: the sampling stream and the --dump-logits row")              \
    X(uint32_t, step, 0, "draw index within the sequence (generate: index of the new token)")      \
    X(int32_t, target, -1, "token whose NLL the head adds up, -1: none")                           \
    X(uint64_t, tag, 0, "the scheduler's own row tag (never sent; stage_batch_add: seq)")

typedef struct {
    int n;                                             /* rows (0 .. cap) */
    int cap;                                           /* rows allocated; 0: a view */
    uint64_t id;                                       /* micro-batch number (set by the loop) */
#define STAGE_BATCH_FIELD(T, name, def, what) T *name; /* [cap] what */
    STAGE_BATCH_ROWS(STAGE_BATCH_FIELD)
#undef STAGE_BATCH_FIELD
    int n_release;
    int32_t *release; /* [STAGE_MAX_RELEASE] slots released before these rows */
    int n_share;      /* triples in share */
    int32_t *share;   /* [STAGE_MAX_SHARE][3] (src, dst, pos): after the releases, before the
                       * rows, slot dst starts as src's positions < pos */
} stage_batch;

int stage_batch_init(stage_batch *b, int cap); /* 0 or -1 (out of memory) */
void stage_batch_free(stage_batch *b);
/* Rows, id and releases of src into dst (dst->cap >= src->n; src may be a view whose tag is
 * NULL: dst's tags are then left as they are). */
void stage_batch_copy(stage_batch *dst, const stage_batch *src);
/* Append a row with default sampling state (greedy, top_p 1, seed 0, target -1, tag seq);
 * returns its index. The caller checks n < cap. */
int stage_batch_add(stage_batch *b, int32_t slot, int32_t pos, int32_t token, uint8_t flags,
                    uint64_t seq, uint32_t step);

#endif
