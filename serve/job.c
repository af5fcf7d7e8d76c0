/* serve/job.c — the job side of the front: rank 0's scheduler relays micro-batches from the
 * front and sampled tokens back (serve/loop.h serve_loop_run_job, frames in serve/chan.h).
 *
 * The front decides everything (admission, chunking, sampling state, slot releases); this
 * scheduler only unpacks what arrives and answers in issue order, so a restarted job is
 * stateless: the front's queue replays what the dead one had. BEAT frames go out at least
 * every BEAT_S seconds while the loop calls us (between micro-batches and while idle), so a
 * stuck rank 0 shows as silence at the front; PROGRESS frames (each stage's micro-batches
 * done, every 0.25 s, also while rank 0 waits for one to come back) and RANKS (each rank's
 * host, once) let it name a stuck rank > 0 and its host.
 */
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "base/clock.h"
#include "serve/chan.h"
#include "serve/loop.h"

#define BEAT_S 0.25

typedef struct {
    int fd;
    chan_reader rd;
    int ended; /* END received, or the front is gone */
    int more;  /* job_next returned a micro-batch with frames possibly left in rd */
    double t_beat;
    int32_t *tok; /* [max_rows] a RESULT's tokens */
    int max_rows;
} job;

static void send_or_end(job *j, uint32_t type, const void *a, size_t na, const void *b, size_t nb)
{
    if (j->ended) return;
    if (chan_send(j->fd, type, a, na, b, nb))
        j->ended = 1;
    else if (type == CHAN_BEAT || type == CHAN_RESULT)
        j->t_beat = base_now_s();
}

static void beat(job *j)
{
    if (base_now_s() - j->t_beat >= BEAT_S) send_or_end(j, CHAN_BEAT, NULL, 0, NULL, 0);
}

static int job_next(void *self, stage_batch *mb)
{
    job *j = self;
    beat(j);
    if (j->ended) return 0;
    if (chan_read(&j->rd, j->fd)) {
        j->ended = 1; /* the front is gone: finish what is in flight, then stop */
        return 0;
    }
    uint32_t type, len;
    const uint8_t *p;
    int k;
    while ((k = chan_next(&j->rd, &type, &p, &len)) == 1) {
        if (type == CHAN_END) {
            j->ended = 1;
            return 0;
        }
        if (type != CHAN_MB) continue;
        if (chan_mb_unpack(p, len, mb)) {
            fprintf(stderr, "modpipe serve: job: a malformed micro-batch from the front\n");
            j->ended = 1;
            return 0;
        }
        /* releases or prefix shares alone: pages back now, or the rows come next */
        if (mb->n > 0 || mb->n_release > 0 || mb->n_share > 0) {
            j->more = 1;
            return 1;
        }
    }
    j->more = 0;
    if (k < 0) j->ended = 1;
    return 0;
}

/* Frames left from the last read, or new bytes on the socket: the front's answer to a
 * RESULT comes within microseconds, and the loop should not wait a millisecond for it. */
static int job_ready(void *self)
{
    job *j = self;
    if (j->ended) return 0;
    if (j->more) return 1;
    struct pollfd pf = {.fd = j->fd, .events = POLLIN};
    return poll(&pf, 1, 0) > 0;
}

static void job_done(void *self, const stage_batch *mb, const int32_t *tok)
{
    job *j = self;
    int32_t n = mb->n;
    for (int i = 0; i < mb->n && i < j->max_rows; i++)
        j->tok[i] = (mb->flags[i] & STAGE_ROW_SAMPLE) ? tok[i] : -1;
    send_or_end(j, CHAN_RESULT, &n, sizeof n, j->tok, (size_t)n * sizeof *j->tok);
}

static int job_finished(void *self) { return ((job *)self)->ended; }

static void job_wait(void *self, double timeout_s)
{
    job *j = self;
    beat(j);
    if (j->ended) return;
    struct pollfd pf = {.fd = j->fd, .events = POLLIN};
    int ms = (int)(timeout_s * 1000);
    if (ms > (int)(BEAT_S * 1000)) ms = (int)(BEAT_S * 1000);
    poll(&pf, 1, ms);
}

static void job_links(void *self, const engine_link_bytes *l, int n)
{
    job *j = self;
    int32_t k = n;
    send_or_end(j, CHAN_LINKS, &k, sizeof k, l, (size_t)n * sizeof *l);
}

static void job_kv(void *self, const engine_kv_report *k, int n)
{
    job *j = self;
    int32_t m = n;
    send_or_end(j, CHAN_KV, &m, sizeof m, k, (size_t)n * sizeof *k);
}

static void job_progress(void *self, const engine_stage_progress *p, int n)
{
    job *j = self;
    int32_t m = n;
    send_or_end(j, CHAN_PROGRESS, &m, sizeof m, p, (size_t)n * sizeof *p);
}

static const engine_sched_ops job_ops = {
    .next = job_next,
    .done = job_done,
    .finished = job_finished,
    .wait = job_wait,
    .ready = job_ready,
    .links = job_links,
    .kv = job_kv,
    .progress = job_progress,
};

/* This rank's host as the front matches it against its hostfile (serve_hosts_find):
 * "HOSTNAME ADDR ADDR ..." (the addresses of its interfaces but loopback), cut at n bytes. */
static void host_ident(char *out, size_t n)
{
    char name[128] = "?";
    if (gethostname(name, sizeof name - 1)) snprintf(name, sizeof name, "?");
    size_t used = (size_t)snprintf(out, n, "%s", name);
    struct ifaddrs *ifs = NULL;
    if (getifaddrs(&ifs)) return;
    for (const struct ifaddrs *i = ifs; i && used < n; i = i->ifa_next) {
        if (!i->ifa_addr) continue;
        char a[INET6_ADDRSTRLEN] = "";
        int fam = i->ifa_addr->sa_family;
        if (fam == AF_INET)
            inet_ntop(fam, &((const struct sockaddr_in *)i->ifa_addr)->sin_addr, a, sizeof a);
        else if (fam == AF_INET6)
            inet_ntop(fam, &((const struct sockaddr_in6 *)i->ifa_addr)->sin6_addr, a, sizeof a);
        if (!a[0] || !strcmp(a, "127.0.0.1") || !strcmp(a, "::1")) continue;
        if (used + strlen(a) + 2 > n) break; /* whole addresses only */
        used += (size_t)snprintf(out + used, n - used, " %s", a);
    }
    freeifaddrs(ifs);
}

static void on_ready(void *arg)
{
    job *j = arg;
    send_or_end(j, CHAN_READY, NULL, 0, NULL, 0);
}

int serve_loop_run_job(MPI_Comm comm, const serve_loop_opts *o, int fd, char *err, size_t errlen)
{
    int rank;
    MPI_Comm_rank(comm, &rank);
    job j;
    memset(&j, 0, sizeof j);
    j.fd = fd;
    int whole;
    j.max_rows = serve_loop_rows(o, &whole);
    const char *bad = NULL;
    if (rank == 0) {
        j.tok = malloc((size_t)j.max_rows * sizeof *j.tok);
        if (fd < 0)
            bad = "rank 0 needs the channel to the front";
        else if (!j.tok)
            bad = "out of memory";
    }
    /* every rank's host, for the front to name a stuck one (collective: before the loop) */
    int size;
    MPI_Comm_size(comm, &size);
    char me[CHAN_RANK_ID];
    memset(me, 0, sizeof me);
    host_ident(me, sizeof me - 1);
    char *all = rank == 0 ? calloc((size_t)size, CHAN_RANK_ID) : NULL;
    int have = rank != 0 || all, every = 0;
    MPI_Allreduce(&have, &every, 1, MPI_INT, MPI_MIN, comm);
    if (every) /* rank 0 out of memory: the front names no host, nothing else changes */
        MPI_Gather(me, CHAN_RANK_ID, MPI_CHAR, all, CHAN_RANK_ID, MPI_CHAR, 0, comm);
    if (rank == 0 && every && fd >= 0) {
        int32_t n = size;
        send_or_end(&j, CHAN_RANKS, &n, sizeof n, all, (size_t)size * CHAN_RANK_ID);
    }
    free(all);
    int rc = serve_loop_run_ops(comm, o, bad, &job_ops, &j, on_ready, &j, err, errlen);
    if (rc && rank == 0 && fd >= 0) chan_send(fd, CHAN_ERROR, err, strlen(err), NULL, 0);
    free(j.tok);
    chan_reader_free(&j.rd);
    return rc;
}
