/* serve/job.c — the job side of the front: rank 0's scheduler relays micro-batches from the
 * front and sampled tokens back (serve/loop.h serve_loop_run_job, frames in serve/chan.h).
 *
 * The front decides everything (admission, chunking, sampling state, slot releases); this
 * scheduler only unpacks what arrives and answers in issue order, so a restarted job is
 * stateless: the front's queue replays what the dead one had. BEAT frames go out at least
 * every BEAT_S seconds while the loop calls us (between micro-batches and while idle), so a
 * stuck rank shows as silence at the front.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/clock.h"
#include "serve/chan.h"
#include "serve/loop.h"

#define BEAT_S 0.25

typedef struct {
    int fd;
    chan_reader rd;
    int ended; /* END received, or the front is gone */
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
        if (mb->n > 0 || mb->n_release > 0 || mb->n_share > 0) return 1;
    }
    if (k < 0) j->ended = 1;
    return 0;
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

static const engine_sched_ops job_ops = {
    .next = job_next,
    .done = job_done,
    .finished = job_finished,
    .wait = job_wait,
    .links = job_links,
    .kv = job_kv,
};

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
    int rc = serve_loop_run_ops(comm, o, bad, &job_ops, &j, on_ready, &j, err, errlen);
    if (rc && rank == 0 && fd >= 0) chan_send(fd, CHAN_ERROR, err, strlen(err), NULL, 0);
    free(j.tok);
    chan_reader_free(&j.rd);
    return rc;
}
