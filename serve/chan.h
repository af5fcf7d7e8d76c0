/* serve/chan.h — the local channel between `modpipe serve`'s front and its MPI job's rank 0
 * (docs/SERVE.md, "The front outside the job").
 *
 * The front (serve/front.h) owns the HTTP server, the request queue and every request's
 * state; it schedules the micro-batches itself (the queue is its scheduler) and sends them
 * to the job's rank 0, which runs the pipeline loop with a scheduler that only relays
 * (serve/remote.h): rows in, sampled tokens back. A frame is a header {type, payload bytes}
 * and the payload, in the host's byte order (both ends run on one host: a Unix socket).
 *
 *   job -> front: HELLO {slots, ctx, vocab, ranks, pid} once connected; READY once every
 *                 rank has loaded its stage; RESULT {n, tok[n]} per micro-batch, in issue
 *                 order; LINKS {n, {from, to, bytes, dense_bytes}[n]}; BEAT (at least every
 *                 0.25 s while the loop runs: the front's stall detector); ERROR {text};
 *                 KV {n, engine_kv_report[n]} (the stages' KV page pools, with LINKS);
 *                 RANKS {n, char[n][CHAN_RANK_ID]} once before READY: each rank's host
 *                 ("HOSTNAME ADDR ADDR ...", its interfaces' addresses);
 *                 PROGRESS {n, engine_stage_progress[n]} with LINKS, also while rank 0
 *                 waits for a micro-batch to come back (the front names a stuck rank)
 *   front -> job: MB (a stage_batch: rows, sampling state, slot releases); END (drain, exit)
 *
 * chan_reader buffers what a non-blocking socket gives and hands out whole frames. Errors:
 * -1 (a broken or closed socket, a frame that does not parse); no allocation per frame once
 * the buffer has grown to the largest frame. Not thread-safe: one reader, one writer.
 */
#ifndef SERVE_CHAN_H
#define SERVE_CHAN_H

#include <stddef.h>
#include <stdint.h>

#include "engine/sched.h"

enum {
    CHAN_HELLO = 1,
    CHAN_READY,
    CHAN_MB,
    CHAN_RESULT,
    CHAN_LINKS,
    CHAN_BEAT,
    CHAN_END,
    CHAN_ERROR,
    CHAN_KV,
    CHAN_RANKS,
    CHAN_PROGRESS,
};

#define CHAN_RANK_ID 256 /* bytes of one rank's host identity in RANKS, NUL-terminated */

#define CHAN_MAX_FRAME (64u << 20) /* a frame larger than this is a protocol error */

typedef struct {
    int32_t slots, ctx, vocab, ranks, pid;
} chan_hello;

/* Writes one frame (blocking; a payload of two parts a[0..na) b[0..nb)). 0 or -1. */
int chan_send(int fd, uint32_t type, const void *a, size_t na, const void *b, size_t nb);

typedef struct {
    uint8_t *buf; /* [cap] bytes received, not yet consumed */
    size_t n, off, cap;
} chan_reader;

void chan_reader_free(chan_reader *r);
/* Reads what fd has now (fd non-blocking). 0, or -1 when the peer closed or the read failed. */
int chan_read(chan_reader *r, int fd);
/* 1 with the next whole frame (payload valid until the next chan_read / chan_next), 0 when
 * none is complete, -1 on a malformed frame. */
int chan_next(chan_reader *r, uint32_t *type, const uint8_t **payload, uint32_t *len);

/* A micro-batch as a CHAN_MB payload: chan_mb_size(rows, releases, shares) bytes, written by
 * chan_mb_pack into out (returns the bytes written); chan_mb_unpack reads one back, -1 when
 * the payload is not one (or has more rows than mb->cap). */
size_t chan_mb_size(int rows, int releases, int shares);
size_t chan_mb_pack(const stage_batch *mb, uint8_t *out);
int chan_mb_unpack(const uint8_t *p, size_t n, stage_batch *mb);

#endif
