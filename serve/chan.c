/* serve/chan.c — frames between the front and the job's rank 0 (see chan.h). */
#include "serve/chan.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

typedef struct {
    uint32_t type, len;
} chan_hdr;

int chan_send(int fd, uint32_t type, const void *a, size_t na, const void *b, size_t nb)
{
    chan_hdr h = {type, (uint32_t)(na + nb)};
    struct iovec iov[3] = {{&h, sizeof h}, {(void *)a, na}, {(void *)b, nb}};
    int k = 0;
    size_t left = sizeof h + na + nb;
    struct msghdr m = {.msg_iov = iov, .msg_iovlen = 3};
    while (left > 0) {
        ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                usleep(1000); /* a full socket buffer: the peer reads soon */
                continue;
            }
            return -1;
        }
        left -= (size_t)w;
        /* skip what was written */
        while (w > 0 && k < 3) {
            if ((size_t)w >= m.msg_iov[0].iov_len) {
                w -= (ssize_t)m.msg_iov[0].iov_len;
                m.msg_iov++;
                m.msg_iovlen--;
                k++;
            } else {
                m.msg_iov[0].iov_base = (char *)m.msg_iov[0].iov_base + w;
                m.msg_iov[0].iov_len -= (size_t)w;
                w = 0;
            }
        }
    }
    return 0;
}

void chan_reader_free(chan_reader *r)
{
    free(r->buf);
    memset(r, 0, sizeof *r);
}

int chan_read(chan_reader *r, int fd)
{
    for (;;) {
        if (r->off > 0 && r->off == r->n) r->off = r->n = 0;
        if (r->n == r->cap) {
            if (r->off > 0) { /* move the unconsumed tail to the front */
                memmove(r->buf, r->buf + r->off, r->n - r->off);
                r->n -= r->off;
                r->off = 0;
            } else {
                size_t cap = r->cap ? r->cap * 2 : 65536;
                if (cap > CHAN_MAX_FRAME + 2 * sizeof(chan_hdr)) return -1;
                uint8_t *nb = realloc(r->buf, cap);
                if (!nb) return -1;
                r->buf = nb;
                r->cap = cap;
            }
        }
        ssize_t k = recv(fd, r->buf + r->n, r->cap - r->n, MSG_DONTWAIT);
        if (k > 0) {
            r->n += (size_t)k;
            continue;
        }
        if (k == 0) return -1;
        if (errno == EINTR) continue;
        return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
    }
}

int chan_next(chan_reader *r, uint32_t *type, const uint8_t **payload, uint32_t *len)
{
    size_t have = r->n - r->off;
    if (have < sizeof(chan_hdr)) return 0;
    chan_hdr h;
    memcpy(&h, r->buf + r->off, sizeof h);
    if (h.len > CHAN_MAX_FRAME || h.type < CHAN_HELLO || h.type > CHAN_PROGRESS) return -1;
    if (have < sizeof h + h.len) return 0;
    *type = h.type;
    *len = h.len;
    *payload = r->buf + r->off + sizeof h;
    r->off += sizeof h + h.len;
    return 1;
}

/* The row columns of STAGE_BATCH_ROWS but tag (the scheduler's own), column by column, then
 * the releases, then the prefix shares (triples). */
#define COL_BYTES(T, name, def, what) +sizeof(T)
#define ROW_BYTES (0 STAGE_BATCH_ROWS(COL_BYTES) - sizeof(uint64_t))

size_t chan_mb_size(int rows, int releases, int shares)
{
    return 3 * sizeof(int32_t) + (size_t)rows * ROW_BYTES +
           ((size_t)releases + 3 * (size_t)shares) * sizeof(int32_t);
}

size_t chan_mb_pack(const stage_batch *mb, uint8_t *out)
{
    uint8_t *o = out;
    int32_t head[3] = {mb->n, mb->n_release, mb->n_share};
    memcpy(o, head, sizeof head);
    o += sizeof head;
#define PUT(T, name, def, what)                                                                    \
    if (strcmp(#name, "tag")) {                                                                    \
        memcpy(o, mb->name, (size_t)mb->n * sizeof(T));                                            \
        o += (size_t)mb->n * sizeof(T);                                                            \
    }
    STAGE_BATCH_ROWS(PUT)
#undef PUT
    memcpy(o, mb->release, (size_t)mb->n_release * sizeof *mb->release);
    o += (size_t)mb->n_release * sizeof *mb->release;
    memcpy(o, mb->share, (size_t)mb->n_share * 3 * sizeof *mb->share);
    o += (size_t)mb->n_share * 3 * sizeof *mb->share;
    return (size_t)(o - out);
}

int chan_mb_unpack(const uint8_t *p, size_t len, stage_batch *mb)
{
    int32_t head[3];
    if (len < sizeof head) return -1;
    memcpy(head, p, sizeof head);
    p += sizeof head;
    if (head[0] < 0 || head[0] > mb->cap || head[1] < 0 || head[1] > STAGE_MAX_RELEASE ||
        head[2] < 0 || head[2] > STAGE_MAX_SHARE || len != chan_mb_size(head[0], head[1], head[2]))
        return -1;
    mb->n = head[0];
    mb->n_release = head[1];
    mb->n_share = head[2];
#define GET(T, name, def, what)                                                                    \
    if (strcmp(#name, "tag")) {                                                                    \
        memcpy(mb->name, p, (size_t)mb->n * sizeof(T));                                            \
        p += (size_t)mb->n * sizeof(T);                                                            \
    }
    STAGE_BATCH_ROWS(GET)
#undef GET
    memcpy(mb->release, p, (size_t)mb->n_release * sizeof *mb->release);
    p += (size_t)mb->n_release * sizeof *mb->release;
    memcpy(mb->share, p, (size_t)mb->n_share * 3 * sizeof *mb->share);
    for (int i = 0; i < mb->n; i++) mb->tag[i] = 0;
    return 0;
}
