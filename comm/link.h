/* comm/link.h — non-blocking MPI links between stages, byte accounting, the fatal macro.
 *
 * comm_links owns a fixed pool of send buffers (sized at init: no allocation while running).
 * comm_links_acquire hands out a free buffer (testing outstanding sends, and waiting for the
 * oldest when all are in flight); comm_links_send MPI_Isends it and counts, per destination,
 * exactly the bytes handed to MPI: header bytes (length prefix + protobuf header) and payload.
 * comm_links_progress tests outstanding sends (call it between layers so TCP moves along).
 * comm_links_wait_recv waits for a posted receive while progressing sends; it gives up after
 * `timeout_s` seconds with a message naming the peer (so a dead peer cannot hang a rank).
 *
 * Errors: MPI errors are returned (the communicator gets MPI_ERRORS_RETURN) and turned into
 * one line; fatal conditions go through COMM_FATAL, which prints
 * "file:line rank N: message" on stderr and MPI_Aborts the whole job.
 */
#ifndef COMM_LINK_H
#define COMM_LINK_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t packets;
    uint64_t header_bytes;
    uint64_t payload_bytes;
    uint64_t rows;
} comm_link_stats;

typedef struct comm_links comm_links;

/* n_dest: number of possible destinations (ranks); buf_bytes: size of each send buffer;
 * n_bufs: how many sends may be in flight at once. */
comm_links *comm_links_init(MPI_Comm comm, int n_dest, size_t buf_bytes, int n_bufs,
                            double timeout_s);
void comm_links_free(comm_links *l);

uint8_t *comm_links_acquire(comm_links *l, size_t *cap);
/* Send buf[0..len) (a buffer from acquire) to dest with tag; account hdr/payload/rows. */
void comm_links_send(comm_links *l, uint8_t *buf, size_t len, int dest, int tag, size_t hdr_bytes,
                     size_t payload_bytes, int rows);
void comm_links_progress(comm_links *l);
/* Wait for every outstanding send. */
void comm_links_drain(comm_links *l);

/* Wait for receive `req`, progressing sends meanwhile. Returns the received byte count.
 * `what` names the awaited packet for the timeout message. */
size_t comm_links_wait_recv(comm_links *l, MPI_Request *req, int peer, const char *what);

const comm_link_stats *comm_links_stats(const comm_links *l, int dest);
double comm_links_wait_seconds(const comm_links *l); /* time blocked in acquire / wait_recv */

/* ---- start-up -------------------------------------------------------------------------------- */
/* Collective: every rank says whether its start-up failed; returns the lowest failing rank,
 * or -1 when none failed. Every rank gets the same answer, so either all go on or all stop
 * (no rank runs on alone into a collective its peers never join). */
int comm_first_failed(MPI_Comm comm, int failed);

/* ---- fatal errors ---------------------------------------------------------------------------- */
void comm_fatal_at(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4), noreturn));
#define COMM_FATAL(...) comm_fatal_at(__FILE__, __LINE__, __VA_ARGS__)

#endif
