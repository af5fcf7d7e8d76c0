/* comm/link.c — see link.h. */
#include "comm/link.h"

#include "base/backoff.h"
#include "base/clock.h"
#include "stage/kernels.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct comm_links {
    MPI_Comm comm;
    int n_dest;
    size_t buf_bytes;
    int n_bufs;
    double timeout_s;
    uint8_t *pool;    /* [n_bufs][buf_bytes] */
    MPI_Request *req; /* [n_bufs], MPI_REQUEST_NULL when free */
    int *busy;        /* [n_bufs] acquired or in flight */
    uint64_t *seq;    /* [n_bufs] send order, to wait for the oldest */
    uint64_t next_seq;
    comm_link_stats *stats; /* [n_dest] */
    double wait_s;
};

void comm_fatal_at(const char *file, int line, const char *fmt, ...)
{
    int rank = -1, inited = 0;
    MPI_Initialized(&inited);
    if (inited) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s:%d rank %d: %s\n", file, line, rank, msg);
    fflush(stderr);
    if (inited) MPI_Abort(MPI_COMM_WORLD, 1);
    abort(); /* not reached under MPI */
}

static void check(int rc, const char *what)
{
    if (rc == MPI_SUCCESS) return;
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    MPI_Error_string(rc, s, &n);
    COMM_FATAL("MPI error in %s: %s", what, s);
}

comm_links *comm_links_init(MPI_Comm comm, int n_dest, size_t buf_bytes, int n_bufs,
                            double timeout_s)
{
    comm_links *l = calloc(1, sizeof *l);
    if (!l) return NULL;
    l->comm = comm;
    l->n_dest = n_dest;
    l->buf_bytes = buf_bytes;
    l->n_bufs = n_bufs < 1 ? 1 : n_bufs;
    l->timeout_s = timeout_s;
    l->pool = malloc((size_t)l->n_bufs * buf_bytes);
    l->req = malloc((size_t)l->n_bufs * sizeof *l->req);
    l->busy = calloc((size_t)l->n_bufs, sizeof *l->busy);
    l->seq = calloc((size_t)l->n_bufs, sizeof *l->seq);
    l->stats = calloc((size_t)n_dest, sizeof *l->stats);
    if (!l->pool || !l->req || !l->busy || !l->seq || !l->stats) {
        comm_links_free(l);
        return NULL;
    }
    for (int i = 0; i < l->n_bufs; i++) l->req[i] = MPI_REQUEST_NULL;
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    return l;
}

void comm_links_free(comm_links *l)
{
    if (!l) return;
    free(l->pool);
    free(l->req);
    free(l->busy);
    free(l->seq);
    free(l->stats);
    free(l);
}

void comm_links_progress(comm_links *l)
{
    for (int i = 0; i < l->n_bufs; i++) {
        if (l->req[i] == MPI_REQUEST_NULL) continue;
        int done = 0;
        check(MPI_Test(&l->req[i], &done, MPI_STATUS_IGNORE), "MPI_Test (send)");
        if (done) l->busy[i] = 0;
    }
}

uint8_t *comm_links_acquire(comm_links *l, size_t *cap)
{
    *cap = l->buf_bytes;
    for (;;) {
        comm_links_progress(l);
        for (int i = 0; i < l->n_bufs; i++) {
            if (!l->busy[i]) {
                l->busy[i] = 1;
                return l->pool + (size_t)i * l->buf_bytes;
            }
        }
        /* All in flight: wait for the oldest send (bounded like a receive). */
        int old = -1;
        for (int i = 0; i < l->n_bufs; i++)
            if (l->req[i] != MPI_REQUEST_NULL && (old < 0 || l->seq[i] < l->seq[old])) old = i;
        if (old < 0) COMM_FATAL("send buffer pool exhausted by buffers never sent");
        double t0 = base_now_s();
        base_backoff bo;
        base_backoff_init(&bo, BASE_BACKOFF_FIXED, 0, 20000);
        for (;;) {
            int done = 0;
            check(MPI_Test(&l->req[old], &done, MPI_STATUS_IGNORE), "MPI_Test (send)");
            if (done) {
                l->busy[old] = 0;
                break;
            }
            if (base_now_s() - t0 > l->timeout_s)
                COMM_FATAL(
                    "a send has not completed for %.0f s: the receiving stage is gone or stuck",
                    l->timeout_s);
            base_backoff_wait(&bo);
        }
        l->wait_s += base_now_s() - t0;
    }
}

void comm_links_send(comm_links *l, uint8_t *buf, size_t len, int dest, int tag, size_t hdr_bytes,
                     size_t payload_bytes, int rows)
{
    size_t i = (size_t)(buf - l->pool) / l->buf_bytes;
    if (buf < l->pool || i >= (size_t)l->n_bufs || len > l->buf_bytes)
        COMM_FATAL("comm_links_send: not a pool buffer or too long (%zu bytes)", len);
    check(MPI_Isend(buf, (int)len, MPI_BYTE, dest, tag, l->comm, &l->req[i]), "MPI_Isend");
    l->seq[i] = l->next_seq++;
    comm_link_stats *st = &l->stats[dest];
    st->packets++;
    st->header_bytes += hdr_bytes;
    st->payload_bytes += payload_bytes;
    st->rows += (uint64_t)rows;
}

void comm_links_drain(comm_links *l)
{
    double t0 = base_now_s();
    base_backoff bo;
    base_backoff_init(&bo, BASE_BACKOFF_FIXED, 0, 20000);
    for (;;) {
        comm_links_progress(l);
        int left = 0;
        for (int i = 0; i < l->n_bufs; i++) left += l->req[i] != MPI_REQUEST_NULL;
        if (!left) break;
        if (base_now_s() - t0 > l->timeout_s)
            COMM_FATAL("%d sends have not completed for %.0f s: a receiving stage is gone or stuck",
                       left, l->timeout_s);
        base_backoff_wait(&bo);
    }
    l->wait_s += base_now_s() - t0;
}

size_t comm_links_wait_recv(comm_links *l, MPI_Request *req, int peer, const char *what)
{
    double t0 = base_now_s();
    MPI_Status st;
    base_backoff bo; /* a short spin first: latency matters; then yield the core */
    base_backoff_init(&bo, BASE_BACKOFF_FIXED, 65, 20000);
    for (;;) {
        int done = 0;
        check(MPI_Test(req, &done, &st), "MPI_Test (receive)");
        if (done) break;
        comm_links_progress(l);
        if (base_now_s() - t0 > l->timeout_s)
            COMM_FATAL("no %s from rank %d for %.0f s: that rank is gone or stuck", what, peer,
                       l->timeout_s);
        base_backoff_wait(&bo);
    }
    l->wait_s += base_now_s() - t0;
    int n = 0;
    MPI_Get_count(&st, MPI_BYTE, &n);
    return (size_t)n;
}

const comm_link_stats *comm_links_stats(const comm_links *l, int dest) { return &l->stats[dest]; }
double comm_links_wait_seconds(const comm_links *l) { return l->wait_s; }

int comm_first_failed(MPI_Comm comm, int failed)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    int bad = failed ? rank : size, first = size;
    MPI_Allreduce(&bad, &first, 1, MPI_INT, MPI_MIN, comm);
    return first < size ? first : -1;
}
