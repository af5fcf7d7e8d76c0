/* serve/front.c — the front's relay and job supervisor (contract in front.h). */
#include "base/clock.h"
#include "serve/front.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "serve/chan.h"
#include "serve/queue_sched.h"

#define HEALTHY_S 60.0 /* a job that ran this long resets the count of restarts in a row */
/* With --spare-hosts a dying job gets this long to say where it failed (mpirun's report of a
 * killed rank can come seconds after rank 0 is gone); the wait ends once a host is named. */
#define HOSTS_GRACE_S 5.0

typedef struct {
    const serve_front_opts *o;
    srvq *q;
    serve_server *srv;
    char dir[40], path[96]; /* the socket's directory (ours, 0700) and path */
    char hostfile[112];     /* the job's hostfile in dir (with o->hosts) */
    char *const *argv;      /* the job's command line (o->job_cmd's) */
    int efd;                /* the job's stderr, relayed to ours; -1: none */
    char eline[1024];       /* its line being read */
    size_t elen;
    char blame[256];      /* the host mpirun's messages name as failed; "": none */
    char blame_line[200]; /* the line that named it, for the log */
    int blame_off;        /* we are ending the job: what it says now is our doing, not a host's */
    int lfd;              /* listening socket */
    int wake[2];          /* srvq_set_notify writes here */
    pid_t pid;            /* the job (mpirun, its own process group); 0: none */
    int status;           /* its wait status once reaped */
    int fd;               /* the channel, -1: none */
    chan_reader rd;
    stage_batch *fl; /* [max_in_flight] micro-batches in flight, oldest at fl_head */
    int fl_head, fl_n;
    uint8_t *pack; /* [chan_mb_size(max_rows, STAGE_MAX_RELEASE, STAGE_MAX_SHARE)] */
    int32_t *tok;  /* [max_rows] a RESULT's tokens, aligned */
    engine_link_bytes links[SRVQ_MAX_LINKS];
    engine_kv_report kv[SRVQ_MAX_LINKS];
    double t_fail; /* when the last failure was detected, until the first new token after it */
    int stalled;   /* the last failure was a stall (no frame / no result for stall_s) */
    /* the job's ranks (RANKS: "HOSTNAME ADDR ...") and its stages' progress (PROGRESS) */
    char rank_id[SRVQ_MAX_LINKS][CHAN_RANK_ID];
    int n_ranks;
    engine_stage_progress prog[SRVQ_MAX_LINKS];
    int n_prog;
} front;

static void wake_fn(void *arg)
{
    front *f = arg;
    char b = 1;
    if (write(f->wake[1], &b, 1) < 0) {} /* full: a wake-up is pending anyway */
}

static void say(const front *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(const front *f, const char *fmt, ...)
{
    if (f->o->quiet) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "modpipe serve: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

/* 1 when the job has exited (reaped, status in f->status). */
static int job_exited(front *f)
{
    if (!f->pid) return 1;
    pid_t r = waitpid(f->pid, &f->status, WNOHANG);
    if (r == f->pid || (r < 0 && errno == ECHILD)) {
        f->pid = 0;
        return 1;
    }
    return 0;
}

static void describe_exit(int status, char *buf, size_t n)
{
    if (WIFEXITED(status))
        snprintf(buf, n, "exit code %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, n, "killed by signal %d", WTERMSIG(status));
    else
        snprintf(buf, n, "status %d", status);
}

/* Relay what the job wrote to its stderr; note the first host a message blames. */
static void pump_err(front *f)
{
    char b[4096];
    ssize_t k;
    while (f->efd >= 0 && (k = read(f->efd, b, sizeof b)) != 0) {
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            break;
        }
        if (fwrite(b, 1, (size_t)k, stderr) != (size_t)k) {} /* our stderr is gone: go on */
        for (ssize_t i = 0; i < k; i++) {
            if (b[i] != '\n' && f->elen < sizeof f->eline - 1) {
                f->eline[f->elen++] = b[i];
                continue;
            }
            f->eline[f->elen] = 0;
            if (!f->blame[0] && !f->blame_off &&
                serve_hosts_blame(f->eline, f->blame, sizeof f->blame)) {
                const char *l = f->eline;
                while (*l == ' ') l++;
                snprintf(f->blame_line, sizeof f->blame_line, "%.*s", (int)sizeof f->blame_line - 1,
                         l);
            }
            f->elen = 0;
        }
    }
    close(f->efd); /* end of file: every writer is gone */
    f->efd = -1;
}

/* Wait up to ms for the job's stderr, relaying it. */
static void wait_err(front *f, int ms)
{
    if (f->efd < 0) {
        usleep((useconds_t)ms * 1000);
        return;
    }
    struct pollfd pf = {.fd = f->efd, .events = POLLIN};
    if (poll(&pf, 1, ms) > 0) pump_err(f);
}

/* End the job: a job whose rank died is being torn down by mpirun already, give it `grace`
 * seconds; then SIGTERM to its process group, SIGKILL after 2 s (a stopped rank too). */
static void kill_job(front *f, double grace)
{
    if (f->fd >= 0) {
        close(f->fd);
        f->fd = -1;
    }
    double t0 = base_now_s();
    while (f->pid && !job_exited(f) && base_now_s() - t0 < grace && !(f->o->hosts && f->blame[0]))
        wait_err(f, 20);
    if (f->pid) {
        pid_t pg = f->pid;
        f->blame_off = 1;
        kill(pg, SIGTERM);
        t0 = base_now_s();
        while (!job_exited(f) && base_now_s() - t0 < 2.0) wait_err(f, 20);
        if (f->pid) {
            kill(-pg, SIGKILL);
            waitpid(f->pid, &f->status, 0);
            f->pid = 0;
        }
        kill(-pg, SIGKILL); /* ranks mpirun left behind, if any */
    }
    /* mpirun's last words (which rank failed where) come as it exits */
    t0 = base_now_s();
    while (f->efd >= 0 && base_now_s() - t0 < 0.5) wait_err(f, 20);
    if (f->efd >= 0) close(f->efd);
    f->efd = -1;
    f->elen = 0;
}

static int spawn(front *f, char *err, size_t errlen)
{
    int n = 0;
    while (f->argv[n]) n++;
    char **argv = calloc((size_t)n + 2, sizeof *argv);
    if (!argv) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (int i = 0; i < n; i++) argv[i] = f->argv[i];
    argv[n] = f->path;
    int ep[2];
    if (pipe2(ep, O_CLOEXEC)) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        free(argv);
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(err, errlen, "fork: %s", strerror(errno));
        free(argv);
        close(ep[0]);
        close(ep[1]);
        return -1;
    }
    if (pid == 0) {
        dup2(ep[1], 2); /* dup2 clears close-on-exec */
        /* its own process group: a terminal's ^C reaches the front only, which drains */
        setpgid(0, 0);
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        sigset_t all;
        sigemptyset(&all);
        sigprocmask(SIG_SETMASK, &all, NULL);
        execvp(argv[0], argv);
        fprintf(stderr, "modpipe serve: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    setpgid(pid, pid);
    free(argv);
    close(ep[1]);
    fcntl(ep[0], F_SETFL, O_NONBLOCK);
    f->efd = ep[0];
    f->elen = 0;
    f->blame[0] = 0;
    f->blame_off = 0;
    f->pid = pid;
    return 0;
}

/* A frame {n, entry[n]} of `each`-byte entries (LINKS, KV, PROGRESS, RANKS) into out (room
 * for SRVQ_MAX_LINKS): n, or -1 when the payload is not one (the frame is then ignored). */
static int frame_table(const uint8_t *p, uint32_t len, size_t each, void *out)
{
    int32_t n;
    if (len < sizeof n) return -1;
    memcpy(&n, p, sizeof n);
    if (n < 0 || n > SRVQ_MAX_LINKS || len != sizeof n + (size_t)n * each) return -1;
    memcpy(out, p + sizeof n, (size_t)n * each);
    return n;
}

/* Start the job and wait for its HELLO and READY. 0, or -1 with err. */
static int start_job(front *f, char *err, size_t errlen)
{
    chan_reader_free(&f->rd);
    f->n_ranks = f->n_prog = 0;
    if (spawn(f, err, errlen)) return -1;
    double t0 = base_now_s();
    int hello = 0;
    for (;;) {
        if (base_now_s() - t0 > f->o->start_timeout_s) {
            snprintf(err, errlen, "the job was not ready after %.0f s", f->o->start_timeout_s);
            return -1;
        }
        if (job_exited(f)) {
            char st[64];
            describe_exit(f->status, st, sizeof st);
            snprintf(err, errlen, "the job ended while starting (%s)", st);
            return -1;
        }
        struct pollfd pf[2] = {{.fd = f->fd >= 0 ? f->fd : f->lfd, .events = POLLIN},
                               {.fd = f->efd, .events = POLLIN}};
        if (poll(pf, 2, 100) <= 0) continue;
        if (pf[1].revents) pump_err(f);
        if (!pf[0].revents) continue;
        if (f->fd < 0) {
            f->fd = accept4(f->lfd, NULL, NULL, SOCK_CLOEXEC);
            continue;
        }
        if (chan_read(&f->rd, f->fd)) {
            snprintf(err, errlen, "the job's rank 0 closed the channel while starting");
            return -1;
        }
        uint32_t type, len;
        const uint8_t *p;
        int k;
        while ((k = chan_next(&f->rd, &type, &p, &len)) == 1) {
            if (type == CHAN_ERROR) {
                snprintf(err, errlen, "%.*s", (int)len, (const char *)p);
                return -1;
            }
            if (type == CHAN_HELLO && len == sizeof(chan_hello)) {
                chan_hello h;
                memcpy(&h, p, sizeof h);
                if (h.slots != f->o->slots || h.ctx != f->o->ctx) {
                    snprintf(err, errlen, "the job has %d slots x %d positions, the front %d x %d",
                             h.slots, h.ctx, f->o->slots, f->o->ctx);
                    return -1;
                }
                hello = 1;
            }
            if (type == CHAN_RANKS) {
                int n = frame_table(p, len, CHAN_RANK_ID, f->rank_id);
                for (int i = 0; i < n; i++) f->rank_id[i][CHAN_RANK_ID - 1] = 0;
                f->n_ranks = n > 0 ? n : 0;
            }
            if (type == CHAN_READY && hello) return 0;
        }
        if (k < 0) {
            snprintf(err, errlen, "a malformed frame from the job");
            return -1;
        }
    }
}

/* Frames from the job: results complete micro-batches in issue order. 0, or -1 with err. */
static int take_frames(front *f, double *last_rx, double *last_res, char *err, size_t errlen)
{
    if (chan_read(&f->rd, f->fd)) {
        snprintf(err, errlen, "the job's rank 0 closed the channel");
        return -1;
    }
    uint32_t type, len;
    const uint8_t *p;
    int k;
    while ((k = chan_next(&f->rd, &type, &p, &len)) == 1) {
        *last_rx = base_now_s();
        if (type == CHAN_RESULT) {
            int32_t n = -1;
            if (len >= sizeof n) memcpy(&n, p, sizeof n);
            stage_batch *mb = &f->fl[f->fl_head];
            if (f->fl_n == 0 || n != mb->n || len != sizeof n + (size_t)n * sizeof(int32_t)) {
                snprintf(err, errlen, "a result from the job that matches no micro-batch");
                return -1;
            }
            memcpy(f->tok, p + sizeof n, (size_t)n * sizeof(int32_t));
            for (int i = 0; f->t_fail > 0 && i < n; i++)
                if (f->tok[i] >= 0) {
                    say(f, "the first new token came %.2f s after the failure was detected",
                        *last_rx - f->t_fail);
                    f->t_fail = 0;
                }
            f->fl_head = (f->fl_head + 1) % f->o->max_in_flight;
            f->fl_n--;
            *last_res = *last_rx;
            srvq_sched_ops.done(f->q, mb, f->tok);
        } else if (type == CHAN_LINKS) {
            int n = frame_table(p, len, sizeof(engine_link_bytes), f->links);
            if (n >= 0) srvq_sched_ops.links(f->q, f->links, n);
        } else if (type == CHAN_KV) {
            int n = frame_table(p, len, sizeof(engine_kv_report), f->kv);
            if (n >= 0) srvq_sched_ops.kv(f->q, f->kv, n);
        } else if (type == CHAN_PROGRESS) {
            int n = frame_table(p, len, sizeof(engine_stage_progress), f->prog);
            if (n >= 0) f->n_prog = n;
        } else if (type == CHAN_ERROR) {
            snprintf(err, errlen, "%.*s", (int)(len < 400 ? len : 400), (const char *)p);
            return -1;
        }
    }
    if (k < 0) {
        snprintf(err, errlen, "a malformed frame from the job");
        return -1;
    }
    return 0;
}

/* The host index (serve_hosts) of the job's rank r: -1 when unknown. A rank on rank 0's
 * machine is the first host's, however the hostfile spells it. */
static int host_of_rank(const front *f, int r)
{
    if (!f->o->hosts || r < 0 || r >= f->n_ranks) return -1;
    size_t k0 = strcspn(f->rank_id[0], " "), k = strcspn(f->rank_id[r], " ");
    if (r == 0 || (k == k0 && !strncmp(f->rank_id[0], f->rank_id[r], k))) return 0;
    return serve_hosts_find(f->o->hosts, f->rank_id[r]);
}

/* A stall: which rank holds the job up. Rank 0 silent (no frame at all: it beats while its
 * loop runs and reports while it waits), else the first stage that has not finished the
 * oldest micro-batch in flight (engine_stuck_stage on its last PROGRESS). The line goes to
 * err; with --spare-hosts the rank's host (never the first) is blamed like a dead one's. */
static void stall_blame(front *f, double quiet, double slow, char *err, size_t errlen)
{
    f->stalled = 1;
    int stage = -1, rank = -1;
    char what[160] = "";
    if (quiet > f->o->stall_s) {
        stage = rank = 0;
        snprintf(what, sizeof what, "rank 0 sent nothing for %.1f s", quiet);
    } else if ((stage = engine_stuck_stage(f->prog, f->n_prog)) >= 0) {
        const engine_stage_progress *p = &f->prog[stage];
        rank = p->rank;
        snprintf(what, sizeof what,
                 "stage %d (rank %d) has not finished micro-batch %llu, last heard %.1f s ago",
                 stage, rank, (unsigned long long)(p->mb_want - 1), p->age_s);
    } else {
        snprintf(what, sizeof what, "no stage named: every one reported the oldest done");
    }
    char host[64] = "";
    int h = host_of_rank(f, rank);
    if (h >= 0)
        snprintf(host, sizeof host, "%.63s", f->o->hosts->h[h].name);
    else if (rank >= 0 && rank < f->n_ranks)
        snprintf(host, sizeof host, "%.*s", (int)strcspn(f->rank_id[rank], " "), f->rank_id[rank]);
    snprintf(err, errlen, "the job stalled: no %s for %.1f s (%d micro-batch%s in flight); %s%s%s",
             quiet > f->o->stall_s ? "frame" : "result", quiet > slow ? quiet : slow, f->fl_n,
             f->fl_n == 1 ? "" : "es", what, host[0] ? " on host " : "", host);
    srvq_note_stall(f->q, stage, rank, host);
    if (h > 0) {
        snprintf(f->blame, sizeof f->blame, "%s", f->o->hosts->h[h].name);
        snprintf(f->blame_line, sizeof f->blame_line, "rank %d stalled for %.1f s", rank,
                 f->o->stall_s);
        f->blame_off = 1; /* what mpirun says as we end the job is our doing */
    }
}

/* Relay until the queue is drained (1) or the job fails (-1, err). */
static int relay(front *f, char *err, size_t errlen)
{
    const int K = f->o->max_in_flight;
    /* Two clocks: any frame (rank 0 beats while its loop runs), and results: rank 0 keeps
     * beating while it waits for a stopped rank, so work in flight must come back. */
    double last_rx = base_now_s(), last_res = last_rx;
    for (;;) {
        while (f->fl_n < K) {
            stage_batch *mb = &f->fl[(f->fl_head + f->fl_n) % K];
            mb->n = 0;
            mb->n_release = 0;
            mb->n_share = 0;
            if (!srvq_sched_ops.next(f->q, mb)) break;
            size_t n = chan_mb_pack(mb, f->pack);
            if (chan_send(f->fd, CHAN_MB, f->pack, n, NULL, 0)) {
                snprintf(err, errlen, "the channel to the job broke");
                return -1;
            }
            if (f->fl_n == 0) last_res = base_now_s(); /* the result clock runs from here */
            f->fl_n++;
        }
        if (f->fl_n == 0 && srvq_sched_ops.finished(f->q)) return 1;
        struct pollfd pf[3] = {{.fd = f->fd, .events = POLLIN},
                               {.fd = f->wake[0], .events = POLLIN},
                               {.fd = f->efd, .events = POLLIN}};
        poll(pf, 3, 50);
        if (pf[2].revents) pump_err(f);
        if (pf[1].revents & POLLIN) {
            char b[64];
            while (read(f->wake[0], b, sizeof b) > 0) {}
        }
        if (pf[0].revents && take_frames(f, &last_rx, &last_res, err, errlen)) return -1;
        if (job_exited(f)) {
            char st[64];
            describe_exit(f->status, st, sizeof st);
            snprintf(err, errlen, "the job ended (%s)", st);
            return -1;
        }
        double t = base_now_s(), quiet = t - last_rx, slow = f->fl_n > 0 ? t - last_res : 0;
        if (quiet > f->o->stall_s || slow > f->o->stall_s) {
            stall_blame(f, quiet, slow, err, errlen);
            return -1;
        }
    }
}

/* The next job's command line: on the hosts left (with o->hosts), re-partitioned for the rank
 * count they hold. 0, or -1 with err. */
static int plan_job(front *f, char *err, size_t errlen)
{
    const serve_front_opts *o = f->o;
    int ranks = o->ranks, stages = 0;
    char names[512] = "";
    if (o->hosts && serve_hosts_write(o->hosts, o->ranks, f->hostfile, &ranks, names, sizeof names,
                                      err, errlen))
        return -1;
    if (o->job_cmd(o->job_arg, ranks, o->hosts ? f->hostfile : NULL, &f->argv, &stages, err,
                   errlen))
        return -1;
    srvq_sched_groups(f->q, o->decode_groups ? o->decode_groups : stages);
    if (o->hosts)
        say(f, "the job: %d rank%s, %d stage%s on %s", ranks, ranks == 1 ? "" : "s", stages,
            stages == 1 ? "" : "s", names);
    return 0;
}

static int setup(front *f, char *err, size_t errlen)
{
    const serve_front_opts *o = f->o;
    snprintf(f->dir, sizeof f->dir, "/tmp/modpipe-front-XXXXXX");
    if (!mkdtemp(f->dir)) {
        snprintf(err, errlen, "mkdtemp: %s", strerror(errno));
        f->dir[0] = 0;
        return -1;
    }
    snprintf(f->path, sizeof f->path, "%s/chan", f->dir);
    snprintf(f->hostfile, sizeof f->hostfile, "%s/hosts", f->dir);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", f->path);
    f->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (f->lfd < 0 || bind(f->lfd, (struct sockaddr *)&a, sizeof a) || listen(f->lfd, 4)) {
        snprintf(err, errlen, "the job's socket %s: %s", f->path, strerror(errno));
        return -1;
    }
    if (pipe2(f->wake, O_NONBLOCK | O_CLOEXEC)) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        return -1;
    }
    f->fl = calloc((size_t)o->max_in_flight, sizeof *f->fl);
    f->pack = malloc(chan_mb_size(o->max_rows, STAGE_MAX_RELEASE, STAGE_MAX_SHARE));
    f->tok = malloc((size_t)o->max_rows * sizeof *f->tok);
    int ok = f->fl && f->pack && f->tok &&
             !srvq_sched_config(f->q, o->micro_batch, o->whole_prompts, o->max_rows);
    for (int i = 0; ok && i < o->max_in_flight; i++) ok = !stage_batch_init(&f->fl[i], o->max_rows);
    if (!ok) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    srvq_set_notify(f->q, wake_fn, f);
    return plan_job(f, err, errlen);
}

static void teardown(front *f)
{
    srvq_set_notify(f->q, NULL, NULL);
    kill_job(f, 0);
    chan_reader_free(&f->rd);
    for (int i = 0; f->fl && i < f->o->max_in_flight; i++) stage_batch_free(&f->fl[i]);
    free(f->fl);
    free(f->pack);
    free(f->tok);
    if (f->lfd >= 0) close(f->lfd);
    for (int i = 0; i < 2; i++)
        if (f->wake[i] >= 0) close(f->wake[i]);
    if (f->path[0]) unlink(f->path);
    if (f->hostfile[0]) unlink(f->hostfile);
    if (f->dir[0]) rmdir(f->dir);
}

int serve_front_run(const serve_front_opts *o, srvq *q, serve_server *srv, char *err, size_t errlen)
{
    front f;
    memset(&f, 0, sizeof f);
    f.o = o;
    f.q = q;
    f.srv = srv;
    f.lfd = f.fd = f.wake[0] = f.wake[1] = f.efd = -1;
    int rc = setup(&f, err, errlen);
    int failures = 0, ever = 0;
    char why[512] = "";
    while (!rc) {
        double t_fail = base_now_s();
        if (start_job(&f, why, sizeof why) == 0) {
            double t_up = base_now_s();
            if (!ever)
                serve_server_set_ready(srv);
            else {
                srvq_stats st;
                srvq_get_stats(q, &st);
                say(&f, "the job is back after %.1f s; %llu request(s) replayed so far",
                    t_up - t_fail, (unsigned long long)st.replayed_requests);
                serve_server_set_recovering(srv, 0);
            }
            ever = 1;
            int r = relay(&f, why, sizeof why);
            if (r == 1) {
                /* drained: END, and the job exits on its own */
                chan_send(f.fd, CHAN_END, NULL, 0, NULL, 0);
                double t0 = base_now_s();
                while (!job_exited(&f) && base_now_s() - t0 < 30.0) usleep(20000);
                break;
            }
            if (base_now_s() - t_up > HEALTHY_S) failures = 0;
        } else if (!ever) {
            snprintf(err, errlen, "the job failed to start: %s", why);
            rc = -1;
            break;
        }
        f.t_fail = base_now_s();
        kill_job(&f, f.stalled ? 0.0 : o->hosts ? HOSTS_GRACE_S : 1.0);
        f.stalled = 0;
        f.fl_head = f.fl_n = 0;
        if (++failures > o->max_restarts) {
            snprintf(err, errlen, "the job failed %d time%s in a row (--max-restarts %d): %s",
                     failures, failures == 1 ? "" : "s", o->max_restarts, why);
            rc = -1;
            break;
        }
        double wait = 0.5;
        for (int i = 1; i < failures && wait < 5.0; i++) wait *= 2;
        if (wait > 5.0) wait = 5.0;
        say(&f, "the job failed: %s; restart %d of at most %d in %.1f s", why, failures,
            o->max_restarts, wait);
        int dead = o->hosts && f.blame[0] ? serve_hosts_mark_dead(o->hosts, f.blame) : -1;
        if (dead >= 0) {
            say(&f, "host %s is counted dead (\"%s\")", f.blame, f.blame_line);
            char perr[512];
            if (plan_job(&f, perr, sizeof perr)) {
                snprintf(err, errlen, "no job without host %s: %s", f.blame, perr);
                rc = -1;
                break;
            }
        }
        serve_server_set_recovering(srv, 1);
        srvq_rewind(q);
        usleep((useconds_t)(wait * 1e6));
    }
    if (rc) srvq_fail_all(q, err);
    teardown(&f);
    return rc;
}
