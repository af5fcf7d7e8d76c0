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
    if (h.len > CHAN_MAX_FRAME || h.type < CHAN_HELLO || h.type > CHAN_ERROR) return -1;
    if (have < sizeof h + h.len) return 0;
    *type = h.type;
    *len = h.len;
    *payload = r->buf + r->off + sizeof h;
    r->off += sizeof h + h.len;
    return 1;
}

/* Row fields, in this order: slot pos token (i32) flags (u8) temperature top_p (f32)
 * seed seq (u64) step (u32) target (i32); after the rows the releases (i32). */
#define ROW_BYTES (3 * 4 + 1 + 2 * 4 + 2 * 8 + 4 + 4)

size_t chan_mb_size(int rows, int releases)
{
    return 2 * sizeof(int32_t) + (size_t)rows * ROW_BYTES + (size_t)releases * sizeof(int32_t);
}

#define PUT(src, n)                                                                                \
    do {                                                                                           \
        memcpy(o, (src), (n));                                                                     \
        o += (n);                                                                                  \
    } while (0)

size_t chan_mb_pack(const engine_mb *mb, uint8_t *out)
{
    uint8_t *o = out;
    int32_t head[2] = {mb->n, mb->n_release};
    size_t n = (size_t)mb->n;
    PUT(head, sizeof head);
    PUT(mb->slot, n * 4);
    PUT(mb->pos, n * 4);
    PUT(mb->token, n * 4);
    PUT(mb->flags, n);
    PUT(mb->temperature, n * 4);
    PUT(mb->top_p, n * 4);
    PUT(mb->seed, n * 8);
    PUT(mb->seq, n * 8);
    PUT(mb->step, n * 4);
    PUT(mb->target, n * 4);
    PUT(mb->release, (size_t)mb->n_release * 4);
    return (size_t)(o - out);
}

#define GET(dst, n)                                                                                \
    do {                                                                                           \
        memcpy((dst), p, (n));                                                                     \
        p += (n);                                                                                  \
    } while (0)

int chan_mb_unpack(const uint8_t *p, size_t len, engine_mb *mb)
{
    int32_t head[2];
    if (len < sizeof head) return -1;
    GET(head, sizeof head);
    if (head[0] < 0 || head[0] > mb->cap || head[1] < 0 || head[1] > COMM_MAX_RELEASE ||
        len != chan_mb_size(head[0], head[1]))
        return -1;
    size_t n = (size_t)head[0];
    mb->n = head[0];
    mb->n_release = head[1];
    GET(mb->slot, n * 4);
    GET(mb->pos, n * 4);
    GET(mb->token, n * 4);
    GET(mb->flags, n);
    GET(mb->temperature, n * 4);
    GET(mb->top_p, n * 4);
    GET(mb->seed, n * 8);
    GET(mb->seq, n * 8);
    GET(mb->step, n * 4);
    GET(mb->target, n * 4);
    GET(mb->release, (size_t)mb->n_release * 4);
    for (size_t i = 0; i < n; i++) mb->tag[i] = 0;
    return 0;
}
